-- history_records: what the history writer keeps of jobs beyond their events, read in
-- one call for a batch of them (read only).
-- KEYS[1] none (read only: job keys are built in-slot from the prefix, as enqueue does)
-- ARGV[1] shard key prefix   ARGV[2] n: how many of the ids want the whole record
-- ARGV[3..] job ids: the first n whole, the rest only their provider's message id (a
--           'sent' event's job: its transport may have been given one)
-- Returns, per id in order: the stored message (msgpack; false when the record is gone
-- or not asked for), its lane, its idempotency note ('<fingerprint>|<position>|<count>|
-- <key>', enqueue.lua), its provider's message id (a provider event's, else the one its
-- send was given); each false when absent.
local prefix, whole = ARGV[1] .. 'job:', tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local r
  if i - 2 <= whole then
    r = redis.call('HMGET', prefix .. ARGV[i], 'msg', 'lane', 'idem', 'provider_message_id',
      'provider_id')
  else
    r = {false, false, false}
    local p = redis.call('HMGET', prefix .. ARGV[i], 'provider_message_id', 'provider_id')
    r[4], r[5] = p[1], p[2]
  end
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
  out[#out + 1] = r[4] or r[5]
end
return out
