-- Drain one bucket of a node's dirty marks: first remove the marks listed as done whose
-- version is at most the one given, then return up to `limit` remaining marks (oldest
-- version first), each with its record.
-- KEYS[1] the node's dirty set in this bucket. ARGV: record-key prefix (same hash tag),
-- limit, then pairs of uuid, version merged.
-- Reply: {'drained', remaining count, then per mark: uuid, ver, record...}.
local dkey, rprefix, limit = KEYS[1], ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local s = redis.call('ZSCORE', dkey, ARGV[i])
  if s and tonumber(s) <= tonumber(ARGV[i + 1]) then
    redis.call('ZREM', dkey, ARGV[i])
  end
end
local reply = {'drained', tostring(redis.call('ZCARD', dkey))}
if limit > 0 then
  local m = redis.call('ZRANGE', dkey, 0, limit - 1, 'WITHSCORES')
  for i = 1, #m, 2 do
    reply[#reply + 1] = m[i]
    reply[#reply + 1] = int(tonumber(m[i + 1]))
    out(load(rprefix .. m[i]), reply)
  end
end
return reply
