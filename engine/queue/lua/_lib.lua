-- _lib: functions every script shares. Redis scripts cannot call each other, so
-- engine.queue.redis prepends this file to each script before loading it.
-- Ready jobs live in one list per (lane, tenant): <shard>ready:<lane>:<tenant>; the
-- tenants with jobs in a lane take turns through the ring <shard>ring:<lane>.
-- <shard>stats 'backlog' counts the entries of all ready lists, 'ready:<lane>' a lane's.

-- Append (or, with front, prepend) ids to a tenant's list in a lane; a list that was
-- empty joins its lane's ring.
local function lib_push(shard, lane, tenant, ids, front)
  local list = shard .. 'ready:' .. lane .. ':' .. tenant
  local n
  if front then
    n = redis.call('LPUSH', list, unpack(ids))
  else
    n = redis.call('RPUSH', list, unpack(ids))
  end
  if n == #ids then
    local ring = shard .. 'ring:' .. lane
    if not redis.call('LPOS', ring, tenant) then redis.call('RPUSH', ring, tenant) end
  end
  redis.call('HINCRBY', shard .. 'stats', 'backlog', #ids)
  redis.call('HINCRBY', shard .. 'stats', 'ready:' .. lane, #ids)
end

-- Queue one job again in the lane and tenant its record names.
local function lib_requeue(shard, id, front)
  local where = redis.call('HMGET', shard .. 'job:' .. id, 'lane', 'tenant')
  lib_push(shard, where[1] or 'normal', where[2] or 'default', {id}, front)
end

-- Append one job's lifecycle event to the stream: type and state (both `kind`), id, at
-- (ms), attempt[, error][, tenant (absent = default)][, tags (the job's tags field:
-- '\n'-joined, tags hold no CR/LF)][, bounce (a failure's class)]. tenant and tags are
-- read in the script's HMGET.
local function lib_event(stream, maxlen, kind, id, now, attempt, err, tenant, tags, bounce)
  local f = {'type', kind, 'id', id, 'at', now, 'attempt', attempt or 0, 'state', kind}
  if err then f[#f + 1] = 'error'; f[#f + 1] = err end
  if tenant and tenant ~= 'default' then f[#f + 1] = 'tenant'; f[#f + 1] = tenant end
  if tags then f[#f + 1] = 'tags'; f[#f + 1] = tags end
  if bounce and bounce ~= '' then f[#f + 1] = 'bounce'; f[#f + 1] = bounce end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(f))
end

-- A stored message's deadline (ms), or nil: a job with a deliver-by carries it in front of
-- its msgpack message as a msgpack uint64 (0xcf + 8 bytes big-endian; a bare message
-- starts with an array marker), so it is read without decoding the message
-- (engine.queue.jobs.with_deadline writes it).
local function lib_deadline(msg)
  if not msg or string.byte(msg, 1) ~= 0xcf then return nil end
  local ms = 0
  for k = 2, 9 do ms = ms * 256 + string.byte(msg, k) end
  return ms
end

-- Ring the doorbell idle senders BLPOP on: make sure n tokens wait (at most 32), one
-- per sender that should wake. A woken sender that leaves work behind rings again, so
-- wake-ups also chain. A token nobody needed costs one empty claim.
local function lib_wake(shard, n)
  local key = shard .. 'wake'
  local missing = math.min(n, 32) - redis.call('LLEN', key)
  for _ = 1, missing do redis.call('RPUSH', key, 1) end
end

-- Redis server time in ms: rate-limit buckets use the server's clock so that replicas
-- with skewed clocks still share one notion of "now".
local function lib_time_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Rate-limit bucket state: one string key per bucket, "tat vtat rate rt cut" (ms on the
-- server clock; rate in msgs/s, '-' = at its limit), written with its expiry in one SET.
local function lib_bucket_get(key)
  local v = redis.call('GET', key)
  local b = {tat = 0, vtat = 0, rate = nil, rt = nil, cut = 0}
  if v then
    local f = {}
    for x in string.gmatch(v, '%S+') do f[#f + 1] = x end
    b.tat, b.vtat, b.rate, b.rt, b.cut = tonumber(f[1]), tonumber(f[2]), tonumber(f[3]),
      tonumber(f[4]), tonumber(f[5])
  end
  return b
end

-- The rate in force now: a slowed-down rate regains `recover` x its limit per second
-- since it was stored (AIMD), up to the limit. Mirrored by engine.policy.recovered_rate.
local function lib_recovered_rate(b, cap, rnow, recover)
  local rate = math.min(cap, b.rate or cap)
  if rate < cap then rate = math.min(cap, rate + cap * recover * (rnow - (b.rt or rnow)) / 1000) end
  return rate
end

local function lib_bucket_set(key, b, rnow)
  local ttl = math.ceil(math.max(b.tat, b.vtat, rnow) - rnow) + 60000
  if b.rate and b.cap and b.rate >= b.cap then b.rate = nil end
  redis.call('SET', key, string.format('%.3f %.3f %s %d %d', b.tat, b.vtat,
    b.rate and string.format('%.6f', b.rate) or '-', b.rt or rnow, b.cut or 0), 'PX', ttl)
end

-- The bare address of 'Name <addr>' (validated at the API: the name holds no '<').
local function lib_bare(addr)
  if string.sub(addr, -1) ~= '>' then return addr end
  local lt = string.find(addr, '<[^<]*>$')
  if not lt then return addr end
  return string.sub(addr, lt + 1, -2)
end

-- The recipients a job's next (or last) attempt goes to, without duplicates (the message's envelope
-- recipients: to, cc, bcc of the msgpack array engine.models.Message, unless 'rcpts'
-- narrowed them); nil when the stored message cannot be read.
local function lib_recipients(key)
  local rcpts = redis.call('HGET', key, 'rcpts')
  local out = {}
  if rcpts then
    for r in string.gmatch(rcpts, '[^,]+') do out[#out + 1] = r end
    return out
  end
  local stored = redis.call('HGET', key, 'msg') or ''
  -- A message with a deliver-by has its deadline in front (a msgpack uint64, 0xcf + 8
  -- bytes: engine.queue.jobs.with_deadline); the message follows it.
  if string.byte(stored, 1) == 0xcf then stored = string.sub(stored, 10) end
  local ok, msg = pcall(cmsgpack.unpack, stored)
  if not ok or type(msg) ~= 'table' then return nil end
  local seen = {}
  for f = 2, 4 do
    if type(msg[f]) ~= 'table' then return nil end
    for _, addr in ipairs(msg[f]) do
      if type(addr) ~= 'string' then return nil end
      local b = lib_bare(addr)
      if not seen[b] then
        seen[b] = true
        out[#out + 1] = b
      end
    end
  end
  return out
end
