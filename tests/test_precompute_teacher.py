"""Teacher loading: mmdetection RetinaNet/GFL key conversion (synthetic state dicts in mmdetection's
layout, R50 shapes), the neck semantics of converted teachers, torchvision and project checkpoints."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detectors import build_detector, save_checkpoint
from detectors.convert import (convert_mmdet_gfl, convert_mmdet_retinanet, detect_source, infer_resnet_depth,
                               select_retinanet_classes, unwrap_state_dict)
from precompute.teacher import as_recorded, load_teacher, neck_head_state

torch.set_num_threads(2)
NUM_CLASSES = 80
REG_MAX = 16


def _resnet50_backbone() -> dict[str, torch.Tensor]:
    """mmdetection's ResNet-50 keys are torchvision's (conv1, bn1, layerX.Y.{conv,bn}N, downsample.{0,1})."""
    body = torchvision.models.resnet50(weights=None).state_dict()
    return {f"backbone.{k}": torch.randn_like(v) if v.is_floating_point() else v
            for k, v in body.items() if not k.startswith("fc.")}


def _mmdet_neck(p6_in_channels: int) -> dict[str, torch.Tensor]:
    neck = {}
    for i, c in enumerate((512, 1024, 2048)):  # start_level=1: C3..C5
        neck[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(256, c, 1, 1) * 0.02
        neck[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(256) * 0.1
    for i in range(5):  # 3 output convs + 2 extra convs (P6, P7)
        in_channels = p6_in_channels if i == 3 else 256
        neck[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, in_channels, 3, 3) * 0.02
        neck[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256) * 0.1
    return neck


def mmdet_retinanet_r50() -> dict[str, torch.Tensor]:
    """retinanet_r50_fpn_1x_coco layout: add_extra_convs='on_input' (P6 conv on C5, 2048 channels)."""
    state = {**_resnet50_backbone(), **_mmdet_neck(p6_in_channels=2048)}
    for tower in ("cls", "reg"):
        for i in range(4):
            state[f"bbox_head.{tower}_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3) * 0.01
            state[f"bbox_head.{tower}_convs.{i}.conv.bias"] = torch.randn(256) * 0.01
    state["bbox_head.retina_cls.weight"] = torch.randn(9 * NUM_CLASSES, 256, 3, 3) * 0.01
    state["bbox_head.retina_cls.bias"] = torch.randn(9 * NUM_CLASSES)
    state["bbox_head.retina_reg.weight"] = torch.randn(9 * 4, 256, 3, 3) * 0.01
    state["bbox_head.retina_reg.bias"] = torch.randn(9 * 4)
    return state


def mmdet_gfl_r50() -> dict[str, torch.Tensor]:
    """gfl_r50_fpn_1x_coco layout: add_extra_convs='on_output', GN towers without conv bias, Scales, Integral."""
    state = {**_resnet50_backbone(), **_mmdet_neck(p6_in_channels=256)}
    for tower in ("cls", "reg"):
        for i in range(4):
            state[f"bbox_head.{tower}_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3) * 0.01
            state[f"bbox_head.{tower}_convs.{i}.gn.weight"] = 1 + torch.randn(256) * 0.1
            state[f"bbox_head.{tower}_convs.{i}.gn.bias"] = torch.randn(256) * 0.1
    state["bbox_head.gfl_cls.weight"] = torch.randn(NUM_CLASSES, 256, 3, 3) * 0.01
    state["bbox_head.gfl_cls.bias"] = torch.randn(NUM_CLASSES)
    state["bbox_head.gfl_reg.weight"] = torch.randn(4 * (REG_MAX + 1), 256, 3, 3) * 0.01
    state["bbox_head.gfl_reg.bias"] = torch.randn(4 * (REG_MAX + 1))
    for i in range(5):
        state[f"bbox_head.scales.{i}.scale"] = torch.tensor(1.0 + 0.1 * i)
    state["bbox_head.integral.project"] = torch.linspace(0, REG_MAX, REG_MAX + 1)
    return state


def _mmdet_fpn_reference(state, c3, c4, c5, p6_on_input: bool) -> list[torch.Tensor]:
    """mmdetection's FPN forward from raw weights: laterals, top-down nearest upsampling, 3x3 outputs,
    P6 = stride-2 conv on C5 (on_input) or on the P5 output (on_output), P7 on P6 with no ReLU."""
    def conv(x, name, stride=1, padding=1):
        return F.conv2d(x, state[f"{name}.conv.weight"], state[f"{name}.conv.bias"], stride, padding)
    laterals = [conv(x, f"neck.lateral_convs.{i}", padding=0) for i, x in enumerate((c3, c4, c5))]
    for i in (2, 1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                          mode="nearest")
    outs = [conv(x, f"neck.fpn_convs.{i}") for i, x in enumerate(laterals)]
    p6 = conv(c5 if p6_on_input else outs[-1], "neck.fpn_convs.3", stride=2)
    return outs + [p6, conv(p6, "neck.fpn_convs.4", stride=2)]


@pytest.mark.parametrize("family,make,convert,p6_on_input", [
    ("retina", mmdet_retinanet_r50, convert_mmdet_retinanet, True),
    ("gfl", mmdet_gfl_r50, convert_mmdet_gfl, False),
])
def test_mmdet_checkpoint_converts_and_loads_strictly(family, make, convert, p6_on_input, tmp_path):
    torch.manual_seed(0)
    mmdet_state = make()
    assert detect_source(mmdet_state) == ("mmdet", family)
    assert infer_resnet_depth(mmdet_state) == 50
    converted = convert({"meta": {"mmdet_version": "2.25.0", "CLASSES": ["a"] * 80}, "state_dict": mmdet_state})

    path = tmp_path / f"{family}_r50_mmdet.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ["a"] * 80}, "state_dict": mmdet_state,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    teacher = load_teacher("r50", path, num_classes=NUM_CLASSES)  # strict load inside: no missing/unexpected
    model = teacher.model
    assert teacher.source == "mmdet" and teacher.arch == f"{family}-r50" and len(teacher.sha256) == 64
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    missing, unexpected = build_detector(model.config).load_state_dict(converted, strict=False)
    assert missing == [] and unexpected == []
    assert model.config.relu_before_p7 is False and model.config.p6_from == ("c5" if p6_on_input else "p5")
    ours = model.state_dict()
    torch.testing.assert_close(ours["backbone.fpn.extra_blocks.p6.weight"], mmdet_state["neck.fpn_convs.3.conv.weight"])
    torch.testing.assert_close(ours["backbone.fpn.extra_blocks.p7.bias"], mmdet_state["neck.fpn_convs.4.conv.bias"])
    torch.testing.assert_close(ours["backbone.body.layer3.5.bn2.running_var"],
                               mmdet_state["backbone.layer3.5.bn2.running_var"])
    if family == "gfl":
        torch.testing.assert_close(ours["head.cls_convs.2.1.weight"], mmdet_state["bbox_head.cls_convs.2.gn.weight"])
        torch.testing.assert_close(ours["head.scales.4.scale"], mmdet_state["bbox_head.scales.4.scale"])

    # The converted neck computes mmdetection's P3..P7 from the same C3..C5.
    c3, c4, c5 = torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4), torch.randn(1, 2048, 2, 2)
    with torch.no_grad():
        ours_p = list(model.backbone.fpn({"c3": c3, "c4": c4, "c5": c5}).values())
        reference = _mmdet_fpn_reference(mmdet_state, c3, c4, c5, p6_on_input)
    for level, (a, b) in enumerate(zip(ours_p, reference)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"P{level + 3}")


def test_conversion_refuses_unknown_keys_and_a_wrong_integral():
    state = mmdet_gfl_r50()
    with pytest.raises(ValueError, match="no counterpart"):
        convert_mmdet_gfl({**state, "bbox_head.loss_weights": torch.ones(1)})
    with pytest.raises(ValueError, match="integral"):
        convert_mmdet_gfl({**state, "bbox_head.integral.project": torch.linspace(0, 1, REG_MAX + 1)})


def test_unwrap_nesting_and_module_prefix():
    inner = {"module.head.gfl_cls.weight": torch.zeros(1)}
    assert list(unwrap_state_dict({"state_dict": inner, "meta": {}})) == ["head.gfl_cls.weight"]
    assert list(unwrap_state_dict({"model": inner})) == ["head.gfl_cls.weight"]


def test_torchvision_coco_classes_are_reduced_to_the_dataset(tmp_path):
    torch.manual_seed(0)
    source = build_detector("retina-nano", num_classes=91)
    state = source.state_dict()
    cat_ids = [1, 3, 90]  # dataset labels 0, 1, 2 -> torchvision's class indices (= COCO category ids)
    reduced = select_retinanet_classes(state, cat_ids)
    weight = reduced["head.classification_head.cls_logits.weight"]
    assert weight.shape[0] == 9 * 3
    torch.testing.assert_close(weight[1 * 3 + 2], state["head.classification_head.cls_logits.weight"][1 * 91 + 90])


def test_project_checkpoint_spec_is_checked(tmp_path):
    model = build_detector("gfl-nano", num_classes=3)
    path = tmp_path / "t.pt"
    save_checkpoint(path, model)
    teacher = load_teacher("gfl-nano", path, num_classes=3)
    assert teacher.source == "project" and teacher.arch == "gfl-nano"
    assert all(k.startswith(("backbone.fpn.", "head.")) for k in neck_head_state(teacher.model))
    assert load_teacher("auto", path).arch == "gfl-nano"
    with pytest.raises(ValueError, match="does not hold a gfl-small"):
        load_teacher("gfl-small", path)
    with pytest.raises(ValueError, match="predicts 3 classes"):
        load_teacher(None, path, num_classes=80)
    with pytest.raises(ValueError, match="not a mmdet checkpoint"):
        load_teacher(None, path, source="mmdet")


@pytest.mark.parametrize("name,other_keys", [("gfl-nano", {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4}),
                                             ("retina-nano", {"reg_max": 16, "atss_topk": 9, "qfl_weight": 1.0,
                                                              "dfl_weight": 0.25, "giou_weight": 2.0})])
def test_a_flat_config_recorded_by_an_earlier_version_declares_the_same_teacher(name, other_keys):
    """Caches declared before per-family configs record every family's keys; resuming one must find
    the same teacher (else precompute refuses it as declared differently), and a different one must not."""
    config = build_detector(name, num_classes=3).config.to_dict()
    entry = {"arch": name, "checkpoint_sha256": "abc", "config": config}
    flat = {"config": dict(config, **other_keys)}
    assert as_recorded(entry, flat) == dict(entry, config=flat["config"])
    assert as_recorded(entry, {"config": config}) == entry
    for different in (dict(flat["config"], fpn_channels=config["fpn_channels"] + 1),   # another teacher
                      dict(flat["config"], unknown_key=1)):                            # not a config at all
        assert as_recorded(entry, {"config": different}) == entry
