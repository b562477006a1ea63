-- reap: promote due delayed jobs; return jobs of expired leases and dead instances.
-- KEYS[1] delayed zset   KEYS[2] leases zset   KEYS[3] instances zset   KEYS[4] events
-- KEYS[5] stats   KEYS[6] dead list
-- ARGV[1] key prefix of the shard (processing lists are ARGV[1]..'processing:'..owner)
-- ARGV[2] job key prefix   ARGV[3] now (ms)   ARGV[4] events MAXLEN   ARGV[5] batch limit
-- ARGV[6] stalls allowed: a job returned more often than this is dead-lettered
-- ARGV[7] seconds to keep a failed record (0 = forever)
-- Returns {promoted, requeued, instances_removed, dead_lettered}. Safe to run from many replicas at
-- once: each job is moved by whichever call sees it first, inside one atomic script.
local shard, prefix, now, maxlen, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max_stalls, keep = tonumber(ARGV[6]), tonumber(ARGV[7])
local promoted, requeued, gone, dead_lettered = 0, 0, 0, 0

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local key = prefix .. id
  local rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags')
  if rec[1] == 'retrying' or rec[1] == 'scheduled' then
    redis.call('HSET', key, 'state', 'queued', 'updated_at', now)
    lib_requeue(shard, id, false)
    lib_event(KEYS[4], maxlen, 'queued', id, now, rec[2], nil, rec[3], rec[4])
    promoted = promoted + 1
  end
end

local function requeue(id, owner)
  local key = prefix .. id
  redis.call('ZREM', KEYS[2], id)
  if owner then redis.call('LREM', shard .. 'processing:' .. owner, 1, id) end
  local rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags')
  if rec[1] == 'processing' then
    redis.call('HDEL', key, 'owner')
    local stalls = redis.call('HINCRBY', key, 'stalls', 1)
    if stalls > max_stalls then
      local err = 'stalled ' .. stalls .. ' times: its sender stopped renewing the lease'
      redis.call('HSET', key, 'state', 'failed', 'updated_at', now, 'last_error', err)
      redis.call('RPUSH', KEYS[6], id)
      if keep > 0 then redis.call('EXPIRE', key, keep) end
      lib_event(KEYS[4], maxlen, 'failed', id, now, rec[2], err, rec[3], rec[4])
      dead_lettered = dead_lettered + 1
    else
      redis.call('HSET', key, 'state', 'queued', 'updated_at', now)
      lib_requeue(shard, id, true)
      lib_event(KEYS[4], maxlen, 'queued', id, now, rec[2], 'lease expired', rec[3], rec[4])
      requeued = requeued + 1
    end
  end
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  local owner = redis.call('HGET', prefix .. id, 'owner')
  requeue(id, owner)
end

local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, limit)
for _, inst in ipairs(dead) do
  local plist = shard .. 'processing:' .. inst
  local ids = redis.call('LRANGE', plist, 0, -1)
  for _, id in ipairs(ids) do
    requeue(id, nil)
  end
  redis.call('DEL', plist)
  redis.call('ZREM', KEYS[3], inst)
  gone = gone + 1
end
if requeued > 0 then redis.call('HINCRBY', KEYS[5], 'reaped', requeued) end
if dead_lettered > 0 then redis.call('HINCRBY', KEYS[5], 'failed', dead_lettered) end
if promoted + requeued > 0 then lib_wake(shard, math.ceil((promoted + requeued) / 16)) end
return {promoted, requeued, gone, dead_lettered}
