-- schedule_put: create or replace a schedule; runtime counters survive a replace.
-- KEYS[1] schedules hash   KEYS[2] schedules:due zset
-- ARGV[1] name   ARGV[2] cron   ARGV[3] timezone   ARGV[4] message JSON
-- ARGV[5] now (ms)   ARGV[6] next tick (ms)
-- Returns {1 created | 0 replaced, stored record}.
local name, now = ARGV[1], tonumber(ARGV[5])
local old = redis.call('HGET', KEYS[1], name)
local s
if old then
  s = cmsgpack.unpack(old)
  s[1] = s[1] + 1
  s[2], s[3], s[4], s[6] = ARGV[2], ARGV[3], ARGV[4], now
else
  s = {1, ARGV[2], ARGV[3], ARGV[4], now, now, 0, '', 0, 0}
end
local record = cmsgpack.pack(s)
redis.call('HSET', KEYS[1], name, record)
redis.call('ZADD', KEYS[2], ARGV[6], name)
if old then return {0, record} end
return {1, record}
