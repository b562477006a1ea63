-- webhook_claim: take up to ARGV[3] webhook deliveries due by ARGV[1] (ms since the
-- epoch), each pushed a lease ahead (ARGV[2] ms): a dispatcher that dies with them in
-- hand leaves them due again when the lease runs out (at least once).
-- KEYS[1] webhook:due zset   ARGV[4] delivery key prefix (a member is appended)
-- Returns a flat list: member, event JSON, attempts, first try (ms), per delivery taken
-- (a member whose record is gone is dropped from the set).
local now = tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, m in ipairs(members) do
  local d = redis.call('HMGET', ARGV[4] .. m, 'event', 'attempts', 'first_ms')
  if d[1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), m)
    out[#out + 1] = m
    out[#out + 1] = d[1]
    out[#out + 1] = d[2] or '0'
    out[#out + 1] = d[3] or ARGV[1]
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
