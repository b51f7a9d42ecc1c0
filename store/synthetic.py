"""Synthetic teacher outputs with the right shapes and FPN-like structure (tests, benchmarks).

This is NOT real teacher data. ``StructuredFPN`` imitates what makes real FPN maps compressible:
a per-level mixing matrix shared by all images (the "teacher"), applied to a few spatially smooth
latent maps per image (low rank across channels, smooth in space), plus a per-channel bias and
i.i.d. noise. Compression figures on it depend on these parameters; re-run the benchmark on real
teacher outputs (bench/bench_store.py --input) before quoting them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import (GROUPS, KEY_FIELDS, LEVELS, REGION_POSITIVE, REGION_VLR, STRIDES, TWO_STAGE_LEVELS,
                     expand_fields)


def _smooth(z: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (FFT), renormalised to unit std per map."""
    h, w = z.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    out = np.fft.irfft2(np.fft.rfft2(z) * gain, s=(h, w))
    std = out.std(axis=(-2, -1), keepdims=True)
    return out / np.where(std > 0, std, 1)


@dataclass
class StructuredFPN:
    """FPN-like maps: x = A z + b + noise, A (C, rank) fixed per level, z (rank, H, W) smooth."""
    channels: int = 256
    rank: int = 32
    decay: float = 0.7          # singular value of latent j ~ j**-decay
    sigma: float = 1.5          # spatial smoothness of the latents, in pixels of the level
    noise: float = 0.03         # i.i.d. noise std relative to the signal std
    bias: float = 0.3
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        scales = np.arange(1, self.rank + 1) ** -self.decay
        self._mix = [rng.standard_normal((self.channels, self.rank)) * scales for _ in LEVELS]
        self._bias = [rng.standard_normal((self.channels, 1, 1)) * self.bias for _ in LEVELS]

    def level(self, level: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        z = _smooth(rng.standard_normal((self.rank, h, w)), self.sigma)
        x = np.einsum("cr,rhw->chw", self._mix[level], z) + self._bias[level]
        x += self.noise * x.std() * rng.standard_normal(x.shape)
        return x.astype(np.float32)


def level_sizes(valid_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(H_l, W_l) for P3..P7 of a view padded to a multiple of 32 (ceil division per stride)."""
    h, w = (-(-valid_hw[0] // 32) * 32, -(-valid_hw[1] // 32) * 32)
    return [(-(-h // s), -(-w // s)) for s in STRIDES]


def make_sample(image_id: int, view_index: int, valid_hw=(96, 128), fields=None, *, channels: int = 16,
                num_classes: int = 5, anchors: int = 1, box_dims: int = 4, regions: int = 12, gt: int = 3,
                rpn_anchors: int = 3, fpn: StructuredFPN | None = None, seed: int | None = None) -> dict:
    """A sample with every field of the schema but the optional ones (FCOS's ``head.ctr``, a
    two-stage teacher's ``fpn.p2`` and ``head.rpn.*``), or the ``fields`` given (which may name
    them), consistent shapes."""
    rng = np.random.default_rng(seed if seed is not None else image_id * 1009 + view_index)
    sizes = level_sizes(valid_hw)
    sample = {
        "meta.image_id": np.int64(image_id),
        "meta.view_index": np.int32(view_index),
        "meta.orig_hw": np.array(valid_hw, np.int32) * 2,
        "meta.valid_hw": np.array(valid_hw, np.int32),
        "meta.level_hw": np.array(sizes, np.int32),
        "meta.gt_boxes_xyxy": (rng.random((gt, 4)) * 64).astype(np.float32),
        "meta.gt_labels": rng.integers(0, num_classes, gt).astype(np.int64),
    }
    for i, (level, (h, w)) in enumerate(zip(LEVELS, sizes)):
        sample[f"fpn.{level}"] = (fpn.level(i, h, w, rng) if fpn is not None
                                  else rng.standard_normal((channels, h, w)).astype(np.float32))
        sample[f"head.cls.{level}"] = (rng.standard_normal((anchors * num_classes, h, w)) * 2 - 5).astype(np.float32)
        sample[f"head.box.{level}"] = rng.standard_normal((anchors * box_dims, h, w)).astype(np.float32)
        sample[f"head.ctr.{level}"] = (rng.standard_normal((anchors, h, w)) * 2 - 2).astype(np.float32)
    level = rng.integers(0, len(LEVELS), regions)
    sample.update({
        "region.level": level.astype(np.int8),
        "region.index": np.array([rng.integers(0, sizes[l][0] * sizes[l][1] * anchors) for l in level], np.int32),
        "region.kind": rng.choice([REGION_POSITIVE, REGION_VLR], regions).astype(np.int8),
        "region.gt": rng.integers(0, gt, regions).astype(np.int32),
        "region.iou": rng.random(regions).astype(np.float32),
        "region.cls": rng.standard_normal((regions, num_classes)).astype(np.float32),
        "region.box_dist": rng.standard_normal((regions, box_dims)).astype(np.float32),
        "image.encoded": rng.integers(0, 256, 200 + image_id % 50).astype(np.uint8),
    })
    keep = set(expand_fields(GROUPS if fields is None else fields)) | set(KEY_FIELDS)
    if any(name == "fpn.p2" or name.startswith("head.rpn.") for name in keep):
        # drawn last and only when asked: the other fields stay those of the same seed without them
        two_stage_sizes = dict(zip(TWO_STAGE_LEVELS, [(2 * sizes[0][0], 2 * sizes[0][1]), *sizes[:4]]))  # P2 = 2 x P3
        sample["fpn.p2"] = rng.standard_normal((channels, *two_stage_sizes["p2"])).astype(np.float32)
        for level, (h, w) in two_stage_sizes.items():
            sample[f"head.rpn.obj.{level}"] = (rng.standard_normal((rpn_anchors, h, w)) * 2 - 3).astype(np.float32)
            sample[f"head.rpn.box.{level}"] = rng.standard_normal((4 * rpn_anchors, h, w)).astype(np.float32)
    return {k: v for k, v in sample.items() if k in keep}
