-- slowdown: a server said "slow down" (421/451) for these buckets: halve their rate
-- (multiplicative decrease; at most once per cooldown, not below the floor). Claims
-- give the rate back additively over time (see claim.lua).
-- KEYS[1] limits hash
-- ARGV[1] shard key prefix   ARGV[2] cooldown (ms)   ARGV[3] floor (fraction of the limit)
-- ARGV[4] additive recovery (fraction of the limit per s)   ARGV[5..] bucket names
-- Returns name, new rate (as a string), ... for the buckets that have a limit.
local shard, cooldown, floor, recover = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rnow = lib_time_ms()
local out = {}
for i = 5, #ARGV do
  local name = ARGV[i]
  local v = redis.call('HGET', KEYS[1], name)
  if not v and string.sub(name, 1, 7) == 'domain:' then v = redis.call('HGET', KEYS[1], 'domain:*') end
  if v then
    local cap = tonumber(string.sub(v, 1, string.find(v, ' ', 1, true) - 1))
    local bkey = shard .. 'bucket:' .. name
    local b = lib_bucket_get(bkey)
    local rate = lib_recovered_rate(b, cap, rnow, recover)
    if rnow - b.cut >= cooldown then
      rate = math.max(cap * floor, rate / 2)
      b.cut = rnow
    end
    b.rate, b.rt, b.cap = rate, rnow, cap
    lib_bucket_set(bkey, b, rnow)
    out[#out + 1] = name
    out[#out + 1] = tostring(rate)
  end
end
return out
