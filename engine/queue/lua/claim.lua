-- claim: mark jobs as processing by this instance and return their payloads.
-- KEYS[1] ready list   KEYS[2] processing:<instance>   KEYS[3] leases zset   KEYS[4] events
-- KEYS[5] instances zset (a claimer is alive: re-register it if a reaper dropped it, so
--         a later BLMOVE leftover in its list has an owner the reaper can find)
-- ARGV[1] job key prefix   ARGV[2] now (ms)   ARGV[3] lease deadline (ms)
-- ARGV[4] events MAXLEN    ARGV[5] instance id   ARGV[6] how many more to LMOVE from ready
-- ARGV[7..] ids already moved into processing by BLMOVE (blocking path)
-- Returns a flat array: id, msgpack message, attempt number, recipients override
-- ('' = all; else the comma-separated recipients still to try), ... per job claimed.
-- A moved id whose record is gone or already finished (sent/failed/cancelled) is
-- dropped from processing: redelivery of a finished job is skipped, never re-sent.
local prefix, now, deadline, maxlen, instance = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {}
redis.call('ZADD', KEYS[5], 'GT', deadline, instance)
local function mark(id)
  local key = prefix .. id
  local rec = redis.call('HMGET', key, 'state', 'attempts', 'msg', 'rcpts')
  local state = rec[1]
  if (not state) or state == 'sent' or state == 'failed' or state == 'cancelled' then
    redis.call('LREM', KEYS[2], -1, id)
    return
  end
  local attempt = tonumber(rec[2]) + 1
  redis.call('HSET', key, 'state', 'processing', 'attempts', attempt, 'updated_at', now,
    'owner', instance)
  redis.call('ZADD', KEYS[3], deadline, id)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*',
    'type', 'processing', 'id', id, 'at', now, 'attempt', attempt, 'state', 'processing')
  out[#out + 1] = id
  out[#out + 1] = rec[3]
  out[#out + 1] = attempt
  out[#out + 1] = rec[4] or ''
end
for i = 7, #ARGV do
  mark(ARGV[i])
end
for _ = 1, tonumber(ARGV[6]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  mark(id)
end
return out
