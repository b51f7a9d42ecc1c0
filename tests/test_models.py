"""Detector zoo: torchvision RetinaNet equivalence, the forward API of every name, valid regions, checkpoints."""
import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from detectors import (FAMILIES, IGNORE, Detector, DetectorConfig, DetectorOutput, GFLConfig, RetinaNetConfig,
                       build_detector, config_from_dict, convert_torchvision_retinanet, flatten_levels, get_config,
                       list_models, load_checkpoint, save_checkpoint, valid_level_sizes)
from detectors.zoo import CHECKPOINT_FORMAT
from detectors.atss import atss_assign
from detectors.gfl import integral

# The dense families' names (DetectorOutput); the two-stage family's forward is tested in tests/test_frcnn.py.
DENSE_MODELS = [name for name in list_models() if issubclass(FAMILIES[get_config(name).family], Detector)]
SMALL_MODELS = [name for name in DENSE_MODELS if name.endswith(("-small", "-nano"))]


def make_targets(num_classes: int = 3) -> list[dict[str, torch.Tensor]]:
    """Targets for a 2-image batch: image 0 (64x96) with two boxes, image 1 (50x60) with none."""
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [50.0, 20.0, 90.0, 62.0]]),
         "labels": torch.tensor([1, num_classes - 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_retina_r50_matches_torchvision_retinanet():
    """A random torchvision retinanet_resnet50_fpn state dict loads strictly and gives identical outputs.

    Both run on the same normalised, padded tensor (torchvision's transform is bypassed). The batch
    is a multiple of 128 so that torchvision's anchor strides (padded size // map size) are exact.
    """
    torch.manual_seed(0)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    for module in reference.head.modules():  # scores above 0.05, so that post-processing has work to do
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.03)
            torch.nn.init.normal_(module.bias, std=0.5)
    state_dict = convert_torchvision_retinanet(reference.state_dict())
    # frozen_bn (the default) loads the BatchNorm keys; "bn" evaluates with the very same ops.
    build_detector("retina-r50", num_classes=5).load_state_dict(state_dict, strict=True)
    model = build_detector("retina-r50", num_classes=5, norm="bn").eval()
    model.load_state_dict(state_dict, strict=True)

    images = torch.randn(1, 3, 128, 256)
    image_sizes = [(120, 250)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0], [100.0, 8.0, 240.0, 60.0]]),
                "labels": torch.tensor([1, 4])}]
    with torch.no_grad():
        features = list(reference.backbone(images).values())
        head_outputs = reference.head(features)
        anchors = reference.anchor_generator(ImageList(images, image_sizes), features)
        per_level = [f.shape[-2] * f.shape[-1] * 9 for f in features]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        expected = reference.postprocess_detections(split_outputs, [list(a.split(per_level)) for a in anchors],
                                                    image_sizes)[0]
        expected_losses = reference.compute_loss(targets, head_outputs, anchors)
        out = model(images, image_sizes, targets)
        detections = model.postprocess(out)[0]

    assert torch.equal(torch.cat(out.anchors), anchors[0])
    assert torch.equal(flatten_levels(out.cls_logits, 9), head_outputs["cls_logits"])
    assert torch.equal(flatten_levels(out.box_outputs, 9), head_outputs["bbox_regression"])
    assert len(expected["boxes"]) == 300
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(detections[key], expected[key]), key
    torch.testing.assert_close(out.losses["cls"], expected_losses["classification"])
    torch.testing.assert_close(out.losses["box"], expected_losses["bbox_regression"])


@pytest.mark.parametrize("name", DENSE_MODELS)
def test_forward_api_shapes(name):
    """Every registered name: DetectorOutput shapes, assignment, finite losses; backward for small models."""
    torch.manual_seed(0)
    num_classes = 3
    model = build_detector(name, num_classes=num_classes)
    config = model.config
    images = torch.randn(2, 3, 64, 96)
    image_sizes = [(64, 96), (50, 60)]
    small = name in SMALL_MODELS
    with torch.set_grad_enabled(small):
        out = model(images, image_sizes, make_targets(num_classes))
    assert isinstance(out, DetectorOutput)
    num_anchors = 9 if config.family == "retina" else 1
    box_channels = 4 * (config.reg_max + 1) if config.family == "gfl" else 4 * num_anchors
    level_shapes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert out.strides == (8, 16, 32, 64, 128)
    for level, (h, w) in enumerate(level_shapes):
        assert out.features[level].shape == (2, config.fpn_channels, h, w)
        assert out.cls_logits[level].shape == (2, num_anchors * num_classes, h, w)
        assert out.box_outputs[level].shape == (2, box_channels, h, w)
        assert out.anchors[level].shape == (h * w * num_anchors, 4)
    total_anchors = sum(h * w for h, w in level_shapes) * num_anchors
    for assignment, target in zip(out.assignment, make_targets(num_classes)):
        matched_gt = assignment["matched_gt"]
        assert matched_gt.shape == (total_anchors,) and matched_gt.dtype == torch.long
        assert int(matched_gt.min()) >= IGNORE and int(matched_gt.max()) < max(1, len(target["boxes"]))
        if config.family == "gfl":
            assert assignment["atss_threshold"].shape == (len(target["boxes"]),)
    assert (out.assignment[0]["matched_gt"] >= 0).any()
    assert (out.assignment[1]["matched_gt"] == IGNORE).any()  # image 1's batch padding
    expected_terms = {"retina": {"cls", "box"}, "gfl": {"qfl", "dfl", "giou"}, "fcos": {"cls", "box", "centerness"}}
    assert set(out.losses) == expected_terms[config.family]
    assert (out.centerness is not None) == (config.family == "fcos")
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    if small:
        sum(out.losses.values()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad)
        model.eval()
        with torch.no_grad():
            detections = model.postprocess(model(images, image_sizes))
        for det, (h, w) in zip(detections, image_sizes):
            assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= config.detections_per_img
            assert len(det["scores"]) == len(det["labels"]) == len(det["boxes"])
            assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()


@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano"])
def test_batch_without_any_gt_has_finite_losses_and_gradients(name):
    model = build_detector(name, num_classes=3)
    empty = make_targets()[1]
    out = model(torch.randn(2, 3, 64, 64), [(64, 64), (40, 50)], [empty, empty])
    assert all((a["matched_gt"] < 0).all() for a in out.assignment)
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano"])
def test_amp_forward_keeps_anchors_assignment_and_losses_in_float32(name):
    """amp_dtype: backbone and head under bf16 autocast; maps float32 copies, anchors exactly float32's."""
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3)
    images, image_sizes = torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)]
    with torch.no_grad():
        full = model(images, image_sizes, make_targets(), return_backbone=True)
        amp = model(images, image_sizes, make_targets(), return_backbone=True, amp_dtype=torch.bfloat16)
    maps = amp.features + amp.cls_logits + amp.box_outputs + amp.backbone_features
    assert all(m.dtype == torch.float32 for m in maps)
    assert all(torch.equal(a, b) for a, b in zip(amp.anchors, full.anchors))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in amp.losses.values())
    assert set(amp.losses) == set(full.losses)
    for reduced, reference in zip(amp.features, full.features):
        assert not torch.equal(reduced, reference)  # autocast did run
        assert float((reduced - reference).norm() / reference.norm()) < 0.05  # bf16: 2-3% here
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 60, 96), [(60, 96)], amp_dtype=torch.bfloat16)  # inputs checked on this path too


def test_valid_level_sizes():
    assert valid_level_sizes((64, 96)) == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    # canonical padding first (50x60 -> 64x64), then ceil halving for P6/P7
    assert valid_level_sizes((50, 60)) == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert valid_level_sizes((800, 1333)) == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano"])
def test_valid_region_in_padded_batch_matches_canonical_run(name):
    """A 64x96 image alone (padded 64x96) vs in a 128x160 batch: same level sizes, anchors, assignment."""
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3)
    image = torch.randn(3, 64, 96)
    target = make_targets()[0]
    with torch.no_grad():
        alone = model(image[None], [(64, 96)], [target])
        batch = torch.zeros(2, 3, 128, 160)
        batch[0, :, :64, :96] = image
        batch[1, :, :100, :150] = torch.randn(3, 100, 150)
        batched = model(batch, [(64, 96), (100, 150)], [target, make_targets()[1]])

    valid = model.valid_anchor_mask((64, 96), [tuple(m.shape[-2:]) for m in batched.cls_logits])
    assert valid_level_sizes((64, 96)) == [tuple(m.shape[-2:]) for m in alone.cls_logits]
    a = model.num_anchors
    for level, (h, w) in enumerate(valid_level_sizes((64, 96))):
        big_h, big_w = batched.cls_logits[level].shape[-2:]
        region = batched.anchors[level].view(big_h, big_w, a, 4)[:h, :w].reshape(-1, 4)
        assert torch.equal(region, alone.anchors[level])
    matched_batch = batched.assignment[0]["matched_gt"]
    assert torch.equal(matched_batch[valid], alone.assignment[0]["matched_gt"])
    assert (matched_batch[~valid] == IGNORE).all()
    assert (alone.assignment[0]["matched_gt"] >= 0).sum() > 0
    if name.startswith("gfl"):
        torch.testing.assert_close(batched.assignment[0]["atss_threshold"], alone.assignment[0]["atss_threshold"])
        # and the model's assignment is ATSS on the valid anchors
        direct = atss_assign(torch.cat(alone.anchors), [len(x) for x in alone.anchors], target["boxes"])
        assert torch.equal(direct.matched_gt, alone.assignment[0]["matched_gt"])


def test_gfl_head_structure_and_decode():
    model = build_detector("gfl-nano", num_classes=3)
    head = model.head
    assert len(head.cls_convs) == 2 and len(head.scales) == 5
    conv_block = head.cls_convs[0]
    assert conv_block[0].bias is None and conv_block[1].num_groups == 16  # gcd(32, 32 // 2)
    torch.testing.assert_close(head.gfl_cls.bias, torch.full((3,), -torch.log(torch.tensor(99.0)).item()))
    assert head.gfl_reg.out_channels == 68
    # decode: centre (16, 8), stride 8, distances (1, 2, 3, 4) bins -> one-hot distributions
    logits = torch.full((1, 4, 17), -1e4)
    for side, bin_index in enumerate((1, 2, 3, 4)):
        logits[0, side, bin_index] = 0.0
    box = model.decode_boxes(logits.reshape(1, 68), torch.tensor([[-16.0, -24.0, 48.0, 40.0]]), 8)
    torch.testing.assert_close(box, torch.tensor([[16.0 - 8, 8.0 - 16, 16.0 + 24, 8.0 + 32]]))
    torch.testing.assert_close(integral(logits.reshape(1, 68), 16), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_gfl_anchors_one_square_per_location():
    model = build_detector("gfl-nano", num_classes=3)
    anchors = model.grid_anchors([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)], torch.zeros(1))
    # P3 stride 8, side 64, centred at (j*8, i*8), order (h, w)
    expected = torch.tensor([[x - 32.0, y - 32.0, x + 32.0, y + 32.0] for y in (0, 8) for x in (0, 8, 16)])
    assert torch.equal(anchors[0], expected)
    assert torch.equal(anchors[4], torch.tensor([[-512.0, -512.0, 512.0, 512.0]]))


def test_neck_options():
    torch.manual_seed(0)
    config = GFLConfig(depth=None, blocks=(1, 1, 1, 1), widths=(8, 16, 24, 32), norm="gn",
                       fpn_channels=16, head_convs=1, p6_from="c5", relu_before_p7=True, trainable_layers=5)
    model = build_detector(config)
    extra = model.backbone.fpn.extra_blocks
    assert extra.p6.in_channels == 32 and extra.relu_before_p7
    assert model.backbone.body.bn1.num_groups == 4  # gcd(32, 8 // 2)
    assert build_detector("gfl-r50").head.cls_convs[0][1].num_groups == 32  # mmdetection's GN(32) at 256
    c5 = torch.randn(1, 32, 4, 4)
    p, names = extra([torch.randn(1, 16, 4, 4)], [c5], ["c5"])
    assert names == ["c5", "p6", "p7"]
    torch.testing.assert_close(p[2], extra.p7(torch.relu(extra.p6(c5))))
    assert not build_detector("gfl-nano").backbone.fpn.extra_blocks.relu_before_p7
    assert build_detector("retina-nano").backbone.fpn.extra_blocks.relu_before_p7


def test_trainable_layers_freeze_stem_and_layer1():
    model = build_detector("gfl-r18", num_classes=3, norm="bn")  # default trainable_layers=3
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    model.train()
    assert not body.bn1.training and not body.layer1.training and body.layer2.training


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="known models: .*gfl-small"):
        build_detector("gfl-huge")
    with pytest.raises(ValueError, match="unknown DetectorConfig keys \\['fpn_chanels'\\]"):
        build_detector("gfl-nano", fpn_chanels=32)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector("gfl-nano")(torch.zeros(1, 3, 40, 64), [(40, 64)])
    config = build_detector("retina-nano", num_classes=7).config
    assert config_from_dict(config.to_dict()) == config
    assert config.nms_thresh == 0.5 and config.detections_per_img == 300
    assert build_detector("r50").config.family == "gfl"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_config_holds_only_its_own_keys(family):
    """Each family's config: its own keys and defaults, a dict round trip, and no other family's keys."""
    config = get_config(f"{family}-nano", num_classes=3)
    assert type(config) is FAMILIES[family].config_class and config.family == family
    values = config.to_dict()
    assert values["family"] == family and config_from_dict(values) == config
    assert set(values) == {"family", *type(config).keys()}
    others = {key for cls in FAMILIES.values() for key in cls.config_class.keys()} - set(type(config).keys())
    assert others  # the families differ in at least one key
    with pytest.raises(ValueError, match=f"unknown DetectorConfig keys .* for family '{family}'"):
        build_detector(f"{family}-nano", **{sorted(others)[0]: 0.3})
    with pytest.raises(ValueError, match="needs a"):
        FAMILIES[family](next(c for c in (GFLConfig(), RetinaNetConfig()) if c.family != family))


def test_family_defaults_and_shared_base():
    gfl, retina = GFLConfig(), RetinaNetConfig()
    assert (gfl.relu_before_p7, gfl.nms_thresh, gfl.detections_per_img) == (False, 0.6, 100)  # mmdetection
    assert (retina.relu_before_p7, retina.nms_thresh, retina.detections_per_img) == (True, 0.5, 300)  # torchvision
    assert (gfl.reg_max, gfl.atss_topk, gfl.qfl_weight, gfl.dfl_weight, gfl.giou_weight) == (16, 9, 1.0, 0.25, 2.0)
    assert (retina.fg_iou_thresh, retina.bg_iou_thresh) == (0.5, 0.4)
    with pytest.raises(TypeError, match="shared keys only"):
        DetectorConfig(relu_before_p7=True, nms_thresh=0.5, detections_per_img=1)
    with pytest.raises(ValueError, match="unknown detector family 'yolo'"):
        config_from_dict({"family": "yolo"})


# Configs as checkpoints and cache manifests stored them before configs were per family: one flat
# dict with every family's keys (the other family's had no effect on the model).
FLAT_LAYOUT = {
    "gfl": {"family": "gfl", "num_classes": 3, "name": "gfl-nano", "depth": None, "blocks": [1, 1, 1, 1],
            "widths": [8, 16, 32, 64], "norm": "bn", "norm_eps": 1e-05, "trainable_layers": 5,
            "backbone_weights": None, "fpn_channels": 32, "p6_from": "p5", "relu_before_p7": False,
            "head_convs": 2, "reg_max": 16, "atss_topk": 9, "qfl_weight": 1.0, "dfl_weight": 0.25,
            "giou_weight": 2.0, "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4, "score_thresh": 0.05,
            "topk_candidates": 1000, "nms_thresh": 0.6, "detections_per_img": 100},
    "retina": {"family": "retina", "num_classes": 3, "name": "retina-nano", "depth": None, "blocks": [1, 1, 1, 1],
               "widths": [8, 16, 32, 64], "norm": "bn", "norm_eps": 1e-05, "trainable_layers": 5,
               "backbone_weights": None, "fpn_channels": 32, "p6_from": "p5", "relu_before_p7": True,
               "head_convs": 2, "reg_max": 16, "atss_topk": 9, "qfl_weight": 1.0, "dfl_weight": 0.25,
               "giou_weight": 2.0, "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4, "score_thresh": 0.05,
               "topk_candidates": 1000, "nms_thresh": 0.5, "detections_per_img": 300},
}


@pytest.mark.parametrize("family", sorted(FLAT_LAYOUT))
def test_checkpoint_with_the_flat_config_layout_loads(tmp_path, family):
    """A checkpoint written before per-family configs (every family's keys in one dict) still loads."""
    torch.manual_seed(0)
    model = build_detector(f"{family}-nano", num_classes=3).eval()
    assert model.config == config_from_dict(FLAT_LAYOUT[family])
    path = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": FLAT_LAYOUT[family], "state_dict": model.state_dict(),
                "extra": {"epoch": 1}}, path)
    loaded, extra = load_checkpoint(path)
    assert extra == {"epoch": 1} and type(loaded) is type(model) and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="unknown DetectorConfig keys \\['fpn_chanels'\\]"):
        config_from_dict({**FLAT_LAYOUT[family], "fpn_chanels": 32})


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_detector("gfl-nano", num_classes=4, score_thresh=0.01).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, epoch=3, metrics={"AP": 1.5})
    loaded, extra = load_checkpoint(path)
    assert extra == {"epoch": 3, "metrics": {"AP": 1.5}}
    assert loaded.config == model.config and type(loaded) is type(model) and not loaded.training
    for (key, a), (key_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert key == key_b and torch.equal(a, b)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(images, [(64, 64)]), loaded(images, [(64, 64)])
    assert all(torch.equal(x, y) for x, y in zip(a.cls_logits + a.box_outputs, b.cls_logits + b.box_outputs))
