"""``DetectorConfig``: the keys every detector family shares; each family's file adds its own.

A family's config subclasses it with the keys only that family reads and the family's reference
values for the shared keys that differ (``GFLConfig`` in detectors/gfl.py, ``RetinaNetConfig`` in
detectors/retinanet.py), so a config holds exactly the keys its detector uses:

    config = GFLConfig(depth=50, num_classes=80)        # or detectors.get_config("gfl-r50")
    config.replace(norm="bn")                           # a copy; a key the family lacks is an error
    config.to_dict()                                    # plain types, "family" included
    detectors.config_from_dict(config.to_dict())        # the family's class again (detectors.zoo)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from detectors.backbone import NORMS, RESNET_DEPTHS


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """Backbone, neck, head size and post-processing: what every family's config has.

    Keys without a default here take the family's reference value in its subclass.
    """

    family: ClassVar[str]                    # the family's name in zoo names and stored configs
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
    relu_before_p7: bool                     # ReLU between P6 and P7
    # Head
    head_convs: int = 4
    # Post-processing
    score_thresh: float = 0.05
    topk_candidates: int = 1000              # per level, before NMS
    nms_thresh: float                        # IoU of the class-aware NMS
    detections_per_img: int

    def __post_init__(self) -> None:
        if getattr(type(self), "family", None) is None:
            raise TypeError("DetectorConfig holds the shared keys only; build a family's config "
                            "(detectors.get_config, or GFLConfig / RetinaNetConfig)")
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

    @classmethod
    def keys(cls) -> list[str]:
        """The keys a config of this family takes (``family`` is the class's, not a key)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def check_keys(cls, keys: Iterable[str]) -> None:
        """Refuse keys this family's config does not have, naming the known ones."""
        unknown = sorted(set(keys) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown DetectorConfig keys {unknown} for family {cls.family!r}; "
                             f"known keys: {sorted(cls.keys())}")

    def replace(self, **overrides: Any) -> DetectorConfig:
        """A copy with ``overrides`` applied; keys the family lacks are an error."""
        self.check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), ``family`` first, for JSON manifests and checkpoints."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"family": self.family, **values}
