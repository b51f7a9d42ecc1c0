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
box with zero (or negative) width or height,     dropped, counted
  or a non-finite (NaN, inf) coordinate
box partly outside the image                     clipped to the image, counted
box entirely outside the image                   dropped (empty after clipping), counted
annotation with an unknown category id           ``DataError`` naming the annotation id and
                                                 category id (always)
annotation for an image id not in ``images``     ``DataError`` naming the annotation (always)
annotation file missing, not JSON, or not COCO   ``DataError`` naming the file and, for a
  (missing ``images``/``annotations``/             missing key, the key (always)
  ``categories`` or a per-entry key)
a value of the wrong JSON type (a string bbox    ``DataError`` naming the file, the image or
  coordinate, height ``"tall"``, category id      annotation id and the field (always): ids,
  ``"7"`` where the categories define ``7``)      sizes and coordinates must be JSON numbers
===============================================  ==============================================

Image hashes and the scan
-------------------------
``scan_images`` (detectors/image_scan.py) reads, hashes (``image_file_hash``: sha256 of the
file's bytes) and decodes every image once, under the same policy; ``exclude`` then leaves the bad
ones out (precompute declares them in the cache, and a trainer excludes exactly those).
``expect_image_hashes`` makes every ``load`` check the bytes it reads against a table: a file
that changed is an ``ImageChangedError`` (always raised, whatever ``on_error``: the cache was
built from other pixels).

Every error is a ``DataError`` (a ``ValueError``) whose message names the file, image or
annotation; errors from PIL or json are not propagated as such.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
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


class ImageChangedError(DataError):
    """An image file's bytes differ from the hash recorded for it (e.g. in a teacher cache)."""


IMAGE_HASH = "sha256"   # image_file_hash: what the recorded image hashes are (``sha256sum FILE``)
IMAGE_HASH_BYTES = 32


def image_file_hash(data: bytes) -> bytes:
    """The sha256 digest (32 bytes) of an image file's bytes as read from disk, before decoding.
    (sha256 with the CPU's SHA extensions ran at 1.6 GB/s here, blake2b at 0.3-0.4 GB/s.)"""
    return hashlib.sha256(data).digest()


def image_hash_table(hashes: dict[int, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids (n,) int64 sorted, digests (n, 32) uint8)``: the compact form of a hash table."""
    ids = np.asarray(sorted(hashes), dtype=np.int64)
    digests = np.frombuffer(b"".join(hashes[int(i)] for i in ids), dtype=np.uint8).reshape(-1, IMAGE_HASH_BYTES)
    return ids, digests


def image_hash_digest(ids: np.ndarray, digests: np.ndarray) -> str:
    """One sha256 over a table from ``image_hash_table``: identifies every image's bytes at once."""
    h = hashlib.sha256(IMAGE_HASH.encode())
    h.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(digests, dtype=np.uint8).tobytes())
    return h.hexdigest()


@dataclass
class DataReport:
    """What the bad-input policy did while building and reading a dataset."""

    missing_files: int = 0  # images left out: file not found
    corrupt_images: int = 0  # images skipped on access or by a scan: decode failed or size mismatch
    images_without_annotations: int = 0  # kept as negative images
    crowd_annotations: int = 0  # kept for evaluation only
    degenerate_boxes: int = 0  # zero width or height, or a non-finite coordinate: dropped
    clipped_boxes: int = 0  # partly outside the image: clipped
    outside_boxes: int = 0  # entirely outside the image: dropped

    def summary(self) -> str:
        """E.g. ``"images left out (file missing): 2, zero-size boxes dropped: 1"``."""
        labels = {
            "missing_files": "images left out (file missing)",
            "corrupt_images": "images skipped (cannot decode)",
            "images_without_annotations": "images without annotations (kept)",
            "crowd_annotations": "crowd annotations (evaluation only)",
            "degenerate_boxes": "non-finite or zero-size boxes dropped",
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
            _require_int(cat["id"], f"{self.ann_file}: category {_entry_name(cat)}", "id")
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
        # image id -> why it was left out: a missing file (skip policy), or ``exclude``
        self.excluded: dict[int, str] = {int(i): f"image file {p} does not exist" for i, p in missing_paths}
        self.image_hashes: dict[int, bytes] | None = None  # image id -> image_file_hash, checked on load
        self.image_ids: list[int] = [r.info.image_id for r in self._records]
        self._index_by_image_id = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if not self._records:
            raise DataError(f"{self.ann_file}: no usable images ({self.report.summary()})")
        r = self.report
        if r.missing_files or r.degenerate_boxes or r.clipped_boxes or r.outside_boxes:
            shown = "".join(f"\n  missing: {p}" for _, p in missing_paths[:5])
            more = f"\n  ... and {len(missing_paths) - 5} more" if len(missing_paths) > 5 else ""
            warnings.warn(f"{self.ann_file}: {r.summary()}{shown}{more}", stacklevel=2)

    # -- building ---------------------------------------------------------------------------
    def _build_records(self, dataset: dict) -> tuple[list[_ImageRecord], list[tuple[int, str]]]:
        """Per-image records after the box policy, and the (image id, path) of missing image files."""
        images: dict[int, dict] = {}
        for entry in dataset["images"]:
            where = f"{self.ann_file}: image {_entry_name(entry)}"
            _require_keys(entry, _REQUIRED_IMAGE_KEYS, where)
            _require_int(entry["id"], where, "id")
            _require_int(entry["height"], where, "height", positive=True)
            _require_int(entry["width"], where, "width", positive=True)
            if not isinstance(entry["file_name"], str) or not entry["file_name"]:
                raise DataError(f"{where} has file_name {entry['file_name']!r}, not a file name")
            image_id = int(entry["id"])
            if image_id in images:
                raise DataError(f"{self.ann_file}: duplicate image id {image_id}")
            images[image_id] = entry

        anns_by_image: dict[int, list[dict]] = {i: [] for i in images}
        for ann in dataset["annotations"]:
            _require_keys(ann, _REQUIRED_ANN_KEYS, f"{self.ann_file}: annotation {_entry_name(ann)}")
            where = f"{self.ann_file}: annotation {ann['id']!r} (image id {ann['image_id']!r})"
            _require_int(ann["image_id"], where, "image_id")
            if not isinstance(ann["bbox"], list) or len(ann["bbox"]) != 4:
                raise DataError(
                    f"{self.ann_file}: annotation {ann['id']} has bbox {ann['bbox']!r}, not [x, y, w, h]"
                )
            for k, value in enumerate(ann["bbox"]):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise DataError(f"{where} has bbox[{k}] = {value!r} in bbox {ann['bbox']!r}: "
                                    f"a {type(value).__name__}, not a JSON number")
            category_id = ann["category_id"]
            if isinstance(category_id, str) and category_id.strip().lstrip("-").isdigit() \
                    and int(category_id) in self.cat_id_to_label:
                raise DataError(f"{where} has category_id {category_id!r}, a string: category ids are JSON "
                                f"integers (the categories define {int(category_id)})")
            _require_int(category_id, where, "category_id")
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
                missing.append((image_id, str(path)))
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
            x, y, w, h = (float(v) for v in ann["bbox"])  # JSON numbers (checked when the file was read)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
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
                data = self.read_image_file(record.info)
                self._check_hash(record.info, data)
                image = self.decode_image_file(record.info, data)
            except ImageChangedError:
                raise  # never skipped: the recorded hash says these are not the pixels it was made from
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
        """Identifies the data a cache was built from: annotation hash and image count, and, when
        set, the images left out by ``exclude`` (sorted ids) and the digest of the image hash table
        (``image_hash_digest``) that ``expect_image_hashes`` checks."""
        out = {"annotation_sha256": self._annotation_sha256, "num_images": len(self._records)}
        if self.excluded:
            out["skipped_image_ids"] = sorted(self.excluded)
        if self.image_hashes is not None:
            out["image_hashes"] = f"{IMAGE_HASH}:{image_hash_digest(*image_hash_table(self.image_hashes))}"
        return out

    def exclude(self, reasons: dict[int, str]) -> None:
        """Leave the images ``{image_id: why}`` out (e.g. those a scan or a cache skipped): ``len``,
        ``image_ids`` and ``fingerprint`` exclude them; each is counted as a corrupt image. An id
        already left out (a missing file) stays out; an id the annotation file lacks is a DataError."""
        reasons = {int(i): str(why) for i, why in reasons.items()}
        unknown = sorted(i for i in reasons if i not in self.coco.imgs)
        if unknown:
            raise DataError(f"{self.ann_file}: cannot leave out image id(s) {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}: the annotation file has no such image")
        drop = {i for i in reasons if i in self._index_by_image_id}  # the rest are already out
        if not drop:
            return
        self._records = [r for r in self._records if r.info.image_id not in drop]
        if not self._records:
            raise DataError(f"{self.ann_file}: no usable images once {len(drop)} bad image(s) are left out")
        self._undecodable = set()
        self.image_ids = [r.info.image_id for r in self._records]
        self._index_by_image_id = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.excluded.update({i: reasons[i] for i in drop})
        self.report.corrupt_images += len(drop)
        if self.image_hashes is not None:
            self.image_hashes = {i: h for i, h in self.image_hashes.items() if i not in drop}

    def expect_image_hashes(self, hashes: dict[int, bytes]) -> None:
        """Check every image's bytes against ``hashes`` (image id -> ``image_file_hash``) when it is
        loaded; every image of the dataset must have one (a DataError names the first without)."""
        lacking = [i for i in self.image_ids if i not in hashes]
        if lacking:
            raise DataError(f"{self.ann_file}: no recorded hash for image id {lacking[0]} "
                            f"({self.image_info(self._index_by_image_id[lacking[0]]).path}) and "
                            f"{len(lacking) - 1} other(s): the images differ from the recorded set")
        self.image_hashes = {i: bytes(hashes[i]) for i in self.image_ids}

    def _check_hash(self, info: ImageInfo, data: bytes) -> None:
        if self.image_hashes is None:
            return
        if image_file_hash(data) != self.image_hashes[info.image_id]:
            raise ImageChangedError(
                f"image file {info.path} (image id {info.image_id}) has changed since its hash was recorded "
                f"(its {IMAGE_HASH} is {image_file_hash(data).hex()}, recorded {self.image_hashes[info.image_id].hex()})"
                f": the cache's teacher outputs were computed from other pixels; restore the file or rebuild the cache")

    # Public for the image scan (detectors/image_scan.py), which reads and decodes as load does.
    @staticmethod
    def read_image_file(info: ImageInfo) -> bytes:
        """The image file's bytes (a missing or unreadable file is a DataError naming it)."""
        try:
            return info.path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"image file {info.path} (image id {info.image_id}) does not exist") from None
        except OSError as err:
            raise DataError(f"cannot read image file {info.path} (image id {info.image_id}): "
                            f"{err.strerror or err}") from None

    @staticmethod
    def decode_image_file(info: ImageInfo, data: bytes) -> torch.Tensor:
        """(3, h, w) uint8 RGB, original pixels, from ``data`` (the file's bytes); a file that does not
        decode, or not to the annotation's size, is a DataError naming it."""
        try:
            with Image.open(io.BytesIO(data)) as pil:
                pil.load()
                rgb = pil.convert("RGB")
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


def _require_int(value: object, where: str, key: str, positive: bool = False) -> None:
    """A JSON integer (an integral float such as ``480.0`` passes); else a DataError naming the field."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if not ok or (positive and value <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise DataError(f"{where} has {key} {value!r} ({type(value).__name__}), not {kind}")


def _require_keys(entry: object, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where} is not a JSON object")
    for key in keys:
        if key not in entry:
            raise DataError(f"{where} missing key {key!r}")
