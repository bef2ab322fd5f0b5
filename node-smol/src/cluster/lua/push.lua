-- Push: 0x10 sets the flag with a new generation, 0x11 ORs, 0x20 replaces with a new
-- generation; creates the record; marks the uuid dirty for its owner; the record expires
-- --pending-ttl after its newest push.
-- KEYS[1] record. ARGV: kind (n|b|p), at ms, ttl ms, dirty-set prefix (same hash tag as
-- KEYS[1]), uuid (the dirty-set member), then bh, bl for b, or the payload for p.
-- Reply: {'pushed', record...}.
local key, kind, at, ttl, dprefix, uuid = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local r = load(key)
local changes = true
if kind == 'b' then
  local nh = u32(bit.bor(r.bh, tonumber(ARGV[6])))
  local nl = u32(bit.bor(r.bl, tonumber(ARGV[7])))
  changes = not (nh == r.bh and nl == r.bl)
  r.bh, r.bl = nh, nl
end
if changes then bump(r, at) end
local idx
if kind == 'n' then
  r.n = r.v; idx = 1
elseif kind == 'b' then
  idx = 2
else
  r.pg = r.v; r.p = ARGV[6]; idx = 3
end
r.t[idx] = math.max(r.t[idx] or at, at)
save(key, r)
redis.call('PEXPIRE', key, ttl)
if changes and r.o then
  local d = dprefix .. r.o
  redis.call('ZADD', d, r.v, uuid)
  redis.call('PEXPIRE', d, ttl)
end
return out(r, {'pushed'})
