"""What every distillation method shares: the base class, configs per detector family, optimiser specs.

A method is an ``nn.Module`` with

- ``NAME`` (registry name) and ``FIELDS``: the store field groups or prefixes (as
  ``store.schema.expand_fields`` understands them) that the official default config reads, which
  is what ``precompute --fields NAME`` caches; the instance property ``fields`` says what a
  configured instance reads (a term with weight 0 reads nothing, an opt-in term adds its fields);
- ``FIELD_PRESETS``: named field sets for other configurations (``--fields defeat-coco``), and
  ``ARTIFACTS``: the per-cache artefacts it reads (MasKD's receptive tokens), which precompute
  makes with :meth:`DistillationMethod.make_artifact` from the method's config (precompute's
  ``--set`` keys; :meth:`DistillationMethod.artifacts_made` says which a config turns off);
- what ``python -m train.viz`` draws for it: ``PICTURE_FIELDS`` (None: no picture),
  ``PICTURE_HELP``, ``PICTURE_OPTIONS`` and :meth:`DistillationMethod.draw_picture`;
- ``Config``: a frozen dataclass of hyperparameters whose defaults are the official values for
  RetinaNet; ``Config.for_family(family, **overrides)`` applies the per-family official values
  (``FAMILY_DEFAULTS``) and then the overrides, rejecting unknown keys and values outside a
  field's type and range (:func:`config_rules`; ``--set`` text is parsed by the same rules);
- learnable parts (adapters, decoders) as submodules, and ``param_groups()`` saying which
  optimiser trains them (:class:`ParamGroupSpec`);
- ``forward(student, teacher, targets, iteration) -> dict[str, Tensor]`` of named, already
  weighted loss terms; the trainer adds them to the detector's own losses.

Teacher and student are compared only inside ``teacher.valid`` (each image's canonical region on
each level), never over batch padding.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.detector import DetectorOutput
from detectors.zoo import TWO_STAGE_FAMILIES
from store.schema import TWO_STAGE_LEVELS
from train.schedule import ScheduleConfig, build_scheduler
from train.teacher_batch import TeacherBatch


def config_keys(config_cls: type) -> list[str]:
    return [f.name for f in fields(config_cls)]


class MethodConfig:
    """Mixin for the Config dataclasses: official defaults per detector family, strict overrides.

    Subclasses are frozen dataclasses whose field defaults are the RetinaNet values and whose
    ``FAMILY_DEFAULTS[family]`` holds what differs for another family. A family missing from
    ``FAMILY_DEFAULTS`` is not supported by the method.
    """

    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {"retina": {}, "gfl": {}}
    # Why a family is not supported (family -> reason), for the refusal: e.g. the official code has no such config.
    UNSUPPORTED: ClassVar[dict[str, str]] = {}

    @classmethod
    def for_family(cls, family: str, **overrides: Any):
        if family not in cls.FAMILY_DEFAULTS:
            why = f" ({cls.UNSUPPORTED[family]})" if family in cls.UNSUPPORTED else ""
            raise ValueError(f"{cls.__qualname__} has no official settings for detector family {family!r}{why}; "
                             f"supported: {sorted(cls.FAMILY_DEFAULTS)}")
        known = config_keys(cls)
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.__qualname__} keys {unknown}; known keys: {known}")
        rules = config_rules(cls, METHOD_LIMITS)
        overrides = {key: rules[key].check(value, key) for key, value in overrides.items()}
        return cls(**{**cls.FAMILY_DEFAULTS[family], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- config values
class SettingError(ValueError):
    """A config value that does not fit its field; the message is one line naming the key and value."""


class _Problem(Exception):
    """What is wrong with a value (internal to ValueRule; surfaced as a SettingError)."""


@dataclass(frozen=True)
class ValueRule:
    """What one config field accepts, as ``KEY=VALUE`` text or as a value: type, range, choices.

    ``kind``: ``bool`` (true, false, 1, 0), ``int`` (integral text only), ``float`` (integral text
    gives an int, as a Python literal would), ``str``, ``tuple`` (of floats: ``(4,5)``, ``4,5``) or
    ``dict`` (a Python dict literal). Numbers, and a tuple's items, must be finite, ``>= minimum``
    (``> minimum`` when ``exclusive``) and ``<= maximum``. ``optional`` also accepts ``none`` (the
    field's automatic default). An empty value is always refused.
    """

    kind: type
    minimum: float | None = None
    exclusive: bool = False
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False

    def describe(self) -> str:
        """``"a float >= 0"``, ``"an int >= 1"``, ``"one of sgd, adamw"``, ..."""
        if self.kind is bool:
            text = "a bool (true, false, 1 or 0)"
        elif self.kind is str:
            text = f"one of {', '.join(self.choices)}" if self.choices else "a non-empty string"
        elif self.kind is dict:
            text = "a dict literal such as {'norm': 'bn'}"
        else:
            text = {int: "an int", float: "a float", tuple: "a tuple of floats"}[self.kind]
            bounds = []
            if self.minimum is not None:
                bounds.append(f"{'>' if self.exclusive else '>='} {self.minimum:g}")
            if self.maximum is not None:
                bounds.append(f"<= {self.maximum:g}")
            if bounds:
                text += (" each " if self.kind is tuple else " ") + " and ".join(bounds)
        return text + (" or none" if self.optional else "")

    def parse(self, text: str, key: str, flag: str = "--set") -> Any:
        """The value of ``KEY=text``; raises :class:`SettingError`: ``flag key='text': problem; expected ...``."""
        try:
            return self._check(self._parse(text.strip()))
        except _Problem as problem:
            raise SettingError(f"{flag} {key}={text!r}: {problem}; expected {self.describe()}") from None

    def check(self, value: Any, key: str) -> Any:
        """``value`` unchanged when it fits; raises :class:`SettingError`: ``key=value: problem; expected ...``."""
        try:
            return self._check(value)
        except _Problem as problem:
            raise SettingError(f"{key}={value!r}: {problem}; expected {self.describe()}") from None

    def _parse(self, text: str) -> Any:
        if not text:
            raise _Problem("empty value")
        if self.optional and text.lower() in ("none", "null"):
            return None
        if self.kind is bool:
            value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
            if value is None:
                raise _Problem("not a bool")
            return value
        if self.kind in (int, float):
            return _parse_number(text, self.kind)
        if self.kind is tuple:
            inner = text[1:-1] if text[0] + text[-1] in ("()", "[]") else text
            items = [item.strip() for item in inner.split(",")]
            if len(items) > 1 and not items[-1]:  # "(4,)"
                items.pop()
            if items == [""]:
                return ()
            if not all(items):
                raise _Problem("an empty item")
            return tuple(_parse_number(item, float) for item in items)
        if self.kind is dict:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise _Problem("not a dict literal") from None
        return text  # str

    def _check(self, value: Any) -> Any:
        if value is None:
            if not self.optional:
                raise _Problem("no value")
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise _Problem("not a bool")
        elif self.kind in (int, float):
            self._check_number(value, self.kind)
        elif self.kind is tuple:
            if not isinstance(value, (tuple, list)):
                raise _Problem("not a tuple")
            for item in value:
                self._check_number(item, float)
        elif self.kind is dict:
            if not isinstance(value, dict):
                raise _Problem("not a dict")
        elif not isinstance(value, str):
            raise _Problem("not a string")
        elif not value:
            raise _Problem("empty value")
        elif self.choices and value not in self.choices:
            raise _Problem("not a choice")
        return value

    def _check_number(self, value: Any, kind: type) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Problem("not a number")
        if kind is int and not isinstance(value, int):
            raise _Problem("not an int")
        if not math.isfinite(value):
            raise _Problem("not finite")
        below = self.minimum is not None and (value <= self.minimum if self.exclusive else value < self.minimum)
        if below or (self.maximum is not None and value > self.maximum):
            raise _Problem("out of range")


_INTEGRAL = re.compile(r"[+-]?[0-9]+")


def _parse_number(text: str, kind: type) -> int | float:
    """An int for integral text ("2"); for a float field, a float for other numeric text ("2.5", "1e-4")."""
    if _INTEGRAL.fullmatch(text):
        return int(text)
    if kind is int:
        raise _Problem("not an int")
    try:
        return float(text)
    except ValueError:
        raise _Problem("not a number") from None


def config_rules(config_cls: type, limits: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ValueRule]:
    """A :class:`ValueRule` per field of the dataclass ``config_cls``, its kind from the type hints.

    Ranges and choices come from ``limits[name]`` (ValueRule keyword arguments); a number without
    an entry must be >= 0 (every count, weight, ratio and rate here is).
    """
    hints = typing.get_type_hints(config_cls)
    limits = limits or {}
    rules = {}
    for f in fields(config_cls):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = len(args) < len(typing.get_args(hint)), args[0]
        kind = typing.get_origin(hint) or hint
        if kind not in (bool, int, float, str, tuple, dict):
            raise TypeError(f"{config_cls.__qualname__}.{f.name}: no command-line rule for the type {hint}")
        extra = dict(limits.get(f.name, {}))
        if kind in (int, float, tuple):
            extra.setdefault("minimum", 0)
        rules[f.name] = ValueRule(kind, optional=optional, **extra)
    return rules


# The range of the methods' hyperparameters by field name (a name means the same in every method);
# a number not listed is >= 0 (weights, iteration counts, ratios, weight decay).
_POSITIVE = {"minimum": 0, "exclusive": True}
METHOD_LIMITS: dict[str, dict[str, Any]] = {
    "temperature": _POSITIVE, "ld_temperature": _POSITIVE, "vlr_temperature": _POSITIVE,
    "kd_temperature": _POSITIVE, "head_temperature": _POSITIVE, "lr": _POSITIVE, "max_grad_norm": _POSITIVE,
    "num_heads": {"minimum": 1}, "ffn_ratio": {"minimum": 1}, "max_queries": {"minimum": 1},
    "images_per_group": {"minimum": 1}, "stage1_lr": _POSITIVE, "stage1_batch_size": {"minimum": 1},
}


# (count, what) -> count (student batch, teacher batch) pairs: a warm-up's data (DistillationMethod.warm_up).
TeacherBatches = Callable[[int, str], Iterable[tuple[Any, TeacherBatch]]]


@dataclass
class RunResources:
    """What a training run offers a method's :meth:`DistillationMethod.prepare` beyond the per-view
    teacher fields: the training data, the cache's artefacts, the online teacher."""

    dataset: Any = None                  # the training split (detectors.data.CocoDetection), its views applied
    artifact: Callable[[str, str], dict] | None = None   # (name, why) -> a cache artefact; raises saying why
    teacher_model: Any = None            # the online teacher (None when the teacher is a cache)
    device: Any = "cpu"
    seed: int = 0
    workers: int = 0
    progress: bool = False


@dataclass
class ArtifactInputs:
    """What precompute gives a method's :meth:`DistillationMethod.make_artifact`, once per cache."""

    teacher_model: Any                   # the frozen teacher (detectors' Detector), on ``device``
    dataset: Any                         # the cached split (detectors.data.CocoDetection), its views applied
    config: Any                          # the method's Config: the teacher's family, precompute's --set overrides
    device: Any = "cpu"
    seed: int = 0
    workers: int = 0
    progress: bool = False


@dataclass
class BuildContext:
    """What a method needs to know about the models to build its learnable parts."""

    student_channels: int = 256          # student FPN channels
    teacher_channels: int = 256          # teacher FPN channels
    num_classes: int = 80
    num_levels: int = 5                  # P3..P7
    student_backbone_channels: tuple[int, int, int] | None = None   # C3..C5 widths (DeFeat's backbone terms)
    teacher_backbone_channels: tuple[int, int, int] | None = None
    prepared: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # method NAME -> its prepare()'s result


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
    FIELDS: ClassVar[tuple[str, ...]] = ()                       # what the default config reads
    # What the default config reads on a family where that differs from FIELDS (a two-stage student's
    # P2..P6 and RPN maps): precompute's ``--fields NAME`` for a teacher of that family.
    FAMILY_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}
    FIELD_PRESETS: ClassVar[dict[str, tuple[str, ...]]] = {}     # precompute --fields names of other configs
    ARTIFACTS: ClassVar[tuple[str, ...]] = ()                    # per-cache artefacts it reads (make_artifact)
    Config: ClassVar[type] = MethodConfig
    PICTURE_FIELDS: ClassVar[tuple[str, ...] | None] = None     # cache fields its viz picture reads
    PICTURE_HELP: ClassVar[str] = ""                             # the picture, for python -m train.viz --help
    PICTURE_OPTIONS: ClassVar[tuple[PictureOption, ...]] = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.family = ""   # the student's detector family (``build_method`` sets it; its fields may depend on it)

    @classmethod
    def prepare(cls, config: Any, run: RunResources) -> Any:
        """What the method needs from the run before it is built (a cache artefact, dataset
        statistics, a stage the online teacher runs first); :meth:`build` finds it in
        ``context.prepared[NAME]``. None by default."""
        return None

    @classmethod
    def artifacts_made(cls, config: Any) -> tuple[str, ...]:
        """The :attr:`ARTIFACTS` precompute makes with the method's ``config`` (its ``Config`` for the
        teacher's family with precompute's ``--set`` overrides): all of them by default; a method
        drops one that a config key turns off (``--set maskd.stage1_iters=0``)."""
        return cls.ARTIFACTS

    @classmethod
    def make_artifact(cls, name: str, inputs: ArtifactInputs) -> tuple[dict[str, Any], dict[str, Any]]:
        """Makes the per-cache artefact ``name`` (one of :attr:`ARTIFACTS`) in precompute, after the
        fields: its arrays (name -> array or tensor) and its JSON-ready meta."""
        raise NotImplementedError(f"{cls.NAME} declares the artefact {name!r} but no maker for it")

    @classmethod
    def build(cls, config: Any, context: BuildContext) -> DistillationMethod:
        """Builds the method from its config and the model facts in ``context``."""
        return cls(config)

    @property
    def fields(self) -> tuple[str, ...]:
        """The teacher fields this configured instance reads."""
        return self.FIELDS

    @property
    def two_stage(self) -> bool:
        """Whether the student's family is two-stage (its outputs a ``detectors.frcnn.TwoStageOutput``)."""
        return self.family in TWO_STAGE_FAMILIES

    @property
    def reads_teacher_roi_head(self) -> bool:
        """Whether this configured instance compares the teacher's RoI outputs on the student's RoIs
        (``TeacherBatch.roi_head``: a two-stage teacher's partial teacher, ``train.partial_teacher``)."""
        return False

    @property
    def cache_options(self) -> dict[str, Any]:
        """The field rules (a cache manifest's ``options``) this configured instance needs the
        teacher fields to have been computed with, e.g. LD's VLR rule; {} when any will do."""
        return {}

    def check_cache_options(self, options: dict[str, Any], where: str) -> None:
        """Refuses (ValueError) a cache whose manifest ``options`` differ from :attr:`cache_options`."""
        for key, wanted in self.cache_options.items():
            if options.get(key) != wanted:
                raise ValueError(f"{where} was written with {key}={options.get(key)!r}, but {self.NAME} is "
                                 f"configured for {wanted!r}")

    def param_groups(self) -> list[ParamGroupSpec]:
        """By default every learnable part trains with the student's optimiser."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroupSpec(f"{self.NAME}", params)] if params else []

    def schedule_notes(self, total_iters: int) -> list[str]:
        """What this configured method advises for a run of ``total_iters`` iterations (printed
        with the schedule warnings before training), e.g. a warm-up a short run needs."""
        return []

    def warm_up(self, teacher_batches: TeacherBatches) -> dict[str, float] | None:
        """Trains parts that learn from the teacher alone, before the student's first step (ICD's
        ``pretrain_batches``); ``teacher_batches(n, what)`` yields n (student batch, TeacherBatch)
        pairs on the training device. Returns what to report, None when there was nothing to do."""
        return None

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def prepare_picture(cls, painter: Any) -> None:
        """Loads once what the picture needs from its options (``painter.options``) before any view is
        drawn, so that a bad option fails first; keeps it in ``painter.state[NAME]``."""

    @classmethod
    def draw_picture(cls, painter: Any, view: Any) -> Any:
        """Draws the method's ``train.viz`` picture of one ``train.viz.ImageView`` with the
        ``train.viz.Painter``'s helpers and returns the PNG's path; raises ``train.viz.Skipped``
        naming what is missing. Imports train.viz (and so matplotlib) only when called."""
        raise NotImplementedError(f"{cls.NAME} has no picture")


@dataclass(frozen=True)
class PictureOption:
    """A ``python -m train.viz`` option of a method's picture (``--maskd-level``); ``train.viz.draw``
    takes it as the keyword :attr:`dest` and the picture reads ``painter.options[dest]``."""

    flag: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# ---------------------------------------------------------------------------------------------- helpers
def pyramid_fields(family: str) -> tuple[str, ...]:
    """The teacher's FPN fields over a student's pyramid: the ``fpn`` group (P3..P7) for a dense family,
    ``fpn.p2`` .. ``fpn.p6`` for a two-stage one."""
    if family in TWO_STAGE_FAMILIES:
        return tuple(f"fpn.{level}" for level in TWO_STAGE_LEVELS)
    return ("fpn",)


# The official runs compute every loss per GPU on 2 images, and DDP averages the gradients: a method
# normalises over each group of 2 consecutive images and averages the groups (METHODS.md, "Batch
# semantics"), so 1 device x 16 images, 8 x 2 and DDP here train the same.
IMAGES_PER_GPU = 2


def sum_per_gpu_batch(per_image: Tensor) -> Tensor:
    """(N, ...) -> (ceil(N / 2), ...): sums over the official per-GPU batches of 2 consecutive images."""
    num_images = per_image.shape[0]
    group = torch.arange(num_images, device=per_image.device) // IMAGES_PER_GPU  # (N,)
    out = per_image.new_zeros((-(-num_images // IMAGES_PER_GPU), *per_image.shape[1:]))
    return out.index_add(0, group, per_image)


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
