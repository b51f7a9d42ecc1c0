"""ICD: Instance-Conditional knowledge Distillation.

(Over 500 lines on purpose: ICD brings its own instance decoder, with its query sampling,
embeddings, layer, warm-up and picture, and this docstring records where the official code's
quirks are reproduced; a method is one file, so all of it stays here.)

Paper: Kang et al., "Instance-Conditional Knowledge Distillation for Object Detection",
NeurIPS 2021. Official code: https://github.com/megvii-research/ICD @acf2726
(``pytorch_release/models/{teacher,distiller,utils}.py``; the MegEngine release has the same
modules).

The idea: a small transformer decoder on the teacher side is trained, online, to *identify*
instances from the teacher's FPN features: each query describes a box (its class, a jittered
point inside it, its scale) and the decoder must tell real boxes from fake ones and regress the
box from the point (the auxiliary task). Its attention of a real instance's query over all
positions says where the teacher's features hold that instance; the student is distilled there.
The teacher side reads nothing but the cached F_t, so it trains from the cache alone.
The same holds for every family: the official FCOS run (``FCOS_R50_R101_icd.yaml``, AdelaiDet's
FCOS) uses the RetinaNet values and reads no head output (centerness included).

Faster R-CNN (``frcnn``; ``pytorch_release/configs/Distillation-ICD/RCNN_R_50_R101_icd_FPN_1x.yaml``
lines 10-15): the FPN levels p2..p6 (strides 4..64, ``INS.INPUT_FEATS``, fields ``fpn.p2`` ..
``fpn.p6``) instead of p3..p7, ``INS_ATT_MIMIC.WEIGHT_VALUE`` 3.0 instead of 8.0 and
``INS.MAX_LABELS`` 100 instead of 300 (``max_queries``: at most max(100, n) queries per image);
everything else at the defaults of ``utils/build.py`` as for the dense families, and no head or RoI
term. The sequence, the key region and the position embeddings run over the student's levels
(``student.strides``; in the warm-up the family's). That run also initialises the student's FPN,
RPN and RoI head from the teacher (``PRELOAD_FPN``/``PRELOAD_HEAD``, ``utils/build.py`` lines 171-172):
the trainer's ``--inherit``.

Per batch (all positions of all levels flattened into one sequence of length S, batch padding
masked out of every attention):

1. Queries per image: its n GT boxes plus fake boxes, min(max(1, 6n), max(300, n)) in all. Fake
   classes are drawn from the dataset's class frequencies, fake sizes (w, h relative to the
   image) from N(mean, std) of that class clipped to mean ± 2 std and to [0.002, 0.7], fake
   centres uniformly in [0.03, 0.97]. Every box's centre is jittered by U(±0.3)·(w, h).
   Descriptor = one-hot class ⊕ sine embedding of the jittered centre (2 × 128) ⊕ scale one-hot
   (5 bins of floor(1.44·ln(side in pixels) − 5), clipped to [0, 4], for w and for h; the side is
   the relative side times the size of the *last* image of the image's per-GPU pair, as the
   official code does) → 3-layer MLP → C.
2. Decoder (1 layer, 8 heads of C/8): key = F_t + Linear(sine position embedding), value = F_t;
   keys are the cells detectron2's ``mask_out_padding`` leaves unmasked: ceil(h / s) × ceil(w / s)
   with s = (H_pad/H_l + W_pad/W_l)/2 on the image's per-GPU pair's padded batch (H_pad, W_pad);
   the position embedding is normalised by that region's size;
   attention logits A = q·k/√(C/8); then residual + LayerNorm, FFN C → 4C → C, residual + LayerNorm.
3. Auxiliary loss (trains the teacher side only): an MLP C → C → C → 5 on each decoded query:
   ``icd_aux_cls`` = BCE(logit, real?) averaged over all queries; ``icd_aux_box`` = Σ_4 |σ(pred) −
   d| / (w, h, w, h) averaged over real queries, d = distances from the jittered centre to the
   box's left, top, right, bottom edges (image-relative coordinates).
4. Distillation: V_t = LN(W_v^t F_t) (the decoder's own value projection, detached), V_s =
   LN(W_v^s F_s) with the student's own value projection; LN non-affine over each head's C/8
   dims. M[n, h, s] = Σ_{real queries k} softmax_s(A[n, h, k, :] / τ), τ = 1, detached.

       icd_distill = 8 · mean_{n, heads, c} [ Σ_s M·(V_s − V_t)² / Σ_s M ]

   For the first 1000 iterations F_s is detached (only W_v^s and the teacher side learn).
   (Faster R-CNN: w = 3, above.)

All of ICD's parameters (teacher side and W_v^s) train with their own optimiser
(:meth:`ICD.param_groups`), as the official ``build_tea_optimizer`` (``utils/build.py``) and
``do_train`` (``train_distill.py``) set it: AdamW (torch defaults betas, eps) lr 1e-4, weight
decay 1e-4 on every parameter, ``WarmupCosineLR`` to 0 over the run with WARMUP_FACTOR = 1.0 over
10 iterations, i.e. no warmup (``warmup_iters`` > 0 adds a linear warmup from 0.001·lr, this
module's former default), gradient norm of all of them clipped at 0.01 (``clip_grad_norm_``,
"full_model"). The official runs also initialise the student's FPN and head from the teacher
("inherit"); that is the trainer's business.

Batch semantics: the official runs are detectron2's 16 images on 8 GPUs, 2 per GPU, and DDP
averages the GPUs. ``icd_distill`` is a mean over images (and heads and channels) already;
``icd_aux_cls`` and ``icd_aux_box`` divide by the queries (real queries) of the GPU's 2 images;
the key region and the scale bins also depend on the pair (above). So a batch of B images is
split into groups of 2 consecutive images (the last group of an odd B holds 1 image, which then
weighs as much as a pair), each term is computed per group and the terms are the mean over the
groups: 1 device × 16 images trains like 8 GPUs × 2. ``tests/test_reference_icd.py`` checks this
module against a float64 transcription of the official code (query construction from the same
random draws, attention logits, the three terms and all gradients, at 2 and 8 images, with and
without padding): measured differences ≤ 1.3e-7 relative on the terms and ≤ 1.4e-6 of the largest
entry on the gradients (this module runs in float32).

Official quirks reproduced by default, each with the corrected behaviour as an option:

- ``scale_bins="official"``: floor(1.44·ln(side) − 5); ``"log2"``: floor(log2(side)) − 5.
  1.44 < log2(e) = 1.4427 moves the bin edges 64/128/256/512 px to 64.5/129.2/258.7/518.0 px;
  a side in [64, 64.5), [128, 129.2), [256, 258.7) or [512, 518.0) px gets the lower bin
  (measured: 0.84 % of sides drawn log-uniformly in [8, 800] px).
- ``scale_image="pair_last"``: the side in pixels is the relative side times the last image of
  the per-GPU pair (the official loop reuses the last image's (H, W)); ``"own"``: each image's.
  Changes bins of the first image of a pair whose size differs from its mate's (measured on
  20 000 random pairs as below, box sides log-uniform in [8, 800] px: 19 % of the first image's
  sides, 35 % of its boxes, 9.7 % of all sides).
- ``key_region="official"``: ``mask_out_padding``'s region (above); ``"canonical"``: each
  image's 32-padded region (``teacher.valid``). The official region is up to 3 rows/columns
  smaller on P3 and 1 on P4 (it stops at ceil(h/stride) instead of the 32-padded size); on P6/P7
  its stride h_pad/H_l can be below 64/128, so it can be one row/column larger than the cached
  region, which we cannot reproduce (the cache holds no teacher features there): those keys are
  left out. Measured on 20 000 random pairs (shorter side 640–800 step 32, aspect ratio U(0.5, 2),
  longer side ≤ 1333): the official region drops 1.4 % of the cached P3 keys and 0.8 % of P4
  (1.2 % of all keys); 43 % of images have official P6/P7 keys beyond the cached region, 2.5 %
  of P6 and 5.5 % of P7 keys (0.05 % of all keys), which are left out here. Faster R-CNN (P2..P6):
  the same rule, up to 7 rows/columns smaller on P2, 3 on P3, 1 on P4; P6 can be one larger.

Remaining differences from the official code: the model width C is the teacher's FPN width (the
official 256); dropout is 0 (the official DROPOUT = 0.0); box geometry is float32 (the official
samples boxes in float64 and casts to float32; < 1e-6 relative); fake boxes come from torch's
generator, not numpy's (same distributions).

Not reproduced (the official fake classes): for COCO-80 the official ``InstanceEncoder`` reads
``configs/coco_obj.json`` in *string*-sorted key order ("0", "1", "10", "11", …, "2", "20", …)
and uses the index as the label, so a fake query labelled i gets the frequency and box size of
class int(sorted_keys[i]): 78 of 80 labels are permuted, 70 % of fake queries carry a label whose
frequency and size belong to another class, and the fake labels' distribution is 0.32 (total
variation) from the class frequencies (label 2, "car": 0.2 % instead of 4.8 %). Here labels,
frequencies and sizes agree (``DatasetStats.from_dataset``). For any other number of classes the
official code ignores the dataset: uniform classes, sizes N(0.2, 0.2) (``DatasetStats.uniform``);
:meth:`ICD.prepare` uses ``from_dataset`` for every training set. Padded query slots (beyond an image's
queries) are zero descriptors here, one-hot(0) ⊕ sine(0) in the official code; they reach no loss.

Short schedules (BENCHMARKS.md, "ICD in short schedules"): the teacher side learns slowly, as
DETR-style decoders do (its queries must learn to match key positions through the sine
embeddings). Over 900 iterations of 8 images the real-vs-fake loss ends at the 0.45 of predicting
the 1-in-6 prior whatever its lr (1e-4, 1e-3, 3e-3) or detached phase (10 or 300 iterations), and a
real query's attention is barely more inside its box than uniform (lift 1.1–1.2), so the student
imitates features that are not instance-specific. The official runs give it 90k iterations.
``pretrain_batches`` (not in the official code; default 0) trains the teacher side alone on that
many batches of the cached F_t before the student's first step (:meth:`ICD.warm_up`, ~0.1 s per
batch of 8 small views on a CPU core, no student forward): with 3000, the attention lift reaches
1.5 (median) and the same 900-iteration students gain 7.6 AP over no distillation instead of 1.8.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.detector import DetectorOutput, valid_level_sizes
from detectors.frcnn import STRIDES as TWO_STAGE_STRIDES
from detectors.frcnn import TwoStageOutput
from detectors.views import padded_size
from detectors.zoo import TWO_STAGE_FAMILIES
from store.schema import LEVELS, STRIDES
from train.methods.base import (IMAGES_PER_GPU, BuildContext, DistillationMethod, MethodConfig, ParamGroupSpec,
                                PictureOption, RunResources, TeacherBatches, pyramid_fields, require,
                                sum_per_gpu_batch)
from train.teacher_batch import TeacherBatch

if TYPE_CHECKING:
    from detectors.data import CocoDetection

QUERY_POS_FEATS = 128          # sine features per coordinate of a query's centre (2 × 128)
SCALE_BINS = 5                 # per side; one-hot of w and of h -> 10
SCALE_BIN_OFFSET = 5           # bin = floor(log2(side px)) − 5: < 64 px -> 0, >= 512 px -> 4
FAKE_CENTER_RANGE = (0.03, 0.97)
FAKE_SIZE_RANGE = (2e-3, 0.7)
SINE_TEMPERATURE = 10000.0
OFFICIAL_LOG2 = 1.44           # the official scale bins: ln(side) * 1.44 for log2(side)
SCALE_BIN_RULES = ("official", "log2")
SCALE_IMAGE_RULES = ("pair_last", "own")
KEY_REGION_RULES = ("official", "canonical")
# Runs shorter than this get the advice to warm the teacher side up (schedule_notes): at 900
# iterations it has not left the prior, and its attention lift grows slowly past 6000 batches.
SHORT_SCHEDULE_ITERS = 20_000


def pair_last_sizes(image_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each image's size replaced by the last image's of its per-GPU pair (the official scale bins)."""
    return [tuple(image_sizes[min(len(image_sizes), (i // IMAGES_PER_GPU + 1) * IMAGES_PER_GPU) - 1])
            for i in range(len(image_sizes))]


def official_key_sizes(image_sizes: list[tuple[int, int]], strides: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Per image, per level: the (rows, cols) detectron2's ``mask_out_padding`` leaves unmasked.

    The image's per-GPU pair is padded to (H_pad, W_pad), the largest 32-padded size of the pair;
    its level maps (H_l, W_l) follow :func:`valid_level_sizes`; with s = (H_pad/H_l + W_pad/W_l)/2
    the region is ceil(h / s) × ceil(w / s), clipped to the pair's map.
    """
    out = []
    for start in range(0, len(image_sizes), IMAGES_PER_GPU):
        pair = image_sizes[start:start + IMAGES_PER_GPU]
        batch_h = max(padded_size(tuple(size))[0] for size in pair)
        batch_w = max(padded_size(tuple(size))[1] for size in pair)
        maps = valid_level_sizes((batch_h, batch_w), strides)
        for h, w in pair:
            sizes = []
            for map_h, map_w in maps:
                stride = (batch_h / map_h + batch_w / map_w) / 2
                sizes.append((min(math.ceil(h / stride), map_h), min(math.ceil(w / stride), map_w)))
            out.append(sizes)
    return out


# ---------------------------------------------------------------------------------------------- dataset stats
@dataclass
class DatasetStats:
    """Class frequencies and box sizes of a training set, for ICD's fake queries.

    Sizes are (w, h) relative to the image's width and height, per class.
    """

    class_freq: Tensor   # (K,) sums to 1
    size_mean: Tensor    # (K, 2)
    size_std: Tensor     # (K, 2)

    @property
    def num_classes(self) -> int:
        return self.class_freq.shape[0]

    @classmethod
    def uniform(cls, num_classes: int) -> DatasetStats:
        """Uniform classes and sizes N(0.2, 0.2): the official fallback for sets other than COCO-80."""
        return cls(torch.full((num_classes,), 1.0 / num_classes), torch.full((num_classes, 2), 0.2),
                   torch.full((num_classes, 2), 0.2))

    @classmethod
    def from_boxes(cls, labels: Tensor, relative_sizes: Tensor, num_classes: int) -> DatasetStats:
        """From every box's label (B,) and relative (w, h) (B, 2). Classes with fewer than two boxes
        take the statistics of all boxes (they are drawn rarely or never anyway)."""
        labels, relative_sizes = labels.long(), relative_sizes.double()
        if labels.numel() == 0:
            return cls.uniform(num_classes)
        counts = torch.bincount(labels, minlength=num_classes).double()  # (K,)
        all_mean, all_std = relative_sizes.mean(0), relative_sizes.std(0, unbiased=False)
        mean = all_mean.repeat(num_classes, 1)
        std = all_std.repeat(num_classes, 1)
        for label in range(num_classes):
            sizes = relative_sizes[labels == label]
            if sizes.shape[0] >= 2:
                mean[label], std[label] = sizes.mean(0), sizes.std(0, unbiased=False)
        return cls((counts / counts.sum()).float(), mean.float(), std.float())

    @classmethod
    def from_dataset(cls, dataset: CocoDetection) -> DatasetStats:
        """From a :class:`detectors.data.CocoDetection`'s annotations (non-crowd boxes of positive size)."""
        labels, sizes = [], []
        for ann in dataset.coco.dataset["annotations"]:
            image = dataset.coco.imgs[ann["image_id"]]
            w, h = float(ann["bbox"][2]), float(ann["bbox"][3])
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            labels.append(dataset.cat_id_to_label[ann["category_id"]])
            sizes.append((min(w / image["width"], 1.0), min(h / image["height"], 1.0)))
        return cls.from_boxes(torch.tensor(labels, dtype=torch.long), torch.tensor(sizes).reshape(-1, 2),
                              dataset.num_classes)


# ---------------------------------------------------------------------------------------------- queries
@dataclass
class InstanceQueries:
    """The queries of a batch, padded to the longest image; coordinates relative to each image."""

    labels: Tensor        # (N, Q) long
    boxes: Tensor         # (N, Q, 4) xyxy in [0, 1]
    centers: Tensor       # (N, Q, 2) jittered centre (x, y)
    is_real: Tensor       # (N, Q) bool: a GT box
    is_query: Tensor      # (N, Q) bool: not padding
    image_sizes: list[tuple[int, int]]  # (h, w) pixels, for the scale bins


def num_queries(num_gt: int, fake_ratio: int, max_queries: int) -> int:
    """Real plus fake queries of an image with ``num_gt`` boxes: min(max(1, (r+1)·n), max(M, n))."""
    return min(max(1, (fake_ratio + 1) * num_gt), max(max_queries, num_gt))


def sample_queries(targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]], stats: DatasetStats,
                   fake_ratio: int = 5, max_queries: int = 300, center_jitter: float = 0.3,
                   generator: torch.Generator | None = None) -> InstanceQueries:
    """Real GT queries plus fake ones drawn from ``stats`` (see the module docstring), on the CPU."""
    rows = []
    for target, (height, width) in zip(targets, image_sizes):
        gt_boxes = target["boxes"].detach().float().cpu()  # (n, 4) pixels
        gt_labels = target["labels"].detach().long().cpu()
        num_real = gt_boxes.shape[0]
        num_fake = num_queries(num_real, fake_ratio, max_queries) - num_real
        fake_labels = torch.multinomial(stats.class_freq.double(), num_fake, replacement=True,
                                        generator=generator) if num_fake else torch.zeros(0, dtype=torch.long)
        mean, std = stats.size_mean[fake_labels], stats.size_std[fake_labels]  # (F, 2)
        sizes = mean + std * torch.randn(num_fake, 2, generator=generator)
        sizes = torch.maximum(torch.minimum(sizes, mean + 2 * std), mean - 2 * std).clamp(*FAKE_SIZE_RANGE)
        centers = torch.rand(num_fake, 2, generator=generator).clamp(*FAKE_CENTER_RANGE)
        fake_boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1).clamp(0, 1)  # (F, 4)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.cat([gt_boxes / scale, fake_boxes])  # (Q, 4) relative xyxy
        box_sizes = boxes[:, 2:] - boxes[:, :2]  # (Q, 2) w, h
        jitter = (torch.rand(boxes.shape[0], 2, generator=generator) * 2 - 1) * center_jitter
        jittered = (boxes[:, :2] + boxes[:, 2:]) / 2 + jitter * box_sizes  # (Q, 2)
        rows.append((torch.cat([gt_labels, fake_labels]), boxes, jittered, num_real))

    longest = max(labels.shape[0] for labels, *_ in rows)
    n = len(rows)
    queries = InstanceQueries(labels=torch.zeros(n, longest, dtype=torch.long), boxes=torch.zeros(n, longest, 4),
                              centers=torch.zeros(n, longest, 2), is_real=torch.zeros(n, longest, dtype=torch.bool),
                              is_query=torch.zeros(n, longest, dtype=torch.bool),
                              image_sizes=[tuple(size) for size in image_sizes])
    for i, (labels, boxes, centers, num_real) in enumerate(rows):
        count = labels.shape[0]
        queries.labels[i, :count], queries.boxes[i, :count], queries.centers[i, :count] = labels, boxes, centers
        queries.is_real[i, :num_real] = True
        queries.is_query[i, :count] = True
    return queries


def query_descriptors(queries: InstanceQueries, num_classes: int, scale_bins: str = "log2",
                      scale_sizes: list[tuple[int, int]] | None = None) -> Tensor:
    """(N, Q, K + 2·128 + 10): one-hot class ⊕ sine(centre x) ⊕ sine(centre y) ⊕ scale one-hots (w, h).

    ``scale_bins``: "official" floor(1.44·ln(side px) − 5) or "log2" floor(log2(side px)) − 5;
    ``scale_sizes``: the (h, w) per image that turns relative sides into pixels (default each
    image's own, ``queries.image_sizes``).
    """
    one_hot = F.one_hot(queries.labels, num_classes).float()  # (N, Q, K)
    position = point_sine_embedding(queries.centers, QUERY_POS_FEATS)  # (N, Q, 256)
    sizes_px = (queries.boxes[..., 2:] - queries.boxes[..., :2]) * torch.tensor(
        [[[w, h]] for h, w in (scale_sizes or queries.image_sizes)], dtype=torch.float32,
        device=queries.boxes.device)  # (N, Q, 2)
    if scale_bins == "official":
        bins = (sizes_px.log() * OFFICIAL_LOG2 - SCALE_BIN_OFFSET).clamp(0, SCALE_BINS - 1).long()
    else:
        bins = (torch.floor(torch.log2(sizes_px.clamp(min=1e-6))) - SCALE_BIN_OFFSET).clamp(0, SCALE_BINS - 1).long()
    scale = F.one_hot(bins, SCALE_BINS).float().flatten(2)  # (N, Q, 10)
    return torch.cat([one_hot, position, scale], dim=2) * queries.is_query[..., None]


def point_sine_embedding(points: Tensor, num_feats: int) -> Tensor:
    """Points (..., P) in [0, 1] -> (..., P·num_feats): per coordinate v, with
    f_i = 10000^(2⌊i/2⌋/num_feats), [sin(2πv/f_0), sin(2πv/f_2), ..., cos(2πv/f_1), cos(2πv/f_3), ...]."""
    dim_t = SINE_TEMPERATURE ** (2 * (torch.arange(num_feats, device=points.device) // 2) / num_feats)
    angles = points[..., None] * (2 * math.pi) / dim_t  # (..., P, num_feats)
    return torch.cat([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)


def grid_sine_embedding(valid_sizes: list[tuple[int, int]], map_size: tuple[int, int], channels: int,
                        device: torch.device) -> Tensor:
    """DETR's normalised sine position embedding of one level: (N, channels, H, W).

    Location (i, j) of an image with valid region (h, w): y = 2π(i+1)/h, x = 2π(j+1)/w;
    channels/2 features each, interleaved sin/cos: [sin(y/f_0), cos(y/f_1), sin(y/f_2), ...] then x.
    Values outside the valid region are irrelevant (those keys are masked out).
    """
    num_feats = channels // 2
    dim_t = SINE_TEMPERATURE ** (2 * (torch.arange(num_feats, device=device) // 2) / num_feats)
    map_h, map_w = map_size
    out = []
    for h, w in valid_sizes:
        y = torch.arange(1, map_h + 1, device=device, dtype=torch.float32).clamp(max=h) / (h + 1e-6) * 2 * math.pi
        x = torch.arange(1, map_w + 1, device=device, dtype=torch.float32).clamp(max=w) / (w + 1e-6) * 2 * math.pi

        def interleave(values: Tensor) -> Tensor:
            angles = values[:, None] / dim_t  # (L, F)
            return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=2).flatten(1)  # (L, F)

        pos_y = interleave(y)[:, None, :].expand(map_h, map_w, num_feats)
        pos_x = interleave(x)[None, :, :].expand(map_h, map_w, num_feats)
        out.append(torch.cat([pos_y, pos_x], dim=2).permute(2, 0, 1))  # (C, H, W)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- modules
class MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier_as_packed(linear: nn.Linear, packed_rows: int) -> None:
    """Xavier-uniform as if ``linear`` were one slice of an in-projection of ``packed_rows`` rows
    (torch's MultiheadAttention initialises q, k, v as one (3C, C) matrix); zero bias."""
    bound = math.sqrt(6.0 / (linear.in_features + packed_rows))
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)


class InstanceDecoderLayer(nn.Module):
    """Cross-attention of instance queries over the flattened teacher features, then FFN.

    No self-attention: each query is decoded independently of the others.
    """

    def __init__(self, dim: int, num_heads: int, ffn_ratio: int = 4) -> None:
        super().__init__()
        if dim % num_heads or dim // num_heads < 2:
            raise ValueError(f"ICD width {dim} must split into {num_heads} heads of at least 2 dims (the "
                             f"distillation normalises each head's values; one dim would normalise to 0)")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.pos_proj = nn.Linear(dim, dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            _xavier_as_packed(projection, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.bias)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.ReLU(), nn.Linear(ffn_ratio * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, features: Tensor, positions: Tensor,
                key_padding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """queries (N, Q, C), features and positions (N, S, C), key_padding (N, S) True = ignore.

        Returns decoded queries (N, Q, C), attention logits (N, heads, Q, S) with −inf at ignored
        keys, and the projected values (N, S, heads, C/heads).
        """
        n, num_q, dim = queries.shape
        seq = features.shape[1]
        q = self.q_proj(queries).view(n, num_q, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, Q, d)
        k = self.k_proj(features + self.pos_proj(positions)).view(n, seq, self.num_heads, self.head_dim)
        values = self.v_proj(features).view(n, seq, self.num_heads, self.head_dim)  # (N, S, h, d)
        logits = q @ k.permute(0, 2, 3, 1) / math.sqrt(self.head_dim)  # (N, h, Q, S)
        logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
        attended = logits.softmax(dim=-1) @ values.transpose(1, 2)  # (N, h, Q, d)
        attended = self.out_proj(attended.transpose(1, 2).reshape(n, num_q, dim))  # (N, Q, C)
        decoded = self.norm1(queries + attended)
        decoded = self.norm2(decoded + self.ffn(decoded))
        return decoded, logits, values


@dataclass(frozen=True)
class ICDConfig(MethodConfig):
    distill_weight: float = 8.0         # w, one-stage detectors (WEIGHT_VALUE); Faster R-CNN 3.0
    aux_cls_weight: float = 1.0         # BCE real vs fake
    aux_box_weight: float = 1.0         # L1 box-edge regression of real queries
    temperature: float = 1.0            # τ of the attention softmax in M
    num_heads: int = 8
    ffn_ratio: int = 4
    fake_ratio: int = 5                 # fake per real query -> 6n queries
    max_queries: int = 300              # MAX_LABELS: min(max(1, 6n), max(300, n)) queries; Faster R-CNN 100
    center_jitter: float = 0.3          # U(±0.3)·(w, h)
    detach_student_iters: int = 1000    # F_s detached before this iteration
    lr: float = 1e-4                    # ICD's own AdamW
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.01
    warmup_iters: int = 0               # official: WARMUP_FACTOR 1.0 (no warmup); 1000 = the former default
    scale_bins: str = "official"        # "official" floor(1.44·ln(side) − 5) | "log2"
    scale_image: str = "pair_last"      # "pair_last" (official) | "own": whose (h, w) turns sides into pixels
    key_region: str = "official"        # "official" mask_out_padding | "canonical" (teacher.valid)
    pretrain_batches: int = 0           # teacher side trained alone on N batches before the student starts
    #                                     (not in the official code; for short schedules, see the docstring)

    # megvii-research/ICD @acf2726 pytorch_release/configs/Distillation-ICD/retinanet_R_50_R101_icd_FPN_1x.yaml
    # and FCOS_R50_R101_icd.yaml (AdelaiDet's FCOS): INS_ATT_MIMIC.WEIGHT_VALUE 8.0 in both, every other
    # distiller key at its default (utils/build.py), so FCOS is RetinaNet's values. No GFL config: the same.
    # frcnn: RCNN_R_50_R101_icd_FPN_1x.yaml lines 11-15: INPUT_FEATS p2..p6, MAX_LABELS 100, WEIGHT_VALUE 3.0.
    FAMILY_DEFAULTS = {"retina": {}, "gfl": {}, "fcos": {}, "frcnn": {"distill_weight": 3.0, "max_queries": 100}}

    def __post_init__(self) -> None:
        for key, allowed in (("scale_bins", SCALE_BIN_RULES), ("scale_image", SCALE_IMAGE_RULES),
                             ("key_region", KEY_REGION_RULES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"ICD {key}={getattr(self, key)!r}; expected one of {allowed}")


class ICD(DistillationMethod):
    NAME = "icd"
    FIELDS = ("fpn",)
    FAMILY_FIELDS = {"frcnn": pyramid_fields("frcnn")}
    Config = ICDConfig
    PICTURE_FIELDS = ("fpn",)
    PICTURE_HELP = ("ICD: the attention of one GT instance's query (--icd-instance, default the largest box) over "
                    "the teacher's P3..P7, from the instance decoder of an ICD run (--icd-run); without one the "
                    "decoder is untrained (random init), as the title says")
    PICTURE_OPTIONS = (
        PictureOption("--icd-run", "ICD student run directory: its last.pt holds the trained decoder", metavar="DIR"),
        PictureOption("--icd-instance", "GT index (among the view's GT boxes) whose ICD attention is drawn "
                      "[the largest box]", type=int, metavar="K"))

    def __init__(self, config: ICDConfig, num_classes: int = 80, student_channels: int = 256,
                 teacher_channels: int = 256, stats: DatasetStats | None = None) -> None:
        super().__init__(config)
        self.num_classes = num_classes
        self.stats = stats if stats is not None else DatasetStats.uniform(num_classes)
        if self.stats.num_classes != num_classes:
            raise ValueError(f"dataset stats for {self.stats.num_classes} classes, detector with {num_classes}")
        dim = teacher_channels
        # Teacher side (trained by the auxiliary task only).
        self.query_encoder = MLP(num_classes + 2 * QUERY_POS_FEATS + 2 * SCALE_BINS, dim, dim, 3)
        self.decoder = InstanceDecoderLayer(dim, config.num_heads, config.ffn_ratio)
        self.aux_head = MLP(dim, dim, 5, 3)
        # Student side: its own value projection.
        self.student_value = nn.Linear(student_channels, dim)
        _xavier_as_packed(self.student_value, 3 * dim)

    @property
    def fields(self) -> tuple[str, ...]:
        return pyramid_fields(self.family)

    @property
    def strides(self) -> tuple[int, ...]:
        """The family's pyramid strides (P2..P6 of a two-stage detector, else P3..P7): the key region's
        when no student output gives them (the warm-up, the picture)."""
        return TWO_STAGE_STRIDES if self.two_stage else STRIDES

    @classmethod
    def prepare(cls, config: ICDConfig, run: RunResources) -> DatasetStats | None:
        """The training split's class frequencies and box sizes (the fake queries' distribution)."""
        return DatasetStats.from_dataset(run.dataset) if run.dataset is not None else None

    @classmethod
    def build(cls, config: ICDConfig, context: BuildContext) -> ICD:
        return cls(config, context.num_classes, context.student_channels, context.teacher_channels,
                   context.prepared.get(cls.NAME))

    def param_groups(self) -> list[ParamGroupSpec]:
        config = self.config
        return [ParamGroupSpec("icd", [p for p in self.parameters() if p.requires_grad], optimizer="adamw",
                               lr=config.lr, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                               warmup_iters=config.warmup_iters)]

    def schedule_notes(self, total_iters: int) -> list[str]:
        if self.config.pretrain_batches or total_iters >= SHORT_SCHEDULE_ITERS:
            return []
        return [f"ICD's teacher side needs many iterations to identify instances (the official runs: 90k); in "
                f"{total_iters} its attention stays close to uniform. --set icd.pretrain_batches=3000 trains it "
                f"alone first (BENCHMARKS.md, 'ICD in short schedules': +7.6 AP over no distillation "
                f"instead of +1.8 in 900 iterations)"]

    def warm_up(self, teacher_batches: TeacherBatches) -> dict[str, float] | None:
        """``config.pretrain_batches`` steps of the teacher side alone (query encoder, decoder, auxiliary
        head) before the student's first step, with ICD's own AdamW settings at a constant lr; returns
        the auxiliary losses averaged over the last tenth of them (None when the count is 0)."""
        config = self.config
        if config.pretrain_batches == 0:
            return None
        params = [p for module in (self.query_encoder, self.decoder, self.aux_head) for p in module.parameters()]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        history: deque[tuple[float, float]] = deque(maxlen=max(1, config.pretrain_batches // 10))
        for batch, teacher in teacher_batches(config.pretrain_batches, "ICD teacher side"):
            aux_cls, aux_box, _, _ = self.auxiliary_task(teacher, self.make_queries(batch.targets, batch.image_sizes))
            aux_cls, aux_box = config.aux_cls_weight * aux_cls.mean(), config.aux_box_weight * aux_box.mean()
            optimizer.zero_grad(set_to_none=True)
            (aux_cls + aux_box).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            history.append((float(aux_cls.detach()), float(aux_box.detach())))
        return {"icd_aux_cls": sum(h[0] for h in history) / len(history),
                "icd_aux_box": sum(h[1] for h in history) / len(history)}

    def make_queries(self, targets: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]]) -> InstanceQueries:
        config = self.config
        return sample_queries(targets, image_sizes, self.stats, config.fake_ratio, config.max_queries,
                              config.center_jitter)

    def decode_instances(self, teacher: TeacherBatch, queries: InstanceQueries,
                         strides: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher side's decoder over the cached F_t: what :meth:`forward` trains and distils with
        (and what ``train.viz`` draws).

        Args:
            teacher: the batch's teacher fields (``fpn`` is read).
            queries: on the device of the features.
            strides: the levels' strides (the student's); default :attr:`strides`.
        Returns:
            decoded queries (N, Q, C); attention logits (N, heads, Q, S) over the sequence of all
            positions of all levels (P3..P7, or P2..P6, concatenated, each level's batch map flattened
            in (h, w) order), −inf outside each image's valid region; projected teacher values
            (N, S, heads, C/heads).
        """
        config = self.config
        teacher_fpn = require(teacher.fpn, "fpn", "ICD")
        device = teacher_fpn[0].device
        key_sizes = self.key_sizes(teacher, queries.image_sizes, strides)  # per image, per level (rows, cols)
        # Keys: that region, and never beyond the cached one (the cache holds no features there).
        key_valid = []
        for level, valid in enumerate(teacher.valid):
            region = torch.zeros_like(valid)  # (N, 1, H, W)
            for image, sizes in enumerate(key_sizes):
                region[image, :, :sizes[level][0], :sizes[level][1]] = True
            key_valid.append(region & valid)
        # Sequences over all positions of all levels: (N, S, C) and the padding mask (N, S).
        teacher_seq = torch.cat([f.flatten(2).transpose(1, 2) for f in teacher_fpn], dim=1)
        key_padding = torch.cat([(~valid).flatten(1) for valid in key_valid], dim=1)
        positions = torch.cat([
            grid_sine_embedding([sizes[level] for sizes in key_sizes], tuple(f.shape[-2:]), f.shape[1],
                                device).flatten(2).transpose(1, 2)
            for level, f in enumerate(teacher_fpn)], dim=1)
        scale_sizes = pair_last_sizes(queries.image_sizes) if config.scale_image == "pair_last" else None
        descriptors = query_descriptors(queries, self.num_classes, config.scale_bins, scale_sizes)
        return self.decoder(self.query_encoder(descriptors), teacher_seq, positions, key_padding)

    def key_sizes(self, teacher: TeacherBatch, image_sizes: list[tuple[int, int]],
                  strides: tuple[int, ...] | None = None) -> list[list[tuple[int, int]]]:
        """Per image, per level: the (rows, cols) of keys (``config.key_region``, see the docstring);
        ``strides``: the levels' strides (default :attr:`strides`)."""
        if self.config.key_region == "canonical":
            return teacher.valid_sizes
        return official_key_sizes(image_sizes, tuple(strides or self.strides)[:len(teacher.valid)])

    def auxiliary_task(self, teacher: TeacherBatch, queries: InstanceQueries,
                       strides: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The teacher side on one batch: decode the queries over F_t and score the auxiliary task
        (``strides`` as :meth:`decode_instances`).

        Returns ``aux_cls`` and ``aux_box`` per official per-GPU batch (G,), unweighted, and the
        decoder's attention logits (N, heads, Q, S) and projected teacher values (N, S, heads, C/heads).
        """
        device = require(teacher.fpn, "fpn", "ICD")[0].device
        labels, boxes, centers = queries.labels.to(device), queries.boxes.to(device), queries.centers.to(device)
        is_real, is_query = queries.is_real.to(device), queries.is_query.to(device)
        decoded, logits, teacher_values = self.decode_instances(
            teacher, InstanceQueries(labels, boxes, centers, is_real, is_query, queries.image_sizes), strides)
        prediction = self.aux_head(decoded)  # (N, Q, 5)
        is_query_f, is_real_f = is_query.float(), is_real.float()
        bce = F.binary_cross_entropy_with_logits(prediction[..., 0], is_real_f, reduction="none")  # (N, Q)
        # Per official per-GPU batch (G,): Σ over its queries / its number of queries.
        aux_cls = sum_per_gpu_batch((bce * is_query_f).sum(dim=1)) / \
            sum_per_gpu_batch(is_query_f.sum(dim=1)).clamp(min=1e-6)
        edges = torch.cat([centers - boxes[..., :2], boxes[..., 2:] - centers], dim=2)  # (N, Q, 4) l, t, r, b
        box_sizes = (boxes[..., 2:] - boxes[..., :2]).repeat(1, 1, 2).clamp(min=1e-7)  # (N, Q, 4) w, h, w, h
        box_error = ((prediction[..., 1:].sigmoid() - edges).abs() / box_sizes).sum(dim=2)  # (N, Q)
        aux_box = sum_per_gpu_batch((box_error * is_real_f).sum(dim=1)) / \
            sum_per_gpu_batch(is_real_f.sum(dim=1)).clamp(min=1e-6)  # (G,)
        return aux_cls, aux_box, logits, teacher_values

    def forward(self, student: DetectorOutput | TwoStageOutput, teacher: TeacherBatch,
                targets: list[dict[str, Tensor]], iteration: int,
                queries: InstanceQueries | None = None) -> dict[str, Tensor]:
        """``queries``: fixed queries instead of sampling them (tests)."""
        config = self.config
        teacher_fpn = require(teacher.fpn, "fpn", "ICD")
        if queries is None:
            queries = self.make_queries(targets, student.image_sizes)
        aux_cls, aux_box, logits, teacher_values = self.auxiliary_task(teacher, queries, tuple(student.strides))
        is_real_f = queries.is_real.to(teacher_fpn[0].device).float()

        # Distillation: the student's values where the teacher's real-instance attention looks.
        with torch.no_grad():
            attention = (logits / config.temperature).softmax(dim=-1)  # (N, h, Q, S)
            mask = torch.einsum("nhqs,nq->nhs", attention, is_real_f)  # (N, h, S): Σ over real queries
            head_dim = teacher_values.shape[-1]
            teacher_v = F.layer_norm(teacher_values, (head_dim,))  # (N, S, h, d)
        student_features = student.features
        if iteration < config.detach_student_iters:
            student_features = [f.detach() for f in student_features]
        for level, f in enumerate(student_features):
            if f.shape[-2:] != teacher_fpn[level].shape[-2:]:
                raise ValueError(f"student map {tuple(f.shape[-2:])} and teacher map "
                                 f"{tuple(teacher_fpn[level].shape[-2:])} of level {level} differ")
        student_seq = torch.cat([f.flatten(2).transpose(1, 2) for f in student_features], dim=1)  # (N, S, C_s)
        n, seq = student_seq.shape[:2]
        student_v = F.layer_norm(self.student_value(student_seq).view(n, seq, -1, head_dim), (head_dim,))
        squared_error = (student_v - teacher_v) ** 2  # (N, S, h, d)
        masked = torch.einsum("nhs,nshd->nhd", mask, squared_error)  # (N, h, d)
        per_image = (masked / mask.sum(dim=-1).clamp(min=1e-6)[..., None]).mean(dim=(1, 2))  # (N,)
        distill = sum_per_gpu_batch(per_image) / sum_per_gpu_batch(torch.ones_like(per_image))  # (G,)

        # Mean over the per-GPU batches.
        return {"icd_distill": config.distill_weight * distill.mean(),
                "icd_aux_cls": config.aux_cls_weight * aux_cls.mean(),
                "icd_aux_box": config.aux_box_weight * aux_box.mean()}

    @classmethod
    def prepare_picture(cls, painter) -> None:
        """The teacher side of an ICD run (``--icd-run``: ``last.pt``'s ``extra.train_state.method``)."""
        from pathlib import Path

        from train.methods import MethodSpec, build_method, split_overrides
        from train.sources import manifest_id
        run_dir = painter.options["icd_run"]
        if run_dir is None:
            return
        path = Path(run_dir) / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--icd-run {run_dir}: no last.pt there (the run directory of a "
                                    f"python -m train --method icd run)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("extra", {}).get("train_state") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or "method" not in state:
            raise ValueError(f"--icd-run {run_dir}: {path} holds no student training state (extra.train_state)")
        spec = MethodSpec.parse(state["config"]["method"])
        if cls.NAME not in spec:
            raise ValueError(f"--icd-run {run_dir} trained method {str(spec)!r}, which has no ICD decoder")
        prefix = f"parts.{cls.NAME}." if len(spec.names) > 1 else ""
        weights = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
        overrides = split_overrides(spec, state["config"].get("overrides", {}))[cls.NAME]
        teacher_channels = int(weights["decoder.q_proj.weight"].shape[0])
        student_channels = int(weights["student_value.weight"].shape[1])
        family = (painter.teacher_config or {}).get("family", "gfl")
        icd = build_method(cls.NAME, family, overrides, student_channels=student_channels,
                           teacher_channels=teacher_channels, num_classes=painter.dataset.num_classes)
        try:
            icd.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"--icd-run {run_dir}: its ICD weights do not fit this data's "
                             f"{painter.dataset.num_classes} classes: {error}") from None
        from train import viz
        note = f"decoder trained for {state.get('iteration', '?')} iterations in {viz.short_path(run_dir)}"
        if state.get("cache_manifest_id") not in (None, manifest_id(painter.cache.manifest)):
            note += " (on another cache)"
            painter.log(f"note: --icd-run {run_dir} was trained on another cache than {painter.cache.url}")
        painter.state[cls.NAME] = (icd.eval(), note)

    @classmethod
    def draw_picture(cls, painter, view):
        """The attention of one GT instance's query over the teacher's P3..P7 (the run's decoder, or an
        untrained one)."""
        from matplotlib.colors import PowerNorm

        from train import viz
        from train.methods import build_method
        from train.teacher_batch import collate_teacher
        family = (painter.teacher_config or {}).get("family")
        if family in TWO_STAGE_FAMILIES:
            raise viz.Skipped(f"the ICD picture draws a dense teacher's P3..P7; this cache's teacher is a "
                              f"two-stage {family!r} (P2..P6)")
        painter.require(view, cls.NAME, cls.PICTURE_FIELDS)
        gt_boxes, gt_labels = view.gt_boxes, view.gt_labels
        if gt_boxes.shape[0] == 0:
            raise viz.Skipped("the view has no GT box (ICD's instance queries are the GT boxes)")
        areas = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(dim=1)
        chosen_instance = painter.options["icd_instance"]
        instance = int(areas.argmax()) if chosen_instance is None else chosen_instance
        if not 0 <= instance < gt_boxes.shape[0]:
            raise viz.Skipped(f"--icd-instance {instance}: the view has {gt_boxes.shape[0]} GT boxes "
                              f"(0..{gt_boxes.shape[0] - 1})")
        fpn = view.level_maps("fpn")
        channels = int(fpn[0].shape[0])
        if cls.NAME not in painter.state:
            family = (painter.teacher_config or {}).get("family", "gfl")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                untrained = build_method(cls.NAME, family, student_channels=channels, teacher_channels=channels,
                                         num_classes=painter.dataset.num_classes)
            painter.state[cls.NAME] = (untrained.eval(), "decoder UNTRAINED (random init; pass --icd-run DIR for "
                                                         "a trained one)")
            painter.log("note: no --icd-run given: the ICD attention comes from an untrained decoder (random init)")
        icd, note = painter.state[cls.NAME]
        if icd.decoder.q_proj.in_features != channels:
            raise ValueError(f"--icd-run {painter.options['icd_run']}: its decoder reads "
                             f"{icd.decoder.q_proj.in_features}-channel teacher features, the cache holds "
                             f"{channels}-channel ones")
        teacher = collate_teacher([{f"fpn.{lvl}": f for lvl, f in zip(LEVELS, fpn)}], view.level_hw, "cpu",
                                  image_sizes=[view.image_hw])
        # Real queries only (no fakes), un-jittered centres: each query attends independently of the others.
        queries = sample_queries([{"boxes": gt_boxes, "labels": gt_labels}], [view.image_hw],
                                 DatasetStats.uniform(icd.num_classes), fake_ratio=0, center_jitter=0.0,
                                 generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, logits, _ = icd.decode_instances(teacher, queries)  # (1, heads, Q, S)
            attention = (logits[0, :, instance] / icd.config.temperature).softmax(dim=-1).mean(dim=0)  # (S,)
        sizes = [h * w for h, w in view.level_hw]
        maps = [a.reshape(hw).numpy() for a, hw in zip(attention.split(sizes), view.level_hw)]  # (h_l, w_l)

        fig, axes = viz.new_figure(2, 3, view.image_hw)
        viz.show_view(axes[0, 0], view)
        painter.draw_gt(axes[0, 0], view, with_labels=False)
        chosen = gt_boxes[instance:instance + 1]
        viz.draw_boxes(axes[0, 0], chosen, "#00e5ff", [painter.class_name(int(gt_labels[instance]))], linewidth=2.0)
        centre = ((chosen[0, :2] + chosen[0, 2:]) / 2).tolist()
        axes[0, 0].plot(*centre, marker="+", color="#00e5ff", markersize=10, mew=2)
        axes[0, 0].set_title(f"query: GT #{instance} (cyan, + = query point)", fontsize=9)
        norm = PowerNorm(0.5, 0, max(float(m.max()) for m in maps))  # square-root scale: faint spread stays visible
        mappable = None
        for level, (ax, grid) in enumerate(zip(axes.flat[1:], maps)):
            viz.show_view(ax, view, grey=True)
            mappable = viz.overlay_map(ax, grid, STRIDES[level], view, norm, cmap="magma")
            viz.draw_boxes(ax, chosen, "#00e5ff", linewidth=1.0, linestyle="--")
            ax.set_title(f"{viz.level_title(level, view)}\n{grid.sum():.0%} of the attention", fontsize=9)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8,
                     label=f"attention weight, mean over {icd.config.num_heads} heads (√ scale)")
        fig.suptitle(f"ICD: attention of GT instance #{instance} ({painter.class_name(int(gt_labels[instance]))}) "
                     f"over the teacher's P3–P7 (softmax over all positions)\n{view.describe()}; {note}",
                     fontsize=10)
        return painter.save(fig, view, cls.NAME)
