"""ATSS assignment on small hand-checked cases (IoUs worked out by hand in the comments)."""
import statistics

import torch

from detectors.atss import atss_assign


def grid_anchors(centers: list[tuple[float, float]], side: float) -> torch.Tensor:
    half = side / 2
    return torch.tensor([[x - half, y - half, x + half, y + half] for x, y in centers])


# Level 1: 3x3 anchors of side 16 centred on a stride-8 grid; level 2: 2x2 anchors of side 32, stride 16.
LEVEL1 = [(x, y) for y in (0.0, 8.0, 16.0) for x in (0.0, 8.0, 16.0)]
LEVEL2 = [(x, y) for y in (0.0, 16.0) for x in (0.0, 16.0)]


def test_two_levels_threshold_is_mean_plus_unbiased_std():
    """GT (2, 3, 18, 15), centre (10, 9), area 192; topk 3 per level.

    Level 1 nearest centres: (8, 8) d=2.24, (16, 8) d=6.08, (8, 16) d=7.28 (next: 9.22).
        IoU (8, 8)  = [0,0,16,16]∩GT = 14·12 = 168 / (256+192−168) = 168/280
        IoU (16, 8) = 10·12 = 120 / 328;  IoU (8, 16) = 14·7 = 98 / 350
    Level 2 nearest centres: (16, 16) d=9.22, (16, 0) d=10.82, (0, 16) d=12.21 (next: 13.45).
        IoU (16, 16) = 192/1024 (GT inside); IoU (16, 0) = 16·12 = 192/1024; IoU (0, 16) = 14·12 = 168/1048
    thr = mean + stdev of the six = 0.4639: only (8, 8) (IoU 0.6, centre inside the GT) is positive.
    """
    anchors = torch.cat([grid_anchors(LEVEL1, 16), grid_anchors(LEVEL2, 32)])
    gt = torch.tensor([[2.0, 3.0, 18.0, 15.0]])
    result = atss_assign(anchors, [9, 4], gt, topk=3)

    candidate_ious = [168 / 280, 120 / 328, 98 / 350, 192 / 1024, 192 / 1024, 168 / 1048]
    threshold = statistics.mean(candidate_ious) + statistics.stdev(candidate_ious)
    assert abs(threshold - 0.4639) < 1e-4
    torch.testing.assert_close(result.thresholds, torch.tensor([threshold]))
    level1_candidates = {LEVEL1.index(c) for c in [(8.0, 8.0), (16.0, 8.0), (8.0, 16.0)]}
    level2_candidates = {9 + LEVEL2.index(c) for c in [(16.0, 16.0), (16.0, 0.0), (0.0, 16.0)]}
    assert set(result.candidates[:, 0].tolist()) == level1_candidates | level2_candidates
    expected = torch.full((13,), -1)
    expected[LEVEL1.index((8.0, 8.0))] = 0
    assert torch.equal(result.matched_gt, expected)
    torch.testing.assert_close(result.ious[:, 0].gather(0, result.candidates[:, 0]).sort().values,
                               torch.tensor(sorted(candidate_ious)))


def test_candidates_need_their_centre_inside_the_gt():
    """A 4x4 GT (9, 9.5, 13, 13.5) inside the three nearest anchors (8,8), (8,16), (16,8): all IoUs are
    16/256, so std = 0 and thr = 0.0625 is met by all three, but none of their centres is inside the GT."""
    anchors = grid_anchors(LEVEL1, 16)
    result = atss_assign(anchors, [9], torch.tensor([[9.0, 9.5, 13.0, 13.5]]), topk=3)
    torch.testing.assert_close(result.thresholds, torch.tensor([0.0625]))
    assert (result.matched_gt == -1).all()


def test_anchor_positive_for_two_gts_goes_to_the_higher_iou():
    """Anchor (8, 8) = [0, 0, 16, 16] is positive for both GTs (topk 3, one level):
    GT0 (1, 2, 17, 18): candidates (8,8) 210/302, (8,16) 150/362, (16,8) 126/386 -> thr 0.6714 <= 0.6954
    GT1 (0.5, 1, 16.5, 17): candidates (8,8) 232.5/279.5, (8,16) 139.5/372.5, (16,8) 127.5/384.5 -> thr 0.7899 <= 0.8318
    It goes to GT1 (IoU 0.8318 > 0.6954); no other anchor is positive.
    """
    anchors = grid_anchors(LEVEL1, 16)
    gts = torch.tensor([[1.0, 2.0, 17.0, 18.0], [0.5, 1.0, 16.5, 17.0]])
    result = atss_assign(anchors, [9], gts, topk=3)
    ious = [[210 / 302, 150 / 362, 126 / 386], [232.5 / 279.5, 139.5 / 372.5, 127.5 / 384.5]]
    thresholds = [statistics.mean(v) + statistics.stdev(v) for v in ious]
    torch.testing.assert_close(result.thresholds, torch.tensor(thresholds))
    assert ious[0][0] >= thresholds[0] and ious[1][0] >= thresholds[1]
    expected = torch.full((9,), -1)
    expected[LEVEL1.index((8.0, 8.0))] = 1
    assert torch.equal(result.matched_gt, expected)


def test_no_gt_is_all_background():
    result = atss_assign(grid_anchors(LEVEL1, 16), [9], torch.zeros(0, 4))
    assert (result.matched_gt == -1).all() and result.thresholds.shape == (0,) and result.ious.shape == (9, 0)
