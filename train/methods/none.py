"""No distillation: the baseline student. Reads no teacher field, adds no loss term.

Batch semantics (see the other methods): no term, so nothing to group per official GPU batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from detectors.detector import DetectorOutput
from detectors.zoo import FAMILIES
from train.methods.base import DistillationMethod, MethodConfig
from train.teacher_batch import TeacherBatch


@dataclass(frozen=True)
class NoneConfig(MethodConfig):
    """No hyperparameters."""

    # the baseline of every detector family
    FAMILY_DEFAULTS = {family: {} for family in FAMILIES}


class NoDistillation(DistillationMethod):
    NAME = "none"
    FIELDS = ()
    Config = NoneConfig

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        return {}
