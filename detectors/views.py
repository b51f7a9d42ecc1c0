"""Views: deterministic transforms of a source image, the unit of caching.

A view is ``(flip, short, max_size)``. Applying it to an image resizes with mmdetection's
keep-ratio rule, flips horizontally if asked, and normalises with ImageNet mean/std. The same
function runs in precompute (teacher) and in the trainer (student), so both see the same pixels.

Coordinates: "original pixels" are the decoded source image's; "view pixels" are the resized
(and possibly flipped) image's. Boxes are ``xyxy`` in continuous pixel coordinates (the image
spans ``[0, w] x [0, h]``), so a horizontal flip maps ``x -> w - x``.

Canonical padding: every image is padded on its own to a multiple of ``SIZE_DIVISOR``
(``padded_size``); ``collate`` pads a batch to the largest padded size in it. A detector's
output on the valid region therefore does not depend on the image's batch-mates.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

SIZE_DIVISOR = 32
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # in 0..255 units
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ViewSpec:
    """A deterministic view: optional horizontal flip, then keep-ratio resize.

    The scale is ``min(short / min(h, w), max_size / max(h, w))`` (mmdetection's
    ``Resize(scale=(max_size, short), keep_ratio=True)``).
    """

    flip: bool = False
    short: int = 800  # target short side, view pixels
    max_size: int = 1333  # cap on the long side, view pixels

    def __post_init__(self):
        if not isinstance(self.flip, bool):
            raise ValueError(f"ViewSpec.flip must be a bool, got {self.flip!r}")
        for name in ("short", "max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViewSpec.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViewSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViewSpec keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def key(self) -> str:
        """Short stable name, e.g. ``s800m1333f1``."""
        return f"s{self.short}m{self.max_size}f{int(self.flip)}"


@dataclass
class Sample:
    """One (image, view) ready for a detector."""

    image: Tensor  # (3, h, w) float32, ImageNet-normalised, view pixels
    boxes_xyxy: Tensor  # (n, 4) float32, view pixels
    labels: Tensor  # (n,) int64, contiguous in [0, num_classes)
    image_id: int  # COCO image id
    view_index: int  # index into the dataset's view list
    view: ViewSpec
    orig_size: tuple[int, int]  # (h, w) of the decoded source image, original pixels


@dataclass
class Batch:
    """Samples padded with zeros to a common size (a multiple of ``SIZE_DIVISOR``)."""

    images: Tensor  # (N, 3, H, W) float32
    image_sizes: list[tuple[int, int]]  # valid (unpadded) (h, w) per image, view pixels
    targets: list[dict[str, Tensor]]  # per image: boxes (n, 4) view pixels xyxy, labels (n,)
    image_ids: list[int]
    view_indices: list[int]
    views: list[ViewSpec]
    # (h, w) of each source image in original pixels, for mapping detections back with
    # view_boxes_to_original; None when the producer of the batch does not know them.
    orig_sizes: list[tuple[int, int]] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the image and target tensors on ``device``."""
        targets = [
            {k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets
        ]
        return replace(self, images=self.images.to(device, non_blocking=non_blocking), targets=targets)


def view_size(orig_hw: tuple[int, int], spec: ViewSpec) -> tuple[int, int]:
    """(h, w) in view pixels after the keep-ratio resize (mmcv's rounding: ``int(x * s + 0.5)``)."""
    h, w = orig_hw
    scale = min(spec.short / min(h, w), spec.max_size / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def apply_view(image_chw_uint8: Tensor, boxes_xyxy: Tensor, spec: ViewSpec) -> tuple[Tensor, Tensor]:
    """Resize (bilinear, antialiased), flip, normalise; transform the boxes the same way.

    Args:
        image_chw_uint8: (3, h, w) uint8 RGB, original pixels.
        boxes_xyxy: (n, 4) original pixels.
    Returns:
        image (3, h', w') float32 normalised, and boxes (n, 4) float32 in view pixels.
    """
    if image_chw_uint8.dtype != torch.uint8 or image_chw_uint8.ndim != 3 or image_chw_uint8.shape[0] != 3:
        raise ValueError(
            f"apply_view expects a (3, h, w) uint8 image, got {tuple(image_chw_uint8.shape)} "
            f"{image_chw_uint8.dtype}"
        )
    orig_h, orig_w = image_chw_uint8.shape[-2:]
    new_h, new_w = view_size((orig_h, orig_w), spec)
    image = image_chw_uint8
    if (new_h, new_w) != (orig_h, orig_w):
        image = TF.resize(image, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if spec.flip:
        image = image.flip(-1)
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB).view(3, 1, 1)
    image = (image.float() - mean) / std  # (3, h', w')

    scale_xyxy = torch.tensor([new_w / orig_w, new_h / orig_h] * 2)
    boxes = boxes_xyxy.float().reshape(-1, 4) * scale_xyxy  # (n, 4) view pixels
    if spec.flip:
        boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
    return image, boxes


def view_boxes_to_original(boxes_xyxy: Tensor, view: ViewSpec, orig_size: tuple[int, int]) -> Tensor:
    """Undo ``apply_view`` on boxes: view pixels -> original pixels (unflip, then unscale).

    Args:
        boxes_xyxy: (n, 4) view pixels.
        orig_size: (h, w) of the source image, original pixels.
    Returns:
        (n, 4) float32, original pixels.
    """
    orig_h, orig_w = orig_size
    new_h, new_w = view_size(orig_size, view)
    boxes = torch.as_tensor(boxes_xyxy).float().reshape(-1, 4)
    if view.flip:
        boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
    scale_xyxy = torch.tensor([orig_w / new_w, orig_h / new_h] * 2, device=boxes.device)
    return boxes * scale_xyxy


def padded_size(hw: tuple[int, int], divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """Canonical padded (H, W): each side rounded up to a multiple of ``divisor``."""
    h, w = hw
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def collate(samples: list[Sample]) -> Batch:
    """Pad images with zeros to the largest canonical padded size in the batch."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    image_sizes = [(int(s.image.shape[-2]), int(s.image.shape[-1])) for s in samples]
    padded = [padded_size(hw) for hw in image_sizes]
    batch_h = max(h for h, _ in padded)
    batch_w = max(w for _, w in padded)
    images = samples[0].image.new_zeros((len(samples), 3, batch_h, batch_w))  # (N, 3, H, W)
    for i, s in enumerate(samples):
        h, w = image_sizes[i]
        images[i, :, :h, :w] = s.image
    return Batch(
        images=images,
        image_sizes=image_sizes,
        targets=[{"boxes": s.boxes_xyxy, "labels": s.labels} for s in samples],
        image_ids=[s.image_id for s in samples],
        view_indices=[s.view_index for s in samples],
        views=[s.view for s in samples],
        orig_sizes=[tuple(s.orig_size) for s in samples],
    )


_VIEW_ITEM = re.compile(r"^(\d+)(?::(\d+))?(:flip)?$")
_MULTISCALE_ITEM = re.compile(r"^ms:(\d+):(\d+)-(\d+)(?::(\d+))?(:noflip)?$")


def parse_view_list(text: str, seed: int = 0) -> list[ViewSpec]:
    """Views from the command line (``--views``, ``--eval-view``): comma-separated items, each one of

    ``default``                    800:1333 and 800:1333:flip (the official single-scale runs)
    ``SHORT[:MAX][:flip]``         one view, e.g. ``160:256:flip`` (MAX defaults to 1333)
    ``ms:K:LO-HI[:MAX][:noflip]``  K views with short sides drawn uniformly from [LO, HI], each
                                   flipped with probability 0.5 unless ``noflip`` (ICD-style
                                   multi-scale, :func:`multiscale_views`); deterministic for a seed.

    A view may not repeat.

    >>> parse_view_list("800:1333,800:1333:flip")
    [ViewSpec(flip=False, short=800, max_size=1333), ViewSpec(flip=True, short=800, max_size=1333)]
    """
    views: list[ViewSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        single, multiscale = _VIEW_ITEM.match(item), _MULTISCALE_ITEM.match(item)
        if item == "default":
            views += [ViewSpec(False, 800, 1333), ViewSpec(True, 800, 1333)]
        elif single:
            short, max_size, flip = single.groups()
            views.append(ViewSpec(flip=flip is not None, short=int(short), max_size=int(max_size or 1333)))
        elif multiscale:
            k, lo, hi, max_size, noflip = multiscale.groups()
            # seed + len(views): two ms: items of one list draw different scales
            views += multiscale_views(int(k), (int(lo), int(hi)), int(max_size or 1333), seed=seed + len(views),
                                      flip=noflip is None)
        elif item.startswith("ms:"):
            raise ValueError(f"cannot parse multi-scale views {item!r}: expected ms:K:LO-HI[:MAX][:noflip], "
                             "e.g. ms:4:640-800")
        else:
            raise ValueError(f"cannot parse view {item!r} in {text!r}: expected SHORT[:MAX][:flip] "
                             "(e.g. 800:1333:flip), ms:K:LO-HI[:MAX][:noflip] or 'default'")
    if not views:
        raise ValueError(f"no views in {text!r}")
    if len(set(views)) != len(views):
        raise ValueError(f"views {text!r} repeat a view: {[v.key() for v in views]}")
    return views


def multiscale_views(
    k: int,
    short_range: tuple[int, int] = (640, 800),
    max_size: int = 1333,
    seed: int = 0,
    flip: bool = True,
) -> list[ViewSpec]:
    """K views with short sides drawn uniformly from ``short_range`` (inclusive), as in ICD's
    multi-scale training; each flipped with probability 0.5 when ``flip``. Deterministic by seed."""
    lo, hi = short_range
    if k <= 0 or lo <= 0 or hi < lo:
        raise ValueError(f"multiscale_views needs k > 0 and 0 < lo <= hi, got k={k}, range={short_range}")
    rng = random.Random(seed)
    views = []
    for _ in range(k):
        short = rng.randint(lo, hi)
        flipped = flip and rng.random() < 0.5
        views.append(ViewSpec(flip=flipped, short=short, max_size=max_size))
    return views
