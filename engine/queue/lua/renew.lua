-- renew: heartbeat of one instance; extend the leases of the jobs it is working on.
-- KEYS[1] instances zset   KEYS[2] leases zset   KEYS[3] processing:<instance>
-- ARGV[1] instance id   ARGV[2] heartbeat deadline (ms)   ARGV[3] lease deadline (ms)
-- ARGV[4] job key prefix
-- ARGV[5..] ids the instance holds in memory (claimed, not yet acked or failed)
-- Ids in the processing list without a lease (left by a BLMOVE claim of a version
-- before lanes, cancelled mid-block) get one lease that is never renewed and this
-- instance as owner, so the reaper returns them to ready once it expires. Returns leases renewed.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local n = 0
for i = 5, #ARGV do
  n = n + redis.call('ZADD', KEYS[2], 'XX', 'CH', ARGV[3], ARGV[i])
end
local listed = redis.call('LRANGE', KEYS[3], 0, -1)
for _, id in ipairs(listed) do
  if redis.call('EXISTS', ARGV[4] .. id) == 0 then
    redis.call('LREM', KEYS[3], 0, id)  -- record expired or deleted: nothing to return
  elseif redis.call('ZADD', KEYS[2], 'NX', ARGV[3], id) == 1 then
    redis.call('HSETNX', ARGV[4] .. id, 'owner', ARGV[1])
  end
end
return n
