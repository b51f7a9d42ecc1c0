"""Pictures of what each distillation method reads from a teacher cache: ``python -m train.viz --help``.

    paths = draw("runs/demo/data", "runs/demo/cache", "runs/viz", num_images=2,
                 student_ckpt="runs/train/frs/student.pt", icd_run="runs/train/icd")

For each chosen (image, view) of a COCO-layout split, PNG files (matplotlib's Agg renderer):

    <id>_view<v>_<method>.png     each method's picture: what it reads from the cache (see --help)
    <id>_view<v>_detections.png   teacher detections decoded from the cached head vs a student's

This module is the shared frame: loading the views, the figure layout and drawing helpers, saving,
and the detections picture. What is drawn for a method is said by its class in train/methods/
(``PICTURE_FIELDS``, ``PICTURE_HELP``, ``PICTURE_OPTIONS``, ``draw_picture``), with the method's
own code (FRS's ``richness_score``, ICD's ``decode_instances``, ...), in the registry's order.

Everything is drawn in view pixels on the view image (the resized, possibly flipped image the teacher
saw, de-normalised), so maps, anchors and boxes line up with what was cached. A level-l map cell
(i, j) is a stride-sized square centred on its anchor centre (j·s, i·s), as ``Detector.grid_anchors``.
The levels are the cache's (:func:`cache_pyramid`): P3..P7, or a two-stage teacher's P2..P6.

A picture whose inputs are missing (no fields, no student checkpoint, ...) is skipped with a printed
reason; the others are drawn. Bad arguments (an image id not in the split or the cache, a view index
out of range) raise ``ValueError`` naming them.
"""
from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor
from torchvision.ops import box_iou

from detectors import build_detector, config_from_dict, load_checkpoint
from detectors.data import CocoDetection
from detectors.detector import Detector, DetectorOutput, valid_level_sizes
from detectors.frcnn import STRIDES as TWO_STAGE_STRIDES
from detectors.views import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Sample, ViewSpec, collate
from detectors.zoo import TWO_STAGE_FAMILIES
from precompute.fields import TWO_STAGE_FIELDS
from store import FIELDS, LEVELS, STRIDES, Cache, CacheError, ManifestMismatch, expand_fields, open_cache
from store.schema import TWO_STAGE_LEVELS
from train.methods import METHODS
from train.methods.base import DistillationMethod, PictureOption
from train.sources import adopt_cache_images

DETECTIONS = "detections"
DETECTION_FIELDS = ("head.cls", "head.box")
DETECTIONS_HELP = ("teacher detections decoded from the cached head.cls/head.box (no teacher weights) beside a "
                   "student's (--student-ckpt), GT dashed")
PANEL_INCHES = 3.0           # width of one image panel
WIDE_PANEL_INCHES = 4.5      # ... in the two-panel pictures
MAP_ALPHA = 0.6              # opacity of a heat map over the (grey) image
GT_COLOR = "white"
DPI = 110


class Skipped(Exception):
    """One picture cannot be drawn; the message names what is missing."""


# The registry is read when called, so that a method registered after this import has its picture.
def picture_methods() -> dict[str, type[DistillationMethod]]:
    """The methods that have a picture, in the registry's order."""
    return {name: cls for name, cls in METHODS.items() if cls.PICTURE_FIELDS is not None}


def picture_names() -> tuple[str, ...]:
    """Every method's picture (the registry's order), then the detections: what ``--what`` takes."""
    return (*picture_methods(), DETECTIONS)


def picture_options() -> dict[str, PictureOption]:
    """The methods' picture options by keyword (``maskd_level``)."""
    return {option.dest: option for cls in picture_methods().values() for option in cls.PICTURE_OPTIONS}


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
    levels: tuple[str, ...]             # the cache's pyramid (cache_pyramid): ("p3", ..., "p7") or P2..P6
    strides: tuple[int, ...]            # pixels per cell of each level

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
        flip = ", flipped" if self.view.flip else ""
        return f"image {self.image_id}, view {self.view_index} ({self.view.short}:{self.view.max_size}{flip})"

    def level_maps(self, prefix: str) -> list[Tensor]:
        """Per level (C, h_l, w_l) cached maps of ``prefix`` (``fpn``, ``head.cls``, ``head.rpn.obj``)."""
        return [self.fields[f"{prefix}.{level}"] for level in self.levels]


def cache_pyramid(cache: Cache) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The cache's levels and strides: a two-stage teacher's P2..P6 (by its family or P2 fields), else P3..P7."""
    family = (cache.manifest["teacher"].get("config") or {}).get("family")
    if family in TWO_STAGE_FAMILIES or any(name.endswith(".p2") for name in cache.manifest.fields):
        return TWO_STAGE_LEVELS, TWO_STAGE_STRIDES
    return LEVELS, STRIDES


def level_fields(names: Sequence[str], levels: Sequence[str]) -> list[str]:
    """Field names of ``names`` as :func:`store.expand_fields`, but a per-level prefix (``fpn``) over ``levels``."""
    out: list[str] = []
    for name in names:
        per_level = [f"{name}.{level}" for level in levels]
        out += per_level if any(field in FIELDS for field in per_level) else expand_fields([name])
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------- drawing helpers
# Public: the methods' pictures (train/methods/*.py ``draw_picture``) draw with them.
def new_figure(rows: int, cols: int, image_hw: tuple[int, int], colorbar: bool = True,
               panel_inches: float = PANEL_INCHES) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` image panels (axes as a 2-D array, no ticks)."""
    h, w = image_hw
    panel_h = panel_inches * h / w
    fig = Figure(figsize=(cols * panel_inches + (0.9 if colorbar else 0.2), rows * (panel_h + 0.45) + 0.9),
                 layout="constrained", dpi=DPI)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def show_view(ax, view: ImageView, grey: bool = False) -> None:
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


def overlay_map(ax, grid: np.ndarray, stride: int, view: ImageView, norm: Normalize, cmap: str = "inferno"):
    """A level map (h_l, w_l) over the image, aligned as :func:`level_map_to_pixels` says."""
    h, w = view.image_hw
    pixels = level_map_to_pixels(grid, stride, view.image_hw)
    image = ax.imshow(pixels, cmap=cmap, norm=norm, alpha=MAP_ALPHA, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return image


def draw_boxes(ax, boxes_xyxy: Tensor, color, labels: Sequence[str] | None = None, linestyle: str = "-",
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


def short_path(path: str | Path, parts: int = 2) -> str:
    """The path, or ".../" and its last ``parts`` components when it is longer (titles stay one line)."""
    components = Path(path).parts
    return str(path) if len(components) <= parts + 1 else ".../" + "/".join(components[-parts:])


def level_title(level: int, view: ImageView) -> str:
    h, w = view.level_hw[level]
    return f"{view.levels[level].upper()} (stride {view.strides[level]}, {h}×{w})"


# ---------------------------------------------------------------------------------------------- the frame
class Painter:
    """Draws the pictures of one cache: the shared inputs (class names, the teacher's decoder, a
    student), the methods' picture options and the state they keep between views, saving."""

    def __init__(self, dataset: CocoDetection, cache: Cache, out: Path, *, pictures: Sequence[str] | None = None,
                 student_ckpt: str | None = None, score_thresh: float = 0.3, options: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.dataset, self.cache, self.out, self.log = dataset, cache, out, log
        self.score_thresh = score_thresh
        self.methods = picture_methods()
        self.options = {dest: option.default for dest, option in picture_options().items()} | dict(options or {})
        self.state: dict[str, Any] = {}   # per method: what its picture loaded once (tokens, a decoder)
        self.teacher_config = cache.manifest["teacher"].get("config")
        self.levels = cache_pyramid(cache)[0]
        self.two_stage = self.levels == TWO_STAGE_LEVELS
        self.student_ckpt = student_ckpt
        self._teacher: Detector | None = None
        self._student: Detector | None = None if student_ckpt is None else self._load_student(student_ckpt)
        for picture in picture_names() if pictures is None else pictures:
            if picture in self.methods:
                self.methods[picture].prepare_picture(self)

    # ------------------------------------------------------------------ shared inputs
    def class_name(self, label: int) -> str:
        cat_id = self.dataset.label_to_cat_id[label]
        return str(self.dataset.coco.cats.get(cat_id, {}).get("name", cat_id))

    def require(self, view: ImageView, picture: str, names: Sequence[str]) -> None:
        """Raises :class:`Skipped` naming the groups of ``names`` the view's cache lacks."""
        lacking = [name for name in level_fields(names, view.levels) if name not in view.fields]
        if lacking:
            groups = sorted({name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1] in view.levels else name
                             for name in lacking})
            if self.two_stage and not any(name in TWO_STAGE_FIELDS for name in lacking):
                raise Skipped(f"a two-stage teacher's cache has no {', '.join(groups)}: those are a dense head's "
                              f"(a two-stage teacher gives fpn.p2 .. fpn.p6 and its RPN's head.rpn.*)")
            spec = "head" if picture == DETECTIONS else picture  # precompute's --fields takes method names
            raise Skipped(f"the cache has no {', '.join(groups)} (python -m precompute --fields {spec} or all "
                          f"writes it)")

    def teacher_detector(self) -> Detector:
        """The cache's teacher architecture, randomly initialised: it only decodes cached outputs."""
        if self.teacher_config is None:
            raise Skipped("the cache manifest records no teacher config (teacher.config), needed for its anchors")
        if self._teacher is None:
            config = config_from_dict({**self.teacher_config, "backbone_weights": None})
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

    def draw_gt(self, ax, view: ImageView, with_labels: bool = True) -> None:
        """The view's GT boxes, dashed white, with their class names."""
        labels = [self.class_name(int(label)) for label in view.gt_labels] if with_labels else None
        draw_boxes(ax, view.gt_boxes, GT_COLOR, labels, linestyle="--", linewidth=1.2)

    def save(self, fig: Figure, view: ImageView, picture: str) -> Path:
        path = self.out / f"{view.image_id}_view{view.view_index}_{picture}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
        return path

    # ------------------------------------------------------------------ pictures
    def detections(self, view: ImageView) -> Path:
        self.require(view, DETECTIONS, DETECTION_FIELDS)
        if self._student is None:
            raise Skipped("no --student-ckpt given (the picture compares teacher and student)")
        teacher = self.teacher_detector()
        cls_maps, box_maps = view.level_maps("head.cls"), view.level_maps("head.box")
        # The cached maps are the teacher's outputs on the view's own canonical grid: a batch of one.
        out = DetectorOutput(features=[], cls_logits=[m[None] for m in cls_maps],
                             box_outputs=[m[None] for m in box_maps], image_sizes=[view.image_hw],
                             anchors=teacher.grid_anchors(view.level_hw, cls_maps[0]), strides=tuple(teacher.strides),
                             centerness=[m[None] for m in view.level_maps("head.ctr")] if "head.ctr.p3" in view.fields
                             else None)
        with torch.no_grad():
            teacher_dets = teacher.postprocess(out)[0]
            batch = collate([view.sample])
            student_dets = self._student.postprocess(self._student(batch.images, batch.image_sizes))[0]

        fig, axes = new_figure(1, 2, view.image_hw, colorbar=False, panel_inches=WIDE_PANEL_INCHES)
        palette = colormaps["tab10"]
        teacher_name = self.teacher_config.get("name") or self.teacher_config.get("family")
        student_name = self._student.config.name or self._student.config.family
        panels = ((axes[0, 0], teacher_dets, f"teacher {teacher_name}, decoded from the cached head"),
                  (axes[0, 1], student_dets, f"student {student_name}, {short_path(self.student_ckpt)}"))
        for ax, dets, title in panels:
            show_view(ax, view)
            self.draw_gt(ax, view, with_labels=False)
            keep = dets["scores"] >= self.score_thresh
            boxes, scores, labels = dets["boxes"][keep], dets["scores"][keep].tolist(), dets["labels"][keep].tolist()
            for group in reversed(_same_box_groups(boxes)):  # the best-scoring box drawn last, on top
                text = ", ".join(f"{self.class_name(labels[i])} {scores[i]:.2f}" for i in group)
                draw_boxes(ax, boxes[group[0]][None], palette(labels[group[0]] % 10), [text], linewidth=1.5)
            ax.set_title(f"{title}\n{int(keep.sum())} detections", fontsize=9)
        fig.suptitle(f"Detections with score ≥ {self.score_thresh:g} (GT dashed white), view pixels\n"
                     f"{view.describe()}", fontsize=10)
        return self.save(fig, view, DETECTIONS)

    def draw(self, view: ImageView, pictures: Sequence[str]) -> list[Path]:
        written = []
        for picture in pictures:
            try:
                if picture == DETECTIONS:
                    written.append(self.detections(view))
                else:
                    written.append(self.methods[picture].draw_picture(self, view))
            except Skipped as reason:
                self.log(f"skipped {picture} for {view.describe()}: {reason}")
        return written


# ---------------------------------------------------------------------------------------------- entry points
def parse_pictures(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma list of :func:`picture_names` -> the list, in their order."""
    known = picture_names()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip().lower() for item in items if item.strip()]
    if "all" in items:
        return list(known)
    unknown = [item for item in items if item not in known]
    if unknown or not items:
        raise ValueError(f"unknown picture(s) {unknown} in --what {spec!r}; choose from all, {', '.join(known)}")
    return [picture for picture in known if picture in items]


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
    levels, strides = cache_pyramid(cache)
    wanted = [name for name in level_fields([*fields, "meta"], levels) if name in cache.manifest.fields]
    cached = cache.dequantize(cache.get(image_id, view_index, fields=wanted), device="cpu")
    image_hw = (int(sample.image.shape[-2]), int(sample.image.shape[-1]))
    if "meta.valid_hw" in cached and tuple(cached["meta.valid_hw"].tolist()) != image_hw:
        raise ValueError(f"image {image_id} view {view_index}: the cache's view is "
                         f"{tuple(cached['meta.valid_hw'].tolist())} pixels, the data's {image_hw}: they were "
                         f"not made from the same images")
    fields_out = {name: value for name, value in cached.items() if not name.startswith("__")}
    return ImageView(image_id, view_index, dataset.views[view_index], sample, fields_out, image_hw,
                     valid_level_sizes(image_hw, strides), levels, strides)


def draw(data: str | Path, cache: str | Path, out: str | Path, *, split: str = "train2017",
         image_ids: Sequence[int] | None = None, num_images: int = 2, view: int = 0,
         student_ckpt: str | Path | None = None, what: str | Sequence[str] = "all", score_thresh: float = 0.3,
         log: Callable[[str], None] = print, **options: Any) -> list[Path]:
    """Draws the pictures (see the module docstring) and returns the written PNG paths.

    Args:
        data: COCO-layout root (``annotations/instances_{split}.json``, ``{split}/``).
        cache: the teacher cache of that split (``python -m precompute``).
        out: directory for the PNG files (created).
        image_ids: COCO ids to draw; default the first ``num_images`` of the split (with GT boxes first).
        view: index into the cache's views.
        student_ckpt: a student checkpoint (a run's ``student.pt``) for the detections picture.
        what: ``"all"`` or a comma list of :func:`picture_names`.
        score_thresh: detections drawn from this score up.
        log: where skip reasons and notes go.
        options: the methods' picture options by :func:`picture_options` name (``icd_run="runs/icd"``,
            ``maskd_level="p4"``); the ones not given take their defaults.
    """
    pictures = parse_pictures(what)
    known_options = picture_options()
    for dest, value in options.items():
        option = known_options.get(dest)
        if option is None:
            raise ValueError(f"unknown picture option {dest!r}; known: {', '.join(known_options)}")
        if option.choices is not None and value not in option.choices:
            raise ValueError(f"{option.flag} {value!r}: choose one of {', '.join(map(str, option.choices))}")
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
    painter = Painter(dataset, opened, Path(out), pictures=pictures,
                      student_ckpt=None if student_ckpt is None else str(student_ckpt), score_thresh=score_thresh,
                      options=options, log=log)
    fields = sorted({name for picture in pictures for name in
                     (DETECTION_FIELDS + ("head.ctr",) if picture == DETECTIONS  # FCOS: its centerness too
                      else painter.methods[picture].PICTURE_FIELDS)})
    written: list[Path] = []
    for image_id in chosen:
        written += painter.draw(load_view(dataset, opened, image_id, view, fields), pictures)
    return written


def _picture_lines(name: str, text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent=f"  {name:<11} ", subsequent_indent=" " * 14)


def description() -> str:
    """``--help``'s text: every picture, the registry's methods' first."""
    pictures = [_picture_lines(name, cls.PICTURE_HELP) for name, cls in picture_methods().items()]
    return f"""\
Pictures of what the distillation methods read from a teacher cache, for chosen images of a
COCO-layout split, as PNG files in --out (one per image and picture):

{chr(10).join(pictures)}
{_picture_lines(DETECTIONS, DETECTIONS_HELP)}

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
    p = argparse.ArgumentParser(prog="python -m train.viz", description=description(), epilog=EPILOG,
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
                   help=f"all, or a comma list of {', '.join(picture_names())} [all]")
    p.add_argument("--student-ckpt", metavar="FILE",
                   help="student checkpoint for the detections picture (a run's student.pt)")
    for option in picture_options().values():
        p.add_argument(option.flag, default=option.default, type=option.type, choices=option.choices,
                       metavar=option.metavar, help=option.help)
    p.add_argument("--score-thresh", type=float, default=0.3, metavar="S",
                   help="detections drawn from this score up [0.3]")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    options = {dest: getattr(args, dest) for dest in picture_options()}
    try:
        paths = draw(args.data, args.cache, args.out, split=args.split, image_ids=args.image_ids,
                     num_images=args.num_images, view=args.view, student_ckpt=args.student_ckpt, what=args.what,
                     score_thresh=args.score_thresh, **options)
    except (ValueError, FileNotFoundError, CacheError) as error:
        raise SystemExit(f"python -m train.viz: error: {error}") from None
    print(f"wrote {len(paths)} picture(s):")
    for path in paths:
        print(f"  {path}")
    return paths


if __name__ == "__main__":   # through the imported module, so that a method's train.viz.Skipped is this one's
    from train.viz import main as imported_main
    imported_main()
