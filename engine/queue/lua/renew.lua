-- renew: heartbeat of one instance; extend the leases of the jobs it is working on.
-- KEYS[1] instances zset   KEYS[2] leases zset
-- ARGV[1] instance id   ARGV[2] heartbeat deadline (ms)   ARGV[3] lease deadline (ms)
-- ARGV[4..] ids the instance holds in memory (claimed, not yet acked or failed)
-- Only existing leases are extended (XX): a job reaped meanwhile stays reaped.
-- Returns leases renewed.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local n = 0
for i = 4, #ARGV do
  n = n + redis.call('ZADD', KEYS[2], 'XX', 'CH', ARGV[3], ARGV[i])
end
return n
