-- schedule_advance: move a schedule's due tick on, if nobody else did (compare-and-set
-- on version and due tick), and count what happened to the ticks passed over.
-- KEYS[1] schedules hash   KEYS[2] schedules:due zset
-- ARGV[1] name   ARGV[2] version   ARGV[3] expected due tick (ms)   ARGV[4] next tick (ms)
-- ARGV[5] ticks fired (0 or 1)   ARGV[6] ticks skipped   ARGV[7] fired tick (ms)
-- ARGV[8] fired job id
-- Returns 1 when advanced, 0 when the schedule was gone, replaced or already advanced.
local name = ARGV[1]
local due = redis.call('ZSCORE', KEYS[2], name)
if not due or tonumber(due) ~= tonumber(ARGV[3]) then return 0 end
local raw = redis.call('HGET', KEYS[1], name)
if not raw then return 0 end
local s = cmsgpack.unpack(raw)
if s[1] ~= tonumber(ARGV[2]) then return 0 end
local fired = tonumber(ARGV[5])
if fired > 0 then
  s[7], s[8], s[9] = tonumber(ARGV[7]), ARGV[8], s[9] + fired
end
s[10] = s[10] + tonumber(ARGV[6])
redis.call('HSET', KEYS[1], name, cmsgpack.pack(s))
redis.call('ZADD', KEYS[2], ARGV[4], name)
return 1
