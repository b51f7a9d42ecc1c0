"""torch datasets over a cache: streaming (IterableDataset) and random access (map-style).

Samples hold tensors of different sizes (views differ in aspect ratio), so use
``DataLoader(..., batch_size=None)`` or ``collate_fn=collate_list``. The cache is opened lazily
in each loader worker; streaming splits shards by rank (``torch.distributed`` if initialised) and
then by loader worker.

With ``decode="compact"`` the workers only decompress; payloads are tensors (shared memory between
processes) and the main process expands them on the accelerator:

    cache = open_cache(url, expect=...)
    loader = DataLoader(CacheIterableDataset(url, fields=["fpn"], decode="compact"), batch_size=None, num_workers=4)
    for sample in loader:
        teacher = cache.dequantize(sample, device="cuda")          # {"fpn.p3": (C, H, W) float32, ...}
"""
from __future__ import annotations

import torch
import torch.utils.data

from .codecs import to_torch
from .reader import Cache, open_cache


def collate_list(samples: list[dict]) -> list[dict]:
    return samples


def _tensors(sample: dict) -> dict:
    return {k: v if k.startswith("__") else to_torch(v) for k, v in sample.items()}


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CacheIterableDataset(torch.utils.data.IterableDataset):
    def __init__(self, url: str, fields=None, expect: dict | None = None, rank: int | None = None,
                 world_size: int | None = None, shuffle: bool = False, seed: int = 0, decode: str = "torch"):
        super().__init__()
        self.url, self.fields, self.expect = str(url), fields, expect
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch, self.decode = shuffle, seed, 0, decode
        self._cache: Cache | None = None
        open_cache(self.url, expect=expect)          # fail early, in the main process

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self._cache is None:
            self._cache = open_cache(self.url, expect=self.expect)
        rank, world = _dist_rank_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        for sample in self._cache.iter(fields=self.fields, rank=rank, world_size=world, shuffle=self.shuffle,
                                       seed=self.seed, epoch=self.epoch, decode=self.decode):
            yield _tensors(sample)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None                       # each worker opens its own
        return state


class CacheMapDataset(torch.utils.data.Dataset):
    """Random access: item i is the i-th (image_id, view_index) of ``keys`` (default: all)."""

    def __init__(self, url: str, fields=None, expect: dict | None = None, keys=None, decode: str = "torch"):
        self.url, self.fields, self.expect, self.decode = str(url), fields, expect, decode
        cache = open_cache(self.url, expect=expect)
        self.keys = [tuple(k) for k in (keys if keys is not None else cache.keys())]
        self._cache: Cache | None = cache

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        if self._cache is None:
            self._cache = open_cache(self.url, expect=self.expect)
        return _tensors(self._cache.get(*self.keys[i], fields=self.fields, decode=self.decode))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state
