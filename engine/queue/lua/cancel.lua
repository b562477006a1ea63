-- cancel: stop a message that has not started: queued, scheduled or waiting to retry.
-- KEYS[1] delayed zset   KEYS[2] events   KEYS[3] stats
-- ARGV[1] job key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN
-- ARGV[4] seconds to keep the cancelled record (0 = forever)   ARGV[5] job id
-- Returns {0, state} cancelled (or already was); {1, ''} no such job; {2, state} too late.
-- A queued job's id stays in its ready list: claim drops ids that are not 'queued'
-- (O(1) here instead of an LREM over a long list).
local prefix, now, maxlen, keep, id = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local key = prefix .. id
local rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags')
local state = rec[1]
if not state then return {1, ''} end
if state == 'cancelled' then return {0, state} end
if state ~= 'queued' and state ~= 'scheduled' and state ~= 'retrying' then return {2, state} end
redis.call('ZREM', KEYS[1], id)
redis.call('HSET', key, 'state', 'cancelled', 'updated_at', now)
redis.call('HDEL', key, 'next_attempt_at')
if keep > 0 then redis.call('EXPIRE', key, keep) end
lib_event(KEYS[2], maxlen, 'cancelled', id, now, rec[2], nil, rec[3], rec[4])
redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
return {0, 'cancelled'}
