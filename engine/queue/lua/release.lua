-- release: hand claimed-but-unsent jobs back to the front of the ready lane (shutdown).
-- KEYS[1] processing:<instance>   KEYS[2] leases   KEYS[3] events
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN   ARGV[4..] job ids
-- The attempt that never reached the server is not counted. Returns jobs released.
local shard, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
local prefix = shard .. 'job:'
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  local removed = redis.call('LREM', KEYS[1], 1, id)
  if removed > 0 then redis.call('ZREM', KEYS[2], id) end  -- else the lease is not ours
  local rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags')
  if removed > 0 and rec[1] == 'processing' then
    local attempt = math.max(0, tonumber(rec[2]) - 1)
    redis.call('HSET', key, 'state', 'queued', 'attempts', attempt, 'updated_at', now)
    redis.call('HDEL', key, 'owner')
    lib_requeue(shard, id, true)
    lib_event(KEYS[3], maxlen, 'queued', id, now, attempt, nil, rec[3], rec[4])
    n = n + 1
  end
end
if n > 0 then lib_wake(shard, math.ceil(n / 16)) end
return n
