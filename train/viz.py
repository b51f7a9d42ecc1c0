"""Pictures of what each distillation method reads from a teacher cache: ``python -m train.viz --help``.

    paths = draw("runs/demo/data", "runs/demo/cache", "runs/viz", num_images=2,
                 student_ckpt="runs/train/frs/student.pt", icd_run="runs/train/icd")

For each chosen (image, view) of a COCO-layout split, PNG files (matplotlib's Agg renderer):

    <id>_view<v>_frs.png          FRS richness S = max over classes of σ(teacher class logits), P3..P7
    <id>_view<v>_maskd.png        MasKD receptive-token masks σ(token_t · F_t) of one level, weights p_t
    <id>_view<v>_ld.png           LD region rows: ATSS positives and VLR anchors, GT boxes
    <id>_view<v>_icd.png          ICD decoder attention of one GT instance's query over P3..P7
    <id>_view<v>_detections.png   teacher detections decoded from the cached head vs a student's

Everything is drawn in view pixels on the view image (the resized, possibly flipped image the
teacher saw, de-normalised), so maps, anchors and boxes line up with what was cached. A level-l
map cell (i, j) is drawn as a stride-sized square centred on its anchor centre (j·s, i·s), the
convention of ``Detector.grid_anchors``. The drawn quantities come from the methods' own code:
FRS's ``richness_score``, MasKD's stage-1 tokens (``load_receptive_tokens``), ICD's
``decode_instances``, the region rows exactly as cached, ``Detector.postprocess``.

A picture whose inputs are missing (the cache lacks its fields, no student checkpoint, ...) is
skipped with a printed reason; the others are drawn. Bad arguments (an image id that is not in the
split or the cache, a view index out of range) raise ``ValueError`` naming them.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import Tensor
from torchvision.ops import box_iou

from detectors import DetectorConfig, build_detector, load_checkpoint
from detectors.data import CocoDetection
from detectors.outputs import Detector, DetectorOutput, valid_level_sizes
from detectors.views import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Sample, ViewSpec, collate
from precompute.fields import MASKD_ARTIFACT
from precompute.maskd_tokens import load_receptive_tokens
from store import (LEVELS, REGION_POSITIVE, REGION_VLR, STRIDES, Cache, CacheError, ManifestMismatch, expand_fields,
                   open_cache)
from train.methods import build_method, parse_method_names, split_overrides
from train.methods.frs import richness_score
from train.methods.icd import ICD, DatasetStats, sample_queries
from train.sources import adopt_cache_images, manifest_id
from train.teacher_batch import collate_teacher

PICTURES = ("frs", "maskd", "ld", "icd", "detections")
# Cache fields each picture reads (groups or prefixes, store vocabulary).
PICTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "frs": ("head.cls",),
    "maskd": ("fpn",),
    "ld": ("region.level", "region.index", "region.kind", "region.iou"),
    "icd": ("fpn",),
    "detections": ("head.cls", "head.box"),
}
PANEL_INCHES = 3.0           # width of one image panel
WIDE_PANEL_INCHES = 4.5      # ... in the two-panel pictures
MAP_ALPHA = 0.6              # opacity of a heat map over the (grey) image
GT_COLOR = "white"
POSITIVE_COLOR = "#2ca02c"   # LD positives
VLR_COLOR = "#ff7f0e"        # LD VLR rows
LEVEL_MARKERS = ("o", "s", "^", "D", "P")
DPI = 110


class Skipped(Exception):
    """One picture cannot be drawn; the message names what is missing."""


@dataclass
class ImageView:
    """One (image, view): the view image, its GT and its cached teacher fields, in view pixels."""

    image_id: int
    view_index: int
    view: ViewSpec
    sample: Sample                      # as the trainer rebuilds it (normalised image, GT boxes)
    fields: dict[str, Tensor]           # dequantised cache fields (float32 / integer tensors)
    image_hw: tuple[int, int]           # valid (h, w), view pixels
    level_hw: list[tuple[int, int]]     # (h_l, w_l) of each level's valid region

    @property
    def rgb(self) -> np.ndarray:
        """(h, w, 3) in [0, 1]: the normalised view image back in RGB."""
        mean = torch.tensor(IMAGENET_MEAN_RGB).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD_RGB).view(3, 1, 1)
        return ((self.sample.image * std + mean) / 255).clamp(0, 1).permute(1, 2, 0).numpy()

    @property
    def grey(self) -> np.ndarray:
        """(h, w) luminance in [0, 1], the background of heat maps."""
        return self.rgb @ np.array([0.299, 0.587, 0.114])

    @property
    def gt_boxes(self) -> Tensor:
        return self.sample.boxes_xyxy  # (G, 4) view pixels

    @property
    def gt_labels(self) -> Tensor:
        return self.sample.labels  # (G,)

    def describe(self) -> str:
        view = self.view
        flip = ", flipped" if view.flip else ""
        return f"image {self.image_id}, view {self.view_index} ({view.short}:{view.max_size}{flip})"

    def level_maps(self, prefix: str) -> list[Tensor]:
        """Per level (C, h_l, w_l) cached maps of ``prefix`` (``fpn``, ``head.cls``, ``head.box``)."""
        return [self.fields[f"{prefix}.{level}"] for level in LEVELS]


# ---------------------------------------------------------------------------------------------- drawing helpers
def _figure(rows: int, cols: int, image_hw: tuple[int, int], colorbar: bool = True,
            panel_inches: float = PANEL_INCHES) -> tuple[Figure, np.ndarray]:
    h, w = image_hw
    panel_h = panel_inches * h / w
    fig = Figure(figsize=(cols * panel_inches + (0.9 if colorbar else 0.2), rows * (panel_h + 0.45) + 0.9),
                 layout="constrained", dpi=DPI)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _show(ax, view: ImageView, grey: bool = False) -> None:
    """The view image in continuous pixel coordinates: x in [0, w], y in [0, h], y down."""
    h, w = view.image_hw
    if grey:
        ax.imshow(view.grey, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")
    else:
        ax.imshow(view.rgb, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)


def level_map_to_pixels(grid: np.ndarray, stride: int, image_hw: tuple[int, int]) -> np.ndarray:
    """A level map (h_l, w_l) -> (h, w): each view pixel takes the value of the cell whose centre, the
    anchor centre (j·s, i·s), is nearest (clamped at the map's last row and column)."""
    h, w = image_hw
    rows = np.clip(np.floor((np.arange(h) + 0.5) / stride + 0.5).astype(int), 0, grid.shape[0] - 1)
    cols = np.clip(np.floor((np.arange(w) + 0.5) / stride + 0.5).astype(int), 0, grid.shape[1] - 1)
    return grid[np.ix_(rows, cols)]


def _overlay(ax, grid: np.ndarray, stride: int, view: ImageView, norm: Normalize, cmap: str = "inferno"):
    """A level map (h_l, w_l) over the image, aligned as :func:`level_map_to_pixels` says."""
    h, w = view.image_hw
    pixels = level_map_to_pixels(grid, stride, view.image_hw)
    image = ax.imshow(pixels, cmap=cmap, norm=norm, alpha=MAP_ALPHA, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return image


def _boxes(ax, boxes_xyxy: Tensor, color, labels: Sequence[str] | None = None, linestyle: str = "-",
           linewidth: float = 1.5, alpha: float = 1.0) -> None:
    for index, (x1, y1, x2, y2) in enumerate(boxes_xyxy.tolist()):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth,
                               linestyle=linestyle, alpha=alpha))
        if labels is not None:
            ax.text(x1, y1, labels[index], color="black", fontsize=6, va="bottom", ha="left", clip_on=True,
                    bbox=dict(facecolor=color, edgecolor="none", alpha=0.8, pad=0.8))


def _same_box_groups(boxes_xyxy: Tensor, iou: float = 0.9) -> list[list[int]]:
    """Indices of boxes (sorted by score, best first) grouped with the first earlier box they overlap by
    IoU >= ``iou``: one rectangle and one label line per group (class-aware NMS keeps such twins)."""
    overlaps = box_iou(boxes_xyxy, boxes_xyxy) if len(boxes_xyxy) else torch.zeros(0, 0)
    groups: list[list[int]] = []
    for index in range(len(boxes_xyxy)):
        for group in groups:
            if overlaps[group[0], index] >= iou:
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def _gt(ax, view: ImageView, names: Callable[[int], str], with_labels: bool = True) -> None:
    labels = [names(int(label)) for label in view.gt_labels] if with_labels else None
    _boxes(ax, view.gt_boxes, GT_COLOR, labels, linestyle="--", linewidth=1.2)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _short_path(path: str | Path, parts: int = 2) -> str:
    """The path, or ".../" and its last ``parts`` components when it is longer (titles stay one line)."""
    components = Path(path).parts
    return str(path) if len(components) <= parts + 1 else ".../" + "/".join(components[-parts:])


def _level_title(level: int, view: ImageView) -> str:
    h, w = view.level_hw[level]
    return f"{LEVELS[level].upper()} (stride {STRIDES[level]}, {h}×{w})"


# ---------------------------------------------------------------------------------------------- the pictures
class Painter:
    """Draws the pictures of one cache; loads the teacher decoder, tokens, student and ICD once."""

    def __init__(self, dataset: CocoDetection, cache: Cache, out: Path, *, student_ckpt: str | None = None,
                 icd_run: str | None = None, maskd_level: str = "p3", icd_instance: int | None = None,
                 score_thresh: float = 0.3, log: Callable[[str], None] = print) -> None:
        self.dataset, self.cache, self.out, self.log = dataset, cache, out, log
        self.maskd_level, self.icd_instance, self.score_thresh = maskd_level, icd_instance, score_thresh
        self.teacher_config = cache.manifest["teacher"].get("config")
        self.student_ckpt, self.icd_run = student_ckpt, icd_run
        self._teacher: Detector | None = None
        self._student: Detector | None = None
        self._icd: tuple[ICD, str] | None = None
        self._tokens = None
        if student_ckpt is not None:
            self._student = self._load_student(student_ckpt)
        if icd_run is not None:
            self._icd = self._load_icd(icd_run)

    # ------------------------------------------------------------------ shared inputs
    def class_name(self, label: int) -> str:
        cat_id = self.dataset.label_to_cat_id[label]
        return str(self.dataset.coco.cats.get(cat_id, {}).get("name", cat_id))

    def require(self, view: ImageView, picture: str, names: Sequence[str]) -> None:
        lacking = [name for name in expand_fields(list(names)) if name not in view.fields]
        if lacking:
            groups = sorted({name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1] in LEVELS else name
                             for name in lacking})
            spec = "head" if picture == "detections" else picture  # precompute's --fields takes method names
            raise Skipped(f"the cache has no {', '.join(groups)} (python -m precompute --fields {spec} or all "
                          f"writes it)")

    def teacher_detector(self) -> Detector:
        """The cache's teacher architecture, randomly initialised: it only decodes cached outputs."""
        if self.teacher_config is None:
            raise Skipped("the cache manifest records no teacher config (teacher.config), needed for its anchors")
        if self._teacher is None:
            config = DetectorConfig.from_dict({**self.teacher_config, "backbone_weights": None})
            with torch.random.fork_rng(devices=[]):
                self._teacher = build_detector(config).eval()
        return self._teacher

    def _load_student(self, path: str) -> Detector:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--student-ckpt {path} does not exist (a run's student.pt, or a "
                                    f"detector checkpoint written by detectors.save_checkpoint)")
        model, _ = load_checkpoint(path)
        if model.num_classes != self.dataset.num_classes:
            raise ValueError(f"--student-ckpt {path} predicts {model.num_classes} classes, the data "
                             f"{self.dataset.ann_file} has {self.dataset.num_classes}")
        return model.eval()

    def _load_icd(self, run_dir: str) -> tuple[ICD, str]:
        """ICD's teacher side from a student run directory (``last.pt``'s ``extra.train_state.method``)."""
        path = Path(run_dir) / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--icd-run {run_dir}: no last.pt there (the run directory of a "
                                    f"python -m train --method icd run)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("extra", {}).get("train_state") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or "method" not in state:
            raise ValueError(f"--icd-run {run_dir}: {path} holds no student training state (extra.train_state)")
        method = state["config"]["method"]
        names = parse_method_names(method)
        if "icd" not in names:
            raise ValueError(f"--icd-run {run_dir} trained method {method!r}, which has no ICD decoder")
        prefix = "parts.icd." if len(names) > 1 else ""
        weights = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
        overrides = split_overrides(names, state["config"].get("overrides", {}))["icd"]
        teacher_channels = int(weights["decoder.q_proj.weight"].shape[0])
        student_channels = int(weights["student_value.weight"].shape[1])
        family = (self.teacher_config or {}).get("family", "gfl")
        icd = build_method("icd", family, overrides, student_channels=student_channels,
                           teacher_channels=teacher_channels, num_classes=self.dataset.num_classes)
        try:
            icd.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"--icd-run {run_dir}: its ICD weights do not fit this data's "
                             f"{self.dataset.num_classes} classes: {error}") from None
        note = f"decoder trained for {state.get('iteration', '?')} iterations in {_short_path(run_dir)}"
        if state.get("cache_manifest_id") not in (None, manifest_id(self.cache.manifest)):
            note += " (on another cache)"
            self.log(f"note: --icd-run {run_dir} was trained on another cache than {self.cache.url}")
        return icd.eval(), note

    def icd(self, channels: int) -> tuple[ICD, str]:
        if self._icd is None:
            family = (self.teacher_config or {}).get("family", "gfl")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                icd = build_method("icd", family, student_channels=channels, teacher_channels=channels,
                                   num_classes=self.dataset.num_classes)
            self._icd = (icd.eval(), "decoder UNTRAINED (random init; pass --icd-run DIR for a trained one)")
            self.log("note: no --icd-run given: the ICD attention comes from an untrained decoder (random init)")
        icd, note = self._icd
        if icd.decoder.q_proj.in_features != channels:
            raise ValueError(f"--icd-run {self.icd_run}: its decoder reads {icd.decoder.q_proj.in_features}-channel "
                             f"teacher features, the cache holds {channels}-channel ones")
        return icd, note

    # ------------------------------------------------------------------ pictures
    def frs(self, view: ImageView) -> Path:
        self.require(view, "frs", PICTURE_FIELDS["frs"])
        maps = [richness_score(logits[None])[0, 0].numpy() for logits in view.level_maps("head.cls")]  # (h_l, w_l)
        fig, axes = _figure(2, 3, view.image_hw)
        _show(axes[0, 0], view)
        _gt(axes[0, 0], view, self.class_name)
        axes[0, 0].set_title("view image, GT dashed", fontsize=9)
        norm = Normalize(0, 1)
        mappable = None
        for level, (ax, grid) in enumerate(zip(axes.flat[1:], maps)):
            _show(ax, view, grey=True)
            mappable = _overlay(ax, grid, STRIDES[level], view, norm)
            _gt(ax, view, self.class_name, with_labels=False)
            ax.set_title(f"{_level_title(level, view)}\nmax S {grid.max():.2f}, mean {grid.mean():.2f}", fontsize=9)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label="richness S")
        fig.suptitle(f"FRS feature richness S = max over classes of σ(teacher class logits), per FPN level\n"
                     f"{view.describe()}; from the cached head.cls", fontsize=10)
        return _save(fig, self.path(view, "frs"))

    def maskd(self, view: ImageView) -> Path:
        self.require(view, "maskd", PICTURE_FIELDS["maskd"])
        if self._tokens is None:
            try:
                self._tokens = load_receptive_tokens(self.cache.artifact(MASKD_ARTIFACT))
            except CacheError as error:
                raise Skipped(f"{error} (MasKD stage 1: python -m precompute --fields all or maskd, "
                              f"--maskd-iters > 0)") from None
        tokens, level = self._tokens, LEVELS.index(self.maskd_level)
        features = view.level_maps("fpn")[level][None]  # (1, C, h_l, w_l)
        with torch.no_grad():
            masks = tokens.masks(features, level)[0].numpy()  # (T, h_l, w_l)
            weights = tokens.weights(features, level)[0].tolist()  # (T,)
        num_tokens = masks.shape[0]
        cols = math.ceil((num_tokens + 1) / 2)
        fig, axes = _figure(2, cols, view.image_hw)
        _show(axes[0, 0], view)
        _gt(axes[0, 0], view, self.class_name)
        axes[0, 0].set_title("view image, GT dashed", fontsize=9)
        norm = Normalize(0, 1)
        mappable = None
        for token, ax in enumerate(axes.flat[1:]):
            if token >= num_tokens:
                ax.set_axis_off()
                continue
            _show(ax, view, grey=True)
            mappable = _overlay(ax, masks[token], STRIDES[level], view, norm, cmap="viridis")
            _gt(ax, view, self.class_name, with_labels=False)
            ax.set_title(f"token {token}: weight p = {weights[token]:.2f}", fontsize=9)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label="mask M_t")
        meta = self.cache.artifacts().get(MASKD_ARTIFACT, {}).get("meta", {})
        learnt = f", tokens learnt in {meta['iters']} stage-1 iterations" if "iters" in meta else ""
        fig.suptitle(f"MasKD receptive-token masks M_t = σ(token_t · F_t) at {_level_title(level, view)}\n"
                     f"{view.describe()}; p_t = token weight (softmax of the prob head){learnt}", fontsize=10)
        return _save(fig, self.path(view, "maskd"))

    def ld(self, view: ImageView) -> Path:
        self.require(view, "ld", PICTURE_FIELDS["ld"])
        teacher = self.teacher_detector()
        anchors = teacher.grid_anchors(view.level_hw, torch.zeros(()))  # per level (h_l·w_l·A, 4), (h, w, a)
        level, index = view.fields["region.level"].long(), view.fields["region.index"].long()
        kind = view.fields["region.kind"].long()
        boxes = torch.stack([anchors[int(lvl)][int(i)] for lvl, i in zip(level, index)]) if len(level) \
            else torch.zeros(0, 4)  # (R, 4) anchor boxes, view pixels
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (R, 2)
        positive, vlr = kind == REGION_POSITIVE, kind == REGION_VLR

        fig, axes = _figure(1, 2, view.image_hw, colorbar=False, panel_inches=WIDE_PANEL_INCHES)
        left, right = axes[0]
        for ax in (left, right):
            _show(ax, view)
        # Left: every row's anchor centre; colour = kind, marker = level. VLR under the positives.
        for mask, color, size in ((vlr, VLR_COLOR, 14), (positive, POSITIVE_COLOR, 22)):
            for lvl in range(len(LEVELS)):
                on = mask & (level == lvl)
                if on.any():
                    left.scatter(centres[on, 0], centres[on, 1], s=size, c=color, marker=LEVEL_MARKERS[lvl],
                                 edgecolors="black", linewidths=0.4, zorder=3)
        _gt(left, view, self.class_name)
        left.set_title(f"anchor centres: {int(positive.sum())} positives, {int(vlr.sum())} VLR rows", fontsize=9)
        # Right: the positives' anchor boxes (what the teacher's box distributions are read at).
        _boxes(right, boxes[positive], POSITIVE_COLOR, linewidth=0.8, alpha=0.8)
        _gt(right, view, self.class_name)
        right.set_title("anchor boxes of the positives", fontsize=9)

        handles = [Line2D([], [], color=POSITIVE_COLOR, marker="o", linestyle="", label="ATSS positive"),
                   Line2D([], [], color=VLR_COLOR, marker="o", linestyle="", label="VLR"),
                   Line2D([], [], color=GT_COLOR, linestyle="--", label="GT box")]
        handles += [Line2D([], [], color="grey", marker=LEVEL_MARKERS[lvl], linestyle="", label=LEVELS[lvl].upper())
                    for lvl in range(len(LEVELS)) if bool((level == lvl).any())]
        legend = fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
                            facecolor="#dddddd")
        legend.get_frame().set_edgecolor("none")
        fig.suptitle(f"LD region rows (cached region.*): ATSS positives and VLR (DIoU in [0.25·thr, thr))\n"
                     f"{view.describe()}", fontsize=10)
        return _save(fig, self.path(view, "ld"))

    def icd_attention(self, view: ImageView) -> Path:
        self.require(view, "icd", PICTURE_FIELDS["icd"])
        gt_boxes, gt_labels = view.gt_boxes, view.gt_labels
        if gt_boxes.shape[0] == 0:
            raise Skipped("the view has no GT box (ICD's instance queries are the GT boxes)")
        areas = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(dim=1)
        instance = int(areas.argmax()) if self.icd_instance is None else self.icd_instance
        if not 0 <= instance < gt_boxes.shape[0]:
            raise Skipped(f"--icd-instance {instance}: the view has {gt_boxes.shape[0]} GT boxes "
                          f"(0..{gt_boxes.shape[0] - 1})")
        fpn = view.level_maps("fpn")
        icd, note = self.icd(int(fpn[0].shape[0]))
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

        fig, axes = _figure(2, 3, view.image_hw)
        _show(axes[0, 0], view)
        _gt(axes[0, 0], view, self.class_name, with_labels=False)
        chosen = gt_boxes[instance:instance + 1]
        _boxes(axes[0, 0], chosen, "#00e5ff", [self.class_name(int(gt_labels[instance]))], linewidth=2.0)
        centre = ((chosen[0, :2] + chosen[0, 2:]) / 2).tolist()
        axes[0, 0].plot(*centre, marker="+", color="#00e5ff", markersize=10, mew=2)
        axes[0, 0].set_title(f"query: GT #{instance} (cyan, + = query point)", fontsize=9)
        norm = PowerNorm(0.5, 0, max(float(m.max()) for m in maps))  # square-root scale: faint spread stays visible
        mappable = None
        for level, (ax, grid) in enumerate(zip(axes.flat[1:], maps)):
            _show(ax, view, grey=True)
            mappable = _overlay(ax, grid, STRIDES[level], view, norm, cmap="magma")
            _boxes(ax, chosen, "#00e5ff", linewidth=1.0, linestyle="--")
            ax.set_title(f"{_level_title(level, view)}\n{grid.sum():.0%} of the attention", fontsize=9)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8,
                     label=f"attention weight, mean over {icd.config.num_heads} heads (√ scale)")
        fig.suptitle(f"ICD: attention of GT instance #{instance} ({self.class_name(int(gt_labels[instance]))}) "
                     f"over the teacher's P3–P7 (softmax over all positions)\n{view.describe()}; {note}",
                     fontsize=10)
        return _save(fig, self.path(view, "icd"))

    def detections(self, view: ImageView) -> Path:
        self.require(view, "detections", PICTURE_FIELDS["detections"])
        if self._student is None:
            raise Skipped("no --student-ckpt given (the picture compares teacher and student)")
        teacher = self.teacher_detector()
        cls_maps, box_maps = view.level_maps("head.cls"), view.level_maps("head.box")
        # The cached maps are the teacher's outputs on the view's own canonical grid: a batch of one.
        out = DetectorOutput(features=[], cls_logits=[m[None] for m in cls_maps],
                             box_outputs=[m[None] for m in box_maps],
                             anchors=teacher.grid_anchors(view.level_hw, cls_maps[0]), strides=tuple(teacher.strides),
                             image_sizes=[view.image_hw])
        with torch.no_grad():
            teacher_dets = teacher.postprocess(out)[0]
            batch = collate([view.sample])
            student_dets = self._student.postprocess(self._student(batch.images, batch.image_sizes))[0]

        fig, axes = _figure(1, 2, view.image_hw, colorbar=False, panel_inches=WIDE_PANEL_INCHES)
        palette = colormaps["tab10"]
        teacher_name = self.teacher_config.get("name") or self.teacher_config.get("family")
        student_name = self._student.config.name or self._student.config.family
        panels = ((axes[0, 0], teacher_dets, f"teacher {teacher_name}, decoded from the cached head"),
                  (axes[0, 1], student_dets, f"student {student_name}, {_short_path(self.student_ckpt)}"))
        for ax, dets, title in panels:
            _show(ax, view)
            _gt(ax, view, self.class_name, with_labels=False)
            keep = dets["scores"] >= self.score_thresh
            groups = _same_box_groups(dets["boxes"][keep])
            boxes, scores, labels = dets["boxes"][keep], dets["scores"][keep].tolist(), dets["labels"][keep].tolist()
            for group in reversed(groups):  # the best-scoring box drawn last, on top
                text = ", ".join(f"{self.class_name(labels[i])} {scores[i]:.2f}" for i in group)
                _boxes(ax, boxes[group[0]][None], palette(labels[group[0]] % 10), [text], linewidth=1.5)
            ax.set_title(f"{title}\n{int(keep.sum())} detections", fontsize=9)
        fig.suptitle(f"Detections with score ≥ {self.score_thresh:g} (GT dashed white), view pixels\n"
                     f"{view.describe()}", fontsize=10)
        return _save(fig, self.path(view, "detections"))

    def path(self, view: ImageView, picture: str) -> Path:
        return self.out / f"{view.image_id}_view{view.view_index}_{picture}.png"

    def draw(self, view: ImageView, pictures: Sequence[str]) -> list[Path]:
        painters = {"frs": self.frs, "maskd": self.maskd, "ld": self.ld, "icd": self.icd_attention,
                    "detections": self.detections}
        written = []
        for picture in pictures:
            try:
                written.append(painters[picture](view))
            except Skipped as reason:
                self.log(f"skipped {picture} for {view.describe()}: {reason}")
        return written


# ---------------------------------------------------------------------------------------------- entry points
def parse_pictures(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma list of PICTURES -> the list, in PICTURES order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip().lower() for item in items if item.strip()]
    if "all" in items:
        return list(PICTURES)
    unknown = [item for item in items if item not in PICTURES]
    if unknown or not items:
        raise ValueError(f"unknown picture(s) {unknown} in --what {spec!r}; choose from all, {', '.join(PICTURES)}")
    return [picture for picture in PICTURES if picture in items]


def choose_images(dataset: CocoDetection, cache: Cache, view_index: int, image_ids: Sequence[int] | None,
                  num_images: int) -> list[int]:
    """The given ids (checked against the split and the cache), or the first ``num_images`` ids of the
    split that the cache holds, images with GT boxes first."""
    incomplete = "" if cache.manifest["complete"] else " (the cache is incomplete: precompute has not finished)"
    if image_ids:
        known = set(dataset.image_ids)
        for image_id in image_ids:
            if image_id not in known:
                shown = ", ".join(map(str, dataset.image_ids[:8])) + (", ..." if len(known) > 8 else "")
                raise ValueError(f"image id {image_id} is not in {dataset.ann_file} ({len(known)} images: "
                                 f"{shown})")
            if (image_id, view_index) not in cache:
                raise ValueError(f"image id {image_id}, view {view_index} is not in the cache {cache.url}"
                                 f"{incomplete}")
        return list(image_ids)
    cached = [i for i in dataset.image_ids if (i, view_index) in cache]
    with_boxes = [i for i in cached if dataset.coco.imgToAnns.get(i)]
    chosen = (with_boxes + [i for i in cached if i not in set(with_boxes)])[:num_images]
    if not chosen:
        raise ValueError(f"the cache {cache.url} holds no image of {dataset.ann_file} under view {view_index}"
                         f"{incomplete}")
    return chosen


def load_view(dataset: CocoDetection, cache: Cache, image_id: int, view_index: int,
              fields: Sequence[str]) -> ImageView:
    """The view image from the data (as the trainer rebuilds it) and its cached fields, checked to agree."""
    sample = dataset.load(dataset.image_ids.index(image_id), view_index)
    wanted = [name for name in expand_fields(list(fields) + ["meta"]) if name in cache.manifest.fields]
    cached = cache.dequantize(cache.get(image_id, view_index, fields=wanted), device="cpu")
    image_hw = (int(sample.image.shape[-2]), int(sample.image.shape[-1]))
    if "meta.valid_hw" in cached and tuple(cached["meta.valid_hw"].tolist()) != image_hw:
        raise ValueError(f"image {image_id} view {view_index}: the cache's view is "
                         f"{tuple(cached['meta.valid_hw'].tolist())} pixels, the data's {image_hw}: they were "
                         f"not made from the same images")
    fields_out = {name: value for name, value in cached.items() if not name.startswith("__")}
    return ImageView(image_id, view_index, dataset.views[view_index], sample, fields_out, image_hw,
                     valid_level_sizes(image_hw, STRIDES))


def draw(data: str | Path, cache: str | Path, out: str | Path, *, split: str = "train2017",
         image_ids: Sequence[int] | None = None, num_images: int = 2, view: int = 0,
         student_ckpt: str | Path | None = None, icd_run: str | Path | None = None,
         what: str | Sequence[str] = "all", maskd_level: str = "p3", icd_instance: int | None = None,
         score_thresh: float = 0.3, log: Callable[[str], None] = print) -> list[Path]:
    """Draws the pictures (see the module docstring) and returns the written PNG paths.

    Args:
        data: COCO-layout root (``annotations/instances_{split}.json``, ``{split}/``).
        cache: the teacher cache of that split (``python -m precompute``).
        out: directory for the PNG files (created).
        image_ids: COCO ids to draw; default the first ``num_images`` of the split (with GT boxes first).
        view: index into the cache's views.
        student_ckpt: a student checkpoint (a run's ``student.pt``) for the detections picture.
        icd_run: a student run directory of an ICD run (its ``last.pt``) for the ICD decoder.
        what: ``"all"`` or a comma list of frs, maskd, ld, icd, detections.
        maskd_level: the level (p3..p7) of the MasKD token masks.
        icd_instance: the GT index whose ICD attention is drawn (default: the largest box).
        score_thresh: detections drawn from this score up.
        log: where skip reasons and notes go.
    """
    pictures = parse_pictures(what)
    if maskd_level not in LEVELS:
        raise ValueError(f"--maskd-level {maskd_level!r}: choose one of {', '.join(LEVELS)}")
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    opened = open_cache(str(cache), allow_incomplete=True)
    if not opened.manifest["complete"]:
        log(f"note: {cache} is incomplete (precompute still running or interrupted); drawing what it holds")
    views = [ViewSpec.from_dict(v) for v in opened.views]
    if not 0 <= view < len(views):
        raise ValueError(f"--view {view}: the cache has {len(views)} views (0..{len(views) - 1}): "
                         + ", ".join(f"{i}: {v.key()}" for i, v in enumerate(views)))
    dataset = CocoDetection(data, split, views=views, view_policy="all")
    adopt_cache_images(dataset, opened, where=str(cache))
    try:
        opened.manifest.check(dict(dataset=dataset.fingerprint()), where=str(cache))
    except ManifestMismatch as error:
        raise ValueError(f"{error} (was the cache written for --split {split} of {data}?)") from None
    chosen = choose_images(dataset, opened, view, [int(i) for i in image_ids or []], num_images)
    painter = Painter(dataset, opened, Path(out), student_ckpt=None if student_ckpt is None else str(student_ckpt),
                      icd_run=None if icd_run is None else str(icd_run), maskd_level=maskd_level,
                      icd_instance=icd_instance, score_thresh=score_thresh, log=log)
    fields = sorted({name for picture in pictures for name in PICTURE_FIELDS[picture]})
    written: list[Path] = []
    for image_id in chosen:
        written += painter.draw(load_view(dataset, opened, image_id, view, fields), pictures)
    return written


DESCRIPTION = """\
Pictures of what the distillation methods read from a teacher cache, for chosen images of a
COCO-layout split, as PNG files in --out (one per image and picture):

  frs         FRS feature richness S = max over classes of σ(teacher class logits), per level
              P3..P7, over the image (cached head.cls)
  maskd       MasKD: the masks σ(token_t · F_t) of the receptive tokens learnt in precompute
              (the cache's maskd_tokens artefact) on one level (--maskd-level), with their weights
  ld          LD: the cached region rows, ATSS positives and VLR anchors, and the GT boxes
  icd         ICD: the attention of one GT instance's query (--icd-instance, default the largest
              box) over the teacher's P3..P7, from the instance decoder of an ICD run (--icd-run);
              without one the decoder is untrained (random init), as the title says
  detections  teacher detections decoded from the cached head.cls/head.box (no teacher weights)
              beside a student's (--student-ckpt), GT dashed

Everything is drawn in view pixels on the view image (resized, possibly flipped: --view) that
the teacher saw. A picture whose inputs are missing is skipped with the reason; the rest are
drawn. The written paths are printed at the end.
"""

EPILOG = """\
examples:
  python -m train.viz --data runs/demo/data --cache runs/demo/cache --out runs/viz --num-images 2
  python -m train.viz --data runs/demo/data --cache runs/demo/cache --out runs/viz --image-ids 1 7 \\
      --what icd,detections --icd-run runs/train/icd --student-ckpt runs/train/icd/student.pt
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.viz", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR",
                   help="COCO-layout root (annotations/instances_SPLIT.json, SPLIT/)")
    p.add_argument("--cache", required=True, metavar="DIR", help="teacher cache of that split (python -m precompute)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files (created)")
    p.add_argument("--split", default="train2017", help="split the cache was written for [train2017]")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--image-ids", type=int, nargs="+", metavar="ID", help="COCO image ids to draw")
    which.add_argument("--num-images", type=int, default=2, metavar="N",
                       help="else: the first N images of the split (those with GT boxes first) [2]")
    p.add_argument("--view", type=int, default=0, metavar="V", help="index into the cache's views [0]")
    p.add_argument("--what", default="all", metavar="LIST",
                   help=f"all, or a comma list of {', '.join(PICTURES)} [all]")
    p.add_argument("--student-ckpt", metavar="FILE",
                   help="student checkpoint for the detections picture (a run's student.pt)")
    p.add_argument("--icd-run", metavar="DIR", help="ICD student run directory: its last.pt holds the trained decoder")
    p.add_argument("--maskd-level", default="p3", choices=LEVELS, help="level of the MasKD token masks [p3]")
    p.add_argument("--icd-instance", type=int, metavar="K",
                   help="GT index (among the view's GT boxes) whose ICD attention is drawn [the largest box]")
    p.add_argument("--score-thresh", type=float, default=0.3, metavar="S",
                   help="detections drawn from this score up [0.3]")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    try:
        paths = draw(args.data, args.cache, args.out, split=args.split, image_ids=args.image_ids,
                     num_images=args.num_images, view=args.view, student_ckpt=args.student_ckpt,
                     icd_run=args.icd_run, what=args.what, maskd_level=args.maskd_level,
                     icd_instance=args.icd_instance, score_thresh=args.score_thresh)
    except (ValueError, FileNotFoundError, CacheError) as error:
        raise SystemExit(f"python -m train.viz: error: {error}") from None
    print(f"wrote {len(paths)} picture(s):")
    for path in paths:
        print(f"  {path}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
