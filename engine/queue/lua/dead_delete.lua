-- dead_delete: drop dead-lettered jobs for good (record included).
-- KEYS[1] dead list   KEYS[2] events
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN   ARGV[4..] job ids
-- Returns the ids deleted (only ids that were in the dead list).
local shard, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
local prefix = shard .. 'job:'
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('LREM', KEYS[1], 1, id) > 0 then
    local rec = redis.call('HMGET', prefix .. id, 'attempts', 'tenant', 'tags')
    redis.call('DEL', prefix .. id)
    lib_event(KEYS[2], maxlen, 'deleted', id, now, rec[1], nil, rec[2], rec[3])
    out[#out + 1] = id
  end
end
return out
