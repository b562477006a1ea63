-- schedule_delete: forget a schedule and its due tick.
-- KEYS[1] schedules hash   KEYS[2] schedules:due zset   ARGV[1] name
-- Returns 1 when it existed, else 0.
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return n
