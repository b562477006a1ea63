-- dead_retry: move dead-lettered jobs back to the ready lane with fresh attempts.
-- KEYS[1] dead list   KEYS[2] events
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN   ARGV[4..] job ids
-- A job is retried only if it is in the dead list and its record still exists, and not
-- once its deadline (lib_deadline) has passed: it would go out late. That one stays a
-- dead letter (to delete, or to read why).
-- A retry goes to the recipients the job still owed (its record's 'rcpts' after a partial
-- delivery: those who got it do not get it twice), less those now on the tenant's
-- suppression list (a 'suppressed' event names them, as enqueue.lua does); a job with
-- none left ends in the state 'suppressed' instead of being queued.
-- Returns {ids retried, {id, deadline (ms), ...} of those refused for their deadline,
-- ids that ended suppressed}.
local shard, now, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local prefix = shard .. 'job:'
local out, late, gone = {}, {}, {}

-- (kept, dropped) recipients of the job at key, or nil when none is suppressed.
local function suppressed_of(key, tenant)
  local set = shard .. 'suppressed:' .. tenant
  if redis.call('EXISTS', set) == 0 then return nil end
  local rcpts = lib_recipients(key)
  if not rcpts or #rcpts == 0 then return nil end
  local lowered = {}
  for k = 1, #rcpts do lowered[k] = string.lower(rcpts[k]) end
  local hits = redis.call('SMISMEMBER', set, unpack(lowered))
  local keep, drop = {}, {}
  for k = 1, #rcpts do
    if hits[k] == 1 then drop[#drop + 1] = rcpts[k] else keep[#keep + 1] = rcpts[k] end
  end
  if #drop == 0 then return nil end
  return keep, drop
end

local function announce_suppressed(id, state, drop, tenant, tags)
  local f = {'type', 'suppressed', 'id', id, 'at', now, 'attempt', 0, 'state', state,
    'rcpts', table.concat(drop, ',')}
  if tenant ~= 'default' then f[#f + 1] = 'tenant'; f[#f + 1] = tenant end
  if tags and tags ~= '' then f[#f + 1] = 'tags'; f[#f + 1] = tags end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(f))
end

for i = 4, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  local rec = redis.call('HMGET', key, 'state', 'tenant', 'tags', 'msg')
  local expires = rec[1] == 'failed' and lib_deadline(rec[4])
  if expires and now >= expires then
    if redis.call('LPOS', KEYS[1], id) then
      late[#late + 1] = id
      late[#late + 1] = expires
    end
  elseif redis.call('LREM', KEYS[1], 1, id) > 0 and rec[1] == 'failed' then
    local tenant = rec[2] or 'default'
    local keep, drop = suppressed_of(key, tenant)
    if drop and #keep == 0 then
      redis.call('HSET', key, 'state', 'suppressed', 'updated_at', now,
        'last_error', 'every recipient is suppressed: ' .. table.concat(drop, ', '))
      announce_suppressed(id, 'suppressed', drop, tenant, rec[3])
      gone[#gone + 1] = id
    else
      redis.call('HSET', key, 'state', 'queued', 'attempts', 0, 'stalls', 0, 'updated_at', now)
      redis.call('HDEL', key, 'next_attempt_at')
      if drop then
        redis.call('HSET', key, 'rcpts', table.concat(keep, ','))
        announce_suppressed(id, 'queued', drop, tenant, rec[3])
      end
      redis.call('PERSIST', key)
      lib_requeue(shard, id, false)
      lib_event(KEYS[2], maxlen, 'queued', id, now, 0, nil, rec[2], rec[3])
      out[#out + 1] = id
    end
  end
end
if #out > 0 then lib_wake(shard, math.ceil(#out / 16)) end
return {out, late, gone}
