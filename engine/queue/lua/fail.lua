-- fail: a delivery attempt failed; schedule a retry or dead-letter the job.
-- KEYS[1] processing:<instance>  KEYS[2] leases  KEYS[3] delayed zset  KEYS[4] dead list
-- KEYS[5] events   KEYS[6] stats
-- ARGV[1] job key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN
-- ARGV[4] seconds to keep a failed record (0 = forever)
-- ARGV[5..] sextuples: job id, 'retry' | 'dead', retry due time (ms), error text,
--           recipients still to try on retry ('' = all of them), bounce class ('' = none)
-- Returns the number of jobs moved.
local prefix, now, maxlen, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n, dead = 0, 0
for i = 5, #ARGV, 6 do
  local id, outcome, due, err, rcpts, bounce =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local key = prefix .. id
  local rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags')
  -- Act only on a job this instance still holds: after its lease lapsed the job may
  -- have been requeued and claimed elsewhere (leave that claim and lease alone).
  local removed = 0
  if rec[1] == 'processing' then removed = redis.call('LREM', KEYS[1], 1, id) end
  if removed > 0 then redis.call('ZREM', KEYS[2], id) end
  if removed > 0 and rec[1] == 'processing' then
    -- The class goes with last_error: one failure's error and class, never mixed.
    if bounce ~= '' then
      redis.call('HSET', key, 'bounce', bounce)
    else
      redis.call('HDEL', key, 'bounce')
    end
    if outcome == 'retry' then
      redis.call('HSET', key, 'state', 'retrying', 'updated_at', now, 'last_error', err,
        'next_attempt_at', due)
      if rcpts ~= '' then redis.call('HSET', key, 'rcpts', rcpts) end
      redis.call('ZADD', KEYS[3], due, id)
      lib_event(KEYS[5], maxlen, 'retrying', id, now, rec[2], err, rec[3], rec[4], bounce)
    else
      redis.call('HSET', key, 'state', 'failed', 'updated_at', now, 'last_error', err)
      redis.call('RPUSH', KEYS[4], id)
      if keep > 0 then redis.call('EXPIRE', key, keep) end
      lib_event(KEYS[5], maxlen, 'failed', id, now, rec[2], err, rec[3], rec[4], bounce)
      dead = dead + 1
    end
    redis.call('HDEL', key, 'owner')
    n = n + 1
  end
end
if dead > 0 then redis.call('HINCRBY', KEYS[6], 'failed', dead) end
return n
