-- transport_slots: reserve send slots in a transport's shared bucket (routing.rates: a
-- provider's rate across every replica), GCRA as the claim script's buckets.
-- KEYS[1] limits hash
-- ARGV[1] shard key prefix   ARGV[2] bucket name ('transport:<name>')   ARGV[3] slots
-- ARGV[4] additive recovery of a slowed-down bucket (fraction of its limit per s)
-- Returns the ms to wait before each slot, in order; {} when the bucket has no limit.
local conf = redis.call('HGET', KEYS[1], ARGV[2])
if not conf then return {} end
local f = {}
for x in string.gmatch(conf, '%S+') do f[#f + 1] = tonumber(x) end
local cap, burst = f[1], f[2]
local rnow = lib_time_ms()
local bkey = ARGV[1] .. 'bucket:' .. ARGV[2]
local b = lib_bucket_get(bkey)
local rate = lib_recovered_rate(b, cap, rnow, tonumber(ARGV[4]))
local interval = 1000 / rate
local out = {}
for _ = 1, tonumber(ARGV[3]) do
  local at = math.max(rnow, b.tat - (burst - 1) * interval)
  out[#out + 1] = math.floor(at - rnow)
  b.tat = math.max(b.tat, at) + interval
end
b.rate, b.rt, b.cap = rate, rnow, cap
lib_bucket_set(bkey, b, rnow)
return out
