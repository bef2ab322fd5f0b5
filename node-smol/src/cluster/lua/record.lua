-- Shared prologue of every ddpushd script (prepended by the adapter, never loaded alone).
-- One hash per uuid holds the record of proto-core's cluster::store::StoredRecord:
--   v ver, o owner, e epoch, n 0x10 generation, bh/bl 0x11 mask (high/low 32 bits, since Lua
--   numbers are doubles and the bit library works on 32 bits), pg/p 0x20 generation and
--   payload, t0/t1/t2 newest push times (ms). A missing field is "none" (or 0 for v, e, bh, bl).
-- Versions and times are milliseconds (about 2^41 today): exact in a double until 2^53.
local FIELDS = {'v', 'o', 'e', 'n', 'bh', 'bl', 'pg', 'p', 't0', 't1', 't2'}

local function num(x)
  if x then return tonumber(x) end
  return nil
end

-- An integer as the decimal string Redis and the adapter expect (never "1e+12").
local function int(x)
  return string.format('%.0f', x)
end

-- A 32-bit result of the bit library as an unsigned number.
local function u32(x)
  return x % 4294967296
end

local function load(key)
  local h = redis.call('HMGET', key, unpack(FIELDS))
  return {
    v = num(h[1]) or 0, o = h[2] or nil, e = num(h[3]) or 0, n = num(h[4]),
    bh = num(h[5]) or 0, bl = num(h[6]) or 0, pg = num(h[7]), p = h[8] or nil,
    t = {num(h[9]), num(h[10]), num(h[11])},
  }
end

local function save(key, r)
  local set, del = {}, {}
  local function put(f, x)
    if x == nil then del[#del + 1] = f else set[#set + 1] = f; set[#set + 1] = x end
  end
  put('v', int(r.v)); put('o', r.o); put('e', int(r.e))
  put('n', r.n and int(r.n)); put('bh', int(r.bh)); put('bl', int(r.bl))
  put('pg', r.pg and int(r.pg)); put('p', r.p)
  for i = 1, 3 do put('t' .. (i - 1), r.t[i] and int(r.t[i])) end
  redis.call('HSET', key, unpack(set))
  if #del > 0 then redis.call('HDEL', key, unpack(del)) end
end

-- ver = max(ver + 1, at): a generation is never reused, even after a fail-over lost writes.
local function bump(r, at)
  r.v = math.max(r.v + 1, at)
end

-- The record as the reply's fixed 11 strings ("" for none), in FIELDS order.
local function out(r, reply)
  local function s(x) if x == nil then return '' end return x end
  reply[#reply + 1] = int(r.v)
  reply[#reply + 1] = s(r.o)
  reply[#reply + 1] = int(r.e)
  reply[#reply + 1] = s(r.n and int(r.n))
  reply[#reply + 1] = int(r.bh)
  reply[#reply + 1] = int(r.bl)
  reply[#reply + 1] = s(r.pg and int(r.pg))
  reply[#reply + 1] = s(r.p)
  for i = 1, 3 do reply[#reply + 1] = s(r.t[i] and int(r.t[i])) end
  return reply
end
