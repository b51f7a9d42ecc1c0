"""The optimisation of a student run: every optimiser and schedule, gradient clipping, the AMP scaler.

    optimizers = RunOptimizers(config, student, method.param_groups(), total_iters, steps_per_epoch, amp_dtype)
    optimizers.zero_grad()
    loss = ...                               # the forward
    grad_norms = optimizers.step(loss)       # backward, clip, step, schedule: {"grad_norm": ...}
    optimizers.learning_rates()              # {"lr": ..., "lr_icd_aux": ...}

The student and the method's parameter groups with ``optimizer="student"`` (adapters) share one
optimiser (SGD or AdamW from the config), one schedule and one gradient-norm clip
(``config.clip_grad``); each ``optimizer="adamw"`` group (ICD's decoder) has its own AdamW,
schedule and clip (``ParamGroupSpec.build`` and ``clip``). Under fp16 a ``GradScaler`` scales the
loss and unscales every gradient before it is clipped.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from train.config import TrainConfig
from train.methods import ParamGroupSpec
from train.schedule import ScheduleConfig, build_scheduler, build_sgd


class RunOptimizers:
    """Every optimiser, scheduler and clip of a run, stepped together once per iteration."""

    def __init__(self, config: TrainConfig, student: nn.Module, groups: list[ParamGroupSpec], total_iters: int,
                 steps_per_epoch: int, amp_dtype: torch.dtype | None) -> None:
        c = config
        for group in groups:
            if group.optimizer not in ("student", "adamw"):
                raise ValueError(f"param group {group.name!r} asks for optimiser {group.optimizer!r}")
        self.clip_grad = c.clip_grad
        self.aux_groups = [g for g in groups if g.optimizer == "adamw"]
        params = [p for p in student.parameters() if p.requires_grad]
        params += [p for g in groups if g.optimizer == "student" for p in g.params if p.requires_grad]
        self.clipped_params = params
        if c.optimizer == "sgd":
            self.optimizer = build_sgd(params, c.lr, c.momentum, c.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        schedule = ScheduleConfig(total_iters=total_iters, warmup_iters=min(c.warmup_iters, total_iters // 2),
                                  warmup_ratio=c.warmup_ratio, kind=c.schedule,
                                  milestones=tuple(int(m * steps_per_epoch) for m in c.milestones))
        self.scheduler = build_scheduler(self.optimizer, schedule)
        built = [group.build(total_iters) for group in self.aux_groups]
        self.aux_optimizers = [optimizer for optimizer, _ in built]
        self.aux_schedulers = [scheduler for _, scheduler in built]
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *self.aux_optimizers]

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self, loss: Tensor) -> dict[str, float]:
        """Backward, clip, step every optimiser and scheduler; returns the gradient norms before clipping
        (``grad_norm``: the student's and its adapters', ``grad_norm_NAME``: a separate group's)."""
        norms = {}
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.clip_grad > 0:
            norms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.clipped_params, self.clip_grad))
        for group in self.aux_groups:
            norm = group.clip()
            if norm is not None:
                norms[f"grad_norm_{group.name}"] = float(norm)
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        for scheduler in self.aux_schedulers:
            scheduler.step()
        return norms

    def learning_rates(self) -> dict[str, float]:
        """The student's lr (``lr``) and each separate group's (``lr_NAME``), as the next step uses them."""
        rates = {"lr": self.scheduler.get_last_lr()[0]}
        for group, scheduler in zip(self.aux_groups, self.aux_schedulers):
            rates[f"lr_{group.name}"] = scheduler.get_last_lr()[0]
        return rates

    def state_dict(self) -> dict:
        """What a resumed run restores (the run state's ``optimizer``, ``scheduler``, ``aux_optimizers``,
        ``aux_schedulers`` and ``scaler``)."""
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    aux_optimizers=[o.state_dict() for o in self.aux_optimizers],
                    aux_schedulers=[s.state_dict() for s in self.aux_schedulers],
                    scaler=self.scaler.state_dict() if self.scaler is not None else None)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for optimizer, saved in zip(self.aux_optimizers, state["aux_optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.aux_schedulers, state["aux_schedulers"]):
            scheduler.load_state_dict(saved)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
