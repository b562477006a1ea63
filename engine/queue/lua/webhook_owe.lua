-- webhook_owe: owe webhook deliveries and acknowledge the stream entries they came from,
-- atomically (a redo after a crash adds nothing: records and members only when absent).
-- KEYS[1] webhook:due zset   KEYS[2] the event stream
-- ARGV[1] delivery key prefix   ARGV[2] now (ms)   ARGV[3] consumer group
-- ARGV[4] n: entry ids to acknowledge, ARGV[5..4+n]; then pairs member, event JSON.
local prefix, now, n = ARGV[1], ARGV[2], tonumber(ARGV[4])
if n > 0 then
  redis.call('XACK', KEYS[2], ARGV[3], unpack(ARGV, 5, 4 + n))
end
local owed = 0
for i = 5 + n, #ARGV, 2 do
  local member = ARGV[i]
  if redis.call('HSETNX', prefix .. member, 'event', ARGV[i + 1]) == 1 then
    redis.call('HSET', prefix .. member, 'first_ms', now)
    redis.call('ZADD', KEYS[1], 'NX', now, member)
    owed = owed + 1
  end
end
return owed
