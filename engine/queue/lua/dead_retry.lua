-- dead_retry: move dead-lettered jobs back to the ready lane with fresh attempts.
-- KEYS[1] dead list   KEYS[2] events
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN   ARGV[4..] job ids
-- A job is retried only if it is in the dead list and its record still exists, and not
-- once its deadline (lib_deadline) has passed: it would go out late. That one stays a
-- dead letter (to delete, or to read why).
-- Returns {ids retried, {id, deadline (ms), ...} of those refused for their deadline}.
local shard, now, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local prefix = shard .. 'job:'
local out, late = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  local rec = redis.call('HMGET', key, 'state', 'tenant', 'tags', 'msg')
  local expires = rec[1] == 'failed' and lib_deadline(rec[4])
  if expires and now >= expires then
    if redis.call('LPOS', KEYS[1], id) then
      late[#late + 1] = id
      late[#late + 1] = expires
    end
  elseif redis.call('LREM', KEYS[1], 1, id) > 0 and rec[1] == 'failed' then
    redis.call('HSET', key, 'state', 'queued', 'attempts', 0, 'stalls', 0, 'updated_at', now)
    redis.call('HDEL', key, 'rcpts', 'next_attempt_at')
    redis.call('PERSIST', key)
    lib_requeue(shard, id, false)
    lib_event(KEYS[2], maxlen, 'queued', id, now, 0, nil, rec[2], rec[3])
    out[#out + 1] = id
  end
end
if #out > 0 then lib_wake(shard, math.ceil(#out / 16)) end
return {out, late}
