"""The Lua scripts the remote tier runs in Redis: each one is atomic there, so readers see a value whole."""

# Compare-and-set for compress/decompress: swap the value only if the header (which holds the checksum) is still
# the one we read, keeping the TTL. A Lua script runs atomically, so readers see the old value or the new one.
SWAP_IF_SAME = """
local head = redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1)
if head ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""


DELETE_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
