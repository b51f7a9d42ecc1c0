"""The teacher side of a training batch, laid out like the student's batch.

Precompute runs the teacher on each view with canonical padding (its own size rounded up to 32),
so a cached dense map of level l is exactly the image's valid region ``(h_l, w_l)``
(:func:`detectors.detector.valid_level_sizes`). The student batch pads every image to the largest
in the batch. :func:`collate_teacher` places each image's maps top-left into zero maps of the
student batch's level sizes and records the valid region per level, so that a method can compare
``teacher.fpn[l][n]`` with ``student.features[l][n]`` location for location and mask with
``teacher.valid[l]``.

    teacher = collate_teacher(samples, [tuple(f.shape[-2:]) for f in student.features], device,
                              image_sizes=batch.image_sizes)

Level lists run over the student's pyramid, named by stride (``level_names``): P3..P7 for a
dense student, P2..P6 for a two-stage one (``fpn.p2`` .. ``fpn.p6``, ``head.rpn.obj.p2`` ..).

Region rows (LD's positives and VLR locations) are concatenated over the batch with a
``batch_index`` column; their ``index`` stays the flat ``(h * w_l + w) * A + a`` on the image's
*own* level grid of width ``w_l = valid_sizes[n][l][1]``, not the batch grid.

A two-stage teacher's RoI outputs on the student's RoIs are not fields: the trainer binds its
partial teacher (``train.partial_teacher``) to the batch's maps as ``TeacherBatch.roi_head``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from detectors.detector import valid_level_sizes
from store.schema import BACKBONE_LEVEL, BACKBONE_STAGES, LEVELS, STRIDES

# Dense field prefixes and the TeacherBatch attribute each fills.
DENSE_PREFIXES = {"fpn": "fpn", "head.cls": "cls", "head.box": "box", "head.ctr": "ctr",
                  "head.rpn.obj": "rpn_obj", "head.rpn.box": "rpn_box"}
REGION_PREFIX = "region."
REGION_INT_FIELDS = ("level", "index", "kind", "gt")


@dataclass
class TeacherBatch:
    """Teacher fields of one student batch. Level lists run over the student's levels (P3..P7, or
    P2..P6 for a two-stage student)."""

    fpn: list[Tensor] | None                 # per level (N, C, H_l, W_l), zero outside valid
    cls: list[Tensor] | None                 # per level (N, A*K, H_l, W_l) class logits, zero outside valid
    box: list[Tensor] | None                 # per level (N, A*B, H_l, W_l) box outputs, zero outside valid
    valid: list[Tensor]                      # per level (N, 1, H_l, W_l) bool: each image's canonical region
    region: dict[str, Tensor] | None         # rows over the batch: "batch_index" (R,) long + region.* without
    #                                          the prefix: level, index, kind, gt (long), iou (R,), cls (R, K),
    #                                          box_dist (R, B) float
    valid_sizes: list[list[tuple[int, int]]]  # per image, per level: (h_l, w_l) of the valid region
    image_ids: list[int] | None = None       # meta.image_id per image, when the samples carry it
    # Backbone stages read from the cache, by name ("c3", "c4", "c5"): (N, C_l, H_l, W_l) on the
    # grid of the level of the same stride (c4 -> P4: ``valid[1]``), zero outside valid; None
    # when the samples hold no ``backbone.*`` field.
    backbone: dict[str, Tensor] | None = None
    # Per level (N, A, H_l, W_l) centerness logits (``head.ctr``: FCOS), zero outside valid; None
    # when the samples hold none.
    ctr: list[Tensor] | None = None
    # A two-stage teacher's RPN maps (``head.rpn.*``), per level (N, A, H_l, W_l) objectness logits and
    # (N, 4A, H_l, W_l) deltas, zero outside valid; None when the samples hold none.
    rpn_obj: list[Tensor] | None = None
    rpn_box: list[Tensor] | None = None
    # A two-stage teacher's RoI head on this batch's maps: per-image RoIs [(R_i, 4) xyxy view pixels]
    # -> (pooled (R, C, S, S), class logits (R, K+1), deltas (R, 4(K+1))), rows image after image
    # (``train.partial_teacher.PartialTeacher.bind``); None unless the method reads it.
    roi_head: Callable[[Sequence[Tensor]], tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def num_images(self) -> int:
        return self.valid[0].shape[0]

    @property
    def level_sizes(self) -> list[tuple[int, int]]:
        return [tuple(v.shape[-2:]) for v in self.valid]


def collate_teacher(samples: Sequence[dict], level_sizes: Sequence[tuple[int, int]], device: torch.device | str,
                    image_sizes: Sequence[tuple[int, int]] | None = None,
                    strides: tuple[int, ...] = STRIDES) -> TeacherBatch:
    """Stacks per-image teacher samples (store vocabulary) into a :class:`TeacherBatch`.

    Args:
        samples: one dict per image of the student batch, in batch order: field name -> array or
            tensor (``fpn.p3`` (C, h, w), ``region.cls`` (R, K), ``meta.valid_hw`` (2,), ...).
        level_sizes: the student batch's (H_l, W_l) per level.
        device: where the batch goes.
        image_sizes: the student batch's valid image sizes (pixels). The valid region of each
            image comes from, in order: this argument, the sample's ``meta.valid_hw``,
            ``meta.level_hw``, or the shapes of its dense maps. Dense maps must match it exactly.

    Only the groups present in the samples are filled (``fpn``/``cls``/``box``/``ctr``/``region``
    are ``None`` otherwise); a group must be present in every sample or in none. ``backbone`` holds
    the stages the samples carry (any subset of c3..c5, the same in every sample).
    """
    if not samples:
        raise ValueError("collate_teacher needs at least one sample")
    if image_sizes is not None and len(image_sizes) != len(samples):
        raise ValueError(f"{len(image_sizes)} image sizes for {len(samples)} teacher samples")
    num_levels = len(level_sizes)
    levels = level_names(strides[:num_levels])
    device = torch.device(device)
    num_images = len(samples)

    valid_sizes = [_valid_sizes(sample, levels, strides[:num_levels],
                                None if image_sizes is None else image_sizes[i], i)
                   for i, sample in enumerate(samples)]
    valid = []
    for level, (map_h, map_w) in enumerate(level_sizes):
        mask = torch.zeros(num_images, 1, map_h, map_w, dtype=torch.bool, device=device)
        for index, sizes in enumerate(valid_sizes):
            h, w = sizes[level]
            if h > map_h or w > map_w:
                raise ValueError(f"image {index} of the batch has a valid region {h}x{w} on {levels[level]}, larger "
                                 f"than the batch's level map {map_h}x{map_w}")
            mask[index, :, :h, :w] = True
        valid.append(mask)

    dense: dict[str, list[Tensor] | None] = {}
    for prefix, attribute in DENSE_PREFIXES.items():
        names = [f"{prefix}.{level}" for level in levels]
        present = [all(name in sample for name in names) for sample in samples]
        partial = [any(name in sample for name in names) and not full for sample, full in zip(samples, present)]
        if any(partial) or (any(present) and not all(present)):
            raise ValueError(f"teacher field group {prefix!r} must hold all of {names} in every sample of the batch, "
                             f"or be absent from all of them")
        if not all(present):
            dense[attribute] = None
            continue
        dense[attribute] = [_stack_dense(samples, name, level, level_sizes[level], valid_sizes, device)
                            for level, name in enumerate(names)]

    backbone = None
    stages = [stage for stage in BACKBONE_STAGES if BACKBONE_LEVEL[stage] in levels]
    present = [tuple(s for s in stages if f"backbone.{s}" in sample) for sample in samples]
    if any(present):
        if any(other != present[0] for other in present):
            raise ValueError(f"every teacher sample must hold the same backbone fields; got {sorted(set(present))}")
        backbone = {}
        for stage in present[0]:
            level = levels.index(BACKBONE_LEVEL[stage])
            backbone[stage] = _stack_dense(samples, f"backbone.{stage}", level, level_sizes[level], valid_sizes,
                                           device)

    image_ids = None
    if all("meta.image_id" in sample for sample in samples):
        image_ids = [int(_as_tensor(sample["meta.image_id"])) for sample in samples]

    return TeacherBatch(fpn=dense["fpn"], cls=dense["cls"], box=dense["box"], valid=valid,
                        region=_collate_region(samples, device), valid_sizes=valid_sizes, image_ids=image_ids,
                        backbone=backbone, ctr=dense["ctr"], rpn_obj=dense["rpn_obj"], rpn_box=dense["rpn_box"])


def level_names(strides: Sequence[int]) -> list[str]:
    """Field level names of pyramid strides: 8 -> "p3", 4 -> "p2" (a level's stride is 2 ** its number)."""
    names = []
    for stride in strides:
        number = int(round(math.log2(stride)))
        if 2 ** number != stride:
            raise ValueError(f"a pyramid stride must be a power of 2, got {stride}")
        names.append(f"p{number}")
    return names


def _stack_dense(samples: Sequence[dict], name: str, level: int, map_size: tuple[int, int],
                 valid_sizes: list[list[tuple[int, int]]], device: torch.device) -> Tensor:
    """(N, C, H_l, W_l) float32: each sample's ``name`` map placed top-left on the batch grid of ``level``."""
    map_h, map_w = map_size
    channels = _as_tensor(samples[0][name]).shape[0]
    out = torch.zeros(len(samples), channels, map_h, map_w, dtype=torch.float32, device=device)
    for index, sample in enumerate(samples):
        value = _as_tensor(sample[name])
        expected = (channels, *valid_sizes[index][level])
        if tuple(value.shape) != expected:
            raise ValueError(f"teacher field {name} of image {index} ({_key(sample)}) has shape "
                             f"{tuple(value.shape)}, expected {expected} (channels, valid region); "
                             f"the cache and the student batch disagree on the view")
        h, w = valid_sizes[index][level]
        out[index, :, :h, :w] = value.to(device=device, dtype=torch.float32, non_blocking=True)
    return out


def _collate_region(samples: Sequence[dict], device: torch.device) -> dict[str, Tensor] | None:
    names_per_sample = [sorted(name for name in sample if name.startswith(REGION_PREFIX)) for sample in samples]
    if not any(names_per_sample):
        return None
    names = names_per_sample[0]
    if any(other != names for other in names_per_sample):
        raise ValueError(f"every teacher sample must hold the same region fields; got {names_per_sample}")
    region: dict[str, list[Tensor]] = {name[len(REGION_PREFIX):]: [] for name in names}
    batch_index = []
    for index, sample in enumerate(samples):
        rows = None
        for name in names:
            value = _as_tensor(sample[name])
            key = name[len(REGION_PREFIX):]
            value = value.to(torch.long) if key in REGION_INT_FIELDS else value.to(torch.float32)
            if rows is None:
                rows = value.shape[0]
            elif value.shape[0] != rows:
                raise ValueError(f"region fields of image {index} ({_key(sample)}) disagree on the row count: "
                                 f"{name} has {value.shape[0]}, expected {rows}")
            region[key].append(value)
        batch_index.append(torch.full((rows,), index, dtype=torch.long))
    out = {key: torch.cat(values).to(device, non_blocking=True) for key, values in region.items()}
    out["batch_index"] = torch.cat(batch_index).to(device, non_blocking=True)
    return out


def _valid_sizes(sample: dict, levels: Sequence[str], strides: tuple[int, ...],
                 image_size: tuple[int, int] | None, index: int) -> list[tuple[int, int]]:
    if image_size is not None:
        return valid_level_sizes((int(image_size[0]), int(image_size[1])), strides)
    if "meta.valid_hw" in sample:
        h, w = (int(v) for v in _as_tensor(sample["meta.valid_hw"]).tolist())
        return valid_level_sizes((h, w), strides)
    if "meta.level_hw" in sample and list(levels) == list(LEVELS[:len(levels)]):  # level_hw is P3..P7
        level_hw = _as_tensor(sample["meta.level_hw"]).tolist()
        return [(int(h), int(w)) for h, w in level_hw[:len(levels)]]
    for prefix in DENSE_PREFIXES:
        names = [f"{prefix}.{level}" for level in levels]
        if all(name in sample for name in names):
            return [tuple(int(d) for d in _as_tensor(sample[name]).shape[-2:]) for name in names]
    raise ValueError(f"teacher sample {index} ({_key(sample)}) gives no valid region: pass image_sizes, or cache "
                     f"meta.valid_hw / meta.level_hw or dense maps")


def _as_tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()  # torch warns on read-only buffers (memory-mapped or decoded cache arrays)
    return torch.as_tensor(value)


def _key(sample: dict) -> str:
    if "meta.image_id" in sample:
        view = f", view {int(_as_tensor(sample['meta.view_index']))}" if "meta.view_index" in sample else ""
        return f"image_id {int(_as_tensor(sample['meta.image_id']))}{view}"
    return "no key"
