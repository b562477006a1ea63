-- enqueue: store new jobs and append them to the ready lane, all or nothing.
-- KEYS[1] ready list        KEYS[2] events stream     KEYS[3] stats hash
-- ARGV[1] job key prefix    ARGV[2] now (ms)          ARGV[3] events MAXLEN (approx.)
-- ARGV[4..] pairs: job id, msgpack message
-- Idempotent per id: a job whose record exists is skipped (a client retry after a lost
-- reply must not enqueue twice). Returns the number of jobs written.
-- Events: one 'queued' entry per 100 jobs, listing them in its 'ids' field (comma-
-- separated) -- a stream entry per job cost 40 % of the enqueue time with AOF on.
local prefix, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
local ids, written = {}, 0
local function flush()
  redis.call('RPUSH', KEYS[1], unpack(ids))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*',
    'type', 'queued', 'ids', table.concat(ids, ','), 'at', now, 'attempt', 0, 'state', 'queued')
  ids = {}
end
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local key = prefix .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'state', 'queued', 'attempts', 0, 'created_at', now,
      'updated_at', now, 'msg', ARGV[i + 1])
    ids[#ids + 1] = id
    written = written + 1
    if #ids == 100 then flush() end
  end
end
if #ids > 0 then flush() end
if written > 0 then redis.call('HINCRBY', KEYS[3], 'enqueued', written) end
return written
