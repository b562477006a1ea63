-- blob_hold: store attachment blobs once by content hash and make each last at least as
-- long as the jobs about to name it (or, for an upload, as long as an unnamed one is kept).
-- KEYS[1], KEYS[2] ... keys to hold: a blob (<shard>blob:<sha256 hex>), then the key that
--         lets its tenant name it (<shard>blobref:<tenant>:<sha256 hex>), pair after pair
-- ARGV[1] seconds each must last at least from now (0 = for ever: PERSIST)
-- ARGV[2] ... the bytes of KEYS[1], KEYS[2] ... in order ('' = a blob stored already: only
--         its expiry is raised; a blobref's are '1')
-- A blob is written once (SET NX); one that exists keeps its bytes and its expiry is only
-- ever raised (EXPIRE GT; a blob without one keeps none). Returns the indexes (1-based) of
-- the keys given no bytes that do not exist (expired between the lookup and now).
local keep = tonumber(ARGV[1])
local missing = {}
for i, key in ipairs(KEYS) do
  local bytes = ARGV[i + 1]
  local fresh = false
  if bytes ~= '' then
    if keep > 0 then
      fresh = redis.call('SET', key, bytes, 'NX', 'EX', keep)
    else
      fresh = redis.call('SET', key, bytes, 'NX')
    end
  end
  if not fresh then
    local held
    if keep > 0 then held = redis.call('EXPIRE', key, keep, 'GT') else held = redis.call('PERSIST', key) end
    if held == 0 and bytes == '' and redis.call('EXISTS', key) == 0 then
      missing[#missing + 1] = i
    end
  end
end
return missing
