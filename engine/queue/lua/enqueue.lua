-- enqueue: store new jobs and append them to the ready lane, all or nothing.
-- KEYS[1] ready list        KEYS[2] events stream     KEYS[3] stats hash
-- ARGV[1] job key prefix    ARGV[2] now (ms)          ARGV[3] events MAXLEN (approx.)
-- ARGV[4..] pairs: job id, msgpack message
-- Idempotent per id: a job whose record exists is skipped (a client retry after a lost
-- reply must not enqueue twice). Returns the number of jobs written.
local prefix, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
local ids = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local key = prefix .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'state', 'queued', 'attempts', 0, 'created_at', now,
      'updated_at', now, 'msg', ARGV[i + 1])
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*',
      'type', 'queued', 'id', id, 'at', now, 'attempt', 0, 'state', 'queued')
    ids[#ids + 1] = id
    if #ids == 1000 then
      redis.call('RPUSH', KEYS[1], unpack(ids))
      ids = {}
    end
  end
end
if #ids > 0 then
  redis.call('RPUSH', KEYS[1], unpack(ids))
end
local n = (#ARGV - 3) / 2
redis.call('HINCRBY', KEYS[3], 'enqueued', n)
return n
