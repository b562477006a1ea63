-- webhook_owe: owe webhook deliveries, record attempts made straight from the stream, and
-- acknowledge the stream entries they came from, atomically (a redo after a crash adds
-- no delivery twice: records and members only when absent).
-- KEYS[1] webhook:due zset   KEYS[2] the event stream
-- ARGV[1] delivery key prefix   ARGV[2] now (ms)   ARGV[3] consumer group
-- ARGV[4] n: entry ids to acknowledge   ARGV[5] m: attempt lists   ARGV[6] attempts kept
-- then the n entry ids; then m times: list key, k, k attempts (newest last);
-- then pairs member, event JSON.
local prefix, now, n, m, kept = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local i = 7
if n > 0 then
  redis.call('XACK', KEYS[2], ARGV[3], unpack(ARGV, i, i + n - 1))
end
i = i + n
for _ = 1, m do
  local key, k = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('LPUSH', key, unpack(ARGV, i + 2, i + 1 + k))
  redis.call('LTRIM', key, 0, kept - 1)
  i = i + 2 + k
end
local owed = 0
for j = i, #ARGV, 2 do
  local member = ARGV[j]
  if redis.call('HSETNX', prefix .. member, 'event', ARGV[j + 1]) == 1 then
    redis.call('HSET', prefix .. member, 'first_ms', now)
    redis.call('ZADD', KEYS[1], 'NX', now, member)
    owed = owed + 1
  end
end
return owed
