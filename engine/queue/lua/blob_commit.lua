-- blob_commit: an upload streamed into a temporary key becomes its blob (or is dropped
-- when that blob is stored already: same id, same bytes), and the uploading tenant may
-- name it; both last at least the given time (an existing expiry is only ever raised).
-- KEYS[1] the upload's temporary key   KEYS[2] the blob   KEYS[3] the tenant's blobref
-- ARGV[1] seconds they must last at least from now (0 = for ever)
-- ARGV[2] the upload's size in bytes (what the temporary key must hold)
-- Returns 1 when the blob is new, 0 when it was stored already, -1 when the temporary
-- key is not the upload (expired, or not all of it): nothing changed then.
local keep, size = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('STRLEN', KEYS[1]) ~= size then return -1 end
local fresh = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[1])
  if keep > 0 then redis.call('EXPIRE', KEYS[2], keep, 'GT') else redis.call('PERSIST', KEYS[2]) end
else
  redis.call('RENAME', KEYS[1], KEYS[2])
  if keep > 0 then redis.call('EXPIRE', KEYS[2], keep) else redis.call('PERSIST', KEYS[2]) end
  fresh = 1
end
if keep > 0 then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', keep) then redis.call('EXPIRE', KEYS[3], keep, 'GT') end
else
  redis.call('SET', KEYS[3], '1')
end
return fresh
