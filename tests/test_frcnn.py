"""Faster R-CNN: torchvision equality, mmdetection key conversion and head function, anchors, box coders,
matching, the RoI head alone (partial teacher), training, inference, zoo and checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, clip_boxes_to_image

from detectors.convert import (checkpoint_filter_fn, convert_mmdet_frcnn, detect_source, mmdet_config_overrides,
                               num_classes_of, torchvision_config_overrides)
from detectors.detector import BACKGROUND, IGNORE, grid_anchors
from detectors.frcnn import (STRIDES, TORCHVISION_FRCNN, FasterRCNN, FasterRCNNConfig, MMDetDeltaCoder, RoIBoxHead,
                             TwoStageOutput, make_box_coder, max_iou_match, rpn_anchor_generator)
from detectors.zoo import build_detector, get_config, list_models, load_checkpoint, save_checkpoint
from mmdet_shapes import add_resnet50

FRCNN_MODELS = [name for name in list_models() if name.startswith("frcnn-")]


def make_targets() -> list[dict[str, torch.Tensor]]:
    """Image 0 (64x96) with two boxes, image 1 (50x60) with one, 3 classes."""
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [50.0, 20.0, 90.0, 62.0]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.tensor([[10.0, 10.0, 45.0, 40.0]]), "labels": torch.tensor([0])}]


# ---------------------------------------------------------------------------------------------- torchvision


def test_frcnn_r50_matches_torchvision_fasterrcnn():
    """A random torchvision fasterrcnn_resnet50_fpn state dict loads strictly and gives identical RPN maps,
    anchors, proposals, RoI head outputs on the same proposals and detections (TORCHVISION_FRCNN).

    Both run on the same normalised tensor (torchvision's transform is bypassed). 128x192 so that
    torchvision's anchor strides (image size // map size) are the true ones on P6 too.
    """
    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=6).eval()
    # scales that leave hundreds of proposals and a full set of detections to compare
    torch.nn.init.normal_(reference.rpn.head.cls_logits.weight, std=0.05)
    torch.nn.init.normal_(reference.rpn.head.cls_logits.bias, std=1.0)
    torch.nn.init.normal_(reference.rpn.head.bbox_pred.weight, std=0.002)
    for layer in reference.roi_heads.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.001 if layer is reference.roi_heads.box_predictor.bbox_pred
                                  else 0.02)
            torch.nn.init.normal_(layer.bias, std=0.5)
    assert detect_source(reference.state_dict()) == ("torchvision", "frcnn")
    state_dict, family = checkpoint_filter_fn(reference.state_dict())
    assert family == "frcnn" and num_classes_of(state_dict, "frcnn") == 5
    assert torchvision_config_overrides("frcnn") == {**TORCHVISION_FRCNN, "norm_eps": 0.0}
    # "bn" evaluates with the very ops of torchvision's untrained (BatchNorm2d) model
    model = build_detector("frcnn-r50", num_classes=5, norm="bn", **TORCHVISION_FRCNN).eval()
    model.load_state_dict(state_dict, strict=True)

    images, image_sizes = torch.randn(1, 3, 128, 192), [(128, 192)]
    with torch.no_grad():
        features = reference.backbone(images)
        image_list = ImageList(images, image_sizes)
        objectness, deltas = reference.rpn.head(list(features.values()))
        anchors = reference.rpn.anchor_generator(image_list, list(features.values()))
        proposals, _ = reference.rpn(image_list, features)
        pooled = reference.roi_heads.box_roi_pool(features, proposals, image_sizes)
        cls_logits, box_deltas = reference.roi_heads.box_predictor(reference.roi_heads.box_head(pooled))
        expected, _ = reference.roi_heads(features, proposals, image_sizes)
        out = model(images, image_sizes)
        detections = model.postprocess(out)[0]

    assert isinstance(out, TwoStageOutput) and out.strides == STRIDES
    assert all(torch.equal(a, b) for a, b in zip(out.features, features.values()))
    assert all(torch.equal(a, b) for a, b in zip(out.rpn_objectness + out.rpn_deltas, objectness + deltas))
    assert torch.equal(torch.cat(out.anchors), anchors[0])
    assert len(proposals[0]) > 500 and torch.equal(out.proposals[0], proposals[0])
    assert torch.equal(out.rois[0], proposals[0])
    assert torch.equal(out.roi_pooled, pooled)
    assert torch.equal(out.roi_cls_logits, cls_logits) and torch.equal(out.roi_box_deltas, box_deltas)
    assert len(expected[0]["boxes"]) == 100
    assert torch.equal(detections["boxes"], expected[0]["boxes"])
    assert torch.equal(detections["scores"], expected[0]["scores"])
    assert torch.equal(detections["labels"] + 1, expected[0]["labels"])  # torchvision: 0 = background


# ---------------------------------------------------------------------------------------------- mmdetection


def mmdet_frcnn_state_dict(num_classes: int = 3, channels: int = 256, fc_channels: int = 1024, rpn_convs: int = 1,
                           backbone: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the keys and shapes of an mmdetection Faster R-CNN R50-FPN checkpoint.

    From mmdetection 3.3's sources: ``ResNet`` (stem conv1/bn1, Bottleneck conv1-3/bn1-3,
    downsample.0/1), ``FPN`` (in_channels 256..2048, num_outs=5, add_extra_convs=False: lateral_convs.0-3
    and fpn_convs.0-3, ConvModules without norm: ``.conv.weight/.bias``), ``RPNHead`` (``rpn_conv`` a
    Conv2d, or with num_convs > 1 a Sequential of ConvModules ``rpn_conv.i.conv``; ``rpn_cls`` with
    num_base_priors (3) × 1 sigmoid channel, ``rpn_reg`` with 3 × 4), ``Shared2FCBBoxHead``
    (``shared_fcs.0`` 256·7·7 -> 1024, ``shared_fcs.1``, ``fc_cls`` K + 1, ``fc_reg`` 4K).
    """
    generator = torch.Generator().manual_seed(1)
    shapes: dict[str, tuple[int, ...]] = {}
    if backbone:
        add_resnet50(shapes)
        for index, width in enumerate((256, 512, 1024, 2048)):
            shapes.update({f"neck.lateral_convs.{index}.conv.weight": (channels, width, 1, 1),
                           f"neck.lateral_convs.{index}.conv.bias": (channels,),
                           f"neck.fpn_convs.{index}.conv.weight": (channels, channels, 3, 3),
                           f"neck.fpn_convs.{index}.conv.bias": (channels,)})
    if rpn_convs == 1:
        shapes.update({"rpn_head.rpn_conv.weight": (channels, channels, 3, 3), "rpn_head.rpn_conv.bias": (channels,)})
    else:
        for index in range(rpn_convs):
            shapes.update({f"rpn_head.rpn_conv.{index}.conv.weight": (channels, channels, 3, 3),
                           f"rpn_head.rpn_conv.{index}.conv.bias": (channels,)})
    for name, rows, columns in (("rpn_head.rpn_cls", 3, channels), ("rpn_head.rpn_reg", 12, channels)):
        shapes.update({f"{name}.weight": (rows, columns, 1, 1), f"{name}.bias": (rows,)})
    for name, rows, columns in (("shared_fcs.0", fc_channels, channels * 49),
                                ("shared_fcs.1", fc_channels, fc_channels),
                                ("fc_cls", num_classes + 1, fc_channels), ("fc_reg", 4 * num_classes, fc_channels)):
        prefix = f"roi_head.bbox_head.{name}"
        shapes.update({f"{prefix}.weight": (rows, columns), f"{prefix}.bias": (rows,)})
    return {key: (torch.randint(0, 100, shape, generator=generator) if key.endswith("num_batches_tracked")
                  else torch.randn(shape, generator=generator) * 0.05) for key, shape in shapes.items()}


def test_mmdet_frcnn_keys_convert():
    """Every tensor of an mmdetection Faster R-CNN R50 state dict lands in an ``frcnn-r50``; the classifier's
    background row moves first and the deltas gain 4 zero background rows."""
    state = mmdet_frcnn_state_dict()
    assert detect_source(state) == ("mmdet", "frcnn")
    converted = convert_mmdet_frcnn({"state_dict": state, "meta": {}})
    assert len(converted) == len(state)
    model = build_detector("frcnn-r50", num_classes=3, **mmdet_config_overrides("frcnn"))
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    moved = {"roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_cls.bias", "roi_head.bbox_head.fc_reg.weight",
             "roi_head.bbox_head.fc_reg.bias"}
    for mmdet_key, value in state.items():
        if mmdet_key.endswith("num_batches_tracked") or mmdet_key in moved:  # frozen BatchNorm drops the counter
            continue
        key = next(k for k, v in converted.items() if v is value)
        assert torch.equal(loaded[key], value), (mmdet_key, key)
    assert torch.equal(loaded["rpn.head.conv.0.0.weight"], state["rpn_head.rpn_conv.weight"])
    assert torch.equal(loaded["backbone.fpn.layer_blocks.3.0.bias"], state["neck.fpn_convs.3.conv.bias"])
    cls_weight, reg_weight = state["roi_head.bbox_head.fc_cls.weight"], state["roi_head.bbox_head.fc_reg.weight"]
    assert torch.equal(loaded["roi_heads.box_predictor.cls_score.weight"][0], cls_weight[3])  # background
    assert torch.equal(loaded["roi_heads.box_predictor.cls_score.weight"][1:], cls_weight[:3])
    assert not loaded["roi_heads.box_predictor.bbox_pred.weight"][:4].any()
    assert torch.equal(loaded["roi_heads.box_predictor.bbox_pred.weight"][4:], reg_weight)
    with pytest.raises(ValueError, match="no counterpart here: \\['roi_head.extra.weight'\\]"):
        convert_mmdet_frcnn({**state, "roi_head.extra.weight": torch.zeros(1)})
    agnostic = {**state, "roi_head.bbox_head.fc_reg.weight": torch.zeros(4, 1024),
                "roi_head.bbox_head.fc_reg.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match="reg_class_agnostic=False"):
        convert_mmdet_frcnn(agnostic)


def test_converted_heads_compute_mmdet_forward():
    """The converted RPN head (two convs) and box head give mmdetection's ``RPNHead.forward_single`` and
    ``Shared2FCBBoxHead.forward``, with the class columns moved as documented."""
    config = FasterRCNNConfig(num_classes=3, depth=None, blocks=(1, 1, 1, 1), widths=(8, 8, 8, 8), fpn_channels=16,
                              head_convs=2, roi_fc_channels=32)
    state = mmdet_frcnn_state_dict(num_classes=3, channels=16, fc_channels=32, rpn_convs=2, backbone=False)
    model = FasterRCNN(config).eval()
    result = model.load_state_dict(convert_mmdet_frcnn(state), strict=False)
    assert not result.unexpected_keys and all(key.startswith("backbone.") for key in result.missing_keys)

    feature, pooled = torch.randn(2, 16, 6, 5), torch.randn(7, 16, 7, 7)
    with torch.no_grad():
        x = feature
        for index in range(2):  # ConvModule (conv, ReLU) x 2, then mmdetection's F.relu
            x = F.relu(F.conv2d(x, state[f"rpn_head.rpn_conv.{index}.conv.weight"],
                                state[f"rpn_head.rpn_conv.{index}.conv.bias"], padding=1))
        expected_cls = F.conv2d(x, state["rpn_head.rpn_cls.weight"], state["rpn_head.rpn_cls.bias"])
        expected_reg = F.conv2d(x, state["rpn_head.rpn_reg.weight"], state["rpn_head.rpn_reg.bias"])
        objectness, deltas = model.rpn.head([feature])
        y = pooled.flatten(1)
        for index in range(2):
            y = F.relu(F.linear(y, state[f"roi_head.bbox_head.shared_fcs.{index}.weight"],
                                state[f"roi_head.bbox_head.shared_fcs.{index}.bias"]))
        cls_score = F.linear(y, state["roi_head.bbox_head.fc_cls.weight"], state["roi_head.bbox_head.fc_cls.bias"])
        bbox_pred = F.linear(y, state["roi_head.bbox_head.fc_reg.weight"], state["roi_head.bbox_head.fc_reg.bias"])
        cls_logits, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    torch.testing.assert_close(objectness[0], expected_cls)
    torch.testing.assert_close(deltas[0], expected_reg)
    torch.testing.assert_close(cls_logits[:, 1:], cls_score[:, :3])
    torch.testing.assert_close(cls_logits[:, 0], cls_score[:, 3])
    torch.testing.assert_close(box_deltas[:, 4:], bbox_pred)
    assert not box_deltas[:, :4].any()


# ---------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("round_anchors", [False, True])
def test_rpn_anchors_by_hand(round_anchors):
    """Side 8 x stride, ratios h/w 0.5/1/2, centred at (j*stride, i*stride), order (h, w, a); torchvision rounds
    the corners of its cell anchors to integers."""
    generator = rpn_anchor_generator(FasterRCNNConfig(round_anchors=round_anchors))
    anchors = grid_anchors(generator, STRIDES, [(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)], torch.zeros(1))
    assert [len(a) for a in anchors] == [18, 6, 3, 3, 3]
    half_w, half_h = 16 * math.sqrt(2), 16 / math.sqrt(2)  # ratio 0.5: w = 32 / sqrt(0.5), h = 32 * sqrt(0.5)
    if round_anchors:
        half_w, half_h = 23.0, 11.0
    x, y = 2 * 4, 1 * 4  # P2 cell (i=1, j=2)
    expected = torch.tensor([[x - half_w, y - half_h, x + half_w, y + half_h],
                             [x - 16, y - 16, x + 16, y + 16],
                             [x - half_h, y - half_w, x + half_h, y + half_w]])
    cell = (1 * 3 + 2) * 3
    torch.testing.assert_close(anchors[0][cell:cell + 3], expected)
    torch.testing.assert_close(anchors[1][3 + 1], torch.tensor([8.0 - 32, -32, 8 + 32, 32]))  # P3 (0, 1), side 64
    torch.testing.assert_close(anchors[4][1], torch.tensor([-256.0, -256, 256, 256]))  # P6, side 512


def test_box_coders_by_hand():
    """mmdetection's and torchvision's coders on a hand case; mmdetection's own ``delta2bbox`` docstring example;
    the log-scale clamp, which only mmdetection's applies from below."""
    anchors, gt = torch.tensor([[0.0, 0.0, 10.0, 20.0]]), torch.tensor([[2.0, 4.0, 12.0, 28.0]])
    raw = torch.tensor([[0.2, 0.3, 0.0, math.log(1.2)]])  # centre moves 2 and 6 px, height x1.2
    for rules in ("mmdet", "torchvision"):
        for stds in ((1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)):
            coder = make_box_coder(stds, rules)
            deltas = coder.encode_single(gt, anchors)
            torch.testing.assert_close(deltas, raw / torch.tensor(stds))
            torch.testing.assert_close(coder.decode_single(deltas, anchors), gt)
    rois = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, -1.0], [0.7, -1.9, -0.5, 0.3]])
    documented = torch.tensor([[0.0000, 0.0000, 1.0000, 1.0000], [0.1409, 0.1409, 2.8591, 2.8591],
                               [0.0000, 0.3161, 4.1945, 0.6839], [5.0000, 5.0000, 5.0000, 5.0000]])
    decoded = clip_boxes_to_image(MMDetDeltaCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, rois), (32, 32))
    torch.testing.assert_close(decoded, documented, atol=1e-4, rtol=0)
    shrink = torch.tensor([[0.0, 0.0, -5.0, 0.0]])  # below -|log(16/1000)| = -4.135
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    mmdet_width = make_box_coder((1.0,) * 4, "mmdet").decode_single(shrink, box)[0, 2:3] * 2 - 100
    torchvision_width = make_box_coder((1.0,) * 4, "torchvision").decode_single(shrink, box)[0, 2:3] * 2 - 100
    torch.testing.assert_close(mmdet_width, torch.tensor([100 * 16 / 1000]))
    torch.testing.assert_close(torchvision_width, torch.tensor([100 * math.exp(-5)]))


def test_max_iou_match_by_hand_and_against_references():
    iou = torch.tensor([[0.9, 0.5, 0.2, 0.25], [0.1, 0.5, 0.6, 0.25]])
    assert max_iou_match(iou, 0.7, 0.3).tolist() == [0, IGNORE, IGNORE, BACKGROUND]
    assert max_iou_match(iou, 0.7, 0.3, 0.3).tolist() == [0, IGNORE, 1, BACKGROUND]  # GT 1's best anchor
    assert max_iou_match(iou, 0.7, 0.3, 0.65).tolist() == [0, IGNORE, IGNORE, BACKGROUND]  # 0.6 < min_pos_iou
    tie = torch.tensor([[0.4, 0.1], [0.4, 0.35]])  # anchor 0 is both GTs' best anchor
    assert max_iou_match(tie, 0.7, 0.3, 0.3, "mmdet").tolist() == [1, IGNORE]  # the last GT it is best for
    assert max_iou_match(tie, 0.7, 0.3, 0.3, "torchvision").tolist() == [0, IGNORE]  # its own best GT

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # IoUs on a coarse grid, so that ties are common
        iou = torch.randint(0, 11, (4, 30), generator=generator).float() / 10
        matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
        assert torch.equal(max_iou_match(iou, 0.7, 0.3, 0.0, "torchvision"), matcher(iou))
        # mmdetection 3.3 MaxIoUAssigner.assign_wrt_overlaps (gt_max_assign_all), written out; 0 = negative
        max_overlaps, argmax_overlaps = iou.max(dim=0)
        gt_max_overlaps = iou.max(dim=1).values
        assigned = torch.full((iou.shape[1],), -1, dtype=torch.long)
        assigned[(max_overlaps >= 0) & (max_overlaps < 0.3)] = 0
        positive = max_overlaps >= 0.7
        assigned[positive] = argmax_overlaps[positive] + 1
        for gt in range(iou.shape[0]):
            if gt_max_overlaps[gt] >= 0.3:
                assigned[iou[gt] == gt_max_overlaps[gt]] = gt + 1
        expected = torch.where(assigned > 0, assigned - 1, torch.where(assigned == 0, BACKGROUND, IGNORE))
        assert torch.equal(max_iou_match(iou, 0.7, 0.3, 0.3, "mmdet"), expected)


def test_roi_level_mappings():
    """mmdetection: floor(log2(sqrt(wh)/56 + 1e-6)); torchvision: floor(4 + log2(sqrt(wh)/224) + 1e-6) - 2; both
    clamped to P2..P5. They part only just below 112 px, where the epsilon sits differently."""
    mmdet, torchvision = RoIBoxHead(8, 3, 16), RoIBoxHead(8, 3, 16, level_mapping="torchvision")
    sides = torch.tensor([4.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    assert mmdet.map_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torchvision.map_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    edge = torch.tensor([[0.0, 0.0, 111.99994, 111.99994]])
    assert (mmdet.map_levels(edge).item(), torchvision.map_levels(edge).item()) == (0, 1)


def mmdet_rpn_proposals(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor], priors: list[torch.Tensor],
                        img_shape: tuple[int, int], nms_pre: int, max_per_img: int,
                        iou_threshold: float) -> torch.Tensor:
    """mmdetection 3.3 ``RPNHead._predict_by_feat_single`` and ``_bbox_post_process`` for one image, written
    out: per level the nms_pre best by sigmoid score, ``delta2bbox`` (stds 1, clamp ±|log(16/1000)|, clipped
    to img_shape), w > 0 and h > 0, NMS within each level (torchvision's ``batched_nms`` for mmcv's)."""
    mlvl_preds, mlvl_priors, mlvl_scores, level_ids = [], [], [], []
    for level, (cls_score, bbox_pred, level_priors) in enumerate(zip(cls_scores, bbox_preds, priors)):
        bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
        scores = cls_score.permute(1, 2, 0).reshape(-1, 1).sigmoid().squeeze()
        if 0 < nms_pre < scores.shape[0]:
            ranked_scores, rank_inds = scores.sort(descending=True)
            topk_inds = rank_inds[:nms_pre]
            scores, bbox_pred, level_priors = ranked_scores[:nms_pre], bbox_pred[topk_inds], level_priors[topk_inds]
        mlvl_preds.append(bbox_pred)
        mlvl_priors.append(level_priors)
        mlvl_scores.append(scores)
        level_ids.append(torch.full((scores.shape[0],), level, dtype=torch.long))
    deltas, rois = torch.cat(mlvl_preds), torch.cat(mlvl_priors)
    pxy, pwh = (rois[:, :2] + rois[:, 2:]) * 0.5, rois[:, 2:] - rois[:, :2]
    max_ratio = abs(math.log(16 / 1000))
    gxy, gwh = pxy + pwh * deltas[:, :2], pwh * deltas[:, 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    bboxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    bboxes[:, 0::2] = bboxes[:, 0::2].clamp(min=0, max=img_shape[1])
    bboxes[:, 1::2] = bboxes[:, 1::2].clamp(min=0, max=img_shape[0])
    scores, levels = torch.cat(mlvl_scores), torch.cat(level_ids)
    valid = (bboxes[:, 2] - bboxes[:, 0] > 0) & (bboxes[:, 3] - bboxes[:, 1] > 0)
    bboxes, scores, levels = bboxes[valid], scores[valid], levels[valid]
    return bboxes[batched_nms(bboxes, scores, levels, iou_threshold)[:max_per_img]]


def test_proposals_follow_mmdet_rpn_predict():
    """The default (mmdetection) proposals of one image are the ones mmdetection's RPN predicts from the same maps,
    with a top-n smaller than the levels so that the per-level selection matters."""
    torch.manual_seed(0)
    model = build_detector("frcnn-nano", num_classes=3, rpn_pre_nms_top_n_test=300,
                           rpn_post_nms_top_n_test=150).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), [(64, 96)])
    expected = mmdet_rpn_proposals([m[0] for m in out.rpn_objectness], [m[0] for m in out.rpn_deltas], out.anchors,
                                   (64, 96), 300, 150, 0.7)
    assert len(expected) == 150
    torch.testing.assert_close(out.proposals[0], expected)


@pytest.mark.parametrize("rules", ["mmdet", "torchvision"])
def test_proposals_clipped_to_nothing_are_dropped(rules):
    """Deltas that move every anchor out of the image leave boxes of zero width after clipping: no proposal."""
    model = build_detector("frcnn-nano", num_classes=3, rules=rules).eval()
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    objectness = [torch.zeros(1, 3, h, w) for h, w in shapes]
    anchors = grid_anchors(model.anchor_generator, STRIDES, shapes, objectness[0])
    for shift, expected in ((0.0, True), (10.0, False)):  # 10 anchor widths to the right
        deltas = [torch.zeros(1, 12, h, w) for h, w in shapes]
        for level_deltas in deltas:
            level_deltas[:, 0::4] = shift
        proposals, _ = model.propose(objectness, deltas, anchors, [(64, 96)])
        assert (len(proposals[0]) > 0) == expected


@pytest.mark.parametrize("rules", ["mmdet", "torchvision"])
def test_gt_boxes_added_as_rois(rules):
    """Each GT box joins the RoI candidates; mmdetection assigns it to its own GT, torchvision by IoU (the
    first of two identical GT boxes)."""
    model = build_detector("frcnn-nano", num_classes=3, rules=rules)
    box = torch.tensor([[10.0, 10.0, 40.0, 30.0]])
    targets = [{"boxes": torch.cat([box, box]), "labels": torch.tensor([2, 0])}]
    sampled = model.sample_rois([torch.zeros(0, 4)], targets)
    assert torch.equal(sampled["rois"][0], torch.cat([box, box]))
    order = sampled["matched_gt"][0].argsort() if rules == "mmdet" else torch.arange(2)
    matched_gt, labels = ([0, 1], [3, 1]) if rules == "mmdet" else ([0, 0], [3, 3])
    assert sampled["matched_gt"][0][order].tolist() == matched_gt
    assert sampled["labels"][0][order].tolist() == labels
    assert not sampled["box_targets"][0].any()  # each RoI is its GT box


# ---------------------------------------------------------------------------------------------- the RoI head alone


def test_roi_head_outputs_equal_the_full_forward_and_rebuild_from_state(tmp_path):
    """The RoI head run alone on the forward's FPN maps and sampled RoIs (the partial teacher's call) gives
    exactly what the forward returned; so does a head rebuilt from its saved state, on P2..P5 only."""
    torch.manual_seed(0)
    model = build_detector("frcnn-nano", num_classes=3).train()
    images, image_sizes = torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)]
    out = model(images, image_sizes, make_targets())
    assert [len(r) for r in out.rois] == [len(m) for m in out.roi_matched_gt] == [len(t) for t in out.roi_box_targets]
    pooled, cls_logits, box_deltas = model.roi_head_outputs(out.features, out.rois, image_sizes)
    assert torch.equal(pooled, out.roi_pooled)
    assert torch.equal(cls_logits, out.roi_cls_logits) and torch.equal(box_deltas, out.roi_box_deltas)

    path = tmp_path / "roi_head.pt"
    torch.save(model.roi_head_state(), path)
    head = RoIBoxHead.from_state(torch.load(path, weights_only=True))
    assert set(head.state_dict()) == {key.removeprefix("roi_heads.") for key in model.state_dict()
                                      if key.startswith("roi_heads.")}
    with torch.no_grad():
        alone = head([f.detach() for f in out.features[:4]], out.rois, image_sizes)
    for value, expected in zip(alone, (out.roi_pooled, out.roi_cls_logits, out.roi_box_deltas)):
        assert torch.equal(value, expected)
    with pytest.raises(ValueError, match="reads 4 FPN maps"):
        head(out.features[:3], out.rois, image_sizes)
    with pytest.raises(ValueError, match="not a RoI head state"):
        RoIBoxHead.from_state({"format": "other"})


# ---------------------------------------------------------------------------------------------- training and inference


def test_training_output_and_losses_decrease():
    """frcnn-nano on a fixed batch: sampled RoIs (positives first, labels/targets consistent), finite losses of
    all four terms, and a lower total and RPN objectness loss after 10 SGD steps."""
    torch.manual_seed(0)
    model = build_detector("frcnn-nano", num_classes=3).train()
    images, image_sizes, targets = torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)], make_targets()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    totals, rpn_cls = [], []
    for step in range(10):
        out = model(images, image_sizes, targets)
        loss = sum(out.losses.values())
        rpn_cls.append(out.losses["rpn_cls"].item())
        assert set(out.losses) == {"rpn_cls", "rpn_box", "cls", "box"}
        assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
        if step == 0:
            assert all(p.grad is not None for p in model.roi_heads.parameters())
            for rois, matched, labels, box_targets, target in zip(out.rois, out.roi_matched_gt, out.roi_labels,
                                                                  out.roi_box_targets, targets):
                positive = int((matched >= 0).sum())
                assert 0 < positive <= 0.25 * 512 and len(rois) <= 512
                assert (matched[:positive] >= 0).all() and (matched[positive:] == BACKGROUND).all()
                assert torch.equal(labels[:positive], target["labels"][matched[:positive]] + 1)
                assert not labels[positive:].any() and not box_targets[positive:].any()
            for assignment in out.rpn_assignment:
                assert assignment.shape == (sum(len(a) for a in out.anchors),) and (assignment >= 0).any()
            assert (out.rpn_assignment[1] == IGNORE).any()  # image 1's batch padding
    assert totals[-1] < 0.8 * totals[0] and rpn_cls[-1] < rpn_cls[0], (totals, rpn_cls)


def test_postprocess_shapes_and_amp():
    torch.manual_seed(0)
    model = build_detector("frcnn-small", num_classes=3, score_thresh=0.0).eval()
    images, image_sizes = torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)]
    with torch.no_grad():
        out = model(images, image_sizes)
        detections = model.postprocess(out)
        amp = model(images, image_sizes, amp_dtype=torch.bfloat16)
    assert out.losses is None and out.roi_labels is None
    assert [len(r) for r in out.rois] == [len(p) for p in out.proposals] == [len(s) for s in out.proposal_scores]
    assert out.roi_cls_logits.shape == (sum(len(p) for p in out.proposals), 4)
    assert out.roi_box_deltas.shape == (sum(len(p) for p in out.proposals), 16)
    for det, (h, w) in zip(detections, image_sizes):
        assert 0 < len(det["boxes"]) <= 100 and det["boxes"].shape[1] == 4
        assert len(det["scores"]) == len(det["labels"]) == len(det["boxes"])
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
    assert all(m.dtype == torch.float32 for m in amp.features + amp.rpn_objectness + [amp.roi_cls_logits])
    with pytest.raises(ValueError, match="forward without targets"):
        model.postprocess(model(images, image_sizes, make_targets()))


# ---------------------------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", FRCNN_MODELS)
def test_every_frcnn_name_builds_and_runs(name):
    model = build_detector(name, num_classes=3).eval()
    config = model.config
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96), [(64, 96), (50, 60)], return_backbone=True)
    level_shapes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    for level, (h, w) in enumerate(level_shapes):
        assert out.features[level].shape == (2, config.fpn_channels, h, w)
        assert out.rpn_objectness[level].shape == (2, 3, h, w) and out.rpn_deltas[level].shape == (2, 12, h, w)
        assert out.anchors[level].shape == (h * w * 3, 4)
    assert [m.shape[-2:] for m in out.backbone_features] == [(16, 24), (8, 12), (4, 6), (2, 3)]  # C2..C5
    assert out.roi_pooled.shape[1:] == (config.fpn_channels, 7, 7)
    assert all(len(p) <= config.rpn_post_nms_top_n_test for p in out.proposals)


def test_zoo_sizes_config_errors_and_checkpoint(tmp_path):
    nano, small = get_config("frcnn-nano"), get_config("frcnn-small")
    assert (nano.head_convs, nano.roi_fc_channels, nano.widths) == (1, 64, (8, 16, 32, 64))
    assert (small.head_convs, small.roi_fc_channels, get_config("frcnn-r50").roi_fc_channels) == (1, 256, 1024)
    defaults = FasterRCNNConfig()  # mmdetection's values
    assert (defaults.rpn_post_nms_top_n_train, defaults.roi_sampling_ratio, defaults.roi_aligned) == (1000, 0, True)
    assert defaults.roi_box_stds == (0.1, 0.1, 0.2, 0.2) and defaults.rpn_min_pos_iou == 0.3
    with pytest.raises(ValueError, match="p6_from does not apply"):
        get_config("frcnn-nano", p6_from="c5")
    with pytest.raises(ValueError, match="rules must be one of"):
        get_config("frcnn-nano", rules="detectron2")

    torch.manual_seed(0)
    model = build_detector("frcnn-nano", num_classes=4).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, epoch=2)
    loaded, extra = load_checkpoint(path)
    assert extra == {"epoch": 2} and type(loaded) is FasterRCNN and loaded.config == model.config
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(images, [(64, 64)]), loaded(images, [(64, 64)])
    assert torch.equal(a.roi_cls_logits, b.roi_cls_logits) and torch.equal(a.proposals[0], b.proposals[0])
