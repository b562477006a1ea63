-- claim: take up to n jobs for this instance, lane by lane and tenant by tenant, and
-- (with rate limits on) reserve each job's send slot in its token buckets.
-- KEYS[1] processing:<instance>   KEYS[2] leases zset   KEYS[3] events   KEYS[4] instances
-- KEYS[5] stats   KEYS[6] delayed zset   KEYS[7] cursor   KEYS[8] limits hash
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] lease deadline (ms)
-- ARGV[4] events MAXLEN   ARGV[5] instance id   ARGV[6] most jobs to claim
-- ARGV[7] lane pattern: one letter per claim slot (h, n, l), e.g. 'hnhlhnhhnh'
-- ARGV[8] '1' when rate limits are configured   ARGV[9] longest wait for a slot (ms)
-- ARGV[10] additive recovery of a slowed-down bucket (fraction of its limit per s)
-- ARGV[11] seconds to keep an expired record (0 = forever)
-- Returns a flat array: id, stored message (msgpack, its deadline in front if any),
-- attempt number, recipients override ('' = all), ms to wait before sending (the
-- reserved slot), first attempt's time (ms), tenant, ... per job claimed.
--
-- Lanes: slot k of the claim counter prefers the lane pattern[k]; an empty lane's slot
-- goes to the others, most urgent first. Tenants: each pop rotates the lane's ring, so
-- tenants with ready jobs take turns one job at a time.
-- Limits: GCRA per bucket ('global', 'domain:<d>', 'tenant:<t>'; configured rate and
-- burst in the limits hash, 'domain:*'/'tenant:*' as defaults). A job whose slot is
-- within ARGV[9] gets it reserved in all its buckets and is claimed; a later one is not
-- spun on: it is deferred (state 'scheduled', in delayed) to when its tightest bucket
-- can take it, spacing deferred jobs at the bucket's rate (its 'vtat'), holding no token.
-- A moved id whose record is gone or already finished is dropped (never re-sent).
-- Deliver-by: a job whose deadline (lib_deadline: in front of its stored message) has
-- passed, or would pass before its reserved or deferred slot, is not handed out: it ends
-- 'expired' here (an 'expired' event; its record kept like a failed one), so it is never
-- sent late. The first claim copies the deadline to the record's 'expires_at' (the API
-- view reads it there).
local shard, now, deadline, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local instance, want, pattern = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local limits_on, max_wait, recover = ARGV[8] == '1', tonumber(ARGV[9]), tonumber(ARGV[10])
local keep = tonumber(ARGV[11])
local prefix = shard .. 'job:'
local out = {}
redis.call('ZADD', KEYS[4], 'GT', deadline, instance)

-- -- popping: lanes and tenants ----------------------------------------------------------
local lane_of = {h = 'high', n = 'normal', l = 'low'}
local lanes = {'high', 'normal', 'low'}
local empty = {}
local taken = {high = 0, normal = 0, low = 0}  -- pops per lane (the stats counters)
local function pop_lane(lane)
  if empty[lane] then return nil end
  local ring = shard .. 'ring:' .. lane
  while true do
    local tenant = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    if not tenant then
      empty[lane] = true
      return nil
    end
    local id = redis.call('LMOVE', shard .. 'ready:' .. lane .. ':' .. tenant, KEYS[1], 'LEFT', 'RIGHT')
    if id then
      taken[lane] = taken[lane] + 1
      return id
    end
    redis.call('LREM', ring, -1, tenant)  -- its list ran empty: it leaves the ring
  end
end
local cursor = redis.call('INCRBY', KEYS[7], want) - want
local function pop(slot)
  local k = (cursor + slot) % #pattern + 1
  local preferred = lane_of[string.sub(pattern, k, k)]
  local id = pop_lane(preferred)
  if id then return id end
  for _, lane in ipairs(lanes) do
    if lane ~= preferred then
      id = pop_lane(lane)
      if id then return id end
    end
  end
  return nil
end

-- -- rate limits ----------------------------------------------------------------------
local rnow = limits_on and lib_time_ms() or 0
-- The configured limits: read whole when the table is small (one call per claim),
-- field by field when it is a long per-domain list.
local conf_cache, buckets = {}, {}
local conf_all = nil
if limits_on and redis.call('HLEN', KEYS[8]) <= 64 then
  conf_all = {}
  local flat = redis.call('HGETALL', KEYS[8])
  for i = 1, #flat, 2 do conf_all[flat[i]] = flat[i + 1] end
end
local function conf_raw(name)
  if conf_all then return conf_all[name] end
  return redis.call('HGET', KEYS[8], name)
end
local function conf(name, fallback)
  local c = conf_cache[name]
  if c == nil then
    local v = conf_raw(name)
    if not v and fallback then v = conf_raw(fallback) end
    c = false
    if v then
      local sp = string.find(v, ' ', 1, true)
      c = {rate = tonumber(string.sub(v, 1, sp - 1)), burst = tonumber(string.sub(v, sp + 1))}
    end
    conf_cache[name] = c
  end
  return c
end
local function bucket(name, c)
  local b = buckets[name]
  if not b then
    b = lib_bucket_get(shard .. 'bucket:' .. name)
    b.name, b.cap, b.burst = name, c.rate, c.burst
    b.rate, b.rt = lib_recovered_rate(b, b.cap, rnow, recover), rnow
    buckets[name] = b
  end
  return b
end
local function buckets_of(doms, tenant)
  local list = {}
  local c = conf('global')
  if c then list[#list + 1] = bucket('global', c) end
  if doms then
    for d in string.gmatch(doms, '[^,]+') do
      c = conf('domain:' .. d, 'domain:*')
      if c then list[#list + 1] = bucket('domain:' .. d, c) end
    end
  end
  tenant = tenant or 'default'
  c = conf('tenant:' .. tenant, 'tenant:*')
  if c then list[#list + 1] = bucket('tenant:' .. tenant, c) end
  return list
end
-- ms from now until the job may go (reserved), nil after deferring it, or -1 when that
-- slot comes at or after its deadline (``left``: ms until then; nil = none): nothing is
-- reserved for a job that would go out late.
local function slot(id, key, attempts, doms, tenant, tags, left)
  local list = buckets_of(doms, tenant)
  local at, tightest = rnow, nil
  for _, b in ipairs(list) do
    local interval = 1000 / b.rate
    local start = math.max(rnow, b.tat - (b.burst - 1) * interval)
    if start > at then at, tightest = start, b end
  end
  if at - rnow <= max_wait then
    if left and at - rnow >= left then return -1 end
    for _, b in ipairs(list) do b.tat = math.max(b.tat, at) + 1000 / b.rate end
    return at - rnow
  end
  local b = tightest
  local interval = 1000 / b.rate
  local come = math.max(rnow, b.vtat, b.tat - (b.burst - 1) * interval - max_wait)
  if left and come - rnow >= left then return -1 end
  b.vtat = come + interval
  local due = now + (come - rnow)
  local err = 'waiting for rate limit ' .. b.name
  redis.call('HSET', key, 'state', 'scheduled', 'updated_at', now, 'next_attempt_at', due,
    'last_error', err)
  redis.call('ZADD', KEYS[6], due, id)
  redis.call('LREM', KEYS[1], -1, id)
  lib_event(KEYS[3], maxlen, 'scheduled', id, now, attempts, err, tenant, tags)
  return nil
end

-- -- claiming -------------------------------------------------------------------------
local claimed, popped, deferred, expired = 0, 0, 0, 0
-- The final state of a job past its deadline. Its last_error stays what held it up (a
-- failure, a rate limit) unless ``why`` says more.
local function expire(id, key, rec, expires, why)
  redis.call('HSET', key, 'state', 'expired', 'updated_at', now, 'expires_at', expires)
  if why then redis.call('HSET', key, 'last_error', why) end
  redis.call('HDEL', key, 'next_attempt_at', 'owner')
  if keep > 0 then redis.call('EXPIRE', key, keep) end
  redis.call('LREM', KEYS[1], -1, id)
  lib_event(KEYS[3], maxlen, 'expired', id, now, rec[2], why or 'not sent by its deadline',
    rec[5], rec[6])
  expired = expired + 1
end
local function mark(id)
  local key = prefix .. id
  local rec
  if limits_on then
    rec = redis.call('HMGET', key, 'state', 'attempts', 'msg', 'rcpts', 'tenant', 'tags',
      'first_at', 'doms')
  else
    rec = redis.call('HMGET', key, 'state', 'attempts', 'msg', 'rcpts', 'tenant', 'tags',
      'first_at')
  end
  local state = rec[1]
  if state ~= 'queued' then
    -- gone, finished or cancelled while it waited: drop it, never send it
    redis.call('LREM', KEYS[1], -1, id)
    return
  end
  local expires = lib_deadline(rec[3])
  if expires and now >= expires then
    expire(id, key, rec, expires, nil)
    return
  end
  local wait = 0
  if limits_on then
    wait = slot(id, key, rec[2], rec[8], rec[5], rec[6], expires and expires - now)
    if wait == -1 then
      expire(id, key, rec, expires, 'its rate-limit slot comes after its deadline')
      return
    end
    if not wait then
      deferred = deferred + 1
      return
    end
  end
  local attempt = tonumber(rec[2]) + 1
  local first_at = rec[7]
  if attempt == 1 or not first_at then
    -- the retry budget (queue.retry_for_s) counts from the first attempt
    first_at = now
    if expires then
      redis.call('HSET', key, 'state', 'processing', 'attempts', attempt, 'updated_at', now,
        'owner', instance, 'first_at', now, 'expires_at', expires)
    else
      redis.call('HSET', key, 'state', 'processing', 'attempts', attempt, 'updated_at', now,
        'owner', instance, 'first_at', now)
    end
  else
    redis.call('HSET', key, 'state', 'processing', 'attempts', attempt, 'updated_at', now,
      'owner', instance)
  end
  redis.call('ZADD', KEYS[2], deadline, id)
  lib_event(KEYS[3], maxlen, 'processing', id, now, attempt, nil, rec[5], rec[6])
  out[#out + 1] = id
  out[#out + 1] = rec[3]
  out[#out + 1] = attempt
  out[#out + 1] = rec[4] or ''
  out[#out + 1] = wait
  out[#out + 1] = first_at
  out[#out + 1] = rec[5] or 'default'
  claimed = claimed + 1
end
-- Deferred and dropped jobs do not fill a slot; bound the pops so one call stays short.
local more = true
while claimed < want and popped < want * 4 do
  local id = pop(popped)
  if not id then
    more = false
    break
  end
  popped = popped + 1
  mark(id)
end
if popped > 0 then
  redis.call('HINCRBY', KEYS[5], 'backlog', -popped)
  for lane, n in pairs(taken) do
    if n > 0 then redis.call('HINCRBY', KEYS[5], 'ready:' .. lane, -n) end
  end
end
if deferred > 0 then redis.call('HINCRBY', KEYS[5], 'throttled', deferred) end
if expired > 0 then redis.call('HINCRBY', KEYS[5], 'expired', expired) end
for name, b in pairs(buckets) do lib_bucket_set(shard .. 'bucket:' .. name, b, rnow) end
if more and popped > 0 then lib_wake(shard, 1) end  -- work left: wake the next idle sender
return out
