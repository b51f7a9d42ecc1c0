"""The streaming student data: one cached view per image per epoch, rebuilt from the image, zipped
with its teacher fields.

Every epoch draws, for every image, one of the cache's views (deterministic in ``(seed, epoch)``)
and a shuffled image order; the order is split between DDP ranks and cut into batches:

    plan = epoch_plan(num_images, num_views, seed, epoch, batch_size, rank, world_size)
    plan[k]          # batch k of this rank: [(image_index, view_index), ...]

A loader worker builds batch ``k``: it decodes each image and applies exactly that view with
``CocoDetection.load`` (``detectors.views.apply_view``, the code path precompute used, so teacher
and student see the same pixels), collates the student batch, and asks the teacher source for its
views' fields in compact form, in one read for the batch (``source.prefetch_many``: the cache's
shard blobs decompressed, still quantised). The main process dequantises them on the training
device (``source.fetch``).

Bad images follow the dataset's ``on_error``: under ``"skip"`` an image that cannot be read or
decoded is replaced by the next good one (its own teacher fields are fetched, so teacher and
student still see the same pixels) and named in ``StudentItem.replaced``; under ``"raise"``, and
always for an image whose bytes differ from the hash the cache recorded, the item carries the
one-line error (``StudentItem.error``) that the trainer raises: an exception raised in a loader
worker would reach the user wrapped in the worker's traceback.

Read-ahead (``prefetch_batches`` = N > 0): when a process builds batch ``k`` it has already
started the teacher reads of the next N batches it will build (``k + j * workers``: the loader
hands batches to its workers in turn), in a pool of N threads; the read of batch ``k`` is then
mostly done, so a remote cache's round trips (HTTP, object store) overlap the steps instead of
adding to them. The payloads are the same bytes either way; a batch whose images the skip policy
replaced is read again for its actual views.

The data position is ``(epoch, step)``: a resumed run rebuilds the epoch's plan from the seed and
starts its loader at batch ``step``, so it sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.data import CocoDetection, DataError
from detectors.views import Batch, collate
from store.codecs import map_tensors

View = tuple[int, int]  # (image_index into dataset.image_ids, view_index into the cache's views)


def epoch_draw(num_images: int, num_views: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's image order (num_images,) and each image's view (num_images,), indexed by image."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(num_images)
    views = rng.integers(0, num_views, size=num_images)
    return order, views


def epoch_plan(num_images: int, num_views: int, seed: int, epoch: int, batch_size: int, rank: int = 0,
               world_size: int = 1, drop_last: bool = True) -> list[list[View]]:
    """Batches of (image_index, view_index) that ``rank`` trains on in ``epoch``.

    Ranks take every ``world_size``-th image of the epoch's order, cut to the same count on every
    rank (so all ranks run the same number of steps); ``drop_last`` drops the last partial batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    order, views = epoch_draw(num_images, num_views, seed, epoch)
    per_rank = num_images // world_size
    mine = order[rank::world_size][:per_rank]
    batches = [[(int(i), int(views[i])) for i in mine[start:start + batch_size]]
               for start in range(0, len(mine), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    per_rank = num_images // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


@dataclass
class StudentItem:
    """What the loader yields: the student batch (CPU) and its teacher payloads (one per image)."""

    batch: Batch | None           # None when ``error`` is set
    teacher: list[Any] | None     # source.prefetch_many's payload per image (None for the online source)
    replaced: list[str] = field(default_factory=list)   # bad images replaced by the next good one (skip)
    error: str | None = None      # a bad image under on_error="raise", or a changed image: the message

    def pin_memory(self) -> StudentItem:  # DataLoader(pin_memory=True)
        if self.batch is None:
            return self
        self.batch.images = self.batch.images.pin_memory()
        if self.teacher is not None:
            self.teacher = [_pin(payload) for payload in self.teacher]
        return self


def _pin(payload: Any) -> Any:
    """A teacher payload in pinned memory, the compact forms' inner arrays included."""
    if isinstance(payload, dict):
        return {k: map_tensors(v, Tensor.pin_memory) for k, v in payload.items()}
    return payload


class ReadAhead:
    """The teacher payloads of a plan's batches, read ``depth`` batches ahead in a pool of ``depth`` threads.

    ``take(k, stride)`` returns the future of batch ``k``'s read and starts those of batches
    ``k + stride``, ..., ``k + depth * stride`` (the next batches this process builds); reads of
    batches before ``k`` that were never taken are cancelled. The pool lives in the process that
    first calls ``take`` (a loader worker makes its own).
    """

    def __init__(self, source: Any, keys: Sequence[list[tuple[int, int]]], depth: int) -> None:
        self.source, self.keys, self.depth = source, keys, depth
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    def take(self, k: int, stride: int = 1) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="teacher-read-ahead")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        for stale in [i for i in self._pending if i < k]:
            self._pending.pop(stale).cancel()
        for ahead in range(k, min(len(self.keys), k + (self.depth + 1) * stride), stride):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self.source.prefetch_many, self.keys[ahead])
        return self._pending.pop(k)

    def __getstate__(self) -> dict:      # a loader worker starts with no pool and no reads of its own
        return dict(self.__dict__, _pool=None, _pending={})


class StudentBatches(torch.utils.data.Dataset):
    """Item ``k``: batch ``k`` of a plan, images viewed and collated, zipped with the teacher payloads.

    Args:
        dataset: the training split with the cache's views (``CocoDetection(..., views=cache views)``).
        plan: batches of (image_index, view_index), e.g. ``epoch_plan(...)[start_step:]``.
        source: the teacher source (``train.sources``), or None when the method reads no field.
        prefetch_batches: how many batches ahead the teacher reads start (see the module docstring).
    """

    def __init__(self, dataset: CocoDetection, plan: Sequence[Sequence[View]], source: Any = None,
                 prefetch_batches: int = 0) -> None:
        self.dataset, self.plan, self.source = dataset, [list(b) for b in plan], source
        self.read_ahead = None
        if source is not None and prefetch_batches > 0:
            keys = [[(int(dataset.image_ids[i]), int(v)) for i, v in batch] for batch in self.plan]
            self.read_ahead = ReadAhead(source, keys, prefetch_batches)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> StudentItem:
        samples, replaced = [], []
        ahead = None
        if self.read_ahead is not None:
            info = torch.utils.data.get_worker_info()
            ahead = self.read_ahead.take(k, 1 if info is None else info.num_workers)
        try:
            for image_index, view_index in self.plan[k]:
                sample = self.dataset.load(image_index, view_index)
                expected = self.dataset.image_ids[image_index]
                if sample.image_id != expected:  # the skip policy replaced a bad image by the next good one
                    replaced.append(f"image id {expected} ({self.dataset.image_info(image_index).path})")
                samples.append(sample)
        except DataError as error:  # handed to the trainer as one line (see the module docstring)
            return StudentItem(None, None, error=str(error))
        batch = collate(samples)
        payloads = None
        if self.source is not None:     # the batch's views in one read (a cache's Cache.get_many)
            keys = [(int(i), int(v)) for i, v in zip(batch.image_ids, batch.view_indices)]
            if ahead is not None and keys == self.read_ahead.keys[k]:
                payloads = ahead.result()
            else:                       # no read-ahead, or the skip policy replaced an image
                payloads = self.source.prefetch_many(keys)
        return StudentItem(batch, payloads, replaced)


def make_loader(dataset: CocoDetection, plan: Sequence[Sequence[View]], source: Any, workers: int,
                seed: int, epoch: int, pin_memory: bool = False, prefetch_batches: int = 0
                ) -> torch.utils.data.DataLoader:
    """A loader over the plan's batches in order, with teacher reads ``prefetch_batches`` batches ahead.
    Its own generator keeps the global RNG untouched (creating a loader iterator otherwise draws from
    it, and a resumed run would diverge)."""
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.utils.data.DataLoader(
        StudentBatches(dataset, plan, source, prefetch_batches), batch_size=None, shuffle=False,
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=2 if workers else None,
        persistent_workers=False, generator=generator)
