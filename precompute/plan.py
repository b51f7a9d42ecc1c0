"""What precompute computes, in which order, and how it batches: tasks, shards, batches.

Tasks are the (image, view) pairs in one deterministic order, image-major and view-minor:
``position = image_index * num_views + view_index`` over ``dataset.image_ids``. Shard ``k`` of the
cache holds positions ``[k * shard_size, (k + 1) * shard_size)`` (store/writer.py), so a shard's
samples never depend on how many processes wrote the cache or on an earlier interrupted run.

Batches hold views of one canonical padded shape only (each view's size rounded up to 32 on its
own), so a batch never pads an image beyond its canonical size. Shapes are known from the
annotation's image sizes without decoding. A rank batches the tasks of a window of its pending
shards at a time (``window`` shards), grouped by shape, batches ordered by their first position.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from detectors.data import CocoDetection, DataError
from detectors.views import Batch, collate, padded_size, view_size


@dataclass(frozen=True)
class TaskOrder:
    """Positions <-> (image index, view index), image-major."""

    num_images: int
    num_views: int

    @property
    def num_samples(self) -> int:
        return self.num_images * self.num_views

    def task(self, position: int) -> tuple[int, int]:
        return divmod(position, self.num_views)

    def position(self, image_index: int, view_index: int) -> int:
        return image_index * self.num_views + view_index


def padded_shape_fn(dataset: CocoDetection, order: TaskOrder) -> Callable[[int], tuple[int, int]]:
    """position -> canonical padded (H, W) of that view, from the annotation's image size."""
    def shape(position: int) -> tuple[int, int]:
        image_index, view_index = order.task(position)
        info = dataset.image_info(image_index)
        return padded_size(view_size((info.height, info.width), dataset.views[view_index]))
    return shape


def plan_batches(positions: Sequence[int], shape_of: Callable[[int], tuple[int, int]],
                 batch_size: int) -> list[list[int]]:
    """Batches (lists of positions) of at most ``batch_size`` views of one padded shape each,
    ordered by their first position; deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for position in positions:
        groups.setdefault(shape_of(position), []).append(position)
    batches = [members[i:i + batch_size] for members in groups.values()
               for i in range(0, len(members), batch_size)]
    return sorted(batches, key=lambda b: b[0])


def plan_windows(shard_positions: Sequence[Sequence[int]], shape_of: Callable[[int], tuple[int, int]],
                 batch_size: int, window: int, keep: Sequence[bool] | None = None) -> list[list[int]]:
    """Batches over consecutive windows of ``window`` shards (each given as its positions).

    ``keep``: per shard, whether it still has to be computed; only the windows holding such a shard
    are planned, whole. A resumed rank plans over every shard it owns and passes the pending ones
    here, so each view is batched with the same partners as in an uninterrupted run (a
    convolution's float result depends on its batch) and the resumed cache is bit-identical, at the
    cost of recomputing the committed shards of the windows it resumes (at most ``window - 1``)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batches: list[list[int]] = []
    for start in range(0, len(shard_positions), window):
        if keep is not None and not any(keep[start:start + window]):
            continue
        positions = [p for shard in shard_positions[start:start + window] for p in shard]
        batches += plan_batches(positions, shape_of, batch_size)
    return batches


@dataclass
class PlannedBatch:
    """A collated batch and the task positions of its images (what the loader yields)."""

    positions: list[int]
    batch: Batch
    image_bytes: list[bytes] | None = None

    def pin_memory(self) -> "PlannedBatch":  # called by DataLoader(pin_memory=True)
        self.batch.images = self.batch.images.pin_memory()
        return self


class ViewBatches(torch.utils.data.Dataset):
    """Item ``k``: the views of ``batches[k]`` loaded, transformed and collated."""

    def __init__(self, dataset: CocoDetection, order: TaskOrder, batches: list[list[int]],
                 image_bytes: bool = False) -> None:
        self.dataset, self.order, self.batches, self.image_bytes = dataset, order, batches, image_bytes

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> PlannedBatch:
        samples, blobs = [], []
        for position in self.batches[k]:
            image_index, view_index = self.order.task(position)
            sample = self.dataset.load(image_index, view_index)
            expected = self.dataset.image_ids[image_index]
            if sample.image_id != expected:  # the skip policy replaced an undecodable image
                raise DataError(f"image id {expected} ({self.dataset.image_info(image_index).path}) could not be "
                                f"decoded now although it was read before the cache was declared (the scan "
                                f"recorded it as good); restore the file and rerun the same command")
            samples.append(sample)
            if self.image_bytes:
                blobs.append(self.dataset.image_info(image_index).path.read_bytes())
        return PlannedBatch(list(self.batches[k]), collate(samples), blobs if self.image_bytes else None)


def calibration_positions(num_samples: int, count: int) -> list[int]:
    """``count`` positions spread evenly over the task order (for fitting KLT codecs)."""
    count = max(1, min(count, num_samples))
    return sorted({round(i * (num_samples - 1) / max(1, count - 1)) for i in range(count)})
