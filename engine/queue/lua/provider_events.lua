-- provider_events: record what an email provider reported of the jobs it took (one signed
-- delivery: POST /v1/providers/{name}/events): an entry per event on the stream, the
-- job's record marked, hard-bounced and complaining recipients suppressed.
-- KEYS[1] events   KEYS[2] stats   [KEYS[3] the delivery's one-time token (pnonce:...)]
-- ARGV[1] shard key prefix   ARGV[2] now (ms)   ARGV[3] events MAXLEN   ARGV[4] provider
-- ARGV[5] ms an event id is remembered when the job's record has no expiry
-- ARGV[6] ms the one-time token is remembered (with KEYS[3])
-- ARGV[7..] 9-tuples: provider's event id, job id, type (delivered | bounced |
--           complained | delayed), recipient (bare), at (ms, the provider's), detail
--           ('' = none), bounce class ('' = none), provider's message id ('' = none),
--           suppression reason ('' = the recipient is not suppressed)
-- Returns {stored, duplicates, unmatched, suppressed}, or {-1, 0, 0, 0} when the token
-- was used before (a replay: nothing is written).
-- A job whose record is gone (or an event without a job id) is unmatched: counted, not
-- stored. Each event id is remembered (SET NX) as long as the job's record lives: a
-- provider's retry of an event is dropped, and after the record expires it would be
-- unmatched anyway. The job's state is left as it is (delivered, bounced, complained,
-- delayed come after 'sent'): provider_state / provider_at / provider_detail record the
-- last event (provider_id, the provider's message id, when the ack left none), and
-- updated_at moves so that the message's history (engine.queue.events) reads up to it. The entry is a lifecycle entry like
-- lib_event's, but its state is the job's (not its type) and 'rcpts' names the recipient.
-- A suppressed recipient must be one of the job's: an event cannot suppress an address
-- the message never went to. The list entry has fail.lua's shape (reason, source = the
-- job, bounce, at); an address already on the list keeps its first entry.
local shard, now, maxlen, provider = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local keep_ms, nonce_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
if KEYS[3] and not redis.call('SET', KEYS[3], '1', 'NX', 'PX', nonce_ms) then
  return {-1, 0, 0, 0}
end

local function is_recipient(key, address)
  local rcpts = lib_recipients(key)
  if not rcpts then return false end
  for _, r in ipairs(rcpts) do
    if string.lower(r) == address then return true end
  end
  return false
end

local stored, dups, unmatched, suppressed = 0, 0, 0, 0
for i = 7, #ARGV, 9 do
  local eid, id, kind, rcpt, at, detail, bounce, mid, reason =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
    ARGV[i + 7], ARGV[i + 8]
  local key = shard .. 'job:' .. id
  local rec = {}
  if id ~= '' then rec = redis.call('HMGET', key, 'state', 'attempts', 'tenant', 'tags') end
  if not rec[1] then
    unmatched = unmatched + 1
  else
    local ttl = redis.call('PTTL', key)
    if ttl <= 0 then ttl = keep_ms end
    local seen = shard .. 'pevent:' .. provider .. ':' .. eid
    if not redis.call('SET', seen, '1', 'NX', 'PX', ttl) then
      dups = dups + 1
    else
      redis.call('HSET', key, 'provider_state', kind, 'provider_at', at, 'updated_at', now)
      if detail ~= '' then
        redis.call('HSET', key, 'provider_detail', detail)
      else
        redis.call('HDEL', key, 'provider_detail')
      end
      -- The ack's own (the id the provider's API answered) is kept: this fills a gap.
      if mid ~= '' then redis.call('HSETNX', key, 'provider_id', mid) end
      local tenant = rec[3] or 'default'
      local f = {'type', kind, 'id', id, 'at', at, 'attempt', rec[2] or 0, 'state', rec[1]}
      if detail ~= '' then f[#f + 1] = 'error'; f[#f + 1] = detail end
      if tenant ~= 'default' then f[#f + 1] = 'tenant'; f[#f + 1] = tenant end
      if rec[4] then f[#f + 1] = 'tags'; f[#f + 1] = rec[4] end
      if bounce ~= '' then f[#f + 1] = 'bounce'; f[#f + 1] = bounce end
      f[#f + 1] = 'rcpts'; f[#f + 1] = rcpt
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(f))
      redis.call('HINCRBY', KEYS[2], 'provider:' .. kind, 1)
      stored = stored + 1
      local address = string.lower(rcpt)
      if reason ~= '' and is_recipient(key, address) then
        local set = shard .. 'suppressed:' .. tenant
        suppressed = suppressed + redis.call('SADD', set, address)
        redis.call('HSETNX', set .. ':info', address,
          cjson.encode({reason = reason, source = id, bounce = bounce ~= '' and bounce or nil,
            at = now}))
      end
    end
  end
end
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'provider:duplicate', dups) end
if unmatched > 0 then redis.call('HINCRBY', KEYS[2], 'provider:unmatched', unmatched) end
return {stored, dups, unmatched, suppressed}
