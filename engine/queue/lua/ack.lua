-- ack: record jobs as sent right after the server's final 250.
-- KEYS[1] processing:<instance>   KEYS[2] leases zset   KEYS[3] events   KEYS[4] stats
-- ARGV[1] job key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN
-- ARGV[4] seconds to keep a sent record (0 = forever)
-- ARGV[5..] fours: job id, note ('' or e.g. the recipients the server refused for good),
-- the transport that took it ('' = not recorded), the provider's message id ('' = none)
-- Idempotent: an id already 'sent' is only removed from processing again.
local prefix, now, maxlen, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = 0
for i = 5, #ARGV, 4 do
  local id, note, transport, provider_id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = prefix .. id
  if redis.call('LREM', KEYS[1], 1, id) > 0 then redis.call('ZREM', KEYS[2], id) end
  local rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags')
  if rec[1] and rec[1] ~= 'sent' then
    redis.call('HSET', key, 'state', 'sent', 'updated_at', now)
    redis.call('HDEL', key, 'owner', 'rcpts')
    if note ~= '' then redis.call('HSET', key, 'last_error', note) end
    if transport ~= '' then redis.call('HSET', key, 'transport', transport) end
    if provider_id ~= '' then redis.call('HSET', key, 'provider_id', provider_id) end
    if keep > 0 then redis.call('EXPIRE', key, keep) end
    lib_event(KEYS[3], maxlen, 'sent', id, now, rec[2], nil, rec[3], rec[4])
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[4], 'sent', n) end
return n
