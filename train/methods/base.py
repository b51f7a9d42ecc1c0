"""What every distillation method shares: the base class, configs per detector family, optimiser specs.

A method is an ``nn.Module`` with

- ``NAME`` (registry name) and ``FIELDS`` (the store field groups or prefixes it may read, as
  ``store.schema.expand_fields`` understands them); the instance property ``fields`` narrows
  ``FIELDS`` to what the configured terms actually need (a term with weight 0 reads nothing);
- ``Config``: a frozen dataclass of hyperparameters whose defaults are the official values for
  RetinaNet; ``Config.for_family(family, **overrides)`` applies the per-family official values
  (``FAMILY_DEFAULTS``) and then the overrides, rejecting unknown keys;
- learnable parts (adapters, decoders) as submodules, and ``param_groups()`` saying which
  optimiser trains them (:class:`ParamGroupSpec`);
- ``forward(student, teacher, targets, iteration) -> dict[str, Tensor]`` of named, already
  weighted loss terms; the trainer adds them to the detector's own losses.

Teacher and student are compared only inside ``teacher.valid`` (each image's canonical region on
each level), never over batch padding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.outputs import DetectorOutput
from train.schedule import ScheduleConfig, build_scheduler
from train.teacher_batch import TeacherBatch

FAMILIES = ("retina", "gfl")


def config_keys(config_cls: type) -> list[str]:
    return [f.name for f in fields(config_cls)]


class MethodConfig:
    """Mixin for the Config dataclasses: official defaults per detector family, strict overrides.

    Subclasses are frozen dataclasses whose field defaults are the RetinaNet values and whose
    ``FAMILY_DEFAULTS[family]`` holds what differs for another family. A family missing from
    ``FAMILY_DEFAULTS`` is not supported by the method.
    """

    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {"retina": {}, "gfl": {}}

    @classmethod
    def for_family(cls, family: str, **overrides: Any):
        if family not in cls.FAMILY_DEFAULTS:
            raise ValueError(f"{cls.__qualname__} has no official settings for detector family {family!r}; "
                             f"supported: {sorted(cls.FAMILY_DEFAULTS)}")
        known = config_keys(cls)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.__qualname__} keys {unknown}; known keys: {known}")
        return cls(**{**cls.FAMILY_DEFAULTS[family], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BuildContext:
    """What a method needs to know about the models to build its learnable parts."""

    student_channels: int = 256          # student FPN channels
    teacher_channels: int = 256          # teacher FPN channels
    num_classes: int = 80
    num_levels: int = 5                  # P3..P7
    maskd_tokens: Any = None             # MasKD: the receptive tokens learnt in precompute (stage 1)
    dataset_stats: Any = None            # ICD: class and box-size statistics (train.methods.icd.DatasetStats)


@dataclass
class ParamGroupSpec:
    """Which optimiser trains a set of a method's parameters.

    ``optimizer="student"``: add the parameters to the student's optimiser (same lr, schedule,
    weight decay); this is how adapters "trained with the student" are trained.
    ``optimizer="adamw"``: a separate AdamW with its own ``lr``, ``weight_decay``, a linear warmup
    over ``warmup_iters`` then cosine decay over the run, and gradient-norm clipping at
    ``max_grad_norm`` applied to this group alone (:meth:`build` and :meth:`clip`).
    """

    name: str
    params: list[nn.Parameter]
    optimizer: str = "student"
    lr: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    warmup_iters: int = 0
    warmup_ratio: float = 0.001

    def build(self, total_iters: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The optimiser and per-iteration scheduler of a group that has its own optimiser."""
        if self.optimizer != "adamw":
            raise ValueError(f"param group {self.name!r} joins the student's optimiser; nothing to build")
        optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = ScheduleConfig(total_iters=total_iters, warmup_iters=self.warmup_iters,
                                  warmup_ratio=self.warmup_ratio, kind="cosine")
        return optimizer, build_scheduler(optimizer, schedule)

    def clip(self) -> Tensor | None:
        """Clips this group's gradient norm (call after backward, before its optimiser's step)."""
        if self.max_grad_norm is None:
            return None
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)


class DistillationMethod(nn.Module):
    """Base class; see the module docstring for the contract."""

    NAME: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type] = MethodConfig

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def build(cls, config: Any, context: BuildContext) -> DistillationMethod:
        """Builds the method from its config and the model facts in ``context``."""
        return cls(config)

    @property
    def fields(self) -> tuple[str, ...]:
        """The teacher fields this configured instance reads."""
        return self.FIELDS

    def param_groups(self) -> list[ParamGroupSpec]:
        """By default every learnable part trains with the student's optimiser."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroupSpec(f"{self.NAME}", params)] if params else []

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- helpers
def linear_ramp(iteration: int, ramp_iters: int) -> float:
    """0 at iteration 0, rising linearly to 1 at ``ramp_iters`` (and 1 after)."""
    if ramp_iters <= 0 or iteration >= ramp_iters:
        return 1.0
    return max(0, iteration) / ramp_iters


def require(value: Any, what: str, method: str) -> Any:
    if value is None:
        raise ValueError(f"{method} needs the teacher's {what}, which this TeacherBatch does not hold; "
                         f"read the fields {what!r} from the cache")
    return value


def check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ; "
                         f"teacher and student must share the detector family, classes and batch layout")


def kl_divergence_with_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """LD's ``KL(T)`` per row: ``T² · mean over the last dim of p_t·(log p_t − log p_s)``.

    ``p = softmax(logits / T)`` over the last dim; the teacher side is detached. (R, B) -> (R,).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="none").mean(dim=-1) * temperature ** 2


def zero_term(*tensors: Tensor) -> Tensor:
    """A zero that keeps ``tensors`` in the graph (so DDP sees every parameter used)."""
    return sum(t.sum() * 0 for t in tensors)
