-- release: hand claimed-but-unsent jobs back to the front of the ready lane (shutdown).
-- KEYS[1] ready list   KEYS[2] processing:<instance>   KEYS[3] leases   KEYS[4] events
-- ARGV[1] job key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN   ARGV[4..] job ids
-- The attempt that never reached the server is not counted. An id still 'queued' (moved
-- by a BLMOVE whose claim never ran) is returned as is. Returns jobs released.
local prefix, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  local removed = redis.call('LREM', KEYS[2], 1, id)
  if removed > 0 then redis.call('ZREM', KEYS[3], id) end  -- else the lease is not ours
  local rec = redis.call('HMGET', key, 'state', 'attempts')
  if removed > 0 and (rec[1] == 'processing' or rec[1] == 'queued') then
    local attempt = tonumber(rec[2])
    if rec[1] == 'processing' then attempt = math.max(0, attempt - 1) end
    redis.call('HSET', key, 'state', 'queued', 'attempts', attempt, 'updated_at', now)
    redis.call('HDEL', key, 'owner')
    redis.call('LPUSH', KEYS[1], id)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', 'type', 'queued', 'id', id,
      'at', now, 'attempt', attempt, 'state', 'queued')
    n = n + 1
  end
end
return n
