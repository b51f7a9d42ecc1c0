"""Loading the frozen teacher from this project's checkpoints, torchvision or mmdetection weights.

    teacher = load_teacher("r101", "gfl_r101_fpn_mstrain_2x_coco.pth", num_classes=80)   # mmdetection
    teacher.model      # Detector, eval mode, requires_grad False
    teacher.sha256     # of the checkpoint file, recorded in the cache manifest
    teacher.arch       # e.g. "gfl-r101"
    teacher.source     # "project" | "torchvision" | "mmdet"

``spec`` names the architecture: a zoo name ("gfl-r101", "retina-r50", "gfl-small"), a family-free
depth ("r101": the family comes from the checkpoint), or "auto"/None (everything from the
checkpoint). For this project's checkpoints the architecture is stored inside and ``spec`` is only
checked against it; for torchvision and mmdetection state dicts the family and ResNet depth are
read from the keys and checked against ``spec``.
"""
from __future__ import annotations

import math
import os
import pickle
import re
from typing import Any, NamedTuple

import torch

from detectors.convert import (MMDET_SOURCE, PROJECT_SOURCE, TORCHVISION_SOURCE, checkpoint_filter_fn,
                               detect_source, infer_resnet_depth, mmdet_config_overrides, num_classes_of,
                               select_retinanet_classes, torchvision_config_overrides, unwrap_state_dict)
from detectors.detector import BaseDetector, Detector
from detectors.config import DetectorConfig
from detectors.zoo import CHECKPOINT_FORMAT, MODELS, build_detector, config_from_dict, get_config
from store import sha256_file

SOURCES = ("auto", PROJECT_SOURCE, TORCHVISION_SOURCE, MMDET_SOURCE)
# Architecture fields a spec must agree on with a checkpoint's own config.
_ARCH_FIELDS = ("family", "depth", "blocks", "widths", "fpn_channels", "head_convs", "reg_max")


class Teacher(NamedTuple):
    model: Detector     # frozen: eval mode, no gradients
    sha256: str         # of the checkpoint file
    arch: str           # zoo-style name, e.g. "gfl-r101"
    source: str         # "project" | "torchvision" | "mmdet"
    metrics: dict[str, float] | None = None   # COCO metrics a project checkpoint records (train.teacher)

    def manifest_entry(self, precision: str = "fp32") -> dict[str, Any]:
        """What the cache manifest records about the teacher (compared on resume)."""
        return {"arch": self.arch, "checkpoint_sha256": self.sha256, "source": self.source,
                "precision": precision, "config": self.model.config.to_dict()}


def as_recorded(entry: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (a teacher's :meth:`Teacher.manifest_entry`) with the config spelled as ``recorded``
    spells it, when both are the same config: caches declared before detectors had per-family
    configs record the flat layout (every family's keys), and they hold the same teacher."""
    config = recorded.get("config")
    if config is None or config == entry.get("config"):
        return entry
    try:
        same = config_from_dict(config).to_dict() == entry.get("config")
    except (TypeError, ValueError):  # not a config this version reads: a different teacher
        same = False
    return dict(entry, config=config) if same else entry


def freeze(model: Detector) -> Detector:
    """Eval mode (BatchNorm uses its running statistics) and no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(spec: str | None, ckpt: str | os.PathLike, num_classes: int | None = None,
                 source: str = "auto", device: str | torch.device = "cpu",
                 category_ids: list[int] | None = None, **overrides: Any) -> Teacher:
    """The frozen teacher from ``ckpt``; see the module docstring.

    Args:
        spec: architecture name or "auto"/None.
        num_classes: the dataset's class count; the checkpoint must have as many (a torchvision
            COCO checkpoint with 91 outputs is reduced to the dataset's categories when
            ``category_ids`` (contiguous label -> category id) is given).
        source: "auto" (from the file's layout), "project", "torchvision" or "mmdet".
        overrides: detector config keys for torchvision/mmdetection weights (e.g. ``norm_eps=0.0``
            for torchvision's released COCO RetinaNet).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    ckpt = os.fspath(ckpt)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"teacher checkpoint {ckpt} does not exist")
    sha256, _ = sha256_file(ckpt)
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{ckpt} holds objects other than tensors and plain containers, which are not loaded "
                         f"(torch.load weights_only=True). Save its state dict alone: "
                         f"torch.save(checkpoint['state_dict'], path). ({error})") from None
    if isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT:
        if source not in ("auto", PROJECT_SOURCE):
            raise ValueError(f"{ckpt} is a checkpoint of this project, not a {source} checkpoint")
        if overrides:
            raise ValueError(f"config overrides {sorted(overrides)} apply to torchvision/mmdetection weights only; "
                             "this project's checkpoints carry their config")
        model = _load_project(checkpoint, spec, ckpt)
        detected = PROJECT_SOURCE
        metrics = (checkpoint.get("extra") or {}).get("metrics")
    else:
        state = unwrap_state_dict(checkpoint)
        detected, family = detect_source(state)
        metrics = None
        if source not in ("auto", detected):
            raise ValueError(f"{ckpt} has the key layout of {detected!r} weights, not {source!r}")
        wanted = _spec_config(spec)
        if detected != MMDET_SOURCE and wanted is not None and wanted.depth is None:
            model = _load_bare(state, family, spec, wanted, ckpt, overrides)  # a bare state dict of a zoo model
            detected = PROJECT_SOURCE
        else:
            state, _ = checkpoint_filter_fn(state, detected)
            model = _load_converted(state, family, detected, spec, num_classes, category_ids, ckpt, overrides)
    if num_classes is not None and model.config.num_classes != num_classes:
        raise ValueError(f"the teacher {ckpt} predicts {model.config.num_classes} classes but the data has "
                         f"{num_classes}")
    return Teacher(freeze(model.to(device)), sha256, _arch_name(model.config), detected,
                   _finite_metrics(metrics))


def _finite_metrics(metrics: Any) -> dict[str, float | None] | None:
    """Plain floats, NaN (COCO AP of a size range without objects) as None: the manifest is strict JSON."""
    if not isinstance(metrics, dict):
        return None
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


def _spec_config(spec: str | None) -> DetectorConfig | None:
    if spec in (None, "", "auto"):
        return None
    if spec not in MODELS:
        raise ValueError(f"unknown teacher {spec!r}; expected 'auto' or a zoo name: {', '.join(MODELS)}")
    return MODELS[spec]


def _family_free(spec: str | None) -> bool:
    """'r101' names a depth only (the zoo maps it to GFL, but the checkpoint decides the family)."""
    return spec is not None and re.fullmatch(r"r\d+", spec) is not None


def _load_project(checkpoint: dict, spec: str | None, ckpt: str) -> Detector:
    config = config_from_dict({**checkpoint["config"], "backbone_weights": None})
    wanted = _spec_config(spec)
    if wanted is not None:
        fields = [f for f in _ARCH_FIELDS if not (f == "family" and _family_free(spec))]
        have, want = config.to_dict(), wanted.to_dict()  # reg_max: GFL's key only (absent: None)
        diff = [f"{f}: checkpoint {have.get(f)!r}, {spec} {want.get(f)!r}" for f in fields
                if have.get(f) != want.get(f)]
        if diff:
            raise ValueError(f"{ckpt} does not hold a {spec}: " + "; ".join(diff))
    model = build_detector(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def _load_bare(state: dict, family: str, spec: str, wanted: DetectorConfig, ckpt: str,
               overrides: dict) -> Detector:
    if wanted.family != family:
        raise ValueError(f"{ckpt} holds a {family} detector, not the {wanted.family} of {spec}")
    model = build_detector(wanted, num_classes=num_classes_of(state, family), **overrides)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not fit {spec}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model


def _load_converted(state: dict, family: str, source: str, spec: str | None, num_classes: int | None,
                    category_ids: list[int] | None, ckpt: str, overrides: dict) -> Detector:
    depth = infer_resnet_depth(state)
    wanted = _spec_config(spec)
    if wanted is not None:
        if wanted.depth is None:
            raise ValueError(f"{spec} has a custom backbone; {ckpt} holds a ResNet-{depth} ({source} weights)")
        if wanted.depth != depth:
            raise ValueError(f"{ckpt} holds a ResNet-{depth}, not the ResNet-{wanted.depth} of {spec}")
        if wanted.family != family and not _family_free(spec):
            raise ValueError(f"{ckpt} holds a {family} detector, not the {wanted.family} of {spec}")
    options: dict[str, Any] = {}
    if source == MMDET_SOURCE:
        options.update(mmdet_config_overrides(family))
    elif source == TORCHVISION_SOURCE:
        options.update(torchvision_config_overrides(family))
    options.update(overrides)
    found_classes = num_classes_of(state, family)
    if (family == "retina" and num_classes is not None and found_classes != num_classes
            and category_ids is not None and max(category_ids) < found_classes):
        state = select_retinanet_classes(state, list(category_ids))  # torchvision COCO: index = category id
        found_classes = len(category_ids)
    config = get_config(f"{family}-r{depth}", num_classes=found_classes, **options)
    model = build_detector(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt} ({source} {family}-r{depth}) does not fit: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}")
    return model


def _arch_name(config: DetectorConfig) -> str:
    if config.depth is not None:
        return f"{config.family}-r{config.depth}"
    if config.name is not None:
        return config.name
    return f"{config.family}-custom"


def neck_head_state(model: BaseDetector) -> dict[str, torch.Tensor]:
    """The teacher's FPN and head weights (``model.NECK_AND_HEADS``: ``backbone.fpn.*`` and ``head.*``; a
    two-stage model's ``rpn.*`` and ``roi_heads.*``), for students that "inherit" them (ICD, MasKD official
    runs); load with ``load_state_dict(..., strict=False)``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(model.NECK_AND_HEADS)}


def neck_head_meta(model: BaseDetector) -> dict[str, Any]:
    """JSON-ready description stored with the weights: what a student must match to load them."""
    return {"keys": " and ".join(f"{prefix}*" for prefix in model.NECK_AND_HEADS) + " of detectors.zoo models",
            "config": model.config.to_dict()}
