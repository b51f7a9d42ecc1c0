"""FCOS: torchvision equality, mmdetection key conversion and head function, assignment, losses, inference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import generalized_box_iou_loss

from detectors.config import DetectorConfig
from detectors.convert import (checkpoint_filter_fn, convert_mmdet_fcos, convert_torchvision_fcos, detect_source,
                               mmdet_config_overrides, num_classes_of, torchvision_config_overrides)
from detectors.detector import BACKGROUND, IGNORE, DetectorOutput, flatten_levels
from detectors.fcos import (FCOS, MMDET_PLAIN_FCOS, TORCHVISION_FCOS, FCOSConfig, centerness_target,
                            distance_targets, fcos_assign)
from detectors.zoo import build_detector, config_from_dict, get_config, load_checkpoint, save_checkpoint
from mmdet_shapes import add_resnet50

STRIDES = (8, 16, 32, 64, 128)


def make_targets() -> list[dict[str, torch.Tensor]]:
    """Two 64x96 images with boxes of 3 classes."""
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [50.0, 20.0, 90.0, 62.0]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([0])}]


# ---------------------------------------------------------------------------------------------- torchvision


def test_fcos_r50_matches_torchvision_fcos():
    """A random torchvision fcos_resnet50_fpn state dict loads strictly and gives identical head outputs,
    anchors and detections (TORCHVISION_FCOS: points at j*stride, sqrt score > 0.2).

    Both run on the same normalised tensor (torchvision's transform is bypassed); 128x128 so that
    torchvision's anchor strides (image size // map size) are exact on P6/P7.
    """
    torch.manual_seed(0)
    reference = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    for module in reference.head.modules():  # scores above 0.2, so that post-processing has work to do
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.03)
            torch.nn.init.normal_(module.bias, std=0.5)
    assert detect_source(reference.state_dict()) == ("torchvision", "fcos")
    state_dict, family = checkpoint_filter_fn(reference.state_dict())
    assert family == "fcos" and torch.equal(state_dict["head.scales.4.scale"], torch.tensor(1.0))
    assert detect_source(state_dict) == ("project", "fcos") and num_classes_of(state_dict, "fcos") == 5
    assert torchvision_config_overrides("fcos") == TORCHVISION_FCOS
    # "bn" evaluates with the very ops of torchvision's untrained (BatchNorm2d) model
    model = build_detector("fcos-r50", num_classes=5, norm="bn", **TORCHVISION_FCOS).eval()
    model.load_state_dict(state_dict, strict=True)
    with pytest.raises(ValueError, match="no per-level Scale"):
        convert_torchvision_fcos(state_dict)

    images, image_sizes = torch.randn(1, 3, 128, 128), [(128, 128)]
    with torch.no_grad():
        features = list(reference.backbone(images).values())
        head_outputs = reference.head(features)  # (N, HWA, C) each
        anchors = reference.anchor_generator(ImageList(images, image_sizes), features)
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        expected = reference.postprocess_detections(split_outputs, [list(a.split(per_level)) for a in anchors],
                                                    image_sizes)[0]
        out = model(images, image_sizes)
        detections = model.postprocess(out)[0]

    assert torch.equal(flatten_levels(out.cls_logits, 1), head_outputs["cls_logits"])
    assert torch.equal(flatten_levels(out.box_outputs, 1), head_outputs["bbox_regression"])
    assert torch.equal(flatten_levels(out.centerness, 1), head_outputs["bbox_ctrness"])
    assert torch.equal(torch.cat(out.anchors), anchors[0])
    assert len(expected["boxes"]) == 100
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(detections[key], expected[key]), key


# ---------------------------------------------------------------------------------------------- mmdetection


def mmdet_fcos_state_dict(num_classes: int = 3, channels: int = 256, num_convs: int = 4, conv_bias: bool = True,
                          old_names: bool = False, backbone: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the keys and shapes of an mmdetection FCOS R50 (caffe) checkpoint.

    From mmdetection 3.3's sources: ``ResNet`` (stem conv1/bn1, Bottleneck conv1-3/bn1-3, downsample.0/1),
    ``FPN`` (start_level=1, add_extra_convs='on_output', num_outs=5: lateral_convs.0-2, fpn_convs.0-4,
    ConvModules without norm, so ``.conv.weight/.bias``), ``AnchorFreeHead``/``FCOSHead`` (cls_convs /
    reg_convs ConvModules with GN: ``.conv.weight``, ``.conv.bias`` with conv_bias, ``.gn.weight/.bias``;
    conv_cls, conv_reg, conv_centerness; one ``Scale`` per stride, a 0-d ``scale``). ``old_names``:
    the predictors' names before AnchorFreeHead (fcos_cls, fcos_reg, fcos_centerness).
    """
    generator = torch.Generator().manual_seed(1)
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, width: int, batch: bool = True) -> None:
        shapes.update({f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)})
        if batch:
            shapes.update({f"{prefix}.running_mean": (width,), f"{prefix}.running_var": (width,),
                           f"{prefix}.num_batches_tracked": ()})

    if backbone:
        add_resnet50(shapes)
        for index, width in enumerate((512, 1024, 2048)):
            shapes.update({f"neck.lateral_convs.{index}.conv.weight": (channels, width, 1, 1),
                           f"neck.lateral_convs.{index}.conv.bias": (channels,)})
        for index in range(5):
            shapes.update({f"neck.fpn_convs.{index}.conv.weight": (channels, channels, 3, 3),
                           f"neck.fpn_convs.{index}.conv.bias": (channels,)})
    for tower in ("cls_convs", "reg_convs"):
        for index in range(num_convs):
            shapes[f"bbox_head.{tower}.{index}.conv.weight"] = (channels, channels, 3, 3)
            if conv_bias:
                shapes[f"bbox_head.{tower}.{index}.conv.bias"] = (channels,)
            norm(f"bbox_head.{tower}.{index}.gn", channels, batch=False)
    prefix = "fcos" if old_names else "conv"
    for name, out_channels in (("cls", num_classes), ("reg", 4), ("centerness", 1)):
        shapes.update({f"bbox_head.{prefix}_{name}.weight": (out_channels, channels, 3, 3),
                       f"bbox_head.{prefix}_{name}.bias": (out_channels,)})
    shapes.update({f"bbox_head.scales.{level}.scale": () for level in range(5)})
    return {key: (torch.randint(0, 100, shape, generator=generator) if key.endswith("num_batches_tracked")
                  else torch.randn(shape, generator=generator) * 0.05) for key, shape in shapes.items()}


@pytest.mark.parametrize("variant", ["improved", "plain"])
def test_mmdet_fcos_keys_convert(variant):
    """Every tensor of an mmdetection FCOS R50 state dict lands in an ``fcos-r50`` built with
    ``mmdet_config_overrides`` (and MMDET_PLAIN_FCOS for the original head: no tower bias, old names)."""
    plain = variant == "plain"
    state = mmdet_fcos_state_dict(conv_bias=not plain, old_names=plain)
    assert detect_source(state) == ("mmdet", "fcos")
    converted = convert_mmdet_fcos({"state_dict": state, "meta": {}})
    assert len(converted) == len(state)
    options = {**mmdet_config_overrides("fcos"), **(MMDET_PLAIN_FCOS if plain else {})}
    model = build_detector("fcos-r50", num_classes=3, **options)
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    for mmdet_key, value in state.items():
        if mmdet_key.endswith("num_batches_tracked"):  # frozen BatchNorm drops the (unused) counter
            continue
        key = next(k for k, v in converted.items() if v is value)
        assert torch.equal(loaded[key], value), (mmdet_key, key)
    # spot checks of the index arithmetic: tower layer 2's conv is torchvision's conv.6, its GN conv.7
    assert torch.equal(loaded["head.regression_head.conv.7.weight"], state["bbox_head.reg_convs.2.gn.weight"])
    assert torch.equal(loaded["backbone.fpn.extra_blocks.p7.bias"], state["neck.fpn_convs.4.conv.bias"])
    assert model.backbone.body.layer3[0].conv1.stride == (2, 2)  # caffe style
    with pytest.raises(ValueError, match="no counterpart here: \\['bbox_head.extra.weight'\\]"):
        convert_mmdet_fcos({**state, "bbox_head.extra.weight": torch.zeros(1)})


def mmdet_forward_single(weights: dict[str, torch.Tensor], x: torch.Tensor, level: int, num_convs: int,
                         norm_on_bbox: bool, centerness_on_reg: bool, training: bool = True):
    """mmdetection 3.3's ``FCOSHead.forward_single`` on its own state dict: ConvModule = conv -> GN(32) -> ReLU."""
    def tower(name: str) -> torch.Tensor:
        feature = x
        for index in range(num_convs):
            prefix = f"bbox_head.{name}.{index}"
            feature = F.conv2d(feature, weights[f"{prefix}.conv.weight"], weights.get(f"{prefix}.conv.bias"),
                               padding=1)
            feature = F.relu(F.group_norm(feature, 32, weights[f"{prefix}.gn.weight"], weights[f"{prefix}.gn.bias"]))
        return feature

    def predict(name: str, feature: torch.Tensor) -> torch.Tensor:
        return F.conv2d(feature, weights[f"bbox_head.{name}.weight"], weights[f"bbox_head.{name}.bias"], padding=1)

    cls_feat, reg_feat = tower("cls_convs"), tower("reg_convs")
    cls_score = predict("conv_cls", cls_feat)
    centerness = predict("conv_centerness", reg_feat if centerness_on_reg else cls_feat)
    bbox_pred = predict("conv_reg", reg_feat) * weights[f"bbox_head.scales.{level}.scale"]
    if norm_on_bbox:
        bbox_pred = bbox_pred.clamp(min=0)
        if not training:
            bbox_pred = bbox_pred * STRIDES[level]
    else:
        bbox_pred = bbox_pred.exp()
    return cls_score, bbox_pred, centerness


@pytest.mark.parametrize("options", [{}, {"centerness_on_reg": False}, MMDET_PLAIN_FCOS],
                         ids=["improved", "maskd-student", "plain"])
def test_converted_head_computes_mmdet_forward(options):
    """The converted head gives mmdetection's FCOSHead outputs for each seed variant; distances in
    stride units (mmdetection's training-mode unit; ×stride its eval-mode and exp pixels)."""
    config = FCOSConfig(num_classes=3, depth=None, blocks=(1, 1, 1, 1), widths=(8, 8, 8, 8), fpn_channels=64,
                        head_convs=2, **options)
    state = mmdet_fcos_state_dict(num_classes=3, channels=64, num_convs=2, conv_bias=config.head_conv_bias,
                                  backbone=False)
    state.update({f"bbox_head.scales.{level}.scale": torch.tensor(0.5 + 0.25 * level) for level in range(5)})
    model = FCOS(config).eval()
    head_state = {k.removeprefix("head."): v for k, v in convert_mmdet_fcos(state).items()}
    model.head.load_state_dict(head_state, strict=True)
    features = [torch.randn(2, 64, 6 - level, 7 - level) for level in range(5)]
    with torch.no_grad():
        cls_logits, distances, centerness = model.head(features)
        for level, feature in enumerate(features):
            cls_ref, box_ref, ctr_ref = mmdet_forward_single(state, feature, level, 2, config.norm_on_bbox,
                                                             config.centerness_on_reg, training=False)
            torch.testing.assert_close(cls_logits[level], cls_ref)
            torch.testing.assert_close(centerness[level], ctr_ref)
            torch.testing.assert_close(distances[level] * STRIDES[level], box_ref)
    if not options:
        assert model.head.classification_head.conv[0].bias is not None
    if options is MMDET_PLAIN_FCOS:
        assert model.head.classification_head.conv[0].bias is None and config.nms_thresh == 0.5


# ---------------------------------------------------------------------------------------------- assignment

# One GT box A (10, 10, 90, 50): centre (50, 30), area 3200. P3: stride 8, range [-1, 64], centre
# region (50 ± 12, 30 ± 12) cut to the box; P4: stride 16, range [64, 128], region (50 ± 24, 30 ± 24) -> y (10, 50).
GT_A = [10.0, 10.0, 90.0, 50.0]
POINTS = torch.tensor([[52.0, 28.0],   # P3, in the centre region, max side 42: A
                       [28.0, 28.0],   # P3, in the box, outside the region (x < 38)
                       [62.0, 30.0],   # P3, on the region's edge (x = 62): not strictly inside
                       [60.0, 20.0],   # P3, in the region, max side 50: A
                       [40.0, 24.0],   # P4, in the region, max side 50 < 64: out of range
                       [24.0, 40.0]])  # P4, in the box, outside the region (x < 26); max side 66
LEVELS = [4, 2, 0, 0, 0]  # points per level (P3..P7)


def point_anchors(points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    return torch.cat([points - strides[:, None] / 2, points + strides[:, None] / 2], dim=1)


def test_fcos_assign_hand_computed_case():
    model = build_detector("fcos-nano", num_classes=3)
    strides = torch.tensor([8.0, 8.0, 8.0, 8.0, 16.0, 16.0])
    anchors = point_anchors(POINTS, strides)
    one_gt = torch.tensor([GT_A])
    matched = model.match(anchors, LEVELS, one_gt)["matched_gt"]
    assert matched.tolist() == [0, BACKGROUND, BACKGROUND, 0, BACKGROUND, BACKGROUND]

    # without centre sampling every point strictly inside A is a candidate: p1 (max 62), p2 (52), p5 (66 on P4)
    plain = build_detector("fcos-nano", num_classes=3, center_sampling=False)
    assert plain.match(anchors, LEVELS, one_gt)["matched_gt"].tolist() == [0, 0, 0, 0, BACKGROUND, 0]

    # a smaller GT B (40, 16, 70, 40) (area 720) wins the points both claim; p2 lies in B's region
    # (55 ± 12, 28 ± 12); p4's x = 40 is on B's region edge at P4 (max(55 - 24, 40) = 40)
    two_gts = torch.tensor([GT_A, [40.0, 16.0, 70.0, 40.0]])
    assert model.match(anchors, LEVELS, two_gts)["matched_gt"].tolist() == [1, BACKGROUND, 1, 1, BACKGROUND,
                                                                            BACKGROUND]
    # the regress range includes both ends (p0's largest side is 42)
    point = POINTS[:1]
    for low, high, expected in ((-1.0, 42.0, 0), (42.0, 64.0, 0), (-1.0, 41.9, BACKGROUND), (42.1, 64.0, BACKGROUND)):
        got = fcos_assign(point, torch.tensor([8.0]), torch.tensor([[low, high]]), one_gt, 1.5)
        assert got.tolist() == [expected], (low, high)
    assert fcos_assign(POINTS, strides, torch.zeros(6, 2), torch.zeros(0, 4)).tolist() == [BACKGROUND] * 6

    # targets of the two positives: distances in stride units and centerness, from the formulas
    positives = POINTS[[0, 3]]
    distances = distance_targets(positives, one_gt.expand(2, 4), torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(distances, torch.tensor([[42.0, 18.0, 38.0, 22.0], [50.0, 10.0, 30.0, 30.0]]) / 8)
    torch.testing.assert_close(centerness_target(distances),
                               torch.tensor([math.sqrt(38 / 42 * 18 / 22), math.sqrt(30 / 50 * 10 / 30)]))


def test_model_assignment_uses_points_at_half_stride_and_ignores_padding():
    model = build_detector("fcos-nano", num_classes=3)
    anchors = model.grid_anchors([(2, 3), (1, 1), (1, 1), (1, 1), (1, 1)], torch.zeros(1))
    # P3: squares of side 8 centred at ((j + 0.5) * 8, (i + 0.5) * 8), order (h, w)
    expected = torch.tensor([[x - 4.0, y - 4.0, x + 4.0, y + 4.0] for y in (4, 12) for x in (4, 12, 20)])
    assert torch.equal(anchors[0], expected)
    assert torch.equal(anchors[4], torch.tensor([[0.0, 0.0, 128.0, 128.0]]))
    torchvision_points = build_detector("fcos-nano", num_classes=3, **TORCHVISION_FCOS)
    first_p3 = torchvision_points.grid_anchors([(1, 1)] * 5, torch.zeros(1))[0]
    assert torch.equal(first_p3, torch.tensor([[-4.0, -4.0, 4.0, 4.0]]))

    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)], make_targets())
    matched = out.assignment[1]["matched_gt"]  # image 1: canonical 64x64 in a 64x96 batch
    p3 = matched[:8 * 12].view(8, 12)
    assert (p3[:, 8:] == IGNORE).all() and (p3[:, :8] != IGNORE).all()
    # image 1's box (10, 10, 60, 50): P3 positives are the points in its centre region (35 ± 12, 30 ± 12)
    rows, cols = torch.where(p3 == 0)
    xs, ys = (cols + 0.5) * 8, (rows + 0.5) * 8
    assert len(rows) > 0 and ((xs - 35).abs() < 12).all() and ((ys - 30).abs() < 12).all()


# ---------------------------------------------------------------------------------------------- losses


def test_fcos_nano_losses_finite_and_decreasing():
    torch.manual_seed(0)
    model = build_detector("fcos-nano", num_classes=3)
    images, image_sizes = torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(12):
        out = model(images, image_sizes, make_targets())
        assert set(out.losses) == {"cls", "box", "centerness"}
        assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
        loss = sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"total": loss.item(), **{k: v.item() for k, v in out.losses.items()}})
    first, last = history[0], history[-1]
    assert last["total"] < 0.7 * first["total"], history
    assert all(last[k] < first[k] for k in ("cls", "box", "centerness")), history

    # a batch without any GT: zero box/centerness terms that still reach the whole head
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    model.zero_grad()
    out = model(images, image_sizes, [empty, empty])
    assert out.losses["box"].item() == 0.0 and out.losses["centerness"].item() == 0.0
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_loss_terms_follow_mmdet_normalisation():
    """cls = focal sum / N_pos; box = Σ c·(1 − GIoU) / Σ c; centerness = Σ BCE / N_pos, recomputed by hand."""
    torch.manual_seed(0)
    model = build_detector("fcos-nano", num_classes=3)
    targets = make_targets()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96), [(64, 96), (64, 96)], targets)
    matched = torch.stack([a["matched_gt"] for a in out.assignment])  # (2, A)
    image_index, point_index = torch.where(matched >= 0)
    gt_rows = torch.tensor([0, 2])[image_index] + matched[image_index, point_index]  # image 0: GTs 0-1, image 1: GT 2
    gt_boxes = torch.cat([t["boxes"] for t in targets])[gt_rows]
    points = (torch.cat(out.anchors)[:, :2] + torch.cat(out.anchors)[:, 2:]) / 2
    strides = torch.cat([torch.full((len(a),), float(s)) for a, s in zip(out.anchors, STRIDES)])
    p, s = points[point_index], strides[point_index]
    target = torch.stack([p[:, 0] - gt_boxes[:, 0], p[:, 1] - gt_boxes[:, 1], gt_boxes[:, 2] - p[:, 0],
                          gt_boxes[:, 3] - p[:, 1]], dim=1) / s[:, None]
    ctr = torch.sqrt(torch.minimum(target[:, 0], target[:, 2]) / torch.maximum(target[:, 0], target[:, 2])
                     * torch.minimum(target[:, 1], target[:, 3]) / torch.maximum(target[:, 1], target[:, 3]))
    pred = flatten_levels(out.box_outputs, 1)[image_index, point_index]
    giou = generalized_box_iou_loss(torch.cat([-pred[:, :2], pred[:, 2:]], 1),
                                    torch.cat([-target[:, :2], target[:, 2:]], 1), reduction="none")
    num_pos = len(image_index)
    assert num_pos > 0
    ctr_logits = flatten_levels(out.centerness, 1)[image_index, point_index, 0]
    torch.testing.assert_close(out.losses["box"], (giou * ctr).sum() / ctr.sum())
    torch.testing.assert_close(out.losses["centerness"],
                               F.binary_cross_entropy_with_logits(ctr_logits, ctr, reduction="sum") / num_pos)
    logits = flatten_levels(out.cls_logits, 1)  # (2, A, K)
    onehot = torch.zeros_like(logits)
    onehot[image_index, point_index, torch.cat([t["labels"] for t in targets])[gt_rows]] = 1
    p_sig = logits.sigmoid()
    p_t = p_sig * onehot + (1 - p_sig) * (1 - onehot)
    focal = (F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * (1 - p_t) ** 2
             * (0.25 * onehot + 0.75 * (1 - onehot)))
    torch.testing.assert_close(out.losses["cls"], focal.sum() / num_pos)


# ---------------------------------------------------------------------------------------------- inference


def hand_outputs(model: FCOS, image_sizes: list[tuple[int, int]]) -> DetectorOutput:
    """Head maps of a 2-image 64x96 batch, all class logits -10 except the planted ones below."""
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    cls = [torch.full((2, 3, h, w), -10.0) for h, w in shapes]
    ctr = [torch.zeros(2, 1, h, w) for h, w in shapes]
    box = [torch.ones(2, 4, h, w) for h, w in shapes]
    cls[0][0, 1, 2, 3], ctr[0][0, 0, 2, 3] = 2.0, 0.5     # d1: P3 (i 2, j 3), class 1
    box[0][0, :, 2, 3] = torch.tensor([1.0, 1.0, 2.0, 2.0])
    cls[1][0, 0, 1, 1], box[1][0, :, 1, 1] = 1.0, 0.5     # d2: P4 (1, 1), class 0, ctr 0
    cls[0][0, 2, 6, 10], ctr[0][0, 0, 6, 10] = -2.0, -10.0  # d3: σ 0.12 > 0.05, tiny product
    cls[0][0, 0, 7, 0], box[0][0, :, 7, 0] = 3.0, 0.0     # d4: a zero-size box
    cls[0][1, 0, 0, 10] = 5.0                             # image 1 (50x60): P3 column 10 is batch padding
    anchors = model.grid_anchors(shapes, torch.zeros(1))
    return DetectorOutput([], cls, box, anchors, STRIDES, image_sizes, centerness=ctr)


def test_postprocess_mmdet_score_rule():
    model = build_detector("fcos-nano", num_classes=3)
    detections = model.postprocess(hand_outputs(model, [(64, 96), (50, 60)]))
    sig = torch.sigmoid
    first = detections[0]
    # d1: point (28, 20) -> (28 - 8, 20 - 8, 28 + 16, 20 + 16); d2: point (24, 24) ± 8; d3: point (84, 52) ± 8
    torch.testing.assert_close(first["boxes"], torch.tensor([[20.0, 12.0, 44.0, 36.0], [16.0, 16.0, 32.0, 32.0],
                                                             [76.0, 44.0, 92.0, 60.0]]))
    torch.testing.assert_close(first["scores"], torch.stack([sig(torch.tensor(2.0)) * sig(torch.tensor(0.5)),
                                                             sig(torch.tensor(1.0)) * 0.5,
                                                             sig(torch.tensor(-2.0)) * sig(torch.tensor(-10.0))]))
    assert first["labels"].tolist() == [1, 0, 2]  # d4 (zero size) dropped as mmdetection's min_bbox_size=0
    assert len(detections[1]["boxes"]) == 0  # its only high logit lies in the batch padding


def test_postprocess_torchvision_score_rule():
    model = build_detector("fcos-nano", num_classes=3, **TORCHVISION_FCOS)
    first = model.postprocess(hand_outputs(model, [(64, 96), (50, 60)]))[0]
    sig = torch.sigmoid
    # sqrt(σ(cls)·σ(ctr)) > 0.2: d3 (0.002) is out, d4 (zero size, not filtered) is in; points at j*stride
    expected = torch.stack([sig(torch.tensor(2.0)) * sig(torch.tensor(0.5)), sig(torch.tensor(3.0)) * 0.5,
                            sig(torch.tensor(1.0)) * 0.5]).sqrt()
    torch.testing.assert_close(first["scores"], expected)
    assert first["labels"].tolist() == [1, 0, 0]
    torch.testing.assert_close(first["boxes"], torch.tensor([[16.0, 8.0, 40.0, 32.0], [0.0, 56.0, 0.0, 56.0],
                                                             [8.0, 8.0, 24.0, 24.0]]))


def test_forward_outputs_amp_and_forward_features():
    torch.manual_seed(0)
    model = build_detector("fcos-nano", num_classes=3).eval()
    images, image_sizes = torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)]
    with torch.no_grad():
        full = model(images, image_sizes, make_targets())
        amp = model(images, image_sizes, make_targets(), amp_dtype=torch.bfloat16)
        again = model.forward_features(full.features, image_sizes, make_targets())
    for level, (h, w) in enumerate([(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]):
        assert full.cls_logits[level].shape == (2, 3, h, w)
        assert full.box_outputs[level].shape == (2, 4, h, w) and (full.box_outputs[level] >= 0).all()
        assert full.centerness[level].shape == (2, 1, h, w)
        assert amp.centerness[level].dtype == torch.float32
        assert torch.equal(again.centerness[level], full.centerness[level])
    assert set(amp.losses) == {"cls", "box", "centerness"}
    assert all(torch.isfinite(v) for v in amp.losses.values())
    assert build_detector("gfl-nano", num_classes=3)(images, image_sizes).centerness is None


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_styles_and_round_trips(tmp_path):
    config = get_config("fcos-r50")
    assert type(config) is FCOSConfig and isinstance(config, DetectorConfig)
    neck_and_nms = (config.relu_before_p7, config.p6_from, config.nms_thresh, config.detections_per_img)
    assert neck_and_nms == (True, "p5", 0.6, 100)
    assert (config.center_sampling, config.center_sample_radius, config.norm_on_bbox, config.centerness_on_reg,
            config.head_conv_bias, config.box_loss, config.score_rule, config.point_offset) == (
        True, 1.5, True, True, True, "giou", "mmdet", 0.5)
    assert config.regress_ranges() == [(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8)]
    assert config_from_dict(config.to_dict()) == config
    for bad, match in (({"regress_range_bounds": (64, 32, 256, 512)}, "increasing"),
                       ({"resnet_style": "tf"}, "resnet_style"), ({"score_rule": "sqrt"}, "score_rule"),
                       ({"box_loss": "l1"}, "box_loss")):
        with pytest.raises(ValueError, match=match):
            config.replace(**bad)

    pytorch_body = build_detector("fcos-r50").backbone.body
    caffe_body = build_detector("fcos-r50", resnet_style="caffe").backbone.body
    for name in ("layer2", "layer3", "layer4"):
        assert getattr(pytorch_body, name)[0].conv2.stride == (2, 2) == getattr(caffe_body, name)[0].conv1.stride
        assert getattr(caffe_body, name)[0].conv2.stride == (1, 1)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [m.shape for m in caffe_body(images).values()] == [m.shape for m in pytorch_body(images).values()]

    model = build_detector("fcos-nano", num_classes=4, center_sampling=False).eval()
    path = tmp_path / "fcos.pt"
    save_checkpoint(path, model, epoch=1)
    loaded, extra = load_checkpoint(path)
    assert type(loaded) is FCOS and loaded.config == model.config and extra == {"epoch": 1}
    with torch.no_grad():
        a, b = model(images, [(64, 64)]), loaded(images, [(64, 64)])
    assert all(torch.equal(x, y) for x, y in zip(a.centerness + a.box_outputs, b.centerness + b.box_outputs))
