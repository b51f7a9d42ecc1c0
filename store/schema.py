"""The teacher-field vocabulary, defined once for precompute, store and train.

A *sample* is one view of one image, keyed by ``(image_id, view_index)``: a dict that maps a
field name to a numpy array (or torch tensor). A field's *group* is the text before its first
dot; groups are stored in separate files, so a reader that asks for ``region`` never touches the
bytes of ``fpn``.

    group   field                 shape            dtype    what
    fpn     fpn.p3 .. fpn.p7      (C, H_l, W_l)    float    FPN output of level l (stride 2**l)
    fpn     fpn.p2                (C, H_l, W_l)    float    FPN output P2 (stride 4) of a two-stage
                                                            teacher (Faster R-CNN: P2..P6, no P7)
    head    head.cls.p3 .. p7     (A*K, H_l, W_l)  float    dense class logits (pre-sigmoid)
    head    head.box.p3 .. p7     (A*B, H_l, W_l)  float    dense box outputs: RetinaNet deltas
                                                            (B=4), GFL distribution logits
                                                            (B=4*(reg_max+1)), after Scale, or
                                                            FCOS side distances (B=4, stride units)
    head    head.ctr.p3 .. p7     (A, H_l, W_l)    float    dense centerness logits (pre-sigmoid) of
                                                            a head with a centerness branch (FCOS,
                                                            A=1); other families have none
    head    head.rpn.obj.p2 .. p6 (A, H_l, W_l)    float    RPN objectness logits (pre-sigmoid) of a
                                                            two-stage teacher, A anchors per cell
    head    head.rpn.box.p2 .. p6 (4A, H_l, W_l)   float    RPN deltas on those anchors (rpn_box_stds
                                                            units)
    backbone backbone.c3 .. c5    (CB_l, H_l, W_l) float    ResNet stage outputs C3, C4, C5 (strides 8,
                                                            16, 32; layer2..layer4), the FPN's inputs;
                                                            C3 has P3's H_l, W_l, C4 P4's, C5 P5's
    region  region.level          (R,)             int8     level index into LEVELS (0 = p3)
    region  region.index          (R,)             int32    flat location on that level,
                                                            (h * W_l + w) * A + a
    region  region.kind           (R,)             int8     REGION_POSITIVE or REGION_VLR
    region  region.gt             (R,)             int32    index of the GT box (meta.gt_*)
    region  region.iou            (R,)             float32  IoU with it (VLR rows are chosen by DIoU,
                                                            weighted by IoU, as official LD)
    region  region.cls            (R, K)           float    teacher class logits at the row
    region  region.box_dist       (R, B)           float    teacher box outputs at the row
    meta    meta.image_id         ()               int64    COCO image id
    meta    meta.view_index       ()               int32    index into the manifest's views
    meta    meta.orig_hw          (2,)             int32    source image (h, w) in pixels
    meta    meta.valid_hw         (2,)             int32    resized view (h, w) before padding
    meta    meta.level_hw         (5, 2)           int32    (H_l, W_l) of every level P3..P7
    meta    meta.gt_boxes_xyxy    (G, 4)           float32  GT used for the regions, view pixels
    meta    meta.gt_labels        (G,)             int64    contiguous labels in [0, K)
    image   image.encoded         (N,)             uint8    the source image file (JPEG/PNG
                                                            bytes), for a self-contained stream

``meta.image_id`` and ``meta.view_index`` are in every cache; the rest is what a precompute run
chose to write. The view spec itself lives once in the manifest (``views[view_index]``) and a
reader returns it as ``meta.view``.

Optional fields (``FieldSpec.optional``) are outputs only some detector families have: ``head.ctr``,
FCOS's centerness, and a two-stage teacher's (Faster R-CNN's) ``fpn.p2`` and RPN maps ``head.rpn.*``.
A group (``head``) expands to its fields every dense family has, so ``head`` means ``head.cls`` and
``head.box`` for every cache and ``fpn`` means P3..P7; a prefix (``head.ctr``, ``head.rpn``) or a
name (``head.ctr.p3``, ``fpn.p2``) names an optional field. (precompute's ``--fields`` grammar
adds a teacher's optional fields to the groups it asks for, and leaves out of them what the teacher
lacks: ``precompute.fields.resolve_fields``.)

The RPN is a two-stage detector's dense head (mmdetection's ``dense_heads.RPNHead``, torchvision's
``rpn.head``), so its maps are in the ``head`` group, under ``head.rpn`` so that no reader of
``head.cls``/``head.box`` mistakes its one class-agnostic objectness per anchor for class logits. A
two-stage teacher's levels are ``TWO_STAGE_LEVELS`` (P2..P6); its RoI head is not a field (its
inputs, the RoIs, are the student's) but the per-cache artefact ``ROI_HEAD_ARTIFACT``, which
``train.partial_teacher`` runs on the cached P2..P5 maps.

Shape symbols are checked per sample: all ``fpn`` levels share ``C``; ``head.*.p3`` has the
``H_l, W_l`` of ``fpn.p3``; all ``region.*`` share ``R``; ``meta.level_hw`` agrees with every
dense map written. A backbone stage is bound to the pyramid level of its stride
(``BACKBONE_LEVEL``: c3 -> p3, c4 -> p4, c5 -> p5), so ``backbone.c4`` has the ``H_l, W_l`` of
``fpn.p4`` and of ``meta.level_hw[1]``; its channels ``CB_l`` are its own (512, 1024, 2048 for a
ResNet-50). The ``backbone`` group is opt-in (DeFeat's COCO recipe reads it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SchemaError

LEVELS = ("p3", "p4", "p5", "p6", "p7")
# A two-stage teacher's pyramid (Faster R-CNN: P2..P6, detectors.frcnn.STRIDES); LEVELS stays the
# dense pyramid that meta.level_hw and region.level index.
TWO_STAGE_LEVELS = ("p2", "p3", "p4", "p5", "p6")
# Pixels per cell of each level, the one definition: the detectors (detectors.detector) import it
# from here, as store stays free of torch.
STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)
GROUPS = ("fpn", "head", "region", "meta", "image", "backbone")
# ResNet stages cached in the "backbone" group, and the pyramid level of the same stride each one
# shares its map size with (C3 stride 8 = P3, C4 stride 16 = P4, C5 stride 32 = P5).
BACKBONE_STAGES = ("c3", "c4", "c5")
BACKBONE_LEVEL = {"c3": "p3", "c4": "p4", "c5": "p5"}

# region.kind values
REGION_POSITIVE = 1
REGION_VLR = 2

KEY_FIELDS = ("meta.image_id", "meta.view_index")

# Which "DIoU" picks LD's VLR rows (precompute/fields.py); a cache with region fields declares it
# under this key of its manifest's ``options``, and LD refuses a cache written with another rule.
LD_VLR_RULES = ("official", "diou")
LD_VLR_RULE_OPTION = "ld_vlr_rule"
DEFAULT_VLR_RULE = "official"   # the rule the official LD code ran; precompute's and the online teacher's default

# Per-cache artefacts (stored once, not per view) that every precompute run writes.
INHERIT_ARTIFACT = "teacher_neck_head"   # teacher backbone.fpn.* and head.* weights ("inherit")
# The per-image hash table (image ids (n,) int64 sorted, sha256 digests (n, 32) uint8 of the image
# files); the declaration's dataset.image_hashes holds its digest (detectors.data.image_hash_digest).
IMAGE_HASHES_ARTIFACT = "image_hashes"
# A two-stage teacher's RoI head alone (detectors.frcnn.RoIBoxHead: its weights and settings), written
# by precompute for such a teacher; train.partial_teacher runs it on the cached maps.
ROI_HEAD_ARTIFACT = "teacher_roi_head"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str                     # "float": storage dtype chosen by the codec; "int"/"bytes": exact dtype
    dtype: str | None             # exact numpy dtype for kind "int"/"bytes"; None for floats
    shape: tuple[str | int, ...]  # symbolic; "_l" in a symbol is bound per level (H_l -> H_p3)
    default_codec: str            # a codec spec of store.codecs.make_codec ("klt", "klt:0.04")
    doc: str
    optional: bool = False        # only some families produce it: named by prefix or name, not by its group

    @property
    def group(self) -> str:
        return group_of(self.name)

    @property
    def level(self) -> str | None:
        """The pyramid level whose (H_l, W_l) the field has: its own, or its backbone stage's (c4 -> p4)."""
        last = self.name.rsplit(".", 1)[-1]
        if self.group == "backbone":
            return BACKBONE_LEVEL.get(last)
        return last if last in LEVELS or last in TWO_STAGE_LEVELS else None


def group_of(name: str) -> str:
    return name.split(".", 1)[0]


FPN_DEFAULT_CODEC = "klt:0.25"


def _build() -> dict[str, FieldSpec]:
    specs: list[FieldSpec] = [FieldSpec("fpn.p2", "float", None, ("C", "H_l", "W_l"), "klt",
                                        "FPN output P2 (two-stage teachers)", optional=True)]
    for level in LEVELS:   # klt:0.25: the cheapest bound inside every dense method's seed band (BENCHMARKS.md)
        specs.append(FieldSpec(f"fpn.{level}", "float", None, ("C", "H_l", "W_l"), FPN_DEFAULT_CODEC,
                               f"FPN output {level.upper()}"))
    for level in LEVELS:
        specs.append(FieldSpec(f"head.cls.{level}", "float", None, ("AK", "H_l", "W_l"), "sparse",
                               f"dense class logits at {level.upper()}"))
    for level in LEVELS:
        specs.append(FieldSpec(f"head.box.{level}", "float", None, ("AB", "H_l", "W_l"), "int8",
                               f"dense box outputs at {level.upper()}"))
    # fp16, not int8: int8's error is a per-map fraction of the logits' range (range/510), which
    # training does not bound (only positives get the centerness loss); fp16's is relative to each
    # value. On an fcos-small demo teacher (7.4 AP, 96 views 160:256 of the demo set) int8 moved
    # σ(ctr) by up to 0.66 % of itself, fp16 by 0.08 %, for 1328 vs 1874 B/view (head group
    # 10.9 vs 11.4 kB/view). No method reads it yet (FRS, ICD, MasKD's FCOS code does not).
    for level in LEVELS:
        specs.append(FieldSpec(f"head.ctr.{level}", "float", None, ("A", "H_l", "W_l"), "fp16",
                               f"dense centerness logits at {level.upper()} (FCOS)", optional=True))
    # fp16 for the RPN maps as for the centerness: an error relative to each value, where int8's is a
    # fraction of each map's range, which a few confident anchors stretch.
    for kind, shape, what in (("obj", "A", "objectness logits"), ("box", "4A", "deltas")):
        for level in TWO_STAGE_LEVELS:
            specs.append(FieldSpec(f"head.rpn.{kind}.{level}", "float", None, (shape, "H_l", "W_l"), "fp16",
                                   f"RPN {what} at {level.upper()} (two-stage teachers)", optional=True))
    specs += [
        FieldSpec("region.level", "int", "int8", ("R",), "raw", "level index into LEVELS"),
        FieldSpec("region.index", "int", "int32", ("R",), "raw", "flat (h*W+w)*A+a on the level"),
        FieldSpec("region.kind", "int", "int8", ("R",), "raw", "REGION_POSITIVE / REGION_VLR"),
        FieldSpec("region.gt", "int", "int32", ("R",), "raw", "index into meta.gt_*"),
        FieldSpec("region.iou", "float", None, ("R",), "raw", "IoU with that GT (the LD loss weight)"),
        FieldSpec("region.cls", "float", None, ("R", "K"), "fp16", "class logits at the row"),
        FieldSpec("region.box_dist", "float", None, ("R", "B"), "fp16", "box outputs at the row"),
        FieldSpec("meta.image_id", "int", "int64", (), "raw", "COCO image id"),
        FieldSpec("meta.view_index", "int", "int32", (), "raw", "index into manifest views"),
        FieldSpec("meta.orig_hw", "int", "int32", (2,), "raw", "source image (h, w)"),
        FieldSpec("meta.valid_hw", "int", "int32", (2,), "raw", "view (h, w) before padding"),
        FieldSpec("meta.level_hw", "int", "int32", (len(LEVELS), 2), "raw", "(H_l, W_l) per level"),
        FieldSpec("meta.gt_boxes_xyxy", "float", None, ("G", 4), "raw", "GT boxes, view pixels"),
        FieldSpec("meta.gt_labels", "int", "int64", ("G",), "raw", "contiguous GT labels"),
        FieldSpec("image.encoded", "bytes", "uint8", ("N",), "stored", "source image file bytes"),
    ]
    for stage in BACKBONE_STAGES:
        specs.append(FieldSpec(f"backbone.{stage}", "float", None, ("CB_l", "H_l", "W_l"), "klt",
                               f"ResNet stage output {stage.upper()} (stride of {BACKBONE_LEVEL[stage].upper()})"))
    return {s.name: s for s in specs}


FIELDS: dict[str, FieldSpec] = _build()


def field_spec(name: str) -> FieldSpec:
    try:
        return FIELDS[name]
    except KeyError:
        raise SchemaError(f"unknown field {name!r}; known fields: {', '.join(FIELDS)}") from None


def expand_fields(names) -> list[str]:
    """Expand field names ("fpn.p3"), groups ("fpn") and dotted prefixes ("head.cls") into field
    names, in the order given (schema order within a group or prefix). A group leaves out its
    optional fields ("head": head.cls and head.box, not FCOS's head.ctr); a prefix keeps them."""
    out: list[str] = []
    for item in names:
        if item in FIELDS:
            matches = [item]
        else:
            matches = [n for n in FIELDS if n.startswith(item + ".") and ("." in item or not FIELDS[n].optional)]
            if not matches:
                raise SchemaError(f"{item!r} is not a field, group or prefix; known fields: {', '.join(FIELDS)}")
        out += [n for n in matches if n not in out]
    return out


def validate_sample(sample: dict, declared: list[str]) -> None:
    """Check that a sample has exactly the declared fields, with dtypes and consistent shapes."""
    missing = [n for n in declared if n not in sample]
    extra = [n for n in sample if n not in declared]
    if missing or extra:
        problems = ([f"missing declared fields {missing}"] if missing else []) + \
                   ([f"has fields the manifest does not declare {extra}"] if extra else [])
        raise SchemaError(f"sample {_key_text(sample)}: {'; '.join(problems)}")
    bound: dict[str, int] = {}
    for name in declared:
        spec = FIELDS[name]
        value = sample[name]
        shape = tuple(value.shape)
        dtype = np.dtype(str(value.dtype).replace("torch.", ""))
        if spec.kind == "float" and dtype.kind != "f":
            raise SchemaError(f"sample {_key_text(sample)}: field {name} must be floating point, got {dtype}")
        if spec.kind in ("int", "bytes") and dtype.kind not in "iub":
            raise SchemaError(f"sample {_key_text(sample)}: field {name} must be integer, got {dtype}")
        if len(shape) != len(spec.shape):
            raise SchemaError(f"sample {_key_text(sample)}: field {name} has shape {shape}, "
                              f"expected {len(spec.shape)} dims {spec.shape}")
        for dim, symbol in zip(shape, spec.shape):
            if isinstance(symbol, int):
                if dim != symbol:
                    raise SchemaError(f"sample {_key_text(sample)}: field {name} has shape {shape}, "
                                      f"expected {spec.shape}")
                continue
            symbol = symbol.replace("_l", "_" + spec.level) if spec.level else symbol
            if bound.setdefault(symbol, dim) != dim:
                raise SchemaError(f"sample {_key_text(sample)}: field {name} has {symbol}={dim} but another "
                                  f"field of this sample has {symbol}={bound[symbol]}")
    if "meta.level_hw" in sample:
        level_hw = np.asarray(sample["meta.level_hw"])
        for i, level in enumerate(LEVELS):
            hw = (bound.get(f"H_{level}"), bound.get(f"W_{level}"))
            if hw[0] is not None and tuple(int(v) for v in level_hw[i]) != hw:
                raise SchemaError(f"sample {_key_text(sample)}: meta.level_hw[{i}] = {level_hw[i].tolist()} "
                                  f"but the {level} maps are {hw[0]}x{hw[1]}")


def sample_key(sample: dict) -> tuple[int, int]:
    try:
        return int(sample["meta.image_id"]), int(sample["meta.view_index"])
    except KeyError as e:
        raise SchemaError(f"every sample needs meta.image_id and meta.view_index; missing {e}") from None


def _key_text(sample: dict) -> str:
    try:
        image_id, view_index = sample_key(sample)
        return f"(image_id={image_id}, view={view_index})"
    except (SchemaError, TypeError, ValueError):
        return "(no key)"
