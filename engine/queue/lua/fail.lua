-- fail: a delivery attempt failed; schedule a retry or dead-letter the job.
-- KEYS[1] processing:<instance>  KEYS[2] leases  KEYS[3] delayed zset  KEYS[4] dead list
-- KEYS[5] events   KEYS[6] stats
-- ARGV[1] job key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN
-- ARGV[4] seconds to keep a failed record (0 = forever)   ARGV[5] shard key prefix
-- ARGV[6..] septuples: job id, 'retry' | 'dead', retry due time (ms), error text,
--           recipients still to try on retry ('' = all of them), bounce class ('' = none),
--           '1' when the failure says the address is dead (a hard bounce), '0' when not,
--           or the comma-separated addresses the server refused one by one as unknown
-- Returns the number of jobs moved.
-- A dead letter whose failure says the address is dead puts the attempt's recipient on
-- the tenant's suppression list (<shard>suppressed:<tenant> and its ':info' hash, see
-- enqueue.lua) with the error as reason and the job as source -- when the attempt had
-- exactly one recipient (the record's 'rcpts', else the message's): with several, the
-- failure does not say which of them the server refused as unknown, so none is added.
local prefix, now, maxlen, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local shard = ARGV[5]
local n, dead = 0, 0

local function suppress(key, id, tenant, err, bounce, which)
  local rcpts
  if which == '1' then
    rcpts = lib_recipients(key)
    if not rcpts or #rcpts ~= 1 then return end
  else
    rcpts = {}
    for r in string.gmatch(which, '[^,]+') do rcpts[#rcpts + 1] = r end
  end
  local set = shard .. 'suppressed:' .. (tenant or 'default')
  for _, rcpt in ipairs(rcpts) do
    local address = string.lower(rcpt)
    redis.call('SADD', set, address)
    redis.call('HSETNX', set .. ':info', address,
      cjson.encode({reason = err, source = id, bounce = bounce ~= '' and bounce or nil,
        at = tonumber(now)}))
  end
end

for i = 6, #ARGV, 7 do
  local id, outcome, due, err, rcpts, bounce, dead_address =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
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
      if dead_address ~= '0' and dead_address ~= '' then
        suppress(key, id, rec[3], err, bounce, dead_address)
      end
      dead = dead + 1
    end
    redis.call('HDEL', key, 'owner')
    n = n + 1
  end
end
if dead > 0 then redis.call('HINCRBY', KEYS[6], 'failed', dead) end
return n
