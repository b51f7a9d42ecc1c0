"""COCO box AP with pycocotools, in detectron2's reset / process / evaluate shape.

Detections enter in *original* image pixels with contiguous labels; a detector's output (view
pixels) is brought back with ``view_boxes_to_original`` first::

    evaluator = CocoEvaluator(dataset)
    for batch in loader:
        outputs = model.postprocess(model(batch.images, batch.image_sizes))
        for det, view, orig_size in zip(outputs, batch.views, batch.orig_sizes):  # (h, w) original
            det["boxes"] = view_boxes_to_original(det["boxes"], view, orig_size)
        evaluator.process(batch.image_ids, outputs)
    metrics = evaluator.evaluate()   # {"AP": 37.1, "AP50": ..., ...} in percent

Only the processed images are evaluated. A metric with no ground truth in its range (e.g. APl
on a set without large objects; pycocotools' -1) is reported as NaN.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.views import view_boxes_to_original

if TYPE_CHECKING:
    from detectors.data import CocoDetection

__all__ = ["CocoEvaluator", "view_boxes_to_original", "METRIC_NAMES"]

# Names of COCOeval.stats[0:6], in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CocoEvaluator:
    """Accumulates detections and computes COCO bbox AP.

    Args:
        dataset: a ``CocoDetection`` (or anything with its ``coco`` ground truth, crowd
            annotations included, and ``label_to_cat_id``: contiguous label -> category id).
        verbose: let pycocotools print its tables.
    """

    def __init__(self, dataset: CocoDetection, verbose: bool = False):
        self.coco_gt: COCO = dataset.coco
        self.label_to_cat_id = np.asarray(dataset.label_to_cat_id, dtype=np.int64)
        self.verbose = verbose
        self.reset()

    def reset(self) -> None:
        self._image_ids: list[int] = []
        self._results: list[dict] = []  # COCO result entries (bbox xywh, original pixels)

    def process(self, image_ids: Sequence[int], detections: Sequence[dict]) -> None:
        """Add one batch.

        Args:
            image_ids: COCO image ids, one per detection dict.
            detections: per image, ``boxes`` (n, 4) xyxy original pixels, ``scores`` (n,),
                ``labels`` (n,) contiguous; tensors (any device) or arrays.
        """
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            boxes = _numpy(det["boxes"]).reshape(-1, 4).astype(np.float64)  # (n, 4) xyxy
            scores = _numpy(det["scores"]).reshape(-1).astype(np.float64)  # (n,)
            labels = _numpy(det["labels"]).reshape(-1).astype(np.int64)  # (n,)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(
                    f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_to_cat_id)):
                raise ValueError(
                    f"image {image_id}: labels must be in [0, {len(self.label_to_cat_id)}), got "
                    f"[{labels.min()}, {labels.max()}]"
                )
            cat_ids = self.label_to_cat_id[labels]
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (n, 4)
            self._image_ids.append(int(image_id))
            self._results += [
                {"image_id": int(image_id), "category_id": int(cat), "bbox": box.tolist(), "score": float(score)}
                for box, score, cat in zip(xywh, scores, cat_ids)
            ]

    def evaluate(self) -> dict[str, float]:
        """AP, AP50, AP75, APs, APm, APl in percent over the processed images."""
        if not self._image_ids:
            raise ValueError("CocoEvaluator.evaluate() called before any process()")
        quiet = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_eval = COCOeval(self.coco_gt, self._coco_results(), iouType="bbox")
            coco_eval.params.imgIds = sorted(set(self._image_ids))
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return {
            name: (math.nan if stat < 0 else float(stat) * 100.0)
            for name, stat in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)])
        }

    def _coco_results(self) -> COCO:
        """The detections as a COCO object (what ``COCO.loadRes`` builds, but also when empty)."""
        annotations = [
            dict(result, id=ann_id, area=result["bbox"][2] * result["bbox"][3], iscrowd=0)
            for ann_id, result in enumerate(self._results, start=1)
        ]
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": self.coco_gt.dataset["images"],
            "categories": self.coco_gt.dataset["categories"],
            "annotations": annotations,
        }
        coco_dt.createIndex()
        return coco_dt


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
