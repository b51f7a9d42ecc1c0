"""ResNet + FPN P3–P7 (or P2–P6) backbone, torchvision modules and torchvision state-dict keys.

The body is a torchvision ``ResNet`` (depth 18/34/50/101) or a small ResNet of the same layout
(``conv1, bn1, relu, maxpool, layer1..layer4``) built from torchvision's ``BasicBlock`` with chosen
block counts and widths, for CPU demos. The neck is torchvision's ``FeaturePyramidNetwork`` on
C3–C5 plus :class:`LastLevelP6P7` for P6/P7. The whole module is a torchvision
``BackboneWithFPN``, so its keys are ``body.*`` and ``fpn.*`` exactly as in torchvision's
``retinanet_resnet50_fpn`` (prefixed ``backbone.`` inside a detector).

``levels="p2-p6"`` is the two-stage pyramid (torchvision's ``fasterrcnn_resnet50_fpn``, mmdetection's
Faster R-CNN FPN with ``add_extra_convs=False``): the FPN on C2–C5 and P6 = 1×1 stride-2 max-pool of
P5 (torchvision's ``LastLevelMaxPool``, no parameters), strides 4..64.

Neck options (see DETECTORS.md): P6 is computed from the P5 *output* (torchvision RetinaNet,
mmdetection GFL) or from C5 (mmdetection RetinaNet, torchvision RetinaNet v2), and a ReLU is applied
between P6 and P7 (torchvision) or not (mmdetection).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

NORMS = ("frozen_bn", "bn", "gn")
RESNET_DEPTHS = (18, 34, 50, 101)
# Pyramid layouts: the ResNet stages the FPN reads (torchvision names) and the levels it returns.
PYRAMID_STAGES = {"p3-p7": ("layer2", "layer3", "layer4"), "p2-p6": ("layer1", "layer2", "layer3", "layer4")}
# Names of the ResNet stages from the last one back, as torchvision's trainable_layers counts them.
_STAGES_FROM_TOP = ("layer4", "layer3", "layer2", "layer1", "conv1")


def group_norm(num_channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with at most ``max_groups`` groups of at least two channels each.

    ``gcd(32, C // 2)``: 32 groups for the reference widths (256, as mmdetection), and still valid
    for small demo widths (32 channels -> 16 groups). Two channels per group keep a 1x1 map (P7 of
    a small image) normalisable.
    """
    return nn.GroupNorm(math.gcd(max_groups, max(1, num_channels // 2)), num_channels)


def norm_layer_factory(norm: str, eps: float = 1e-5) -> Callable[[int], nn.Module]:
    """Backbone normalisation layer for ``norm`` in ("frozen_bn", "bn", "gn")."""
    if norm == "frozen_bn":
        return lambda c: FrozenBatchNorm2d(c, eps=eps)
    if norm == "bn":
        return lambda c: nn.BatchNorm2d(c, eps=eps)
    if norm == "gn":
        return group_norm
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


class SmallResNet(nn.Module):
    """A ResNet of BasicBlocks with chosen block counts and stage widths (torchvision key layout).

    Stem: 7×7 stride-2 conv to ``widths[0]`` channels, norm, ReLU, 3×3 stride-2 max-pool; then
    four stages, the first at stride 4 and each next one halving the resolution (C2..C5 at
    strides 4, 8, 16, 32). With blocks (2, 2, 2, 2) and widths (64, 128, 256, 512) it is exactly
    torchvision's resnet18 without the classifier.
    """

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...],
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if len(blocks) != 4 or len(widths) != 4 or min(blocks) < 1 or min(widths) < 1:
            raise ValueError(f"SmallResNet needs 4 positive block counts and widths, got {blocks}, {widths}")
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = widths[0]
        for index, (num_blocks, width) in enumerate(zip(blocks, widths)):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or in_channels != width:
                downsample = nn.Sequential(conv1x1(in_channels, width, stride), norm_layer(width))
            layer = [BasicBlock(in_channels, width, stride, downsample, norm_layer=norm_layer)]
            layer += [BasicBlock(width, width, norm_layer=norm_layer) for _ in range(num_blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            in_channels = width
        # Same initialisation as torchvision's ResNet.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class LastLevelP6P7(ExtraFPNBlock):
    """P6 = 3×3 stride-2 conv on P5 (or C5); P7 = 3×3 stride-2 conv on P6, with an optional ReLU between.

    Same parameter names (``p6``, ``p7``) and initialisation as torchvision's ``LastLevelP6P7``,
    whose behaviour is ``p6_from="p5", relu_before_p7=True`` when its in/out channels are equal.
    """

    def __init__(self, in_channels: int, out_channels: int, p6_from: str = "p5",
                 relu_before_p7: bool = True) -> None:
        super().__init__()
        if p6_from not in ("p5", "c5"):
            raise ValueError(f"p6_from must be 'p5' or 'c5', got {p6_from!r}")
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.kaiming_uniform_(module.weight, a=1)
            nn.init.constant_(module.bias, 0)
        self.p6_from = p6_from
        self.relu_before_p7 = relu_before_p7

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1] if self.p6_from == "p5" else c[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return p + [p6, p7], names + ["p6", "p7"]


class ResNetFPN(BackboneWithFPN):
    """ResNet body + FPN P3–P7 (or P2–P6, ``levels``); ``forward(images)`` returns an OrderedDict of 5 maps
    (N, C, H_l, W_l).

    The ``trainable_layers`` top stages train (torchvision's count: 3 = layer2..layer4, 5 = all);
    the others have ``requires_grad=False`` and stay in eval mode under ``.train()`` (so trainable
    BatchNorm statistics of frozen stages do not drift, as mmdetection's frozen_stages).
    """

    def __init__(self, body: nn.Module, stage_channels: tuple[int, ...], fpn_channels: int,
                 p6_from: str = "p5", relu_before_p7: bool = True, trainable_layers: int = 5,
                 levels: str = "p3-p7") -> None:
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        if levels not in PYRAMID_STAGES:
            raise ValueError(f"levels must be one of {tuple(PYRAMID_STAGES)}, got {levels!r}")
        stages = PYRAMID_STAGES[levels]
        if len(stage_channels) != len(stages):
            raise ValueError(f"levels {levels!r} reads {len(stages)} stages, got {len(stage_channels)} stage widths")
        if levels == "p3-p7":
            p6_in_channels = fpn_channels if p6_from == "p5" else stage_channels[-1]
            extra_blocks = LastLevelP6P7(p6_in_channels, fpn_channels, p6_from, relu_before_p7)
        else:
            extra_blocks = LastLevelMaxPool()
        super().__init__(
            body,
            return_layers={name: f"c{int(name[-1]) + 1}" for name in stages},  # layer2 -> c3, ...
            in_channels_list=list(stage_channels),
            out_channels=fpn_channels,
            extra_blocks=extra_blocks,
        )
        self.stage_channels = tuple(stage_channels)  # widths of the stages the FPN reads (forward_with_stages)
        trainable = list(_STAGES_FROM_TOP[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
        self.frozen_modules = [name for name, _ in self.body.named_children()
                               if name not in trainable and name not in ("relu", "maxpool")]
        for name in self.frozen_modules:
            getattr(self.body, name).requires_grad_(False)

    def forward_with_stages(self, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(pyramid, stages): the pyramid maps of ``forward`` and the ResNet stage outputs they come from.

        ``stages`` is an OrderedDict ``c3, c4, c5`` (layer2..layer4, strides 8, 16, 32; ``c2`` first,
        stride 4, for ``levels="p2-p6"``), each (N, C_l, H_l, W_l) with the (H_l, W_l) of the pyramid
        level of the same stride. One pass: the same maps ``forward`` feeds the FPN, returned instead
        of dropped (DeFeat's backbone terms distil them).
        """
        stages = self.body(images)  # OrderedDict c3, c4, c5
        return self.fpn(stages), stages

    def train(self, mode: bool = True) -> "ResNetFPN":
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self.body, name).eval()
        return self


def build_resnet_fpn(depth: int | None = 50, blocks: tuple[int, ...] | None = None,
                     widths: tuple[int, ...] | None = None, norm: str = "frozen_bn", norm_eps: float = 1e-5,
                     fpn_channels: int = 256, p6_from: str = "p5", relu_before_p7: bool = True,
                     trainable_layers: int = 3, weights: str | None = None, levels: str = "p3-p7") -> ResNetFPN:
    """Builds the backbone from either a torchvision ``depth`` or custom ``blocks``/``widths``.

    ``levels``: "p3-p7" (the dense families) or "p2-p6" (Faster R-CNN; ``p6_from`` and
    ``relu_before_p7`` do not apply to it).

    ``weights``: optional ResNet (ImageNet) weights for a torchvision depth: a file holding a
    torchvision ResNet state dict, or a torchvision weights name such as
    ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloaded through torch.hub).
    """
    norm_layer = norm_layer_factory(norm, norm_eps)
    if depth is not None:
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {RESNET_DEPTHS}, got {depth}")
        body = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer)
        if weights is not None:
            body.load_state_dict(_load_resnet_weights(weights))
    else:
        if blocks is None or widths is None:
            raise ValueError("a custom backbone needs both blocks and widths (or give a torchvision depth)")
        if weights is not None:
            raise ValueError("backbone weights can only be loaded into a torchvision depth (18/34/50/101)")
        body = SmallResNet(tuple(blocks), tuple(widths), norm_layer)
    stage_channels = resnet_stage_channels(depth, widths, levels)
    return ResNetFPN(body, stage_channels, fpn_channels, p6_from, relu_before_p7, trainable_layers, levels)


def resnet_stage_channels(depth: int | None, widths: tuple[int, ...] | None = None,
                          levels: str = "p3-p7") -> tuple[int, ...]:
    """Widths of C3, C4, C5 (C2..C5 for ``levels="p2-p6"``) for a torchvision ``depth`` or a custom ``widths``.

    The teacher's and student's values size DeFeat's backbone adapters; a detector config (or a
    cache manifest's ``teacher.config``) gives ``depth`` and ``widths``.
    """
    if levels not in PYRAMID_STAGES:
        raise ValueError(f"levels must be one of {tuple(PYRAMID_STAGES)}, got {levels!r}")
    if depth is not None:
        expansion = 1 if depth in (18, 34) else 4
        all_widths = tuple(64 * 2 ** stage * expansion for stage in range(4))  # C2..C5
    elif widths is None or len(widths) != 4:
        raise ValueError(f"a custom backbone needs 4 stage widths, got {widths}")
    else:
        all_widths = tuple(int(w) for w in widths)
    return all_widths[-len(PYRAMID_STAGES[levels]):]


def _load_resnet_weights(weights: str) -> dict[str, Tensor]:
    """A torchvision ResNet state dict from a file path or a torchvision weights name."""
    if os.path.exists(weights):
        return torch.load(weights, map_location="cpu", weights_only=True)
    try:
        enum = torchvision.models.get_weight(weights)
    except (ValueError, KeyError) as error:
        raise ValueError(f"backbone weights {weights!r} is neither a file nor a torchvision weights name "
                         f"(e.g. 'ResNet50_Weights.IMAGENET1K_V1')") from error
    return enum.get_state_dict(progress=True)
