"""DeFeat's COCO recipe: the ``backbone`` field group (C3–C5), from the detector's forward through
precompute and the store to DeFeat's backbone terms (ggjy/DeFeat.pytorch @c46a793,
``mmdet/apis/train.py`` ``bb-adapt,bb-decouple``; ``anchor_head.py`` ``get_bb_gt_mask``).

The hand computation loops over explicit cells with plain floats, from the formula in
``train/methods/defeat.py``'s docstring, not from the method's helpers.
"""
import uuid

import numpy as np
import pytest
import torch

from detectors import build_detector, valid_level_sizes
from detectors.detector import DetectorOutput
from detectors.views import Batch, padded_size
from precompute.fields import extract_fields, resolve_fields
from store import BACKENDS, FIELDS, Manifest, SchemaError, expand_fields, open_cache, open_writer
from store.schema import validate_sample
from train.methods import DeFeat, build_method
from train.teacher_batch import TeacherBatch, collate_teacher
from train.trainer import DistillationModel

STAGES = ("c3", "c4", "c5")


def _key_meta(level_hw):
    return {"meta.image_id": np.int64(7), "meta.view_index": np.int32(0),
            "meta.level_hw": np.asarray(level_hw, dtype=np.int32)}


# ---------------------------------------------------------------------------------------------- schema
def test_backbone_group_in_the_vocabulary():
    assert expand_fields(["backbone"]) == ["backbone.c3", "backbone.c4", "backbone.c5"]
    assert all(FIELDS[f"backbone.{s}"].default_codec == "klt" for s in STAGES)
    assert [FIELDS[f"backbone.{s}"].level for s in STAGES] == ["p3", "p4", "p5"]


def test_schema_accepts_backbone_maps_on_the_grids_of_p3_p4_p5():
    level_hw = valid_level_sizes((64, 96))  # p3 8x12, p4 4x6, p5 2x3, ...
    sample = {**_key_meta(level_hw),
              "backbone.c3": np.zeros((16, 8, 12), np.float32), "backbone.c4": np.zeros((32, 4, 6), np.float32),
              "backbone.c5": np.zeros((64, 2, 3), np.float32), "fpn.p4": np.zeros((8, 4, 6), np.float32)}
    validate_sample(sample, list(sample))  # per-stage channels, each stage its own level's (H, W)


@pytest.mark.parametrize("name,shape,match", [
    ("backbone.c4", (32, 8, 12), r"meta.level_hw\[1\].*p4 maps are 8x12"),   # C4 given P3's size
    ("backbone.c5", (64, 2, 4), r"meta.level_hw\[2\].*p5 maps are 2x4"),
    ("backbone.c3", (16, 8), "expected 3 dims"),
])
def test_schema_rejects_backbone_maps_off_their_level(name, shape, match):
    level_hw = valid_level_sizes((64, 96))
    sample = {**_key_meta(level_hw), name: np.zeros(shape, np.float32)}
    with pytest.raises(SchemaError, match=match):
        validate_sample(sample, list(sample))


def test_schema_binds_backbone_stages_to_the_fpn_maps_of_their_stride():
    sample = {"meta.image_id": np.int64(1), "meta.view_index": np.int32(0),
              "fpn.p4": np.zeros((8, 4, 6), np.float32), "backbone.c4": np.zeros((32, 4, 5), np.float32)}
    with pytest.raises(SchemaError, match="H_p4|W_p4"):
        validate_sample(sample, list(sample))
    sample["backbone.c4"] = np.zeros((32, 4, 6), np.int32)
    with pytest.raises(SchemaError, match="floating point"):
        validate_sample(sample, list(sample))


# ---------------------------------------------------------------------------------------------- detectors
def _batch(images, sizes, boxes, first_id=10):
    pad_h = max(padded_size(s)[0] for s in sizes)
    pad_w = max(padded_size(s)[1] for s in sizes)
    padded = torch.zeros(len(images), 3, pad_h, pad_w)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        padded[i, :, :h, :w] = image[:, :h, :w]
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
    return Batch(padded, list(sizes), targets, image_ids=list(range(first_id, first_id + len(images))),
                 view_indices=[0] * len(images), views=[None] * len(images),
                 orig_sizes=[(h, w) for h, w in sizes])


@pytest.mark.parametrize("name", ["retina-nano", "gfl-nano"])
def test_forward_returns_the_stage_maps_only_when_asked(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = model(images, [(64, 96), (50, 70)])
        both = model(images, [(64, 96), (50, 70)], return_backbone=True)
        stages = model.backbone.body(images)
    assert plain.backbone_features is None
    assert [tuple(m.shape) for m in both.backbone_features] == \
        [(2, c, h, w) for c, (h, w) in zip(model.backbone.stage_channels, [(8, 12), (4, 6), (2, 3)])]
    for got, want in zip(both.backbone_features, stages.values()):
        torch.testing.assert_close(got, want)
    for got, want in zip(both.features, plain.features):  # the pyramid is unchanged
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["retina-nano", "gfl-nano"])
def test_extract_fields_writes_the_models_stage_maps_on_the_valid_region(name):
    torch.manual_seed(1)
    model = build_detector(name, num_classes=3).eval()
    sizes = [(64, 96), (40, 60)]  # canonical 64x96 and 64x64: two forwards
    images = [torch.randn(3, 64, 96) for _ in sizes]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0]]), torch.zeros(0, 4)]
    samples = extract_fields(model, _batch(images, sizes, boxes), "backbone")
    for image, size, sample in zip(images, sizes, samples):
        assert not any(key.startswith(("fpn.", "head.")) for key in sample)
        pad_h, pad_w = padded_size(size)
        alone = torch.zeros(1, 3, pad_h, pad_w)
        alone[0, :, :size[0], :size[1]] = image[:, :size[0], :size[1]]
        with torch.no_grad():
            want = model.backbone.body(alone)  # the image under its own canonical padding
        level_hw = valid_level_sizes(size)
        for index, stage in enumerate(STAGES):
            h, w = level_hw[index]
            assert sample[f"backbone.{stage}"].shape == (model.backbone.stage_channels[index], h, w)
            torch.testing.assert_close(sample[f"backbone.{stage}"], want[stage][0], rtol=1e-4, atol=1e-4)
        validate_sample({k: v.numpy() for k, v in sample.items()}, list(sample))


def test_bf16_autocast_stage_maps_are_float32_and_close():
    torch.manual_seed(2)
    model = build_detector("gfl-nano", num_classes=3).eval()
    batch = _batch([torch.randn(3, 64, 64)], [(64, 64)], [torch.zeros(0, 4)])
    exact = extract_fields(model, batch, "backbone")[0]
    amp = extract_fields(model, batch, "backbone", amp_dtype=torch.bfloat16)[0]
    for stage in STAGES:
        assert amp[f"backbone.{stage}"].dtype == torch.float32
        torch.testing.assert_close(amp[f"backbone.{stage}"], exact[f"backbone.{stage}"], rtol=0.1, atol=0.1)


def test_field_specs_keep_the_released_defeat_and_add_the_coco_preset():
    assert DeFeat.FIELDS == ("fpn",)  # the released config; its GT masks come from the student's targets
    assert not any(n.startswith("backbone.") for n in resolve_fields("defeat") + resolve_fields("all"))
    coco = resolve_fields("defeat-coco")
    assert set(coco) == set(resolve_fields("defeat")) | set(expand_fields(["head.cls", "backbone"]))
    assert set(resolve_fields("defeat,backbone")) == set(resolve_fields("defeat")) | set(expand_fields(["backbone"]))


# ---------------------------------------------------------------------------------------------- DeFeat
def _set_center_tap(conv, matrix, bias):
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = matrix
        conv.bias.copy_(bias)


def _cells(y_range, x_range):
    return {(y, x) for y in y_range for x in x_range}


def test_backbone_terms_match_hand_computation():
    """Three images (groups of 2: [0, 1], [2]) and stages C3, C4, C5 with different widths.

    Image 0 valid 64x96 (P3 8x12, P4 4x6, P5 2x3): box [8, 16, 40, 40] covers stride-8 cells
    y 2..4, x 1..4; the thin box [80, 0, 81, 30] its top-left cell (0, 10). Nearest resize
    (C4 cell (i, j) = P3 cell (2i, 2j), C5 = (4i, 4j)): C4 {(1,1),(1,2),(2,1),(2,2),(0,5)}, C5 {(1,1)}.
    Image 1 valid 40x60 -> canonical 64x64 (P3 8x8, P4 4x4, P5 2x2): box [16, 8, 56, 40] covers
    y 1..4, x 2..6; C4 {(1,1),(1,2),(1,3),(2,1),(2,2),(2,3)}, C5 {(1,1)}. Image 2: no GT.
    """
    torch.manual_seed(5)
    c_s, c_t = (2, 3, 2), (3, 2, 4)
    map_sizes = [(8, 12), (4, 6), (2, 3)]
    valid_sizes = [[(8, 12), (4, 6), (2, 3)], [(8, 8), (4, 4), (2, 2)], [(8, 12), (4, 6), (2, 3)]]
    fg_cells = [
        [_cells(range(2, 5), range(1, 5)) | {(0, 10)}, {(1, 1), (1, 2), (2, 1), (2, 2), (0, 5)}, {(1, 1)}],
        [_cells(range(1, 5), range(2, 7)), _cells((1, 2), (1, 2, 3)), {(1, 1)}],
        [set(), set(), set()],
    ]
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 40.0], [80.0, 0.0, 81.0, 30.0]]), "labels": torch.zeros(2)},
               {"boxes": torch.tensor([[16.0, 8.0, 56.0, 40.0]]), "labels": torch.zeros(1)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    s_maps = [torch.randn(3, c, h, w) for c, (h, w) in zip(c_s, map_sizes)]
    t_maps = [torch.randn(3, c, h, w).abs() for c, (h, w) in zip(c_t, map_sizes)]
    matrices = [torch.randn(o, i) for i, o in zip(c_s, c_t)]
    biases = [torch.randn(o) * 0.3 for o in c_t]

    config = DeFeat.Config.for_family("retina", backbone_fg_weight=2.0, backbone_bg_weight=5.0,
                                      backbone_stages=(3, 4, 5))
    method = DeFeat(config, student_channels=4, teacher_channels=4, num_levels=3,
                    student_backbone_channels=c_s, teacher_backbone_channels=c_t)
    for index, stage in enumerate(STAGES):
        _set_center_tap(method.backbone_adapters[stage][0], matrices[index], biases[index])
    valid = []
    for level, (map_h, map_w) in enumerate(map_sizes):
        mask = torch.zeros(3, 1, map_h, map_w, dtype=torch.bool)
        for n in range(3):
            mask[n, :, :valid_sizes[n][level][0], :valid_sizes[n][level][1]] = True
        valid.append(mask)
    teacher_maps = [torch.where(v, t, torch.zeros(())) for v, t in zip(valid, t_maps)]  # as collate_teacher
    fpn = [torch.zeros(3, 4, h, w) for h, w in map_sizes]
    teacher = TeacherBatch(fpn=fpn, cls=None, box=None, valid=valid, region=None, valid_sizes=valid_sizes,
                           backbone=dict(zip(STAGES, teacher_maps)))
    student = DetectorOutput([torch.zeros(3, 4, h, w) for h, w in map_sizes], [], [], [], (8, 16, 32),
                             [(64, 96), (40, 60), (64, 96)])
    student.backbone_features = [m.clone().requires_grad_() for m in s_maps]
    terms = method(student, teacher, targets, iteration=0)

    def squared(level, n, y, x):
        total = 0.0
        for o in range(c_t[level]):
            value = float(biases[level][o]) + sum(float(matrices[level][o, i]) * float(s_maps[level][n, i, y, x])
                                                  for i in range(c_s[level]))
            total += (max(value, 0.0) - float(t_maps[level][n, o, y, x])) ** 2
        return total

    per_group_fg, per_group_bg = [], []
    for group in ([0, 1], [2]):
        fg = bg = 0.0
        for level in range(3):
            fg_err = bg_err = 0.0
            fg_count = bg_count = 0
            for n in group:
                h, w = valid_sizes[n][level]
                bg_set = _cells(range(h), range(w)) - fg_cells[n][level]
                fg_err += sum(squared(level, n, y, x) for y, x in fg_cells[n][level])
                bg_err += sum(squared(level, n, y, x) for y, x in bg_set)
                fg_count, bg_count = fg_count + len(fg_cells[n][level]), bg_count + len(bg_set)
            fg += fg_err / max(1, 2 * c_t[level] * fg_count)
            bg += bg_err / max(1, 2 * c_t[level] * bg_count)
        per_group_fg.append(fg)
        per_group_bg.append(bg)
    assert terms["defeat_backbone_fg"].item() == pytest.approx(2.0 / 3 * sum(per_group_fg) / 2, rel=1e-5)
    assert terms["defeat_backbone_bg"].item() == pytest.approx(5.0 / 3 * sum(per_group_bg) / 2, rel=1e-5)
    assert {"defeat_fg", "defeat_bg"} <= set(terms)
    (terms["defeat_backbone_fg"] + terms["defeat_backbone_bg"]).backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student.backbone_features)


def test_backbone_fields_and_adapters_only_with_weights_above_zero():
    released = build_method("defeat", "retina", student_channels=4, teacher_channels=8)
    assert released.fields == ("fpn",) and released.backbone_adapters is None
    assert not any("backbone" in key for key in released.state_dict())
    assert (released.config.backbone_fg_weight, released.config.backbone_bg_weight) == (0.0, 0.0)
    with pytest.raises(ValueError, match="C3-C5 widths"):
        build_method("defeat", "retina", {"backbone_bg_weight": 16.0})  # BuildContext gives no stage widths

    config = DeFeat.Config.for_family("retina", backbone_bg_weight=16.0, head_fg_weight=2.0)
    method = DeFeat(config, 4, 8, student_backbone_channels=(16, 32, 64), teacher_backbone_channels=(32, 64, 128))
    assert method.fields == ("fpn", "head.cls", "backbone.c4", "backbone.c5")  # the author's stages 3 and 4
    assert set(method.backbone_adapters) == {"c4", "c5"}
    conv, relu = method.backbone_adapters["c5"]
    assert (conv.in_channels, conv.out_channels) == (64, 128) and isinstance(relu, torch.nn.ReLU)
    assert conv.weight.abs().max() <= 2e-4
    assert DeFeat.Config.for_family("retina", backbone_stages=(3, 4, 5)).backbone_stages == (3, 4, 5)
    for bad in [(2, 3), (4, 4), (4.5,)]:
        with pytest.raises(ValueError, match="backbone_stages"):
            DeFeat.Config.for_family("retina", backbone_stages=bad)
    with pytest.raises(ValueError, match="backbone_stages is empty"):
        DeFeat.Config.for_family("retina", backbone_fg_weight=1.0, backbone_stages=())


def test_backbone_terms_refuse_missing_maps():
    config = DeFeat.Config.for_family("retina", backbone_fg_weight=1.0)
    method = DeFeat(config, 2, 2, num_levels=3, student_backbone_channels=(2, 2, 2),
                    teacher_backbone_channels=(2, 2, 2))
    sizes = [(8, 8), (4, 4), (2, 2)]
    valid = [torch.ones(1, 1, h, w, dtype=torch.bool) for h, w in sizes]
    teacher = TeacherBatch(fpn=[torch.zeros(1, 2, h, w) for h, w in sizes], cls=None, box=None, valid=valid,
                           region=None, valid_sizes=[sizes])
    student = DetectorOutput([torch.zeros(1, 2, h, w) for h, w in sizes], [], [], [], (8, 16, 32), [(64, 64)])
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    with pytest.raises(ValueError, match="return_backbone"):
        method(student, teacher, targets, 0)
    student.backbone_features = [torch.zeros(1, 2, h, w) for h, w in sizes]
    with pytest.raises(ValueError, match="'backbone'"):
        method(student, teacher, targets, 0)
    teacher.backbone = {"c4": torch.zeros(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="backbone.c5"):
        method(student, teacher, targets, 0)


def test_trainer_model_asks_the_student_for_stage_maps_only_when_read():
    torch.manual_seed(3)
    teacher_model = build_detector("retina-nano", num_classes=3).eval()
    student = build_detector("retina-nano", num_classes=3)
    released = DistillationModel(student, build_method("defeat", "retina", student_channels=8, teacher_channels=8))
    assert not released.return_backbone
    config = DeFeat.Config.for_family("retina", backbone_fg_weight=4.0, backbone_bg_weight=16.0)
    method = DeFeat(config, student.config.fpn_channels, teacher_model.config.fpn_channels,
                    student_backbone_channels=student.backbone.stage_channels,
                    teacher_backbone_channels=teacher_model.backbone.stage_channels)
    model = DistillationModel(student, method)
    assert model.return_backbone
    sizes = [(64, 96), (40, 60)]
    batch = _batch([torch.randn(3, 64, 96) for _ in sizes], sizes,
                   [torch.tensor([[4.0, 6.0, 40.0, 30.0]]), torch.tensor([[10.0, 10.0, 30.0, 35.0]])])
    samples = extract_fields(teacher_model, batch, "defeat-coco")
    out, terms = model(batch, samples, iteration=0)
    assert out.backbone_features is not None
    assert {"defeat_backbone_fg", "defeat_backbone_bg"} <= set(terms)
    sum(terms.values()).backward()
    layer4 = [p for p in student.backbone.body.layer4.parameters() if p.requires_grad]
    assert layer4 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer4)
    assert all(p.grad is not None for p in method.backbone_adapters.parameters())


# ---------------------------------------------------------------------------------------------- store
@pytest.mark.parametrize("backend", BACKENDS)
def test_backbone_fields_round_trip_through_the_cache(backend):
    torch.manual_seed(4)
    model = build_detector("retina-nano", num_classes=3).eval()
    sizes = [(64, 96), (40, 60), (96, 64)]
    batch = _batch([torch.randn(3, 96, 96) for _ in sizes], sizes, [torch.zeros(0, 4)] * 3)
    fields = resolve_fields("backbone")
    items = [{k: v.numpy() for k, v in sample.items()} for sample in extract_fields(model, batch, fields)]
    manifest = Manifest.create(teacher={"arch": "retina-nano", "checkpoint_sha256": "ab" * 32},
                               dataset={"annotation_sha256": "cd" * 32, "num_images": 3},
                               views=[{"flip": False, "short": 96, "max_size": 160}], fields=fields,
                               calibration=items, backend=backend, num_samples=len(items), shard_size=2)
    assert set(manifest.groups) == {"backbone", "meta"}
    url = f"memory://backbone-{uuid.uuid4().hex}"
    with open_writer(url, manifest) as writer:
        for item in items:
            writer.write(item)
    cache = open_cache(url)
    read = []
    for item in items:
        sample = cache.get(int(item["meta.image_id"]), 0, fields=["backbone", "meta.valid_hw", "meta.image_id"])
        for stage in STAGES:
            got, want = sample[f"backbone.{stage}"], item[f"backbone.{stage}"]
            assert got.shape == want.shape
            error = np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
            assert error <= 0.02, (stage, error)  # klt, max_rel_rmse 0.01 per field
        read.append(sample)
    level_sizes = valid_level_sizes((96, 96))
    teacher = collate_teacher(read, level_sizes, "cpu")
    assert teacher.fpn is None and set(teacher.backbone) == set(STAGES)
    for index, stage in enumerate(STAGES):
        assert tuple(teacher.backbone[stage].shape) == (3, model.backbone.stage_channels[index], *level_sizes[index])
        for n, size in enumerate(sizes):
            h, w = valid_level_sizes(size)[index]
            assert not teacher.backbone[stage][n, :, h:, :].any() and not teacher.backbone[stage][n, :, :, w:].any()
