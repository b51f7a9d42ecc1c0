"""The one definition of every teacher field: what precompute caches and what train's online-teacher
mode computes in process, so the cached and online paths cannot drift apart.

    fields = resolve_fields("frs,ld")          # method names, groups, prefixes or field names
    samples = extract_fields(teacher, batch, fields)      # one dict per image of the batch
    samples[0]["fpn.p3"]                       # (C, H_3, W_3) float32, the image's canonical region

Field names and shapes are the store's vocabulary (store/schema.py). Per image of a batch:

- ``fpn.pL`` (C, H_l, W_l), ``head.cls.pL`` (A*K, H_l, W_l), ``head.box.pL`` (A*B, H_l, W_l),
  ``head.ctr.pL`` (A, H_l, W_l): the teacher's dense outputs on the image padded on its own to a
  multiple of 32 (canonical padding), so they do not depend on the batch. (H_l, W_l) =
  ``valid_level_sizes(valid_hw)``. A batch whose images have different canonical sizes is run as
  one forward per size.
- ``head.ctr.*`` (an optional field of the store's schema) is the centerness of a head that has
  that branch (FCOS's ``DetectorOutput.centerness``): "all" and the group "head" bring it for such
  a teacher; for another, they leave it out and naming it (``head.ctr``, ``head.ctr.p3``) is an
  error naming the teacher's family (:class:`TeacherOutputs`).
- A two-stage teacher (Faster R-CNN, ``detectors.frcnn.TwoStageOutput``) gives its FPN maps
  ``fpn.p2`` .. ``fpn.p6`` and its RPN's ``head.rpn.obj.pL`` (A, H_l, W_l) objectness logits and
  ``head.rpn.box.pL`` (4A, H_l, W_l) deltas, on P2..P6 (optional fields of the schema), cut to the
  canonical region like the dense maps, and the meta; for it the group "fpn" means P2..P6, "head"
  its RPN maps, and "all" those and the meta. It has no dense head, LD rows or backbone fields
  (naming them is an error, as naming ``fpn.p2`` or ``head.rpn`` for a dense teacher is); its RoI
  head is the cache artefact ``store.schema.ROI_HEAD_ARTIFACT`` (precompute.pipeline), run by
  ``train.partial_teacher``.
- ``region.*``: LD's rows (Li et al., "Localization Distillation"; HikariTJU/LD
  ``mmdet/core/bbox/assigners/atss_assigner.py`` and ``ld_head.py``), from the anchors of the
  image's canonical region and its GT boxes only (:func:`ld_regions`), with the teacher's class
  logits and box outputs at those locations:
    positive rows: the ATSS positives (``detectors.atss.atss_assign``, topk from the teacher's
      config), ``region.gt`` the assigned GT, ``region.iou`` the anchor's IoU with it;
    VLR rows ("valuable localization region", the official ``ATSSAssigner.get_vlr_region``):
      every anchor whose "DIoU" with a GT lies in [0.25·thr, thr), thr = that GT's ATSS threshold
      (mean + unbiased std of the IoUs of its top-9-per-level candidates); no centre-in-box
      condition; an anchor in the VLR of several GTs takes the highest IoU among them, and
      ``region.iou`` is that IoU (the official LD weights the VLR loss with the IoU, not the
      DIoU); rows with IoU 0 are dropped (the official loss keeps ``vlr_region > 0``). An anchor
      can be both a positive row and a VLR row (as in LD). Which "DIoU" (``ld_vlr_rule``, recorded
      in the cache manifest's ``options``, :func:`cache_options`):
        "official" (default): mmdetection's ``bbox_overlaps(mode="diou")`` as LD ran it, which
          builds the union only for iou/giou, so for diou the denominator is the anchor's area:
          overlap / area(anchor) − ρ²/c²;
        "diou": the true DIoU, IoU − ρ²/c².
  ``region.index`` = (h·W_l + w)·A + a on the image's level map, ``region.level`` indexes P3..P7.
- ``meta.*``: image id, view index, source and view sizes, level sizes (P3..P7 for every teacher);
  the GT boxes (view pixels) and labels when regions are written (``region.gt`` indexes them) or
  asked for.
- ``backbone.c3`` .. ``backbone.c5`` (C_l, H_l, W_l): the ResNet stage outputs the FPN is built
  on (strides 8, 16, 32), cut to the same valid region as P3, P4, P5, from the same forward.
  Opt-in (not in "all"): the ``backbone`` group, or the preset ``defeat-coco`` (DeFeat's COCO
  recipe: ``fpn``, ``head.cls``, ``backbone`` and the GT meta).

FRS's richness map (max over classes of σ(class logits)) is not a field: it is derived from
``head.cls`` in one line, and the head term of FRS needs every class logit anyway.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from detectors.atss import ATSS_TOPK, atss_assign
from detectors.detector import BaseDetector, DetectorOutput, valid_level_sizes
from detectors.frcnn import TwoStageOutput
from detectors.views import Batch, padded_size
from store import FIELDS, GROUPS, LEVELS, REGION_POSITIVE, REGION_VLR, expand_fields, group_of
from store.schema import (BACKBONE_LEVEL, BACKBONE_STAGES, DEFAULT_VLR_RULE, LD_VLR_RULE_OPTION, LD_VLR_RULES,
                          ROI_HEAD_ARTIFACT, TWO_STAGE_LEVELS)
from train.methods import (METHODS, DistillationMethod, MethodSpec,  # what each method reads: its class says
                           artifact_makers, method_configs, methods_named, named_field_sets, parse_overrides,
                           split_overrides)

# Groups written by FIELDS=all (the "image" group, source image bytes, is opt-in).
ALL_GROUPS = ("fpn", "head", "region", "meta")
KEY_META = ("meta.image_id", "meta.view_index")
VIEW_META = ("meta.orig_hw", "meta.valid_hw", "meta.level_hw")
ALWAYS_META = KEY_META + VIEW_META
GT_META = ("meta.gt_boxes_xyxy", "meta.gt_labels")
REGION_FIELDS = tuple(name for name in expand_fields(["region"]))
# The schema's optional fields (only some families produce them), by prefix -> the attribute of the
# teacher's output they are read from: a dense head's branch (DetectorOutput.centerness, None for a
# head without it), or a two-stage teacher's P2 (the first of its features) and RPN maps (TwoStageOutput).
OPTIONAL_HEAD_FIELDS = {"head.ctr": "centerness", "fpn": "features", "head.rpn.obj": "rpn_objectness",
                        "head.rpn.box": "rpn_deltas"}
# The optional branches of a dense head (TeacherOutputs.lacking names those a teacher's head lacks).
DENSE_OPTIONAL = ("head.ctr",)
# What a two-stage teacher gives besides the meta and image groups: FPN P2..P6 and its RPN maps.
TWO_STAGE_FIELDS = tuple(name for name, spec in FIELDS.items() if spec.level in TWO_STAGE_LEVELS
                         and (group_of(name) == "fpn" or name.startswith("head.rpn.")))
TWO_STAGE_ONLY = tuple(name for name in TWO_STAGE_FIELDS if FIELDS[name].optional)   # fpn.p2, head.rpn.*
EVERY_TEACHER_GROUPS = ("meta", "image")
# The image a teacher is probed on (TeacherOutputs.probe): the smallest canonical size, one cell on P5..P7.
PROBE_SIZE = (32, 32)

# mmdetection's eps in bbox_overlaps(mode="diou"): both denominators are clamped to at least it.
DIOU_EPS = 1e-6
# VLR is DIoU in [VLR_LOW * thr, thr).
VLR_LOW = 0.25


def _items(spec: str | Iterable[str]) -> list[str]:
    if isinstance(spec, str):
        spec = spec.split(",")
    return [item.strip() for item in spec if item.strip()]


@dataclass(frozen=True)
class TeacherOutputs:
    """What a teacher's forward gives: a dense head's maps (and which optional branches,
    ``DENSE_OPTIONAL``, its head lacks), or a two-stage teacher's ``TWO_STAGE_FIELDS``."""

    family: str
    lacking: tuple[str, ...]   # prefixes of DENSE_OPTIONAL whose output the teacher's head does not have
    two_stage: bool = False    # a TwoStageOutput (detectors.frcnn): FPN P2..P6 and RPN maps, no dense head

    @classmethod
    def of(cls, model: BaseDetector, out: DetectorOutput | TwoStageOutput) -> TeacherOutputs:
        """From one of the teacher's forward outputs."""
        if isinstance(out, TwoStageOutput):
            return cls(model.config.family, (), two_stage=True)
        return cls(model.config.family, tuple(prefix for prefix in DENSE_OPTIONAL
                                              if getattr(out, OPTIONAL_HEAD_FIELDS[prefix]) is None))

    @classmethod
    @torch.no_grad()
    def probe(cls, model: BaseDetector) -> TeacherOutputs:
        """From a forward of ``model`` (in eval mode, restored after) on one black image of
        ``PROBE_SIZE``: what a run must know before its first batch (precompute's declaration)."""
        device = next(model.parameters()).device
        training = model.training
        model.eval()
        try:
            out = model(torch.zeros(1, 3, *PROBE_SIZE, device=device), [PROBE_SIZE])
        finally:
            model.train(training)
        return cls.of(model, out)

    def gives(self, name: str) -> bool:
        """Whether the teacher produces the field ``name``."""
        if group_of(name) in EVERY_TEACHER_GROUPS:
            return True
        if self.two_stage:
            return name in TWO_STAGE_FIELDS
        return name not in TWO_STAGE_ONLY and not any(name.startswith(prefix + ".") for prefix in self.lacking)

    def group_fields(self, group: str) -> list[str]:
        """The fields of ``group`` the teacher produces, optional ones included (schema order)."""
        return [name for name in FIELDS if group_of(name) == group and self.gives(name)]

    def check(self, item: str, source: str) -> None:
        """Refuses a ``--fields`` item that names (or lies under) a field this teacher does not produce,
        or a group of which it produces nothing."""
        names = self.group_fields(item) if item in GROUPS else expand_fields([item])
        missing = [name for name in names if not self.gives(name)]
        if names and not missing:
            return
        what = ", ".join(dict.fromkeys(_field_kind(name) for name in missing)) or f"the {item} group"
        if self.two_stage:
            raise ValueError(f"{source} {item!r}: a {self.family!r} teacher is a two-stage detector, so it cannot "
                             f"provide {what}: it gives fpn.p2 .. fpn.p6 (its FPN), head.rpn.* (its RPN's objectness "
                             f"and deltas) and meta; its RoI head is the cache artefact {ROI_HEAD_ARTIFACT!r}")
        for prefix in self.lacking:
            if any(name.startswith(prefix + ".") for name in missing):
                attribute = OPTIONAL_HEAD_FIELDS[prefix]
                raise ValueError(f"{source} {item!r}: a {self.family!r} teacher has no {attribute} output "
                                 f"(DetectorOutput.{attribute} is None for its head), so it cannot provide "
                                 f"{prefix}.*; only a head with that branch (FCOS) does")
        raise ValueError(f"{source} {item!r}: a {self.family!r} teacher is a dense detector (FPN P3..P7, no RPN), so "
                         f"it cannot provide {what}: those are a two-stage teacher's (Faster R-CNN, 'frcnn')")


def _field_kind(name: str) -> str:
    """``head.cls.p3`` -> ``head.cls``; an FPN level or a field without a level is itself (``fpn.p7``)."""
    base, _, last = name.rpartition(".")
    return base if base != "fpn" and (last in LEVELS or last in TWO_STAGE_LEVELS) else name


def resolve_fields(spec: str | Iterable[str], teacher: TeacherOutputs | None = None) -> list[str]:
    """Field names (store vocabulary, schema order) for "all", method names and their field presets
    (what each method class declares: ``train.methods.named_field_sets``), groups, prefixes, names.

    Always adds ``meta.image_id``, ``meta.view_index``, ``meta.orig_hw``, ``meta.valid_hw``,
    ``meta.level_hw``; a region field brings every ``region.*`` field and the GT meta. With
    ``teacher``, a group (also through "all") means the fields of it the teacher produces
    (:meth:`TeacherOutputs.group_fields`): FCOS's ``head.ctr`` with ``head``, a two-stage teacher's
    P2..P6 for ``fpn`` and RPN maps for ``head``; "all" leaves out the groups it produces nothing of.
    Without ``teacher`` a group is its fields every dense family has. An item naming a field the
    teacher lacks (the field, its prefix, a group it has nothing of, a method's field set), or a
    method without official values for the teacher's family, is a ValueError naming the family.
    """
    method_sets = named_field_sets(None if teacher is None else teacher.family)
    wanted: list[str] = []
    for item in _items(spec):
        if item == "all":
            wanted += list(ALL_GROUPS) if teacher is None else [name for group in ALL_GROUPS
                                                                for name in teacher.group_fields(group)]
        elif item in method_sets:
            if teacher is not None:
                _check_method_family(item, teacher.family)
                for group in method_sets[item]:
                    teacher.check(group, f"--fields {item} (the method's fields)")
            wanted += method_sets[item]
        else:
            if teacher is not None:
                teacher.check(item, "--fields")
            # a group means what the teacher produces of it; a prefix or name, what it names (expand_fields checks it)
            wanted += teacher.group_fields(item) if teacher is not None and "." not in item else [item]
    names = set(expand_fields(wanted + list(ALWAYS_META)))
    if names & set(REGION_FIELDS):
        names |= set(REGION_FIELDS) | set(GT_META)
    return [name for name in FIELDS if name in names]  # schema order


def _check_method_family(item: str, family: str) -> None:
    """Refuses a method (or preset) of ``--fields`` without official values for the teacher's family:
    its cache could never be used (LD: GFL only; DeFeat: no FCOS)."""
    for name in methods_named([item]).names:
        try:
            METHODS[name].Config.for_family(family)
        except ValueError as error:
            raise ValueError(f"--fields {item}: {error}") from None


def methods_of(spec: str | Iterable[str]) -> MethodSpec:
    """The methods a field spec names (by name or preset), every registered one for "all": those whose
    hyperparameters precompute's ``--set`` takes (``train.methods.methods_named``)."""
    return methods_named(_items(spec))


def parse_method_settings(spec: str | Iterable[str], texts: Mapping[str, str], flag: str = "--set"
                          ) -> dict[str, Any]:
    """Precompute's ``--set KEY=VALUE`` texts -> qualified method hyperparameters
    (``{"maskd.stage1_iters": 500}``), each parsed and checked by its field's rule for the methods
    the field spec names (``train.methods.parse_overrides``); ValueError, one line."""
    methods = methods_of(spec)
    if texts and not methods.names:
        raise ValueError(f"{flag} {', '.join(texts)}: --fields {','.join(_items(spec))} names no method whose "
                         f"hyperparameters it could set")
    values = parse_overrides(methods, dict(texts), flag)
    return {f"{name}.{key}": value for name, part in split_overrides(methods, values).items()
            for key, value in part.items()}


def artifact_configs(spec: str | Iterable[str], family: str, settings: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The config of each method with artefacts that the field spec names: ``Config.for_family``
    of the teacher's ``family`` with precompute's ``--set`` ``settings`` (what its artefacts are made with).
    "all" names the methods with official values for ``family``."""
    methods = methods_of(spec)
    named = methods_of([item for item in _items(spec) if item != "all"]).names
    return method_configs(methods, family, settings, only=[
        n for n in methods.names if METHODS[n].ARTIFACTS and (n in named or _has_family(n, family))])


def _has_family(method: str, family: str) -> bool:
    try:
        METHODS[method].Config.for_family(family)
    except ValueError:
        return False
    return True


def artifacts_for(spec: str | Iterable[str], configs: Mapping[str, Any] | None = None
                  ) -> dict[str, type[DistillationMethod]]:
    """Per-cache artefact -> the method class that makes it, for a field spec: the artefacts of the
    methods it names (by name or preset), every method's for "all"; with the methods' ``configs``
    (:func:`artifact_configs`), those made with them (``train.methods.artifact_makers``)."""
    names = methods_of(spec).names
    return artifact_makers(names if configs is None else [n for n in names if n in configs or not METHODS[n].ARTIFACTS],
                           configs)


# ---------------------------------------------------------------------------------------------
# LD regions


def diou_matrix(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, eps: float = DIOU_EPS, rule: str = "diou") -> Tensor:
    """(n, m) "DIoU" of every box of ``boxes1_xyxy`` (the anchors) with every box of ``boxes2_xyxy``.

    rule "diou": the true Distance-IoU, overlap / union − ρ²/c² (ρ the distance between the centres,
    c the diagonal of the smallest enclosing box). rule "official": the same with the first box's
    area in place of the union, as HikariTJU/LD's ``bbox_overlaps(mode="diou")``
    (``mmdet/core/bbox/iou_calculators/iou2d_calculator.py``) computes it and ``get_vlr_region``
    uses it. Both denominators are clamped to at least ``eps`` (``torch.max(., eps)``), and the
    arithmetic follows mmdetection's order, so threshold decisions round the same way.
    """
    if rule not in LD_VLR_RULES:
        raise ValueError(f"unknown VLR rule {rule!r}; expected one of {LD_VLR_RULES}")
    lt = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])  # (n, m, 2)
    rb = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]  # (n, m)
    area1 = (boxes1_xyxy[:, 2] - boxes1_xyxy[:, 0]) * (boxes1_xyxy[:, 3] - boxes1_xyxy[:, 1])  # (n,)
    area2 = (boxes2_xyxy[:, 2] - boxes2_xyxy[:, 0]) * (boxes2_xyxy[:, 3] - boxes2_xyxy[:, 1])  # (m,)
    if rule == "diou":
        union = area1[:, None] + area2[None, :] - overlap
    else:
        union = area1[:, None].expand_as(overlap)  # the official "union" for mode="diou"
    eps_t = union.new_tensor([eps])
    ious = overlap / torch.max(union, eps_t)
    # ρ²: squared distance between the centres, from the coordinate sums as mmdetection.
    sums1 = (boxes1_xyxy[:, :2] + boxes1_xyxy[:, 2:])[:, None, :]  # (n, 1, 2) twice the centres
    sums2 = (boxes2_xyxy[:, :2] + boxes2_xyxy[:, 2:])[None, :, :]  # (1, m, 2)
    offsets2 = (sums2 - sums1) ** 2 / 4  # (n, m, 2)
    rho2 = offsets2[..., 0] + offsets2[..., 1]
    enclose = (torch.max(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
               - torch.min(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])).clamp(min=0)  # (n, m, 2)
    diagonal2 = torch.max(enclose[..., 0] ** 2 + enclose[..., 1] ** 2, eps_t)  # c²
    return ious - rho2 / diagonal2


def cache_options(fields: Iterable[str], ld_vlr_rule: str = DEFAULT_VLR_RULE) -> dict[str, str]:
    """The manifest ``options`` of a cache holding ``fields``: the VLR rule when regions are written."""
    if ld_vlr_rule not in LD_VLR_RULES:
        raise ValueError(f"unknown LD VLR rule {ld_vlr_rule!r}; expected one of {LD_VLR_RULES}")
    return {LD_VLR_RULE_OPTION: ld_vlr_rule} if set(fields) & set(REGION_FIELDS) else {}


def ld_regions(anchors_xyxy: Tensor, num_anchors_per_level: list[int], gt_boxes_xyxy: Tensor,
               topk: int = ATSS_TOPK, vlr_rule: str = DEFAULT_VLR_RULE) -> dict[str, Tensor]:
    """LD's positive and VLR rows for one image (see the module docstring).

    Args:
        anchors_xyxy: (A_total, 4) anchors of the image's canonical region, levels concatenated,
            (h, w, a) order within a level.
        num_anchors_per_level: anchors of each level in ``anchors_xyxy``.
        gt_boxes_xyxy: (G, 4) GT boxes, same pixels as the anchors.
        vlr_rule: which "DIoU" picks the VLR rows, "official" or "diou" (module docstring).
    Returns:
        ``level`` (R,) long, ``index`` (R,) long (row within the level), ``kind`` (R,) int8
        (REGION_POSITIVE rows first, then REGION_VLR, each in anchor order), ``gt`` (R,) long,
        ``iou`` (R,) float32.
    """
    if vlr_rule not in LD_VLR_RULES:
        raise ValueError(f"unknown LD VLR rule {vlr_rule!r}; expected one of {LD_VLR_RULES}")
    anchors_xyxy = anchors_xyxy.float()
    gt_boxes_xyxy = gt_boxes_xyxy.to(anchors_xyxy)
    device = anchors_xyxy.device
    result = atss_assign(anchors_xyxy, num_anchors_per_level, gt_boxes_xyxy, topk)
    positive = torch.where(result.matched_gt >= 0)[0]  # (P,)
    positive_gt = result.matched_gt[positive]
    positive_iou = result.ious[positive, positive_gt]

    if gt_boxes_xyxy.shape[0]:
        diou = diou_matrix(anchors_xyxy, gt_boxes_xyxy, rule=vlr_rule)  # (A, G)
        thresholds = result.thresholds[None, :]  # (1, G)
        in_vlr = (diou < thresholds) & (diou >= VLR_LOW * thresholds)
        # Several GTs: the highest IoU among them (the official max over IoUs masked to -INF).
        vlr_iou, vlr_gt = torch.where(in_vlr, result.ious, torch.full_like(result.ious, -math.inf)).max(dim=1)
        vlr = torch.where(vlr_iou > 0)[0]  # (V,) the official loss keeps rows whose IoU weight is > 0
        vlr_gt, vlr_iou = vlr_gt[vlr], vlr_iou[vlr]
    else:
        vlr = positive.new_zeros(0)
        vlr_gt, vlr_iou = positive_gt.new_zeros(0), positive_iou.new_zeros(0)

    anchor = torch.cat([positive, vlr])
    starts = torch.tensor([0] + list(num_anchors_per_level), device=device).cumsum(0)  # (L+1,)
    level = torch.searchsorted(starts[1:], anchor, right=True)
    kind = torch.cat([torch.full_like(positive, REGION_POSITIVE), torch.full_like(vlr, REGION_VLR)])
    return {"level": level, "index": anchor - starts[level], "kind": kind.to(torch.int8),
            "gt": torch.cat([positive_gt, vlr_gt]), "iou": torch.cat([positive_iou, vlr_iou]).float()}


def canonical_anchors(anchors: list[Tensor], map_sizes: list[tuple[int, int]],
                      valid_sizes: list[tuple[int, int]], num_anchors: int) -> tuple[Tensor, list[int]]:
    """Anchors of the valid (canonical) region of each level, concatenated, and their counts."""
    rows, counts = [], []
    for level_anchors, (map_h, map_w), (valid_h, valid_w) in zip(anchors, map_sizes, valid_sizes):
        grid = level_anchors.view(map_h, map_w, num_anchors, 4)[:valid_h, :valid_w]  # (h, w, A, 4)
        rows.append(grid.reshape(-1, 4))
        counts.append(valid_h * valid_w * num_anchors)
    return torch.cat(rows), counts


def gather_rows(maps: list[Tensor], image: int, level: Tensor, index: Tensor, num_anchors: int,
                map_widths_valid: list[int]) -> Tensor:
    """Rows (R, C) of per-level maps (N, A*C, H, W) of one image at region (level, index) rows.

    ``index`` is (h·w_l + w)·A + a with w_l the level's valid width.
    """
    channels = maps[0].shape[1] // num_anchors
    out = maps[0].new_zeros((level.shape[0], channels))
    for lvl, level_map in enumerate(maps):
        rows = torch.where(level == lvl)[0]
        if rows.numel() == 0:
            continue
        flat = index[rows]
        a = flat % num_anchors
        w = (flat // num_anchors) % map_widths_valid[lvl]
        h = flat // (num_anchors * map_widths_valid[lvl])
        grid = level_map[image].view(num_anchors, channels, *level_map.shape[-2:])  # (A, C, H, W)
        out[rows] = grid[a, :, h, w]  # (r, C)
    return out


# ---------------------------------------------------------------------------------------------
# the teacher forward and the per-image fields


@torch.no_grad()
def extract_fields(model: BaseDetector, batch: Batch, fields: str | Iterable[str], *,
                   amp_dtype: torch.dtype | None = None,
                   output_device: torch.device | str | None = None,
                   ld_vlr_rule: str = DEFAULT_VLR_RULE) -> list[dict[str, Tensor]]:
    """Runs the frozen teacher on ``batch`` and returns one store-vocabulary dict per image.

    Args:
        model: the teacher, in eval mode: a dense ``Detector`` or a two-stage ``FasterRCNN``.
        batch: images (N, 3, H, W) zero-padded (``detectors.views.collate``), sizes, targets, ids;
            the GT (``batch.targets``) is used only for regions and ``meta.gt_*``.
        fields: anything :func:`resolve_fields` takes.
        amp_dtype: torch.bfloat16 / torch.float16 to run backbone and head under autocast;
            every output is cast to float32.
        output_device: where the returned tensors live (default: the model's device). On a CUDA
            model with ``"cpu"``, dense maps are copied with ``non_blocking=True`` into pinned
            memory: synchronise (e.g. an event recorded after this call) before reading them.
        ld_vlr_rule: which "DIoU" picks LD's VLR rows ("official" or "diou"); a cache records it
            in its manifest's ``options`` (:func:`cache_options`).
    Returns:
        per image: {field name: tensor}; float fields float32, integer fields in the schema dtype.
    Raises:
        ValueError: ``fields`` names a field the teacher does not produce (``head.ctr`` of a family
            without centerness, ``head.cls`` or ``region`` of a two-stage teacher, ``head.rpn`` of a
            dense one); groups and "all" leave it out (:class:`TeacherOutputs`).
    """
    # image.*: the source file bytes; narrowed to what the teacher produces after its forward
    names = [n for n in resolve_fields(fields) if not n.startswith("image.")]
    wanted = set(names)
    device = next(model.parameters()).device
    output_device = torch.device(output_device) if output_device is not None else device
    num_anchors, strides = model.num_anchors, tuple(model.strides)
    levels = [f"p{int(math.log2(stride))}" for stride in strides]  # P3..P7, or P2..P6 for a two-stage teacher
    want_backbone = any(f"backbone.{stage}" in wanted for stage in BACKBONE_STAGES)  # C3..C5
    images = batch.images.to(device, non_blocking=True)
    sizes = [(int(h), int(w)) for h, w in batch.image_sizes]
    if batch.orig_sizes is None and "meta.orig_hw" in wanted:
        raise ValueError("meta.orig_hw needs batch.orig_sizes (detectors.views.collate fills them in)")

    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(padded_size(size), []).append(index)
    samples: list[dict[str, Tensor] | None] = [None] * len(sizes)
    for (pad_h, pad_w), members in groups.items():
        if len(members) == len(sizes):
            sub_images = images[:, :, :pad_h, :pad_w]
        else:
            sub_images = images[torch.tensor(members, device=device), :, :pad_h, :pad_w]
        sub_sizes = [sizes[i] for i in members]
        out = model(sub_images, sub_sizes, return_backbone=want_backbone, amp_dtype=amp_dtype)  # float32 maps
        # What this teacher produces (head.ctr: FCOS's centerness; a two-stage teacher's P2 and RPN maps)
        # is known from its output.
        names = [n for n in resolve_fields(fields, TeacherOutputs.of(model, out)) if not n.startswith("image.")]
        wanted = set(names)
        want_region = bool(wanted & set(REGION_FIELDS))  # a dense teacher's only
        # every prefix's per-level maps, the optional ones read from the attribute OPTIONAL_HEAD_FIELDS names
        two_stage = isinstance(out, TwoStageOutput)
        dense_head = {} if two_stage else {"head.cls": out.cls_logits, "head.box": out.box_outputs}
        maps = {"fpn": out.features, **dense_head,
                **{prefix: getattr(out, attribute) for prefix, attribute in OPTIONAL_HEAD_FIELDS.items()
                   if getattr(out, attribute, None) is not None}}
        want_dense = {group: [f"{group}.{lvl}" in wanted for lvl in levels] for group in maps}
        moved = {group: [m.to(output_device, non_blocking=True) if want else None
                         for m, want in zip(maps[group], want_dense[group])]
                 for group in want_dense}
        # C3..C5 share the map sizes of P3..P5, so each is cut to the valid region of that level.
        stages = None if two_stage else out.backbone_features  # C2..C5 for a two-stage teacher: none is a field
        moved_stages = [m.to(output_device, non_blocking=True) if f"backbone.{stage}" in wanted else None
                        for m, stage in zip(stages or [None] * len(BACKBONE_STAGES), BACKBONE_STAGES)]
        for position, index in enumerate(members):
            valid = valid_level_sizes(sizes[index], strides)
            sample: dict[str, Tensor] = {}
            for group, level_maps in moved.items():
                for level, level_map, (h, w) in zip(levels, level_maps, valid):
                    if level_map is not None:
                        sample[f"{group}.{level}"] = level_map[position, :, :h, :w]  # (C, h_l, w_l)
            for stage, stage_map in zip(BACKBONE_STAGES, moved_stages):
                if stage_map is not None:
                    h, w = valid[LEVELS.index(BACKBONE_LEVEL[stage])]
                    sample[f"backbone.{stage}"] = stage_map[position, :, :h, :w]  # (C_l, h_l, w_l)
            if want_region:
                cls_logits, box_outputs = out.cls_logits, out.box_outputs
                map_sizes = [tuple(f.shape[-2:]) for f in out.features]
                canonical, counts = canonical_anchors(out.anchors, map_sizes, valid, num_anchors)
                gt_boxes = batch.targets[index]["boxes"].to(device)
                # a teacher without ATSS of its own (RetinaNet) takes LD's topk
                topk = getattr(model.config, "atss_topk", ATSS_TOPK)
                rows = ld_regions(canonical, counts, gt_boxes, topk, vlr_rule=ld_vlr_rule)
                widths = [w for _, w in valid]
                region = {
                    "region.level": rows["level"].to(torch.int8),
                    "region.index": rows["index"].to(torch.int32),
                    "region.kind": rows["kind"],
                    "region.gt": rows["gt"].to(torch.int32),
                    "region.iou": rows["iou"],
                    "region.cls": gather_rows(cls_logits, position, rows["level"], rows["index"], num_anchors,
                                              widths),
                    "region.box_dist": gather_rows(box_outputs, position, rows["level"], rows["index"],
                                                   num_anchors, widths),
                }
                sample.update({k: v.to(output_device, non_blocking=True) for k, v in region.items()})
            # meta.level_hw is the dense pyramid's P3..P7 for every teacher (the schema's LEVELS)
            sample.update(_meta(batch, index, sizes[index], valid_level_sizes(sizes[index]), wanted, output_device))
            samples[index] = {name: sample[name] for name in names if name in sample}
    return samples  # type: ignore[return-value]


def _meta(batch: Batch, index: int, size: tuple[int, int], valid: list[tuple[int, int]], wanted: set[str],
          device: torch.device) -> dict[str, Tensor]:
    meta = {
        "meta.image_id": torch.tensor(int(batch.image_ids[index]), dtype=torch.int64),
        "meta.view_index": torch.tensor(int(batch.view_indices[index]), dtype=torch.int32),
        "meta.valid_hw": torch.tensor(size, dtype=torch.int32),
        "meta.level_hw": torch.tensor(valid, dtype=torch.int32),  # (5, 2)
    }
    if batch.orig_sizes is not None:
        meta["meta.orig_hw"] = torch.tensor(tuple(batch.orig_sizes[index]), dtype=torch.int32)
    if wanted & set(GT_META):
        target = batch.targets[index]
        meta["meta.gt_boxes_xyxy"] = target["boxes"].detach().float().reshape(-1, 4)
        meta["meta.gt_labels"] = target["labels"].detach().to(torch.int64).reshape(-1)
    return {k: v.to(device) for k, v in meta.items() if k in wanted}
