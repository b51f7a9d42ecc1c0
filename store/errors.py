"""Errors raised by the store. Every message names the cache, shard, file, field or key at fault."""


class CacheError(Exception):
    """Base class: anything wrong with a teacher-output cache or its use."""


class ManifestMismatch(CacheError):
    """The cache was written for a different teacher, dataset, views or fields than the caller declares."""


class CorruptShardError(CacheError):
    """A shard's bytes do not match its checksum, or cannot be decoded."""


class IncompleteCacheError(CacheError):
    """The cache lacks shards that its manifest declares (an interrupted precompute)."""


class SchemaError(CacheError):
    """A sample does not follow the field vocabulary in store/schema.py."""


class ForeignShardError(CacheError):
    """Shards in the cache directory that were not written under this cache's declaration."""
