-- suppress_refused: a delivered message's recipients that the server refused as unknown
-- (a 5xx of the invalid-recipient class at RCPT, the others accepted) go on the job's
-- tenant's suppression list (<shard>suppressed:<tenant> and its ':info' hash, the shape
-- fail.lua writes), with the refusal as reason and the job as source.
-- KEYS[1] the job's record
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] job id
-- ARGV[4..] triples: bare address, reason, bounce class
-- Returns how many addresses were not on the list yet.
local shard, now, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local tenant = redis.call('HGET', KEYS[1], 'tenant') or 'default'
local set = shard .. 'suppressed:' .. tenant
local added = 0
for i = 4, #ARGV, 3 do
  local address = string.lower(ARGV[i])
  added = added + redis.call('SADD', set, address)
  redis.call('HSETNX', set .. ':info', address,
    cjson.encode({reason = ARGV[i + 1], source = id, bounce = ARGV[i + 2], at = now}))
end
return added
