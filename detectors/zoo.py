"""Model zoo: ``DetectorConfig``, registered names -> configs, ``build_detector`` and checkpoints.

Names (``list_models()``):
    retina-r18/r34/r50/r101, gfl-r18/r34/r50/r101, r18/r34/r50/r101 (= gfl-*):
        torchvision ResNets, FPN 256, 4 head convs; frozen BatchNorm with stem + layer1 frozen
        (the pretrained regime; from-scratch training wants ``norm="bn", trainable_layers=5``).
        No weights are loaded unless ``backbone_weights`` is given.
    gfl-small / retina-small: CPU demo teacher, BasicBlocks (2, 2, 2, 2), widths (32, 64, 128, 256),
        FPN 128, 3 head convs, trainable BatchNorm.
    gfl-nano / retina-nano: CPU demo student, BasicBlocks (1, 1, 1, 1), widths (8, 16, 32, 64),
        FPN 32, 2 head convs, trainable BatchNorm (sized so that the demo teacher beats it by
        about 10 AP on the synthetic set after the same schedule; BENCHMARKS.md).

A checkpoint stores the config next to the state dict, so ``load_checkpoint`` rebuilds the model
without being told its architecture.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detectors.backbone import NORMS, RESNET_DEPTHS
from detectors.gfl import GFL
from detectors.outputs import Detector
from detectors.retinanet import RetinaNet

FAMILIES = ("gfl", "retina")
CHECKPOINT_FORMAT = "detkd-detector/1"
# Reference values that differ between the families (torchvision RetinaNet, mmdetection GFL).
_FAMILY_DEFAULTS = {
    "retina": {"relu_before_p7": True, "nms_thresh": 0.5, "detections_per_img": 300},
    "gfl": {"relu_before_p7": False, "nms_thresh": 0.6, "detections_per_img": 100},
}


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild a detector. ``None`` fields take the family's reference value."""

    family: str = "gfl"                      # "gfl" | "retina"
    num_classes: int = 80
    name: str | None = None                  # zoo name this config came from (informational)
    # Backbone: a torchvision ResNet depth, or (depth=None) a custom BasicBlock ResNet.
    depth: int | None = 50                   # 18 | 34 | 50 | 101
    blocks: tuple[int, ...] | None = None    # custom: BasicBlocks per stage (4 stages)
    widths: tuple[int, ...] | None = None    # custom: channels per stage (the stem has widths[0])
    norm: str = "frozen_bn"                  # backbone norm: "frozen_bn" | "bn" | "gn"
    norm_eps: float = 1e-5                   # BatchNorm eps (torchvision's COCO RetinaNet weights: 0.0)
    trainable_layers: int = 3                # top ResNet stages that train (torchvision's count, 0..5)
    backbone_weights: str | None = None      # ResNet weights file or torchvision weights name
    # Neck
    fpn_channels: int = 256
    p6_from: str = "p5"                      # P6 from the P5 output ("p5") or from C5 ("c5")
    relu_before_p7: bool | None = None       # retina: True (torchvision), gfl: False (mmdetection)
    # Head
    head_convs: int = 4
    reg_max: int = 16                        # GFL: bins per side = reg_max + 1
    # Assignment and losses
    atss_topk: int = 9                       # GFL
    qfl_weight: float = 1.0                  # GFL
    dfl_weight: float = 0.25                 # GFL
    giou_weight: float = 2.0                 # GFL
    fg_iou_thresh: float = 0.5               # RetinaNet
    bg_iou_thresh: float = 0.4               # RetinaNet
    # Post-processing
    score_thresh: float = 0.05
    topk_candidates: int = 1000              # per level, before NMS
    nms_thresh: float | None = None          # retina: 0.5, gfl: 0.6 (class-aware)
    detections_per_img: int | None = None    # retina: 300, gfl: 100

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        for key in ("blocks", "widths"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        if self.depth is not None and self.depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {RESNET_DEPTHS} or None, got {self.depth}")
        if self.depth is None and (self.blocks is None or self.widths is None):
            raise ValueError("depth=None needs custom blocks and widths")
        if self.depth is not None and (self.blocks is not None or self.widths is not None):
            raise ValueError("give either a torchvision depth or custom blocks/widths, not both")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
        if self.p6_from not in ("p5", "c5"):
            raise ValueError(f"p6_from must be 'p5' or 'c5', got {self.p6_from!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), for JSON manifests and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectorConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        _check_keys(values)
        return cls(**values)


def _check_keys(values: dict[str, Any]) -> None:
    known = {f.name for f in fields(DetectorConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown DetectorConfig keys {unknown}; known keys: {sorted(known)}")


def _registry() -> dict[str, DetectorConfig]:
    models: dict[str, DetectorConfig] = {}
    for family in FAMILIES:
        for depth in RESNET_DEPTHS:
            models[f"{family}-r{depth}"] = DetectorConfig(family=family, name=f"{family}-r{depth}", depth=depth)
        small = dict(depth=None, norm="bn", trainable_layers=5)
        models[f"{family}-small"] = DetectorConfig(family=family, name=f"{family}-small", blocks=(2, 2, 2, 2),
                                                   widths=(32, 64, 128, 256), fpn_channels=128, head_convs=3,
                                                   **small)
        models[f"{family}-nano"] = DetectorConfig(family=family, name=f"{family}-nano", blocks=(1, 1, 1, 1),
                                                  widths=(8, 16, 32, 64), fpn_channels=32, head_convs=2,
                                                  **small)
    for depth in RESNET_DEPTHS:
        models[f"r{depth}"] = dataclasses.replace(models[f"gfl-r{depth}"], name=f"r{depth}")
    return models


MODELS: dict[str, DetectorConfig] = _registry()
_FAMILY_CLASSES: dict[str, type[Detector]] = {"gfl": GFL, "retina": RetinaNet}


def list_models() -> list[str]:
    """Registered model names."""
    return list(MODELS)


def get_config(name: str, **overrides: Any) -> DetectorConfig:
    """The registered config of ``name`` with ``overrides`` applied (unknown keys are an error)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    _check_keys(overrides)
    return dataclasses.replace(MODELS[name], **overrides)


def build_detector(name_or_config: str | DetectorConfig, num_classes: int | None = None,
                   **overrides: Any) -> Detector:
    """A freshly initialised detector from a zoo name or a config, with ``overrides`` applied.

    ``num_classes`` defaults to the config's own (80 for zoo names).
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(name_or_config, DetectorConfig):
        _check_keys(overrides)
        config = dataclasses.replace(name_or_config, **overrides)
    else:
        config = get_config(name_or_config, **overrides)
    return _FAMILY_CLASSES[config.family](config)


def save_checkpoint(path: str | os.PathLike, model: Detector, **extra: Any) -> None:
    """Writes {config, state_dict, extra} atomically (temporary file, then rename).

    ``extra`` must hold plain containers, numbers, strings and tensors (it is read back with
    ``weights_only=True``), e.g. epoch, iteration, metrics, optimizer state.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(),
                "state_dict": model.state_dict(), "extra": extra}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Detector, dict]:
    """(model in eval mode, extra) from a ``save_checkpoint`` file; the architecture comes from its config."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a detector checkpoint written by save_checkpoint "
                         f"(format {CHECKPOINT_FORMAT!r})")
    config = DetectorConfig.from_dict({**checkpoint["config"], "backbone_weights": None})
    model = build_detector(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint["extra"]


def convert_torchvision_retinanet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``retinanet_resnet50_fpn`` state dict -> this project's ``retina-r50`` keys.

    The keys are the same; only a DataParallel/DDP ``module.`` prefix is dropped. Old (v1) key
    names of torchvision's released COCO weights are renamed by torchvision's own head and FPN
    modules when loading. Build the model to match those weights:
    ``build_detector("retina-r50", num_classes=91, norm_eps=0.0)`` (91 COCO category ids,
    background at 0; torchvision overwrites the frozen BatchNorm eps with 0 for them).
    """
    return {key.removeprefix("module."): value for key, value in state_dict.items()}
