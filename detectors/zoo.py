"""Model zoo: the detector families by name, registered names -> configs, ``build_detector`` and checkpoints.

A family is one file (its config, head and model) registered in ``FAMILIES``; every family comes
in every size of ``SIZES``, named ``{family}-{size}`` (``list_models()``):
    retina-r18/r34/r50/r101, gfl-r18/r34/r50/r101, fcos-r18/r34/r50/r101, r18/r34/r50/r101 (= gfl-*):
        torchvision ResNets, FPN 256, 4 head convs; frozen BatchNorm with stem + layer1 frozen
        (the pretrained regime; from-scratch training wants ``norm="bn", trainable_layers=5``).
        No weights are loaded unless ``backbone_weights`` is given.
    gfl-small / retina-small / fcos-small: CPU demo teacher, BasicBlocks (2, 2, 2, 2), widths
        (32, 64, 128, 256), FPN 128, 3 head convs, trainable BatchNorm.
    gfl-nano / retina-nano / fcos-nano: CPU demo student, BasicBlocks (1, 1, 1, 1), widths
        (8, 16, 32, 64), FPN 32, 2 head convs, trainable BatchNorm (GFL's sized so that the demo
        teacher beats it by about 10 AP on the synthetic set after the same schedule; BENCHMARKS.md).
    frcnn-*: Faster R-CNN (P2..P6) in the same sizes; a family's config may change a size's shared
        values (``SIZE_OVERRIDES``): frcnn-small and frcnn-nano keep one RPN conv and RoI heads of
        fc 256 and 64 (``detectors.frcnn.FasterRCNNConfig``).

A checkpoint stores the config next to the state dict, so ``load_checkpoint`` rebuilds the model
without being told its architecture.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from detectors.backbone import RESNET_DEPTHS
from detectors.config import DetectorConfig
from detectors.detector import BaseDetector, Detector
from detectors.fcos import FCOS
from detectors.frcnn import FasterRCNN
from detectors.gfl import GFL
from detectors.retinanet import RetinaNet

# Family name ("family" of its config) -> its detector class. A new family: its file, then one entry here.
FAMILIES: dict[str, type[BaseDetector]] = {cls.config_class.family: cls for cls in (GFL, RetinaNet, FCOS, FasterRCNN)}
# Two-stage families (their forward returns a detectors.frcnn.TwoStageOutput, P2..P6), and the dense rest.
TWO_STAGE_FAMILIES = frozenset(family for family, cls in FAMILIES.items() if not issubclass(cls, Detector))
CHECKPOINT_FORMAT = "detkd-detector/1"
_SMALL = dict(depth=None, norm="bn", trainable_layers=5)  # from scratch: every stage and BatchNorm trains
# Size name -> the shared config keys it sets, the same for every family.
SIZES: dict[str, dict[str, Any]] = {
    **{f"r{depth}": dict(depth=depth) for depth in RESNET_DEPTHS},
    "small": dict(blocks=(2, 2, 2, 2), widths=(32, 64, 128, 256), fpn_channels=128, head_convs=3, **_SMALL),
    "nano": dict(blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64), fpn_channels=32, head_convs=2, **_SMALL),
}


def _registry() -> dict[str, DetectorConfig]:
    models: dict[str, DetectorConfig] = {}
    for family, detector_class in FAMILIES.items():
        size_overrides = getattr(detector_class.config_class, "SIZE_OVERRIDES", {})  # only some families have them
        for size, keys in SIZES.items():
            keys = {**keys, **size_overrides.get(size, {})}
            models[f"{family}-{size}"] = detector_class.config_class(name=f"{family}-{size}", **keys)
    for depth in RESNET_DEPTHS:  # family-free names: GFL
        models[f"r{depth}"] = models[f"gfl-r{depth}"].replace(name=f"r{depth}")
    return models


MODELS: dict[str, DetectorConfig] = _registry()


def list_models() -> list[str]:
    """Registered model names."""
    return list(MODELS)


def get_config(name: str, **overrides: Any) -> DetectorConfig:
    """The registered config of ``name`` with ``overrides`` applied (unknown keys are an error)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name].replace(**overrides)


def build_detector(name_or_config: str | DetectorConfig, num_classes: int | None = None,
                   **overrides: Any) -> BaseDetector:
    """A freshly initialised detector from a zoo name or a config, with ``overrides`` applied.

    ``num_classes`` defaults to the config's own (80 for zoo names).
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(name_or_config, DetectorConfig):
        config = name_or_config.replace(**overrides)
    else:
        config = get_config(name_or_config, **overrides)
    return FAMILIES[config.family](config)


def config_from_dict(values: dict[str, Any]) -> DetectorConfig:
    """Inverse of ``DetectorConfig.to_dict``: the config of the family ``values["family"]`` names.

    Also reads the flat layout that checkpoints and cache manifests were written in before configs
    were per family (one dict with every family's keys): keys of other families had no effect on
    the model and are dropped. Any other unknown key is an error.
    """
    values = dict(values)
    family = values.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"unknown detector family {family!r}; expected one of {sorted(FAMILIES)}")
    config_class = FAMILIES[family].config_class
    other_families_keys = {key for cls in FAMILIES.values() for key in cls.config_class.keys()}
    other_families_keys -= set(config_class.keys())
    config_class.check_keys(set(values) - other_families_keys)
    return config_class(**{k: v for k, v in values.items() if k not in other_families_keys})


def save_checkpoint(path: str | os.PathLike, model: BaseDetector, **extra: Any) -> None:
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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[BaseDetector, dict]:
    """(model in eval mode, extra) from a ``save_checkpoint`` file; the architecture comes from its config."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a detector checkpoint written by save_checkpoint "
                         f"(format {CHECKPOINT_FORMAT!r})")
    config = config_from_dict({**checkpoint["config"], "backbone_weights": None})
    model = build_detector(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint["extra"]

