import math

import pytest
import torch

from train.schedule import ScheduleConfig, build_scheduler, build_sgd, lr_factor


def test_step_schedule_with_warmup_hand_values():
    cfg = ScheduleConfig(total_iters=100, warmup_iters=10, warmup_ratio=0.001, kind="step", milestones=(50, 80))
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(49, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(0.1)
    assert lr_factor(80, cfg) == pytest.approx(0.01)


def test_cosine_schedule_hand_values():
    cfg = ScheduleConfig(total_iters=100, warmup_iters=0, kind="cosine", min_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(25, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduler_drives_optimizer_lr():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = build_sgd([w], lr=0.02)
    sched = build_scheduler(opt, ScheduleConfig(total_iters=10, warmup_iters=2, warmup_ratio=0.5, milestones=(5,)))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.01, 0.015, 0.02, 0.02, 0.02, 0.002])


def test_unknown_schedule_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        ScheduleConfig(total_iters=1, kind="linear")
