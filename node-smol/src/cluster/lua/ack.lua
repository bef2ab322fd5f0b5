-- Ack attributed by a node: clears 0x10/0x20 only if the generation is the pending one, 0x11
-- clears exactly its bits; nothing unless that node owns the record at the epoch it gives.
-- KEYS[1] record. ARGV: node, epoch, kind (n|b|p), gen, bh, bl, at ms.
-- Reply: {'stale', record...} or {'acked', '0'|'1', record...}.
local key = KEYS[1]
local node, epoch, kind, gen = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local ah, al, at = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('EXISTS', key) == 0 then
  return out(load(key), {'stale'})
end
local r = load(key)
if r.o ~= node or r.e ~= epoch then
  return out(r, {'stale'})
end
local cleared = false
if kind == 'n' then
  if r.n == gen then r.n = nil; cleared = true end
elseif kind == 'p' then
  if r.pg ~= nil and r.pg == gen then r.pg = nil; r.p = nil; cleared = true end
else
  if bit.band(r.bh, ah) ~= 0 or bit.band(r.bl, al) ~= 0 then
    r.bh = u32(bit.band(r.bh, bit.bnot(ah)))
    r.bl = u32(bit.band(r.bl, bit.bnot(al)))
    cleared = true
  end
end
if cleared then
  bump(r, at)
  save(key, r)
end
return out(r, {'acked', cleared and '1' or '0'})
