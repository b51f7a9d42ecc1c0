"""COCO-format detection data with deterministic views.

``CocoDetection(root, split)`` reads ``root/annotations/instances_{split}.json`` once (with
pycocotools), keeps per-image training targets in memory, and decodes
``root/{split}/{file_name}`` with PIL on each access. Category ids (sparse, e.g. COCO's 1..90)
map to contiguous labels ``0..K-1`` in sorted category-id order.

Bad-input policy
----------------
The annotation file is checked when the dataset is built; image files are checked for existence
then and decoded on access. ``on_error`` chooses what happens to a bad *image*:

- ``"raise"`` (strict): raise ``DataError`` naming the file and image id.
- ``"skip"`` (default): leave the image out and count it in ``dataset.report``. A missing file
  is left out when the dataset is built (``len`` excludes it), and one warning summarises
  everything the policy did there. A file that fails to decode is only found on access: the
  dataset warns once for that file and returns the next good image instead
  (``Sample.image_id`` names the image actually returned).

Case by case:

===============================================  ==============================================
missing image file                               bad image (``on_error``)
corrupt or truncated image, or decoded size      bad image (``on_error``)
  different from the annotation's width/height
image without annotations                        kept: a valid negative image (counted)
``iscrowd=1`` annotation                         kept for evaluation, not a training target
box with zero (or negative) width or height      dropped, counted
box partly outside the image                     clipped to the image, counted
box entirely outside the image                   dropped (empty after clipping), counted
annotation with an unknown category id           ``DataError`` naming the annotation id and
                                                 category id (always)
annotation for an image id not in ``images``     ``DataError`` naming the annotation (always)
annotation file missing, not JSON, or not COCO   ``DataError`` naming the file and, for a
  (missing ``images``/``annotations``/             missing key, the key (always)
  ``categories`` or a per-entry key)
===============================================  ==============================================

Every error is a ``DataError`` (a ``ValueError``) whose message names the file, image or
annotation; errors from PIL or json are not propagated as such.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from detectors.views import Sample, ViewSpec, apply_view


class DataError(ValueError):
    """Bad input data: the message names the file, image or annotation at fault."""


@dataclass
class DataReport:
    """What the bad-input policy did while building and reading a dataset."""

    missing_files: int = 0  # images left out: file not found
    corrupt_images: int = 0  # images skipped on access: decode failed or size mismatch
    images_without_annotations: int = 0  # kept as negative images
    crowd_annotations: int = 0  # kept for evaluation only
    degenerate_boxes: int = 0  # zero width or height: dropped
    clipped_boxes: int = 0  # partly outside the image: clipped
    outside_boxes: int = 0  # entirely outside the image: dropped

    def summary(self) -> str:
        """E.g. ``"images left out (file missing): 2, zero-size boxes dropped: 1"``."""
        labels = {
            "missing_files": "images left out (file missing)",
            "corrupt_images": "images skipped (cannot decode)",
            "images_without_annotations": "images without annotations (kept)",
            "crowd_annotations": "crowd annotations (evaluation only)",
            "degenerate_boxes": "zero-size boxes dropped",
            "clipped_boxes": "boxes clipped to the image",
            "outside_boxes": "boxes outside the image dropped",
        }
        return ", ".join(f"{labels[k]}: {v}" for k, v in vars(self).items() if v) or "no issues"


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    path: Path
    height: int  # original pixels
    width: int


@dataclass
class _ImageRecord:
    info: ImageInfo
    boxes_xyxy: np.ndarray  # (n, 4) float32, original pixels, clipped; crowd excluded
    labels: np.ndarray  # (n,) int64 contiguous


_REQUIRED_TOP_KEYS = ("images", "annotations", "categories")
_REQUIRED_IMAGE_KEYS = ("id", "file_name", "height", "width")
_REQUIRED_ANN_KEYS = ("id", "image_id", "category_id", "bbox")


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-layout split served as ``Sample``s under a list of views.

    Args:
        root: directory with ``annotations/instances_{split}.json`` and ``{split}/``.
        split: e.g. ``"train2017"``.
        views: the view specs; ``Sample.view_index`` indexes this tuple.
        view_policy: ``"random"`` - one item per image, view drawn with ``torch.randint`` (so it
            follows ``torch.manual_seed`` and DataLoader worker seeding); ``"all"`` - one item
            per (image, view), image-major: item ``i`` is image ``i // V``, view ``i % V``.
        on_error: ``"skip"`` or ``"raise"`` for bad images (see the module docstring).
        ann_file: overrides the annotation path.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        views: Sequence[ViewSpec] = (ViewSpec(),),
        view_policy: str = "random",
        on_error: str = "skip",
        ann_file: str | Path | None = None,
    ):
        if view_policy not in ("random", "all"):
            raise ValueError(f"view_policy must be 'random' or 'all', got {view_policy!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not views:
            raise ValueError("views must hold at least one ViewSpec")
        self.root = Path(root)
        self.split = split
        self.views = tuple(views)
        self.view_policy = view_policy
        self.on_error = on_error
        default_ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.ann_file = Path(ann_file) if ann_file is not None else default_ann_file
        self.image_dir = self.root / split
        self.report = DataReport()

        dataset, self._annotation_sha256 = _read_coco_json(self.ann_file)
        for cat in dataset["categories"]:
            _require_keys(cat, ("id",), f"{self.ann_file}: category {_entry_name(cat)}")
        cat_ids = sorted(int(c["id"]) for c in dataset["categories"])
        self.label_to_cat_id: list[int] = cat_ids
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}
        self.num_classes = len(cat_ids)
        self._records, missing_paths = self._build_records(dataset)  # validates every entry
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
        self._undecodable: set[int] = set()  # record indices found bad on access (skip policy)
        self.image_ids: list[int] = [r.info.image_id for r in self._records]
        self._index_by_image_id = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if not self._records:
            raise DataError(f"{self.ann_file}: no usable images ({self.report.summary()})")
        r = self.report
        if r.missing_files or r.degenerate_boxes or r.clipped_boxes or r.outside_boxes:
            shown = "".join(f"\n  missing: {p}" for p in missing_paths[:5])
            more = f"\n  ... and {len(missing_paths) - 5} more" if len(missing_paths) > 5 else ""
            warnings.warn(f"{self.ann_file}: {r.summary()}{shown}{more}", stacklevel=2)

    # -- building ---------------------------------------------------------------------------
    def _build_records(self, dataset: dict) -> tuple[list[_ImageRecord], list[str]]:
        """Per-image records after the box policy, and the paths of missing image files."""
        images: dict[int, dict] = {}
        for entry in dataset["images"]:
            _require_keys(entry, _REQUIRED_IMAGE_KEYS, f"{self.ann_file}: image {_entry_name(entry)}")
            image_id = int(entry["id"])
            if image_id in images:
                raise DataError(f"{self.ann_file}: duplicate image id {image_id}")
            images[image_id] = entry

        anns_by_image: dict[int, list[dict]] = {i: [] for i in images}
        for ann in dataset["annotations"]:
            _require_keys(ann, _REQUIRED_ANN_KEYS, f"{self.ann_file}: annotation {_entry_name(ann)}")
            if not isinstance(ann["bbox"], list) or len(ann["bbox"]) != 4:
                raise DataError(
                    f"{self.ann_file}: annotation {ann['id']} has bbox {ann['bbox']!r}, not [x, y, w, h]"
                )
            if ann["category_id"] not in self.cat_id_to_label:
                raise DataError(
                    f"{self.ann_file}: annotation {ann['id']} has unknown category id {ann['category_id']!r} "
                    f"(the file defines {self.num_classes} categories)"
                )
            if ann["image_id"] not in anns_by_image:
                raise DataError(
                    f"{self.ann_file}: annotation {ann['id']} refers to image id {ann['image_id']}, "
                    "which is not in 'images'"
                )
            anns_by_image[ann["image_id"]].append(ann)

        records = []
        missing = []
        for image_id, entry in images.items():
            path = self.image_dir / entry["file_name"]
            if not path.is_file():
                if self.on_error == "raise":
                    raise DataError(f"image file {path} (image id {image_id}) does not exist")
                self.report.missing_files += 1
                missing.append(str(path))
                continue
            info = ImageInfo(image_id, entry["file_name"], path, int(entry["height"]), int(entry["width"]))
            boxes, labels = self._targets(anns_by_image[image_id], info)
            records.append(_ImageRecord(info, boxes, labels))
        return records, missing

    def _targets(self, anns: list[dict], info: ImageInfo) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes (n, 4) xyxy original pixels and labels (n,), after the box policy."""
        if not anns:
            self.report.images_without_annotations += 1
        boxes, labels = [], []
        for ann in anns:
            if ann.get("iscrowd", 0):
                self.report.crowd_annotations += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                self.report.degenerate_boxes += 1
                continue
            x1, y1 = min(max(x, 0.0), info.width), min(max(y, 0.0), info.height)
            x2, y2 = min(max(x + w, 0.0), info.width), min(max(y + h, 0.0), info.height)
            if x2 <= x1 or y2 <= y1:
                self.report.outside_boxes += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                self.report.clipped_boxes += 1
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_id_to_label[ann["category_id"]])
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.view_policy == "all":
            return len(self._records) * len(self.views)
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        if self.view_policy == "all":
            return self.load(index // len(self.views), index % len(self.views))
        view_index = int(torch.randint(len(self.views), ()))
        return self.load(index, view_index)

    def load(self, image_index: int, view_index: int) -> Sample:
        """The image at ``image_index`` (position in ``image_ids``) under view ``view_index``.

        With ``on_error="skip"`` an undecodable image is replaced by the next good one.
        """
        if not 0 <= image_index < len(self._records):
            raise IndexError(f"image index {image_index} out of range for {len(self._records)} images")
        if not 0 <= view_index < len(self.views):
            raise IndexError(f"view index {view_index} out of range for {len(self.views)} views")
        for offset in range(len(self._records)):
            record_index = (image_index + offset) % len(self._records)
            if record_index in self._undecodable:
                continue
            record = self._records[record_index]
            try:
                image = self._decode(record.info)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                self._undecodable.add(record_index)
                self.report.corrupt_images += 1
                warnings.warn(f"skipping bad image ({self.report.corrupt_images} so far): {err}", stacklevel=2)
                continue
            view = self.views[view_index]
            image, boxes = apply_view(image, torch.from_numpy(record.boxes_xyxy), view)
            return Sample(
                image=image,
                boxes_xyxy=boxes,
                labels=torch.from_numpy(record.labels.copy()),
                image_id=record.info.image_id,
                view_index=view_index,
                view=view,
                orig_size=(record.info.height, record.info.width),
            )
        raise DataError(f"{self.image_dir}: no image could be decoded")

    def image_info(self, index: int) -> ImageInfo:
        """Id, file name, path and original (height, width) of the image at ``index``."""
        return self._records[index].info

    def image_size(self, image_id: int) -> tuple[int, int]:
        """Original (h, w) of the image with COCO id ``image_id``."""
        info = self._records[self._index_by_image_id[image_id]].info
        return info.height, info.width

    def fingerprint(self) -> dict:
        """Identifies the data a cache was built from: annotation hash and image count."""
        return {"annotation_sha256": self._annotation_sha256, "num_images": len(self._records)}

    @staticmethod
    def _decode(info: ImageInfo) -> torch.Tensor:
        """(3, h, w) uint8 RGB, original pixels."""
        try:
            with Image.open(info.path) as pil:
                pil.load()
                rgb = pil.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"image file {info.path} (image id {info.image_id}) does not exist") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot decode image file {info.path} (image id {info.image_id}): {err}") from None
        if (rgb.height, rgb.width) != (info.height, info.width):
            raise DataError(
                f"image file {info.path} (image id {info.image_id}) is {rgb.height}x{rgb.width} (h x w) "
                f"but the annotation says {info.height}x{info.width}"
            )
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (3, h, w)


def _read_coco_json(path: Path) -> tuple[dict, str]:
    """The parsed annotation file and the sha256 of its bytes."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read annotation file {path}: {err.strerror or err}") from None
    try:
        dataset = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(dataset, dict):
        raise DataError(f"annotation file {path} is not COCO: the top level is a {type(dataset).__name__}")
    _require_keys(dataset, _REQUIRED_TOP_KEYS, f"annotation file {path} is not COCO:")
    return dataset, hashlib.sha256(raw).hexdigest()


def _entry_name(entry: object) -> str:
    """How an error message names a JSON entry: its id if it has one, else the entry itself."""
    if isinstance(entry, dict) and "id" in entry:
        return repr(entry["id"])
    return repr(entry)[:80]


def _require_keys(entry: object, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where} is not a JSON object")
    for key in keys:
        if key not in entry:
            raise DataError(f"{where} missing key {key!r}")
