"""Checkpoint conversion: other frameworks' detector weights -> this project's state-dict keys.

One ``checkpoint_filter_fn`` per source family (timm's habit): each maps a state dict in the
source's key layout to the keys of :mod:`detectors.zoo` models and refuses keys it does not know
(nothing is dropped silently, except buffers that only restate a constant, which are checked).

    state_dict = unwrap_state_dict(torch.load(path, map_location="cpu"))   # 'state_dict', 'module.'
    family = detect_source(state_dict)            # ("mmdet", "gfl"), ("torchvision", "retina"), ...
    model = build_detector(f"gfl-r{infer_resnet_depth(state_dict)}", num_classes=80,
                           **mmdet_config_overrides("gfl"))
    model.load_state_dict(convert_mmdet_gfl(state_dict))                  # strict: no missing keys

mmdetection layouts (``configs/retinanet/retinanet_r50_fpn_1x_coco.py``, ``configs/gfl/gfl_r50_fpn_1x_coco.py``,
``configs/fcos/fcos_r50-caffe_fpn_gn-head*``, ``configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py``; FCOS keys
from mmdetection 3.3 ``mmdet/models/dense_heads/{fcos,anchor_free}_head.py``, Faster R-CNN keys from its
``dense_heads/rpn_head.py`` and ``roi_heads/bbox_heads/{bbox_head,convfc_bbox_head}.py``):

    mmdetection                                   this project
    backbone.{conv1,bn1,layerX.Y.*}               backbone.body.{conv1,bn1,layerX.Y.*}
    neck.lateral_convs.i.conv.*                   backbone.fpn.inner_blocks.i.0.*
    neck.fpn_convs.i.conv.*  (i = 0, 1, 2)        backbone.fpn.layer_blocks.i.0.*
    neck.fpn_convs.3.conv.* / fpn_convs.4.conv.*  backbone.fpn.extra_blocks.p6.* / .p7.*
    RetinaNet head
    bbox_head.cls_convs.i.conv.*                  head.classification_head.conv.i.0.*
    bbox_head.reg_convs.i.conv.*                  head.regression_head.conv.i.0.*
    bbox_head.retina_cls.*                        head.classification_head.cls_logits.*
    bbox_head.retina_reg.*                        head.regression_head.bbox_reg.*
    GFL head
    bbox_head.{cls,reg}_convs.i.conv.weight       head.{cls,reg}_convs.i.0.weight
    bbox_head.{cls,reg}_convs.i.gn.*              head.{cls,reg}_convs.i.1.*
    bbox_head.gfl_cls.* / gfl_reg.*               head.gfl_cls.* / head.gfl_reg.*
    bbox_head.scales.i.scale                      head.scales.i.scale
    bbox_head.integral.project (buffer 0..reg_max) checked, dropped
    FCOS head (this project keeps torchvision's FCOS keys; t = classification for cls, regression for reg)
    bbox_head.{cls,reg}_convs.i.conv.*            head.{t}_head.conv.(3i).*     (bias only with conv_bias)
    bbox_head.{cls,reg}_convs.i.gn.*              head.{t}_head.conv.(3i+1).*
    bbox_head.conv_cls.*  (early 2.x: fcos_cls.*) head.classification_head.cls_logits.*
    bbox_head.conv_reg.*  (early 2.x: fcos_reg.*) head.regression_head.bbox_reg.*
    bbox_head.conv_centerness.* (fcos_centerness.*)  head.regression_head.bbox_ctrness.*
    bbox_head.scales.i.scale                      head.scales.i.scale
    Faster R-CNN (torchvision's fasterrcnn_resnet50_fpn keys; the neck reads C2..C5, its P6 has no weights)
    neck.lateral_convs.i.conv.*  (i = 0..3)       backbone.fpn.inner_blocks.i.0.*
    neck.fpn_convs.i.conv.*  (i = 0..3)           backbone.fpn.layer_blocks.i.0.*
    rpn_head.rpn_conv.*  (num_convs > 1: .i.conv.*)  rpn.head.conv.(i).0.*
    rpn_head.rpn_cls.* / rpn_head.rpn_reg.*       rpn.head.cls_logits.* / rpn.head.bbox_pred.*
    roi_head.bbox_head.shared_fcs.0.* / .1.*      roi_heads.box_head.fc6.* / fc7.*
    roi_head.bbox_head.fc_cls.*  (K+1 rows)       roi_heads.box_predictor.cls_score.*  (background row moved first)
    roi_head.bbox_head.fc_reg.*  (4K rows)        roi_heads.box_predictor.bbox_pred.*  (4 zero background rows first)

Architecture differences the converted model must be built with (:func:`mmdet_config_overrides`):
mmdetection's RetinaNet builds P6 from C5 (``add_extra_convs='on_input'``) and its GFL from the P5
output (``'on_output'``); neither applies a ReLU before P7. Its FCOS builds P6 from the P5 output with
a ReLU before P7 (``relu_before_extra_convs=True``) on a caffe-style ResNet. Its Faster R-CNN is the
defaults of ``detectors.frcnn.FasterRCNNConfig``. Its ResNet BatchNorm eps is 1e-5. An FCOS
checkpoint's head switches are not in its keys: the defaults of
``detectors.fcos.FCOSConfig`` are the ``center-normbbox-centeronreg-giou`` configs', and
``detectors.fcos.MMDET_PLAIN_FCOS`` the original ``fcos_r50-caffe_fpn_gn-head`` ones (tower convs
without bias: a checkpoint without ``cls_convs.0.conv.bias`` needs ``head_conv_bias=False``). mmdetection's
and detectron2's caffe ResNets expect BGR 0–255 inputs minus their mean (std 1); the detector here
gives the checkpoint's outputs on the tensor it is given, so such a teacher needs that normalisation
upstream.
Anchors of a converted RetinaNet are torchvision's (sizes rounded down to integers, e.g. 40 and
50 instead of mmdetection's 40.3 and 50.8 on P3): the dense outputs are the teacher's own, boxes
decoded from them differ slightly from mmdetection's.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from detectors.fcos import TORCHVISION_FCOS
from detectors.frcnn import TORCHVISION_FRCNN

MMDET_SOURCE = "mmdet"
TORCHVISION_SOURCE = "torchvision"
PROJECT_SOURCE = "project"

_BACKBONE = [(r"^backbone\.((?:conv1|bn1|layer[1-4]\.\d+)\..+)$", r"backbone.body.\1")]
_NECK = [
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.([012])\.conv\.(weight|bias)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.3\.conv\.(weight|bias)$", r"backbone.fpn.extra_blocks.p6.\1"),
    (r"^neck\.fpn_convs\.4\.conv\.(weight|bias)$", r"backbone.fpn.extra_blocks.p7.\1"),
]
_RETINA_HEAD = [
    (r"^bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)$", r"head.classification_head.conv.\1.0.\2"),
    (r"^bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)$", r"head.regression_head.conv.\1.0.\2"),
    (r"^bbox_head\.retina_cls\.(weight|bias)$", r"head.classification_head.cls_logits.\1"),
    (r"^bbox_head\.retina_reg\.(weight|bias)$", r"head.regression_head.bbox_reg.\1"),
]
_GFL_HEAD = [
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.weight$", r"head.\1_convs.\2.0.weight"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)$", r"head.\1_convs.\2.1.\3"),
    (r"^bbox_head\.gfl_(cls|reg)\.(weight|bias)$", r"head.gfl_\1.\2"),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
]
_GFL_PROJECT = "bbox_head.integral.project"
_FCOS_TOWERS = {"cls": "classification", "reg": "regression"}
# FCOS tower layer i is torchvision's conv.(3i) (Conv2d), conv.(3i+1) (GroupNorm), conv.(3i+2) (ReLU).
_FCOS_HEAD = [
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$",
     lambda m: f"head.{_FCOS_TOWERS[m[1]]}_head.conv.{3 * int(m[2])}.{m[3]}"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)$",
     lambda m: f"head.{_FCOS_TOWERS[m[1]]}_head.conv.{3 * int(m[2]) + 1}.{m[3]}"),
    (r"^bbox_head\.(?:conv|fcos)_cls\.(weight|bias)$", r"head.classification_head.cls_logits.\1"),
    (r"^bbox_head\.(?:conv|fcos)_reg\.(weight|bias)$", r"head.regression_head.bbox_reg.\1"),
    (r"^bbox_head\.(?:conv|fcos)_centerness\.(weight|bias)$", r"head.regression_head.bbox_ctrness.\1"),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
]
_FRCNN_NECK = [
    (r"^neck\.lateral_convs\.([0-3])\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.([0-3])\.conv\.(weight|bias)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
]
_FRCNN_HEADS = [
    (r"^rpn_head\.rpn_conv\.(?:(\d+)\.conv\.)?(weight|bias)$", lambda m: f"rpn.head.conv.{m[1] or 0}.0.{m[2]}"),
    (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
]
_MMDET_FRCNN_KEY = "roi_head.bbox_head.fc_cls.weight"
_TORCHVISION_FRCNN_KEY = "roi_heads.box_predictor.cls_score.weight"
_FCOS_CENTERNESS_KEYS = ("bbox_head.conv_centerness.weight", "bbox_head.fcos_centerness.weight")
_TORCHVISION_FCOS_KEY = "head.regression_head.bbox_ctrness.weight"
# Levels of torchvision's FCOS (P3..P7): one Scale each here.
_FCOS_LEVELS = 5


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, Tensor]:
    """The tensor state dict inside a checkpoint file's contents.

    Accepts a bare state dict, mmdetection's ``{"meta": ..., "state_dict": ..., "optimizer": ...}``,
    ``{"model": ...}`` (torchvision reference scripts, detectron2) and this project's
    ``{"format", "config", "state_dict", "extra"}``; a DataParallel/DDP ``module.`` prefix is dropped.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    state = checkpoint
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"no tensors in the checkpoint (top-level keys: {sorted(checkpoint)[:10]})")
    others = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if others:
        raise ValueError(f"the checkpoint's state dict holds non-tensor entries {others[:5]}")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def detect_source(state_dict: Mapping[str, Tensor]) -> tuple[str, str]:
    """(source, family) from the key layout: ("mmdet" | "torchvision" | "project", "gfl" | "retina" | "fcos" |
    "frcnn")."""
    keys = set(state_dict)
    if _MMDET_FRCNN_KEY in keys:
        return MMDET_SOURCE, "frcnn"
    if _TORCHVISION_FRCNN_KEY in keys:
        return TORCHVISION_SOURCE, "frcnn"  # torchvision's keys are this project's Faster R-CNN keys
    if "bbox_head.gfl_cls.weight" in keys:
        return MMDET_SOURCE, "gfl"
    if "bbox_head.retina_cls.weight" in keys:
        return MMDET_SOURCE, "retina"
    if keys & set(_FCOS_CENTERNESS_KEYS):
        return MMDET_SOURCE, "fcos"
    if _TORCHVISION_FCOS_KEY in keys:  # before RetinaNet's key, which FCOS shares; only this project has Scales
        return (PROJECT_SOURCE if "head.scales.0.scale" in keys else TORCHVISION_SOURCE), "fcos"
    if "head.classification_head.cls_logits.weight" in keys:
        return TORCHVISION_SOURCE, "retina"  # torchvision's keys are this project's RetinaNet keys
    if "head.gfl_cls.weight" in keys:
        return PROJECT_SOURCE, "gfl"
    raise ValueError("cannot tell the checkpoint's layout: none of bbox_head.gfl_cls / bbox_head.retina_cls / "
                     f"bbox_head.conv_centerness / {_MMDET_FRCNN_KEY} (mmdetection), "
                     "head.classification_head.cls_logits (torchvision RetinaNet), head.regression_head.bbox_ctrness "
                     f"(torchvision FCOS), {_TORCHVISION_FRCNN_KEY} (torchvision Faster R-CNN) or head.gfl_cls (this "
                     f"project) is present; first keys: {sorted(keys)[:8]}")


def _rename(state_dict: Mapping[str, Tensor], rules: list[tuple[str, str | Callable[[re.Match], str]]],
            what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) of the {what} checkpoint have no counterpart here: "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def convert_mmdet_retinanet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An mmdetection RetinaNet (ResNet-FPN) state dict -> ``retina-r*`` keys (see the module table).

    Build the model with ``mmdet_config_overrides("retina")`` (P6 from C5, no ReLU before P7).
    """
    return _rename(unwrap_state_dict(state_dict), _BACKBONE + _NECK + _RETINA_HEAD, "mmdetection RetinaNet")


def convert_mmdet_gfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An mmdetection GFL (ResNet-FPN) state dict -> ``gfl-r*`` keys (see the module table).

    The ``integral.project`` buffer must be 0..reg_max (it is a constant here, not a parameter).
    """
    state = dict(unwrap_state_dict(state_dict))
    project = state.pop(_GFL_PROJECT, None)
    if project is not None:
        expected = torch.arange(project.numel(), dtype=project.dtype)
        if not torch.equal(project.cpu(), expected):
            raise ValueError(f"{_GFL_PROJECT} is not 0..{project.numel() - 1}; this GFL integrates over the "
                             "bins 0..reg_max")
    return _rename(state, _BACKBONE + _NECK + _GFL_HEAD, "mmdetection GFL")


def convert_mmdet_fcos(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An mmdetection FCOS (ResNet-FPN) state dict -> ``fcos-r*`` keys (see the module table).

    Build the model with ``mmdet_config_overrides("fcos")`` and the head switches of the checkpoint's
    config (``detectors.fcos.MMDET_PLAIN_FCOS`` for the original FCOS). The predictor names of early
    mmdetection checkpoints (``fcos_cls``, ``fcos_reg``, ``fcos_centerness``) are read too, as
    mmdetection's ``AnchorFreeHead._load_from_state_dict`` does.
    """
    return _rename(unwrap_state_dict(state_dict), _BACKBONE + _NECK + _FCOS_HEAD, "mmdetection FCOS")


def convert_mmdet_frcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An mmdetection Faster R-CNN (ResNet-FPN, ``Shared2FCBBoxHead``) state dict -> ``frcnn-r*`` keys.

    Renamed as the module table says; the classifier's rows are rotated (mmdetection's background
    is its last class, here the first) and 4 zero rows are put before the class-specific deltas
    for the background (mmdetection has none; no output reads them), so the converted head's
    class-k column is mmdetection's class k. Build the model with the defaults
    (``mmdet_config_overrides("frcnn")``); a class-agnostic regression head is refused.
    """
    state = _rename(unwrap_state_dict(state_dict), _BACKBONE + _FRCNN_NECK + _FRCNN_HEADS,
                    "mmdetection Faster R-CNN")
    cls_key, reg_key = "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"
    if f"{cls_key}.weight" not in state or f"{reg_key}.weight" not in state:
        raise ValueError("the mmdetection Faster R-CNN state dict lacks roi_head.bbox_head.fc_cls or fc_reg")
    num_classes = state[f"{cls_key}.weight"].shape[0] - 1
    if state[f"{reg_key}.weight"].shape[0] != 4 * num_classes:
        raise ValueError(f"roi_head.bbox_head.fc_reg has {state[f'{reg_key}.weight'].shape[0]} rows for "
                         f"{num_classes} classes; only class-specific regression (4 per class, "
                         "reg_class_agnostic=False) converts")
    for suffix in ("weight", "bias"):
        rows = state[f"{cls_key}.{suffix}"]
        state[f"{cls_key}.{suffix}"] = torch.cat([rows[-1:], rows[:-1]])  # background first
        rows = state[f"{reg_key}.{suffix}"]
        state[f"{reg_key}.{suffix}"] = torch.cat([rows.new_zeros((4,) + rows.shape[1:]), rows])
    return state


def convert_torchvision_frcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``fasterrcnn_resnet50_fpn`` state dict -> this project's ``frcnn-r50`` keys (the same keys;
    a DataParallel/DDP ``module.`` prefix is dropped, and torchvision's ``RPNHead`` renames its v1 keys when
    loading). Build the model with ``torchvision_config_overrides("frcnn")`` (``TORCHVISION_FRCNN`` and, for
    its COCO weights, ``norm_eps=0.0``, 90 classes: torchvision's 91 outputs are background + category ids)."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _torchvision_frcnn_filter(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return convert_torchvision_frcnn(unwrap_state_dict(state_dict))


def convert_torchvision_fcos(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``fcos_resnet50_fpn`` state dict -> this project's ``fcos-r50`` keys.

    The keys are the same (``backbone.body/fpn.*``, ``head.classification_head.*``,
    ``head.regression_head.*``); torchvision has no per-level Scale, so ``head.scales.{0..4}.scale``
    are added as 1.0, which leaves every output as torchvision computes it. Build the model as
    ``build_detector("fcos-r50", num_classes=91, **detectors.fcos.TORCHVISION_FCOS)`` (its points at
    j·stride, its score rule and threshold; 91 COCO category ids for its COCO weights, whose frozen
    BatchNorm keeps eps 1e-5) — ``torchvision_config_overrides("fcos")``. Where torchvision's FCOS
    differs in training (regress-range ends, unweighted GIoU), the converted model trains as
    mmdetection's: see detectors/fcos.py.
    """
    state = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if _TORCHVISION_FCOS_KEY not in state:
        raise ValueError(f"not a torchvision FCOS state dict: {_TORCHVISION_FCOS_KEY} is missing")
    scales = sorted(key for key in state if key.startswith("head.scales."))
    if scales:
        raise ValueError(f"torchvision's FCOS has no per-level Scale, but the state dict holds {scales[:3]}: "
                         "it is this project's FCOS; load it as it is")
    one = state[_TORCHVISION_FCOS_KEY].new_ones(())
    return {**state, **{f"head.scales.{level}.scale": one.clone() for level in range(_FCOS_LEVELS)}}


def _torchvision_fcos_filter(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return convert_torchvision_fcos(unwrap_state_dict(state_dict))


def convert_torchvision_retinanet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ``retinanet_resnet50_fpn`` state dict -> this project's ``retina-r50`` keys.

    The keys are the same; only a DataParallel/DDP ``module.`` prefix is dropped. Old (v1) key
    names of torchvision's released COCO weights are renamed by torchvision's own head and FPN
    modules when loading. Build the model to match those weights:
    ``build_detector("retina-r50", num_classes=91, norm_eps=0.0)`` (91 COCO category ids,
    background at 0; torchvision overwrites the frozen BatchNorm eps with 0 for them).
    """
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _torchvision_retinanet_filter(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return convert_torchvision_retinanet(unwrap_state_dict(state_dict))


CHECKPOINT_FILTERS: dict[tuple[str, str], Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] = {
    (MMDET_SOURCE, "retina"): convert_mmdet_retinanet,
    (MMDET_SOURCE, "gfl"): convert_mmdet_gfl,
    (TORCHVISION_SOURCE, "retina"): _torchvision_retinanet_filter,
    (MMDET_SOURCE, "fcos"): convert_mmdet_fcos,
    (TORCHVISION_SOURCE, "fcos"): _torchvision_fcos_filter,
    (MMDET_SOURCE, "frcnn"): convert_mmdet_frcnn,
    (TORCHVISION_SOURCE, "frcnn"): _torchvision_frcnn_filter,
}


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], source: str = "auto") -> tuple[dict[str, Tensor], str]:
    """(converted state dict, family) for a state dict of ``source`` ("auto" detects it)."""
    state = unwrap_state_dict(state_dict)
    detected, family = detect_source(state)
    if source not in ("auto", detected):
        raise ValueError(f"the checkpoint has the key layout of {detected!r}, not {source!r}")
    if detected == PROJECT_SOURCE:
        return dict(state), family
    return CHECKPOINT_FILTERS[(detected, family)](state), family


def infer_resnet_depth(state_dict: Mapping[str, Tensor]) -> int:
    """ResNet depth (18/34/50/101) from the block counts of a converted or mmdetection state dict."""
    blocks: dict[str, set[int]] = {}
    bottleneck = False
    for key in state_dict:
        match = re.match(r"^(?:backbone\.body\.|backbone\.)(layer[1-4])\.(\d+)\.(conv\d)", key)
        if match:
            blocks.setdefault(match.group(1), set()).add(int(match.group(2)))
            bottleneck |= match.group(3) == "conv3"
    counts = tuple(len(blocks.get(f"layer{i}", ())) for i in range(1, 5))
    known = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
             (True, (3, 4, 23, 3)): 101}
    depth = known.get((bottleneck, counts))
    if depth is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise ValueError(f"the checkpoint's ResNet has {kind} stages of {counts} blocks: not ResNet-18/34/50/101")
    return depth


def num_classes_of(state_dict: Mapping[str, Tensor], family: str, num_anchors: int = 9) -> int:
    """Classes of a converted state dict (GFL: gfl_cls rows; FCOS: cls_logits rows; RetinaNet: cls_logits
    rows / anchors; Faster R-CNN: cls_score rows less the background)."""
    if family == "gfl":
        return int(state_dict["head.gfl_cls.weight"].shape[0])
    if family == "frcnn":
        return int(state_dict[_TORCHVISION_FRCNN_KEY].shape[0]) - 1
    rows = int(state_dict["head.classification_head.cls_logits.weight"].shape[0])
    if family == "fcos":
        return rows
    if rows % num_anchors:
        raise ValueError(f"RetinaNet cls_logits has {rows} rows, not a multiple of {num_anchors} anchors")
    return rows // num_anchors


def select_retinanet_classes(state_dict: Mapping[str, Tensor], class_indices: list[int],
                             num_anchors: int = 9) -> dict[str, Tensor]:
    """Keep the classification rows of ``class_indices`` (in that order) for every anchor.

    For torchvision's COCO weights (91 outputs indexed by COCO category id, 0 = background) and a
    dataset with contiguous labels: ``class_indices = dataset.label_to_cat_id``. torchvision's FCOS
    has the same key with one anchor: ``num_anchors=1``.
    """
    state = dict(state_dict)
    weight_key, bias_key = "head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"
    weight, bias = state[weight_key], state[bias_key]
    num_classes = weight.shape[0] // num_anchors
    if max(class_indices) >= num_classes or min(class_indices) < 0:
        raise ValueError(f"class indices {min(class_indices)}..{max(class_indices)} are outside the "
                         f"checkpoint's {num_classes} classes")
    rows = torch.tensor([a * num_classes + k for a in range(num_anchors) for k in class_indices])
    state[weight_key], state[bias_key] = weight[rows].clone(), bias[rows].clone()
    return state


def mmdet_config_overrides(family: str) -> dict:
    """DetectorConfig options that reproduce mmdetection's neck (and FCOS's caffe-style ResNet) for ``family``."""
    if family == "retina":
        return {"p6_from": "c5", "relu_before_p7": False}
    if family == "gfl":
        return {"p6_from": "p5", "relu_before_p7": False}
    if family == "fcos":  # every caffe FCOS config; the lsj-200e ones use style="pytorch"
        return {"p6_from": "p5", "relu_before_p7": True, "resnet_style": "caffe"}
    if family == "frcnn":  # faster-rcnn_r50_fpn: the config's defaults (the *-caffe_fpn ones: resnet_style="caffe")
        return {}
    raise ValueError(f"unknown family {family!r}")


def torchvision_config_overrides(family: str) -> dict:
    """DetectorConfig options that reproduce torchvision's released detector of ``family``."""
    if family == "retina":
        return {"norm_eps": 0.0}  # torchvision overwrites the frozen BatchNorm eps of its COCO weights
    if family == "fcos":
        return dict(TORCHVISION_FCOS)
    if family == "frcnn":
        return {**TORCHVISION_FRCNN, "norm_eps": 0.0}  # its COCO weights: overwrite_eps(model, 0.0)
    raise ValueError(f"torchvision has no {family!r} detector")
