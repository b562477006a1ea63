-- webhook_idle: with no endpoint at all, move the webhooks consumer group to the end of
-- the event stream (nothing is owed to anyone), so no replica reads and parses events
-- for nobody. Atomic with the check: an endpoint added first is never skipped over.
-- KEYS[1] webhooks hash   KEYS[2] the event stream   ARGV[1] consumer group
-- Returns 1 when the group was moved, 0 when an endpoint exists.
if redis.call('HLEN', KEYS[1]) > 0 then return 0 end
redis.call('XGROUP', 'SETID', KEYS[2], ARGV[1], '$')
return 1
