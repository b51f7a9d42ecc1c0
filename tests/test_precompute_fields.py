"""precompute.fields: LD regions (hand-checked and against a brute-force reference), canonical
dense fields independent of batching, region rows equal to the dense maps, field resolution, and
the optional head fields (FCOS's centerness) a teacher does or does not provide."""
import math

import pytest
import torch

from detectors import build_detector, valid_level_sizes
from detectors.views import Batch, padded_size
from precompute.fields import (ALWAYS_META, GT_META, OPTIONAL_HEAD_FIELDS, TeacherOutputs, artifact_configs,
                               artifacts_for, canonical_anchors, diou_matrix, extract_fields, ld_regions,
                               parse_method_settings, resolve_fields)
from store import FIELDS, LEVELS, REGION_POSITIVE, REGION_VLR, expand_fields
from train.methods import MasKD

torch.set_num_threads(2)


def test_ld_regions_hand_checked_case():
    # One level, four anchors, one GT [0, 0, 10, 10]; topk 9 > 4 so every anchor is a candidate.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0],    # IoU 1,    DIoU 1,                official 1
                            [5.0, 0.0, 15.0, 10.0],    # IoU 1/3,  DIoU 1/3 - 25/325,     official 50/100 - 25/325
                            [10.0, 0.0, 20.0, 10.0],   # IoU 0,    DIoU -100/500 = -0.2,  official -0.2
                            [2.0, 2.0, 8.0, 8.0]])     # IoU 0.36, DIoU 0.36 (same centre), official 36/36 = 1
    torch.testing.assert_close(diou_matrix(anchors, gt)[:, 0], torch.tensor([1.0, 1 / 3 - 25 / 325, -0.2, 0.36]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(diou_matrix(anchors, gt, rule="official")[:, 0],
                               torch.tensor([1.0, 0.5 - 25 / 325, -0.2, 1.0]), atol=1e-5, rtol=0)
    # thr = mean + std (unbiased) of (1, 1/3, 0, 0.36) = 0.42333 + 0.41788 = 0.84121
    ious = [1.0, 1 / 3, 0.0, 0.36]
    mean = sum(ious) / 4
    thr = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 3)
    assert thr == pytest.approx(0.841211, abs=1e-5)

    # positive: IoU >= thr and centre inside the GT -> anchor 0 only.
    # official (default): VLR "DIoU" in [0.2103, 0.8412) -> anchor 1 (0.4231) only; anchor 3 (1.0) is out.
    rows = ld_regions(anchors, [4], gt, topk=9)
    assert rows["kind"].tolist() == [REGION_POSITIVE, REGION_VLR]
    assert rows["index"].tolist() == [0, 1]
    assert rows["level"].tolist() == [0, 0] and rows["gt"].tolist() == [0, 0]
    torch.testing.assert_close(rows["iou"], torch.tensor([1.0, 1 / 3]))
    # true DIoU: anchors 1 (0.2564) and 3 (0.36), weight = IoU.
    rows = ld_regions(anchors, [4], gt, topk=9, vlr_rule="diou")
    assert rows["kind"].tolist() == [REGION_POSITIVE, REGION_VLR, REGION_VLR]
    assert rows["index"].tolist() == [0, 1, 3]
    assert rows["level"].tolist() == [0, 0, 0]
    assert rows["gt"].tolist() == [0, 0, 0]
    torch.testing.assert_close(rows["iou"], torch.tensor([1.0, 1 / 3, 0.36]))
    with pytest.raises(ValueError, match="VLR rule"):
        ld_regions(anchors, [4], gt, vlr_rule="giou")


def test_ld_regions_vlr_goes_to_the_gt_with_the_highest_iou_and_levels_are_split():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]])
    level0 = torch.tensor([[2.0, 2.0, 8.0, 8.0]])      # level 0, index 0
    level1 = torch.tensor([[100.0, 100.0, 110.0, 110.0], [5.0, 0.0, 15.0, 10.0]])  # level 1, indices 0, 1
    for rule in ("official", "diou"):
        rows = ld_regions(torch.cat([level0, level1]), [1, 2], gts, topk=9, vlr_rule=rule)
        ref = _reference_ld_regions(torch.cat([level0, level1]), [1, 2], gts, topk=9, rule=rule)
        assert _rows(rows) == ref
        assert {(lvl, idx) for lvl, idx, *_ in ref} <= {(0, 0), (1, 0), (1, 1)}


def _rows(rows):
    return sorted(zip(rows["level"].tolist(), rows["index"].tolist(), rows["kind"].tolist(), rows["gt"].tolist(),
                      [round(v, 5) for v in rows["iou"].tolist()]))


def _reference_ld_regions(anchors, counts, gts, topk, rule="official"):
    """Brute force in plain Python: ATSS positives and LD's VLR, from the definitions ("official":
    the anchor's area in place of the union in the VLR "DIoU", as the official code)."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    def diou(a, b):
        cw = max(a[2], b[2]) - min(a[0], b[0])
        ch = max(a[3], b[3]) - min(a[1], b[1])
        rho2 = ((a[0] + a[2] - b[0] - b[2]) ** 2 + (a[1] + a[3] - b[1] - b[3]) ** 2) / 4
        if rule == "official":
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            return w * h / ((a[2] - a[0]) * (a[3] - a[1])) - rho2 / (cw * cw + ch * ch)
        return iou(a, b) - rho2 / (cw * cw + ch * ch)

    anchors, gts = anchors.tolist(), gts.tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    level_of = [lvl for lvl, n in enumerate(counts) for _ in range(n)]
    centre = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors]
    best_pos, vlr = {}, {}
    for g, box in enumerate(gts):
        gc = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        candidates = []
        for start, n in zip(starts, counts):
            dist = sorted(range(start, start + n), key=lambda i: math.dist(centre[i], gc))
            candidates += dist[:min(topk, n)]
        values = [iou(anchors[i], box) for i in candidates]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
        thr = mean + std
        for i, v in zip(candidates, values):
            cx, cy = centre[i]
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            if v >= thr and inside and (i not in best_pos or v > best_pos[i][1]):
                best_pos[i] = (g, v)
        for i, a in enumerate(anchors):
            d, v = diou(a, box), iou(a, box)
            if 0.25 * thr <= d < thr and v > 0 and (i not in vlr or v > vlr[i][1]):
                vlr[i] = (g, v)
    out = []
    for kind, table in ((REGION_POSITIVE, best_pos), (REGION_VLR, vlr)):
        for i, (g, v) in table.items():
            out.append((level_of[i], i - starts[level_of[i]], kind, g, round(v, 5)))
    return sorted(out)


@pytest.mark.parametrize("rule", ["official", "diou"])
@pytest.mark.parametrize("gt_box", [[0.0, 0.0, 20.0, 14.0], [30.0, 20.0, 90.0, 62.0], [70.0, 40.0, 96.0, 64.0]])
def test_ld_regions_match_the_reference_on_a_detector_grid(gt_box, rule):
    """A GT at the image's corner, in the middle, and at the far border of a 64x96 GFL anchor grid."""
    model = build_detector("gfl-nano", num_classes=3)
    sizes = valid_level_sizes((64, 96))
    anchors = model.grid_anchors(sizes, torch.zeros(1))
    canonical, counts = canonical_anchors(anchors, sizes, sizes, model.num_anchors)
    gts = torch.tensor([gt_box, [8.0, 30.0, 40.0, 60.0]])
    rows = ld_regions(canonical, counts, gts, topk=9, vlr_rule=rule)
    assert _rows(rows) == _reference_ld_regions(canonical, counts, gts, topk=9, rule=rule)
    assert (rows["kind"] == REGION_POSITIVE).any() and (rows["kind"] == REGION_VLR).any()


def test_ld_regions_without_gt_are_empty():
    rows = ld_regions(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), [1], torch.zeros(0, 4))
    assert all(v.numel() == 0 for v in rows.values())


def _batch(images, sizes, boxes, first_id=10):
    """Zero-padded batch of given valid sizes; image ids first_id, first_id + 1, ..."""
    pad_h = max(padded_size(s)[0] for s in sizes)
    pad_w = max(padded_size(s)[1] for s in sizes)
    padded = torch.zeros(len(images), 3, pad_h, pad_w)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        padded[i, :, :h, :w] = image[:, :h, :w]
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
    return Batch(padded, list(sizes), targets, image_ids=list(range(first_id, first_id + len(images))),
                 view_indices=[(first_id + i) % 2 for i in range(len(images))], views=[None] * len(images),
                 orig_sizes=[(2 * h, 2 * w) for h, w in sizes])


@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano", "fcos-nano"])
def test_fields_of_an_image_do_not_depend_on_its_batch(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3).eval()
    sizes = [(64, 96), (33, 70), (96, 64)]  # canonical 64x96, 64x96, 96x64: two forwards, batch padded 96x96
    images = [torch.randn(3, 96, 96) for _ in sizes]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]),
             torch.tensor([[2.0, 2.0, 30.0, 30.0]]), torch.zeros(0, 4)]  # the last: a negative image
    together = extract_fields(model, _batch(images, sizes, boxes), "all")
    everything = resolve_fields("all", TeacherOutputs.probe(model))
    # "all" holds the centerness exactly when the head has it
    assert ("head.ctr.p3" in everything) == (name == "fcos-nano")
    for i in range(len(sizes)):
        alone = extract_fields(model, _batch([images[i]], [sizes[i]], [boxes[i]], first_id=10 + i), "all")[0]
        assert set(together[i]) == set(alone) == set(everything)
        for key, value in alone.items():
            torch.testing.assert_close(together[i][key], value, rtol=1e-4, atol=1e-4, msg=key)
        level_sizes = valid_level_sizes(sizes[i])
        for level, (h, w) in zip(LEVELS, level_sizes):
            assert alone[f"fpn.{level}"].shape == (model.config.fpn_channels, h, w)
            assert alone[f"head.cls.{level}"].shape == (model.num_anchors * 3, h, w)
            if name == "fcos-nano":
                assert alone[f"head.ctr.{level}"].shape == (1, h, w)
        assert alone["meta.level_hw"].tolist() == [list(s) for s in level_sizes]
        assert alone["meta.valid_hw"].tolist() == list(sizes[i])
        assert alone["meta.orig_hw"].tolist() == [2 * sizes[i][0], 2 * sizes[i][1]]
        assert int(alone["meta.image_id"]) == 10 + i and int(alone["meta.view_index"]) == i % 2
        assert alone["meta.image_id"].dtype == torch.int64 and alone["meta.view_index"].dtype == torch.int32
        torch.testing.assert_close(alone["meta.gt_boxes_xyxy"], boxes[i])


@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano"])
def test_region_rows_are_the_dense_outputs_at_their_locations(name):
    torch.manual_seed(1)
    model = build_detector(name, num_classes=4).eval()
    batch = _batch([torch.randn(3, 64, 96)], [(64, 96)], [torch.tensor([[8.0, 8.0, 60.0, 40.0]])])
    sample = extract_fields(model, batch, "all")[0]
    anchors_per_location, rows = model.num_anchors, sample["region.index"].shape[0]
    assert rows > 0 and sample["region.cls"].shape == (rows, 4)
    for r in range(rows):
        level = LEVELS[int(sample["region.level"][r])]
        cls_map, box_map = sample[f"head.cls.{level}"], sample[f"head.box.{level}"]
        width = cls_map.shape[-1]
        index = int(sample["region.index"][r])
        a, w, h = index % anchors_per_location, (index // anchors_per_location) % width, \
            index // (anchors_per_location * width)
        cls = cls_map.view(anchors_per_location, 4, *cls_map.shape[-2:])[a, :, h, w]
        box = box_map.view(anchors_per_location, -1, *box_map.shape[-2:])[a, :, h, w]
        torch.testing.assert_close(sample["region.cls"][r], cls)
        torch.testing.assert_close(sample["region.box_dist"][r], box)
    assert sample["region.gt"].max() < sample["meta.gt_boxes_xyxy"].shape[0]


def test_fcos_dense_fields_are_the_model_outputs_on_the_canonical_region():
    """head.cls/box/ctr of an FCOS teacher are its own maps (box: side distances in stride units)."""
    torch.manual_seed(4)
    model = build_detector("fcos-nano", num_classes=3).eval()
    batch = _batch([torch.randn(3, 64, 96)], [(64, 96)], [torch.tensor([[8.0, 8.0, 60.0, 40.0]])])
    sample = extract_fields(model, batch, ["fpn", "head"])[0]
    with torch.no_grad():
        out = model(batch.images, batch.image_sizes)
    for level, name in enumerate(LEVELS):
        h, w = valid_level_sizes((64, 96))[level]
        for field, maps in (("fpn", out.features), ("head.cls", out.cls_logits), ("head.box", out.box_outputs),
                            ("head.ctr", out.centerness)):
            assert torch.equal(sample[f"{field}.{name}"], maps[level][0, :, :h, :w]), f"{field}.{name}"
    assert (sample["head.box.p3"] >= 0).all()  # ReLU'd distances (norm_on_bbox)


@pytest.mark.parametrize("name,family", [("gfl-nano", "gfl"), ("retina-nano", "retina")])
def test_a_teacher_without_centerness_refuses_head_ctr_and_leaves_it_out_of_groups(name, family):
    torch.manual_seed(5)
    model = build_detector(name, num_classes=3).eval()
    teacher = TeacherOutputs.probe(model)
    assert teacher == TeacherOutputs(family, ("head.ctr",))
    for spec in ("head.ctr", "head.ctr.p4", "fpn,head.ctr"):
        with pytest.raises(ValueError, match=f"a '{family}' teacher has no centerness output.*only a head with "
                                             f"that branch \\(FCOS\\)"):
            resolve_fields(spec, teacher)
    batch = _batch([torch.randn(3, 64, 64)], [(64, 64)], [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=f"'{family}' teacher has no centerness"):
        extract_fields(model, batch, "head.ctr.p3")
    # groups and "all" leave it out
    assert set(resolve_fields("head", teacher)) == set(expand_fields(["head.cls", "head.box"]) + list(ALWAYS_META))
    assert resolve_fields("all", teacher) == resolve_fields("all")
    assert set(extract_fields(model, batch, "head")[0]) == set(resolve_fields("head", teacher))


def test_groups_bring_the_centerness_of_a_teacher_that_has_it():
    # the schema's optional fields are those precompute reads from an optional DetectorOutput attribute
    assert {n.rsplit(".", 1)[0] for n, spec in FIELDS.items() if spec.optional} == set(OPTIONAL_HEAD_FIELDS)
    fcos = TeacherOutputs("fcos", ())
    ctr = expand_fields(["head.ctr"])
    assert ctr == [f"head.ctr.p{i}" for i in range(3, 8)]
    assert set(resolve_fields("all", fcos)) == set(resolve_fields("all")) | set(ctr)
    assert set(resolve_fields("head", fcos)) == set(resolve_fields("head")) | set(ctr)
    assert resolve_fields("fpn,head.cls", fcos) == resolve_fields("fpn,head.cls")   # a prefix: only what it names
    assert resolve_fields("frs", fcos) == resolve_fields("frs")                       # no method reads it
    assert set(resolve_fields("head.ctr.p5")) == {"head.ctr.p5", *ALWAYS_META}      # the vocabulary has it by name
    assert "head.ctr.p3" not in resolve_fields("all")                               # no teacher: groups without it
    # a method without official values for the teacher's family is refused (its cache would be unusable)
    with pytest.raises(ValueError, match=r"--fields ld: LDConfig has no official settings for detector family "
                                         r"'fcos' \(LD distils box distributions"):
        resolve_fields("frs,ld", fcos)
    with pytest.raises(ValueError, match=r"--fields defeat-coco: DeFeatConfig .* 'fcos' \(the official code"):
        resolve_fields("defeat-coco", fcos)
    with pytest.raises(ValueError, match=r"--fields ld: .* 'retina'"):
        resolve_fields("ld", TeacherOutputs("retina", ("head.ctr",)))
    # schema order, the centerness after the box outputs
    names = resolve_fields("all", fcos)
    assert names.index("head.box.p7") < names.index("head.ctr.p3") < names.index("region.level")


def test_the_probe_leaves_the_teacher_as_it_was():
    model = build_detector("fcos-nano", num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert TeacherOutputs.probe(model) == TeacherOutputs("fcos", ())
    assert model.training  # restored; BatchNorm running statistics untouched (the probe ran in eval mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_autocast_outputs_are_float32_and_close():
    torch.manual_seed(2)
    model = build_detector("gfl-nano", num_classes=3).eval()
    batch = _batch([torch.randn(3, 64, 64)], [(64, 64)], [torch.tensor([[8.0, 8.0, 40.0, 40.0]])])
    exact = extract_fields(model, batch, ["fpn", "region"])[0]
    amp = extract_fields(model, batch, ["fpn", "region"], amp_dtype=torch.bfloat16)[0]
    assert amp["fpn.p3"].dtype == torch.float32
    rel = (amp["fpn.p3"] - exact["fpn.p3"]).norm() / exact["fpn.p3"].norm()
    assert rel < 0.05
    assert amp["region.index"].tolist() == exact["region.index"].tolist()  # regions need no forward


def test_resolve_fields_methods_groups_and_always_meta():
    assert resolve_fields("none") == list(ALWAYS_META)
    frs = resolve_fields("frs")
    assert set(frs) == set(expand_fields(["fpn", "head.cls"]) + list(ALWAYS_META))
    ld = resolve_fields(["ld"])
    assert set(ld) == set(expand_fields(["region"]) + list(ALWAYS_META + GT_META))
    assert set(resolve_fields("region.cls")) == set(ld)  # a region field brings all region rows and the GT
    everything = resolve_fields("all")
    assert set(everything) == set(expand_fields(["fpn", "head", "region", "meta"]))
    assert set(resolve_fields("frs,ld,icd,maskd,defeat")) == set(everything)
    with pytest.raises(Exception, match="not a field"):
        resolve_fields("fpn,bogus")
    with pytest.raises(Exception, match="not a field"):
        resolve_fields("kd")  # neither a method of the registry nor a field


def test_method_names_bring_their_artefacts():
    assert artifacts_for("all") == artifacts_for("maskd") == {"maskd_tokens": MasKD}
    assert artifacts_for("frs,ld,fpn") == artifacts_for("defeat-coco") == {}
    # the method's config (precompute --set, the teacher's family) turns the tokens off
    for family in ("retina", "gfl"):
        assert artifacts_for("all", artifact_configs("all", family)) == {"maskd_tokens": MasKD}
        assert artifacts_for("all", artifact_configs("all", family, {"maskd.stage1_iters": 0})) == {}
        assert artifacts_for("maskd", artifact_configs("maskd", family, {"stage1_iters": 0})) == {}
    # --set keys are those of the methods --fields names, parsed by their rules
    assert parse_method_settings("all", {"stage1_iters": "500"}) == {"maskd.stage1_iters": 500}
    assert parse_method_settings("maskd,fpn", {"maskd.stage1_lr": "0.02"}) == {"maskd.stage1_lr": 0.02}
    with pytest.raises(ValueError, match="unknown override keys"):
        parse_method_settings("frs,ld", {"maskd.stage1_iters": "5"})
    with pytest.raises(ValueError, match="names no method"):
        parse_method_settings("fpn", {"maskd.stage1_iters": "5"})
    with pytest.raises(ValueError, match=r"--set stage1_iters='-1'"):
        parse_method_settings("all", {"stage1_iters": "-1"})


def test_cache_options_record_the_vlr_rule_only_with_regions():
    from precompute.fields import cache_options
    assert cache_options(resolve_fields("ld")) == {"ld_vlr_rule": "official"}
    assert cache_options(resolve_fields("all"), "diou") == {"ld_vlr_rule": "diou"}
    assert cache_options(resolve_fields("frs")) == {}
    with pytest.raises(ValueError, match="VLR rule"):
        cache_options(resolve_fields("ld"), "giou")


def test_extract_fields_passes_the_vlr_rule_to_the_regions():
    torch.manual_seed(3)
    model = build_detector("gfl-nano", num_classes=3).eval()
    batch = _batch([torch.randn(3, 64, 96)], [(64, 96)], [torch.tensor([[10.0, 6.0, 50.0, 40.0]])])
    for rule in ("official", "diou"):
        sample = extract_fields(model, batch, "ld", ld_vlr_rule=rule)[0]
        sizes = valid_level_sizes((64, 96))
        canonical, counts = canonical_anchors(model.grid_anchors(sizes, torch.zeros(1)), sizes, sizes,
                                              model.num_anchors)
        rows = ld_regions(canonical, counts, batch.targets[0]["boxes"], topk=9, vlr_rule=rule)
        assert sample["region.index"].tolist() == rows["index"].tolist()
        assert sample["region.kind"].tolist() == rows["kind"].tolist()
