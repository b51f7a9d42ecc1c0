"""GFL losses against numbers computed by hand from the formulas of DETECTORS.md."""
import math

import torch

from detectors import DetectorOutput, build_detector
from detectors.losses import distribution_focal_loss, giou_loss, quality_focal_loss


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def bce(z: float, y: float) -> float:
    """Binary cross-entropy of a logit z against target y: softplus(z) − y·z."""
    return math.log1p(math.exp(z)) - y * z


def test_quality_focal_loss_hand_computed():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, -1])  # row 0: positive of class 1 with quality 0.8; row 1: negative
    quality = torch.tensor([0.8, 0.0], dtype=torch.float64)
    expected = [
        bce(0.5, 0) * sigmoid(0.5) ** 2 + bce(-1.0, 0.8) * abs(0.8 - sigmoid(-1.0)) ** 2,
        bce(2.0, 0) * sigmoid(2.0) ** 2 + bce(0.0, 0) * sigmoid(0.0) ** 2,
    ]
    torch.testing.assert_close(quality_focal_loss(logits, labels, quality), torch.tensor(expected, dtype=torch.float64))


def test_distribution_focal_loss_hand_computed():
    # bins 0..4 with logits (0, ln 2, 0, 0, 0): probabilities (1, 2, 1, 1, 1) / 6
    logits = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    target = torch.tensor([1.5, 3.0, 0.25], dtype=torch.float64)
    ce = [-math.log(p / 6) for p in (1, 2, 1, 1, 1)]  # cross-entropy of each bin
    expected = [0.5 * ce[1] + 0.5 * ce[2],   # y = 1.5: left 1, right 2
                1.0 * ce[3] + 0.0 * ce[4],   # y = 3: all weight on the left bin
                0.75 * ce[0] + 0.25 * ce[1]]  # y = 0.25
    torch.testing.assert_close(distribution_focal_loss(logits, target), torch.tensor(expected, dtype=torch.float64))


def test_giou_loss_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    target = torch.tensor([[2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    expected = [
        1 - (0 - (3 - 2) / 3),        # disjoint: IoU 0, union 2, enclosing 3
        1 - (1 / 7 - (9 - 7) / 9),    # overlap 1, union 7, enclosing 9
        1 - 2 / 16,                   # target inside pred: GIoU = IoU
    ]
    torch.testing.assert_close(giou_loss(pred, target), torch.tensor(expected, dtype=torch.float64))


def test_gfl_loss_normalisation_hand_computed():
    """N_pos, w_i and W on a 2-image, 2-anchor, 2-class, reg_max=4 case (one level, stride 8).

    Image 0: anchor 0 positive (class 1), anchor 1 negative. Image 1: anchor 0 negative, anchor 1
    ignored. N_pos = max(1, 1) + max(1, 0) = 2; W = max(1, w_0) = 1.
    """
    model = build_detector("gfl-nano", num_classes=2, reg_max=4)
    stride = 8
    anchors = torch.tensor([[-32.0, -32.0, 32.0, 32.0], [-24.0, -32.0, 40.0, 32.0]])  # centres (0, 0), (8, 0)
    cls = torch.tensor([[[0.0, 1.0], [-1.0, 0.5]],       # (N, anchors, K)
                        [[2.0, -2.0], [5.0, 5.0]]])
    box = torch.zeros(2, 2, 4, 5)  # (N, anchors, sides, bins): uniform distributions -> distance 2
    box[0, 0, 0] = torch.tensor([0.0, math.log(2.0), 0.0, 0.0, 0.0])  # left side: expectation 11/6
    out = DetectorOutput(
        features=[], cls_logits=[cls.permute(0, 2, 1).reshape(2, 2, 1, 2)],
        box_outputs=[box.reshape(2, 2, 20).permute(0, 2, 1).reshape(2, 20, 1, 2)],
        anchors=[anchors], strides=(stride,), image_sizes=[(32, 32), (32, 32)],
        assignment=[{"matched_gt": torch.tensor([0, -1])}, {"matched_gt": torch.tensor([-1, -2])}])
    targets = [{"boxes": torch.tensor([[-12.0, -16.0, 16.0, 8.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model.compute_losses(out, targets)

    # Positive: centre (0, 0); prediction (stride units) (-11/6, -2, 2, 2); GT (-1.5, -2, 2, 1) lies inside it.
    pred_area = (2 + 11 / 6) * 4
    gt_area = 3.5 * 3
    iou = gt_area / pred_area  # = GIoU (the enclosing box is the prediction)
    w = sigmoid(1.0)  # max class probability of the positive
    n_pos, weight_sum = 2, 1.0
    qfl = (bce(0.0, 0) * sigmoid(0.0) ** 2 + bce(1.0, iou) * abs(iou - sigmoid(1.0)) ** 2   # image 0, anchor 0
           + bce(-1.0, 0) * sigmoid(-1.0) ** 2 + bce(0.5, 0) * sigmoid(0.5) ** 2            # image 0, anchor 1
           + bce(2.0, 0) * sigmoid(2.0) ** 2 + bce(-2.0, 0) * sigmoid(-2.0) ** 2) / n_pos   # image 1, anchor 0
    giou = 2.0 * w * (1 - iou) / weight_sum
    # target distances l, t, r, b = 1.5, 2, 2, 1; left side bins (1, 2, 1, 1, 1)/6, others uniform
    dfl_sides = [0.5 * -math.log(2 / 6) + 0.5 * -math.log(1 / 6), math.log(5), math.log(5), math.log(5)]
    dfl = 0.25 * w * sum(dfl_sides) / 4 / weight_sum
    expected = {"qfl": qfl, "giou": giou, "dfl": dfl}
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], torch.tensor(value, dtype=torch.float32), msg=key)
