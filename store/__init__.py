"""The teacher-output cache: schema, codecs, manifest, Zarr v3 and WebDataset backends.

Write (precompute); ``fields`` takes groups, prefixes or names, each with its default codec
(store/schema.py) or a dict name -> codec spec (``"fp16"``, ``"klt:0.04"``: store/codecs.py):

    from store import Manifest, load_manifest, open_writer, sha256_file
    declared = dict(teacher={"arch": "gfl-r101", "checkpoint_sha256": sha256_file(ckpt)[0]},
                    dataset=dataset.fingerprint(), views=[v.to_dict() for v in views])
    manifest = load_manifest(url)                       # resuming: keep the fitted codecs
    if manifest is None:
        manifest = Manifest.create(**declared, fields=["fpn", "head", "region", "meta"],
                                   calibration=first_samples,           # fits the klt basis
                                   num_samples=len(dataset.image_ids) * len(views), shard_size=64)
    else:
        manifest.check(dict(declared, fields=["fpn", "head", "region", "meta"]))
    with open_writer(url, manifest, rank=rank, world_size=world) as writer:
        for task in writer.pending_shards():            # complete shards are skipped
            with writer.shard(task.index) as shard:     # committed atomically on exit
                for position in task.positions:
                    shard.write(sample_at(position))    # {"fpn.p3": (C, H, W), "meta.image_id": ..., ...}

Read (train):

    from store import open_cache
    cache = open_cache(url, expect=dict(declared, fields=["fpn", "head.cls"]))
    sample = cache.get(image_id, view_index, fields=["fpn"], decode="compact")    # random access
    from store.torch_data import CacheIterableDataset                              # imports torch
    loader = DataLoader(CacheIterableDataset(url, fields=["fpn"], decode="compact"), batch_size=None, num_workers=4)
    for sample in loader:                                                          # streaming
        teacher = cache.dequantize(sample, device="cuda")     # {"fpn.p3": (C, H, W) float32, ...}

CLI: ``python -m store inspect CACHE`` / ``python -m store verify CACHE``.
"""
from .backends import BACKENDS, ReadStats
from .blob import FieldCodec
from .codecs import (PRESETS, Affine, CodecSpec, Int8AffineCodec, LosslessCodec, SparseScoreCodec, dequantize,
                     make_codec, measure_error, parse_codec_spec)
from .errors import CacheError, CorruptShardError, IncompleteCacheError, ManifestMismatch, SchemaError
from .fsutil import sha256_file
from .klt import KLTCodec, KLTCoeffs
from .manifest import Manifest
from .reader import Cache, open_cache
from .schema import (FIELDS, GROUPS, KEY_FIELDS, LEVELS, REGION_POSITIVE, REGION_VLR, STRIDES, FieldSpec,
                     expand_fields, field_spec, group_of)
from .writer import CacheWriter, ShardTask, ShardWriter, finalize, load_manifest, open_writer

__all__ = [
    "Affine", "BACKENDS", "Cache", "CacheError", "CacheWriter", "CodecSpec", "CorruptShardError", "FIELDS", "FieldCodec",
    "FieldSpec",
    "GROUPS", "IncompleteCacheError", "Int8AffineCodec", "KEY_FIELDS", "KLTCodec", "KLTCoeffs", "LEVELS",
    "LosslessCodec", "Manifest", "ManifestMismatch", "REGION_POSITIVE", "REGION_VLR", "ReadStats", "STRIDES",
    "SchemaError", "ShardTask", "ShardWriter", "SparseScoreCodec", "dequantize", "expand_fields", "field_spec",
    "PRESETS", "finalize", "group_of", "load_manifest", "make_codec", "measure_error", "open_cache", "open_writer",
    "parse_codec_spec", "sha256_file",
]
