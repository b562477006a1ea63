-- enqueue: store the jobs of one or more requests and queue (or schedule) them; each
-- request is all or nothing. An Idempotency-Key makes a repeated request return the
-- first one's ids; a client over its rate or a backlog over its high-water mark is
-- refused before anything is stored.
-- KEYS[1] events stream   KEYS[2] stats hash   KEYS[3] delayed zset
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN (approx.)
-- ARGV[4] idempotency TTL (s)   ARGV[5] backlog high-water mark (jobs; 0 = none)
-- ARGV[6] per-client rate (messages/s; 0 = none)   ARGV[7] per-client burst (messages)
-- ARGV[8] 1 when Redis's memory is over ingest's budget (sampled by the caller: INFO
--         costs a third of a one-job enqueue), else 0
-- ARGV[9] seconds to keep the record of a job whose every recipient is suppressed
-- ARGV[10..] requests, each: idempotency key ('' = none), body fingerprint, client id,
--           n, cost (what it takes from the client's bucket: its recipients), then n
--           octuples: job id, msgpack message, lane, tenant, recipient
--           domains (comma-separated), due time (ms; 0 = now), tags ('\n'-joined; '' = none),
--           recipients (bare addresses, comma-separated; '' = not checked; "<list>\n"
--           in front for a message of a list: see suppressed_of)
-- Returns one entry per request: {0, remaining} stored (remaining: the client's tokens,
-- -1 without client limits); {1, 'id,id,...'} a replay of the same key and body
-- (nothing stored); {2, fingerprint} the key was used for another body (409);
-- {3, retry_after_ms} the client is over its rate (-1: larger than the burst);
-- {4, backlog} the backlog is full; {5, backlog} Redis's memory is over its budget.
-- Idempotent per id too: a job whose record exists is skipped (a lost reply retried).
-- A job of a request with a key keeps 'idem' = '<fingerprint>|<position>|<count>|<key>'
-- in its record: the history writer copies it to PostgreSQL (checked there past the TTL).
-- Events: one 'queued' (or 'scheduled') entry per up to 100 jobs of one (lane, tenant)
-- group -- a stream entry per job cost 40 % of the enqueue time with AOF on. 'ids' lists
-- them (comma-separated), 'tenant' is the group's (absent = default) and, when any of
-- them has tags, 'tags' holds each job's tags ('\n'-joined) joined by '\r', in the order
-- of 'ids' (tags hold no CR or LF).
-- Suppression lists: when the job's tenant has one (<shard>suppressed:<tenant>, a set of
-- bare addresses with ASCII letters lower-cased, engine.queue.suppression.address_key),
-- its recipients are tested against it (one SMISMEMBER per job; a tenant without a list
-- costs one EXISTS per script run). Suppressed recipients are dropped: the others go to
-- the record's 'rcpts' (the recipients still to try, as after a partial delivery) and a
-- 'suppressed' entry (id, state, 'rcpts': the dropped ones) is added; a job with none
-- left ends in the state 'suppressed': never queued, never claimed.
local shard, now, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local idem_ttl, high_water = ARGV[4], tonumber(ARGV[5])
local client_rate, client_burst = tonumber(ARGV[6]), tonumber(ARGV[7])
local memory_full = ARGV[8] == '1'
local keep_suppressed = tonumber(ARGV[9])
local prefix, idem_prefix = shard .. 'job:', shard .. 'idem:'
local written = 0

-- Jobs are pushed and announced per (lane, tenant) group, 100 to a push and an event
-- entry, however a batch interleaves lanes and tenants (a push and an entry per job
-- cost 40 %). Scheduled jobs are announced per tenant.
local groups, group_order = {}, {}
local function flush(group)
  if #group.ids == 0 then return end
  if group.lane then lib_push(shard, group.lane, group.tenant, group.ids, false) end
  local f = {'type', group.kind, 'ids', table.concat(group.ids, ','), 'at', now,
    'attempt', 0, 'state', group.kind}
  if group.tenant ~= 'default' then f[#f + 1] = 'tenant'; f[#f + 1] = group.tenant end
  if group.tagged then f[#f + 1] = 'tags'; f[#f + 1] = table.concat(group.tags, '\r') end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(f))
  group.ids, group.tags, group.tagged = {}, {}, false
end
-- lane nil: scheduled (in delayed, announced but pushed nowhere).
local function add(id, lane, tenant, tags)
  local name = (lane or '') .. ':' .. tenant
  local group = groups[name]
  if not group then
    group = {kind = lane and 'queued' or 'scheduled', lane = lane, tenant = tenant,
      ids = {}, tags = {}, tagged = false}
    groups[name] = group
    group_order[#group_order + 1] = group
  end
  group.ids[#group.ids + 1] = id
  group.tags[#group.tags + 1] = tags
  if tags ~= '' then group.tagged = true end
  if #group.ids == 100 then flush(group) end
end

local backlog = nil
local function backlog_now()
  if not backlog then
    backlog = (tonumber(redis.call('HGET', KEYS[2], 'backlog')) or 0)
      + redis.call('ZCARD', KEYS[3])
  end
  return backlog
end

-- GCRA per client: a request of n messages passes if the client's theoretical arrival
-- time after it stays within burst/rate of now. Returns (ok, retry_after_ms|remaining).
local rnow = nil
local function client_take(client, n)
  if client_rate <= 0 or client == '' then return true, -1 end
  if n > client_burst then return false, -1 end
  rnow = rnow or lib_time_ms()
  local key = shard .. 'bucket:client:' .. client
  local interval = 1000 / client_rate
  local tau = client_burst * interval
  local tat = math.max(tonumber(redis.call('HGET', key, 'tat')) or 0, rnow)
  local new_tat = tat + n * interval
  if new_tat - rnow > tau then return false, math.ceil(new_tat - tau - rnow) end
  redis.call('HSET', key, 'tat', new_tat)
  redis.call('PEXPIRE', key, math.ceil(new_tat - rnow) + 1000)
  return true, math.floor((rnow + tau - new_tat) / interval)
end

-- (recipients to keep, recipients dropped) of a job, or nil when none is suppressed.
local has_list = {}
local function suppressed_of(tenant, rcpts)
  if rcpts == '' then return nil end
  -- A message of a list ("<list>\n" in front) is also checked against the list's own
  -- (<shard>suppressed:<tenant>:list:<list>: one-click unsubscribes from that list).
  local scoped
  local nl = string.find(rcpts, '\n', 1, true)
  if nl then
    scoped = shard .. 'suppressed:' .. tenant .. ':list:' .. string.sub(rcpts, 1, nl - 1)
    rcpts = string.sub(rcpts, nl + 1)
    if redis.call('EXISTS', scoped) == 0 then scoped = nil end
  end
  local set = shard .. 'suppressed:' .. tenant
  if has_list[tenant] == nil then has_list[tenant] = redis.call('EXISTS', set) == 1 end
  if not has_list[tenant] and not scoped then return nil end
  local all, lowered = {}, {}
  for r in string.gmatch(rcpts, '[^,]+') do
    all[#all + 1] = r
    lowered[#lowered + 1] = string.lower(r)
  end
  if #all == 0 then return nil end
  local hits = has_list[tenant] and redis.call('SMISMEMBER', set, unpack(lowered)) or {}
  local listed = scoped and redis.call('SMISMEMBER', scoped, unpack(lowered)) or {}
  local keep, drop = {}, {}
  for k = 1, #all do
    if hits[k] == 1 or listed[k] == 1 then
      drop[#drop + 1] = all[k]
    else
      keep[#keep + 1] = all[k]
    end
  end
  if #drop == 0 then return nil end
  return keep, drop
end
-- The distinct lower-cased domains of addresses (engine.models.recipient_domains): the
-- rate-limit buckets of a job whose suppressed recipients were dropped.
local function domains_of(addresses)
  local seen, out = {}, {}
  for _, a in ipairs(addresses) do
    local d = string.lower(string.match(a, '@([^@]*)$') or '')
    if not seen[d] then
      seen[d] = true
      out[#out + 1] = d
    end
  end
  return table.concat(out, ',')
end
local function announce_suppressed(id, state, drop, tenant, tags)
  local f = {'type', 'suppressed', 'id', id, 'at', now, 'attempt', 0, 'state', state,
    'rcpts', table.concat(drop, ',')}
  if tenant ~= 'default' then f[#f + 1] = 'tenant'; f[#f + 1] = tenant end
  if tags ~= '' then f[#f + 1] = 'tags'; f[#f + 1] = tags end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(f))
end

local out = {}
local i = 10
while i <= #ARGV do
  local idem, fingerprint, client, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local cost = tonumber(ARGV[i + 4])
  local first, last = i + 5, i + 4 + 8 * n
  i = last + 1
  local answered = false
  if idem ~= '' then
    local prior = redis.call('GET', idem_prefix .. idem)
    if prior then
      answered = true
      local sep = string.find(prior, '|', 1, true)
      if string.sub(prior, 1, sep - 1) == fingerprint then
        out[#out + 1] = {1, string.sub(prior, sep + 1)}
      else
        out[#out + 1] = {2, string.sub(prior, 1, sep - 1)}
      end
    end
  end
  if not answered and high_water > 0 and backlog_now() + n > high_water then
    answered = true
    out[#out + 1] = {4, backlog_now()}
  end
  if not answered and memory_full then
    answered = true
    out[#out + 1] = {5, backlog_now()}
  end
  local remaining = -1
  if not answered then
    local ok, value = client_take(client, cost)
    if not ok then
      answered = true
      out[#out + 1] = {3, value}
    end
    remaining = value
  end
  if not answered then
    local request_ids = {}
    for j = first, last, 8 do
      local id, lane, tenant, doms, due = ARGV[j], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4], tonumber(ARGV[j + 5])
      local tags = ARGV[j + 6]
      request_ids[#request_ids + 1] = id
      local key = prefix .. id
      if redis.call('EXISTS', key) == 0 then
        local keep, drop = suppressed_of(tenant, ARGV[j + 7])
        if drop and #keep > 0 then doms = domains_of(keep) end
        local fields = {'attempts', 0, 'created_at', now, 'updated_at', now, 'msg', ARGV[j + 1]}
        -- lane, tenant, domains and tags are left out at their defaults (bytes per job).
        if lane ~= 'normal' then fields[#fields + 1] = 'lane'; fields[#fields + 1] = lane end
        if tenant ~= 'default' then fields[#fields + 1] = 'tenant'; fields[#fields + 1] = tenant end
        if doms ~= '' then fields[#fields + 1] = 'doms'; fields[#fields + 1] = doms end
        if tags ~= '' then fields[#fields + 1] = 'tags'; fields[#fields + 1] = tags end
        -- The request's key, for the history (engine.history keeps it past idem_ttl).
        if idem ~= '' then
          fields[#fields + 1] = 'idem'
          fields[#fields + 1] = fingerprint .. '|' .. ((j - first) / 8) .. '|' .. n .. '|' .. idem
        end
        if drop and #keep == 0 then
          redis.call('HSET', key, 'state', 'suppressed', 'last_error',
            'every recipient is suppressed: ' .. table.concat(drop, ', '), unpack(fields))
          if keep_suppressed > 0 then redis.call('EXPIRE', key, keep_suppressed) end
          announce_suppressed(id, 'suppressed', drop, tenant, tags)
        else
          if drop then fields[#fields + 1] = 'rcpts'; fields[#fields + 1] = table.concat(keep, ',') end
          if due > now then
            redis.call('HSET', key, 'state', 'scheduled', 'next_attempt_at', due, unpack(fields))
            redis.call('ZADD', KEYS[3], due, id)
            if drop then announce_suppressed(id, 'scheduled', drop, tenant, tags) end
            add(id, nil, tenant, tags)
          else
            redis.call('HSET', key, 'state', 'queued', unpack(fields))
            if drop then announce_suppressed(id, 'queued', drop, tenant, tags) end
            add(id, lane, tenant, tags)
          end
          if backlog then backlog = backlog + 1 end
        end
        written = written + 1
      end
    end
    if idem ~= '' then
      redis.call('SET', idem_prefix .. idem, fingerprint .. '|' .. table.concat(request_ids, ','),
        'EX', idem_ttl)
    end
    out[#out + 1] = {0, remaining}
  end
end
for _, group in ipairs(group_order) do flush(group) end
if written > 0 then
  redis.call('HINCRBY', KEYS[2], 'enqueued', written)
  lib_wake(shard, math.ceil(written / 16))
end
return out
