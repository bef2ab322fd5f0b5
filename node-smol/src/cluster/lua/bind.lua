-- Bind: owner = node, epoch + 1; creates the record; marks the uuid dirty for the previous
-- owner so that it drops its copy; removes the new owner's own mark (it has this version).
-- KEYS[1] record. ARGV: node, at ms, ttl ms, dirty-set prefix, uuid.
-- Reply: {'bound', record...}.
local key, node, at, ttl, dprefix, uuid = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local r = load(key)
local previous = r.o
r.o = node
r.e = r.e + 1
bump(r, at)
save(key, r)
redis.call('PEXPIRE', key, ttl)
if previous and previous ~= node then
  local d = dprefix .. previous
  redis.call('ZADD', d, r.v, uuid)
  redis.call('PEXPIRE', d, ttl)
end
redis.call('ZREM', dprefix .. node, uuid)
return out(r, {'bound'})
