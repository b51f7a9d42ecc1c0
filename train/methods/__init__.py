"""Distillation methods: one file each, and the registry that builds them by name.

    method = build_method("ld+frs", "gfl", {"frs.feat_weight": 0.2}, student_channels=64, teacher_channels=128)
    teacher = collate_teacher(samples, level_sizes, device)      # fields: method.fields
    terms = method(student_out, teacher, targets, iteration)     # {"ld_main": ..., "frs_feat": ...}
    loss = sum(student_out.losses.values()) + sum(terms.values())

Names: ``METHODS``, in the order tables and figures list them. ``"a+b"`` combines methods
(:class:`MethodSpec`, the one parser of the method string): their terms are added side by side
(term names are unique per method) and their fields and parameter groups are joined. Overrides
are config keys, either plain (``"feat_weight"``) when exactly one of the combined methods has
that key, or qualified (``"frs.feat_weight"``); unknown keys are rejected with the known ones
listed. Defaults are the official values for the detector family (``retina``
or ``gfl``), see each method's ``Config``. Values must fit their field's type and range
(``base.config_rules``); command-line text is parsed by the same rules (:func:`parse_overrides`).

Everyone else asks the registry what a method needs, when called: precompute's ``--fields NAME``
resolves through :func:`named_field_sets` and makes the artefacts :func:`artifact_makers` names
(each class's ``FIELDS``, ``FIELD_PRESETS``, ``ARTIFACTS`` and ``make_artifact``, given the
method's config: precompute's ``--set`` takes the hyperparameters of the methods its ``--fields``
names, :func:`methods_named`, as train's does), ``train.viz``
draws each class's picture, and the sweep, its report and the benchmarks list :data:`METHODS`.
``python -m train.methods`` prints the registry.

A method defined in a file of its own, outside this package, joins with :func:`register_method`
(tests/test_toy_method.py does); the processes that the sweep and precompute start register it
again from where it is defined (:func:`method_sources`, :func:`register_method_sources`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detectors.detector import DetectorOutput
from detectors.zoo import FAMILIES
from store import SchemaError, expand_fields
from train.methods.base import (METHOD_LIMITS, ArtifactInputs, BuildContext, DistillationMethod,
                                MethodConfig, ParamGroupSpec, RunResources, SettingError, TeacherBatches, ValueRule,
                                config_keys, config_rules)
from train.methods.defeat import DeFeat
from train.methods.frs import FRS
from train.methods.icd import ICD, DatasetStats
from train.methods.ld import LD
from train.methods.maskd import MasKD
from train.methods.none import NoDistillation
from train.teacher_batch import TeacherBatch

# Method name -> class, in the order tables and figures list them: the built-in methods, then the
# registered ones in the order they were registered.
METHODS: dict[str, type[DistillationMethod]] = {}
# The run every method is compared with (the sweep report's ΔAP).
BASELINE = NoDistillation.NAME

__all__ = ["BASELINE", "METHODS", "ArtifactInputs", "BuildContext", "CombinedMethod", "DatasetStats", "DeFeat",
           "DistillationMethod", "FRS", "ICD", "LD", "MasKD", "MethodConfig", "MethodSpec", "NoDistillation",
           "ParamGroupSpec", "RunResources", "SettingError", "ValueRule", "artifact_makers", "build_method",
           "check_overrides", "default_iteration_settings", "iteration_settings", "method_configs",
           "method_sources", "methods_named", "named_field_sets", "override_rule", "parse_overrides", "register_method", "register_method_sources",
           "schedule_warnings", "split_overrides"]

# A method name is one word of the method string ("ld+frs"), of qualified keys ("frs.feat_weight")
# and before the first "_" of its loss terms' names ("frs_feat", train.figures reads them so).
_METHOD_NAME = re.compile(r"[a-z][a-z0-9-]*")


def register_method(cls: type[DistillationMethod]) -> type[DistillationMethod]:
    """Adds ``cls`` to :data:`METHODS` under its ``NAME`` and returns it (so it also decorates a class).

    Refuses (ValueError) a name that is not one lowercase word, that another class or a field preset
    already holds, or that ``precompute --fields`` reads otherwise ("all", a field group, prefix or
    name), and field presets that clash likewise. Registering the same class again changes nothing.
    """
    if METHODS.get(cls.NAME) is cls:
        return cls
    names = [cls.NAME, *cls.FIELD_PRESETS]
    bad = [name for name in names if not _METHOD_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"{cls.__qualname__}: method and field preset names must match {_METHOD_NAME.pattern}, "
                         f"got {bad}")
    registered = {name for known in METHODS.values() for name in (known.NAME, *known.FIELD_PRESETS)}
    taken = [name for name in names if name == "all" or name in registered or _is_field_spec(name)]
    if taken:
        raise ValueError(f"{cls.__qualname__}: the names {taken} are taken (a method or field preset, 'all', or a "
                         f"store field group, prefix or name)")
    METHODS[cls.NAME] = cls
    return cls


def _is_field_spec(name: str) -> bool:
    try:
        expand_fields([name])
    except SchemaError:
        return False
    return True


for _builtin in (NoDistillation, FRS, ICD, MasKD, LD, DeFeat):
    register_method(_builtin)


def method_sources() -> dict[str, str]:
    """``"FILE:CLASS"`` of each method registered from outside this package, by name: what a process
    started from this one (a sweep run, a spawned precompute rank) passes to
    :func:`register_method_sources` to know the same methods. A class defined where there is no file
    (an interactive session) is left out: other processes do not know it."""
    files = {name: getattr(sys.modules.get(cls.__module__), "__file__", None) for name, cls in METHODS.items()
             if not cls.__module__.startswith(__name__ + ".")}
    return {name: f"{file}:{METHODS[name].__qualname__}" for name, file in files.items() if file}


def register_method_sources(sources: Mapping[str, str]) -> None:
    """Registers the methods of :func:`method_sources` not yet known here: each file is loaded as a
    module of its own (its ``if __name__ == "__main__":`` block does not run) and the class registered."""
    for name, source in sources.items():
        if name in METHODS:
            continue
        path, _, qualname = source.rpartition(":")
        if not Path(path).is_file():
            raise ValueError(f"method {name!r} is defined in {path}, which does not exist here")
        spec = importlib.util.spec_from_file_location(f"registered_method_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # dataclasses and type hints look their module up there
        spec.loader.exec_module(module)
        cls = module
        for part in qualname.split("."):
            cls = getattr(cls, part)
        register_method(cls)


@dataclass(frozen=True)
class MethodSpec:
    """A method string parsed once: ``MethodSpec.parse("ld+frs").names == ("ld", "frs")``; ``str()``
    gives the string back. Every function here takes either, so a caller that holds a spec never
    has it parsed again."""

    names: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str | MethodSpec) -> MethodSpec:
        """``"ld+frs"`` -> ``MethodSpec(("ld", "frs"))``, checked against the registry; a spec as it is."""
        if isinstance(spec, MethodSpec):
            return spec
        names = tuple(name.strip().lower() for name in spec.split("+"))
        unknown = [name for name in names if name not in METHODS]
        if unknown or not names:
            raise ValueError(f"unknown distillation method(s) {unknown} in {spec!r}; known: {list(METHODS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"method {spec!r} names a method twice")
        if len(names) > 1 and BASELINE in names:
            raise ValueError(f"{BASELINE!r} cannot be combined with other methods ({spec!r})")
        return cls(names)

    def __str__(self) -> str:
        return "+".join(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names


def named_field_sets(family: str | None = None) -> dict[str, tuple[str, ...]]:
    """The names ``precompute --fields`` takes for what methods read, with their field groups: each
    method's name (what its default config reads: ``FIELDS``, or ``FAMILY_FIELDS[family]`` for a
    teacher of ``family``) and each method's ``FIELD_PRESETS``."""
    sets: dict[str, tuple[str, ...]] = {}
    for name, cls in METHODS.items():
        sets[name] = cls.FAMILY_FIELDS.get(family, cls.FIELDS)
        sets.update(cls.FIELD_PRESETS)
    return sets


def methods_named(names: Iterable[str]) -> MethodSpec:
    """The methods that ``names`` (precompute ``--fields`` items) name by method name or one of their
    field presets, every registered one for "all", in registry order; other names (field groups)
    are ignored. Not a trainable combination: it may hold the baseline beside others (a spec for
    :func:`parse_overrides`, :func:`split_overrides` and :func:`method_configs`)."""
    names = [name.strip() for name in names]
    return MethodSpec(tuple(cls.NAME for cls in METHODS.values()
                            if any(name in ("all", cls.NAME) or name in cls.FIELD_PRESETS for name in names)))


def method_configs(spec: str | MethodSpec, family: str, overrides: Mapping[str, Any] | None = None,
                   only: Iterable[str] | None = None) -> dict[str, Any]:
    """Method name -> its ``Config.for_family(family, **its overrides)``, for the methods of ``spec``
    (those in ``only``, when given); ``overrides`` are keys of ``spec``'s methods, plain or qualified."""
    spec = MethodSpec.parse(spec)
    per_method = split_overrides(spec, dict(overrides or {}))
    wanted = spec.names if only is None else [name for name in spec.names if name in set(only)]
    return {name: METHODS[name].Config.for_family(family, **per_method[name]) for name in wanted}


def artifact_makers(names: Iterable[str], configs: Mapping[str, Any] | None = None
                    ) -> dict[str, type[DistillationMethod]]:
    """Per-cache artefact -> the method class that makes it (``make_artifact``), for the methods
    named in ``names`` by method name or one of their field presets (:func:`methods_named`). With
    ``configs`` (method name -> its config, :func:`method_configs`), only the artefacts made with
    them (``artifacts_made``); without, every declared one."""
    out = {}
    for name in methods_named(names).names:
        cls = METHODS[name]
        if not cls.ARTIFACTS:
            continue
        made = cls.ARTIFACTS if configs is None else cls.artifacts_made(configs[name])
        out.update({artifact: cls for artifact in made if artifact not in out})
    return out


def build_method(spec: str | MethodSpec, family: str, overrides: dict[str, Any] | None = None, *,
                 student_channels: int = 256, teacher_channels: int = 256, num_classes: int = 80,
                 num_levels: int = 5, student_backbone_channels: tuple[int, int, int] | None = None,
                 teacher_backbone_channels: tuple[int, int, int] | None = None, run: RunResources | None = None,
                 prepared: dict[str, Any] | None = None) -> DistillationMethod:
    """Builds a method (or a ``+`` combination) with the official defaults of ``family`` and ``overrides``.

    Args:
        spec: ``"frs"``, ``"ld+frs"``, ... or its :class:`MethodSpec`.
        family: the student's (and teacher's) detector family, ``"retina"`` or ``"gfl"``.
        overrides: config keys -> values (plain or ``"<method>.<key>"``).
        student_channels, teacher_channels: FPN widths, for adapters and projections.
        num_classes: the detector's classes (ICD's query one-hots).
        student_backbone_channels, teacher_backbone_channels: C3..C5 widths (DeFeat's backbone terms).
        run: the training run's data, artefacts and online teacher: each method's ``prepare`` step
            reads what it needs from it (MasKD's tokens, ICD's dataset statistics).
        prepared: method name -> what its ``prepare`` would return, given directly (tests; it wins
            over ``run``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown detector family {family!r}; expected one of {sorted(FAMILIES)}")
    spec = MethodSpec.parse(spec)
    per_method = split_overrides(spec, dict(overrides or {}))
    configs = {name: METHODS[name].Config.for_family(family, **per_method[name]) for name in spec.names}
    prepared = dict(prepared or {})
    # A prepare step may draw random numbers (MasKD's stage 1): the methods' initial weights must
    # depend on the seed alone, so it runs on a forked generator.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        for name, config in configs.items():
            if name not in prepared and run is not None:
                prepared[name] = METHODS[name].prepare(config, run)
    context = BuildContext(student_channels=student_channels, teacher_channels=teacher_channels,
                           num_classes=num_classes, num_levels=num_levels,
                           student_backbone_channels=student_backbone_channels,
                           teacher_backbone_channels=teacher_backbone_channels, prepared=prepared)
    parts = [METHODS[name].build(config, context) for name, config in configs.items()]
    for part in parts:
        part.family = family
    if len(parts) == 1:
        return parts[0]
    combined = CombinedMethod(parts)
    combined.family = family
    return combined


# The official schedules these methods' iteration counts were chosen for: mmdetection's 1x
# (12 epochs of COCO at batch 16).
REFERENCE_ITERS = 90_000


def iteration_settings(method: DistillationMethod) -> dict[str, int]:
    """The method's hyperparameters counted in iterations (ramps, warmups, detach phases), qualified."""
    configs = method.config if isinstance(method, CombinedMethod) else {method.NAME: method.config}
    return _iteration_settings(configs)


def default_iteration_settings(spec: str | MethodSpec, family: str) -> dict[str, int]:
    """:func:`iteration_settings` of the official configs of ``family``, without building the method."""
    spec = MethodSpec.parse(spec)
    configs = {name: METHODS[name].Config.for_family(family) for name in spec.names}
    return _iteration_settings(configs)


def _iteration_settings(configs: dict[str, Any]) -> dict[str, int]:
    """Fields named ``*iters*`` or ``*warmup*``, except those whose metadata says they count no student
    iterations (``student_schedule: False``: MasKD's stage 1 runs before the student's first step)."""
    out = {}
    for name, config in configs.items():
        if dataclasses.is_dataclass(config):
            for f in dataclasses.fields(config):
                value = getattr(config, f.name)
                if not f.metadata.get("student_schedule", True):
                    continue
                if ("iters" in f.name or "warmup" in f.name) and isinstance(value, int) and value > 0:
                    out[f"{name}.{f.name}"] = value
    return out


def schedule_warnings(method: DistillationMethod, total_iters: int) -> list[str]:
    """Iteration counts set for a 1x schedule that take up much of a shorter run (ICD's 1000 detached
    iterations are the whole of a 900-iteration run: the student would never be distilled)."""
    warnings = []
    for key, value in iteration_settings(method).items():
        if value > total_iters / 4:
            scaled = max(1, round(value * total_iters / REFERENCE_ITERS))
            warnings.append(f"{key}={value} spans {min(value, total_iters)} of this run's {total_iters} iterations "
                            f"(the value is meant for a ~{REFERENCE_ITERS // 1000}k-iteration schedule); "
                            f"--set {key}={scaled} keeps the official fraction")
    parts = method.parts.values() if isinstance(method, CombinedMethod) else [method]
    return warnings + [note for part in parts for note in part.schedule_notes(total_iters)]


def split_overrides(spec: str | MethodSpec, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Overrides of a (combined) method, per part: ``{"frs": {"feat_weight": 0.2}, "ld": {}}``."""
    names = MethodSpec.parse(spec).names
    keys = {name: config_keys(METHODS[name].Config) for name in names}
    per_method: dict[str, dict[str, Any]] = {name: {} for name in names}
    unknown, ambiguous = [], []
    for key, value in overrides.items():
        method, _, plain = key.rpartition(".")
        if method:
            if method in keys and plain in keys[method]:
                per_method[method][plain] = value
            else:
                unknown.append(key)
            continue
        owners = [name for name in names if key in keys[name]]
        if len(owners) == 1:
            per_method[owners[0]][key] = value
        elif owners:
            ambiguous.append(f"{key} (use one of {[f'{o}.{key}' for o in owners]})")
        else:
            unknown.append(key)
    if unknown or ambiguous:
        known = [f"{name}.{k}" for name in names for k in keys[name]]
        problems = ([f"unknown override keys {unknown}"] if unknown else []) + \
                   ([f"ambiguous override keys {ambiguous}"] if ambiguous else [])
        raise ValueError(f"{'; '.join(problems)} for method {'+'.join(names)!r}; known keys: {known} "
                         f"(the part after the dot alone where it is unique)")
    return per_method


def override_rule(key: str) -> ValueRule:
    """The rule of a qualified method hyperparameter ``"frs.feat_weight"``; ValueError naming the valid keys."""
    name, _, plain = key.partition(".")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {key!r}; known methods: {list(METHODS)}")
    rules = config_rules(METHODS[name].Config, METHOD_LIMITS)
    if plain not in rules:
        raise ValueError(f"unknown {name} hyperparameter {key!r}; valid keys: {[f'{name}.{k}' for k in rules]}")
    return rules[plain]


def parse_overrides(spec: str | MethodSpec, texts: dict[str, str], flag: str = "--set") -> dict[str, Any]:
    """Command-line overrides of a (combined) method, parsed: ``{"frs.feat_weight": "0.2"}`` ->
    ``{"frs.feat_weight": 0.2}`` (keys as given, plain or qualified).

    Every value is parsed and checked by its field's :class:`ValueRule`, and each part's config is
    built once so that its own checks run too. Raises ValueError, one line, naming the flag, key and
    value (:class:`SettingError`), or listing the known keys for an unknown or ambiguous one.
    """
    spec = MethodSpec.parse(spec)
    split_overrides(spec, texts)  # every unknown and ambiguous key at once, with the known keys
    values = {}
    for key, text in texts.items():
        [(name, plain)] = [(name, plain) for name, part in split_overrides(spec, {key: text}).items()
                           for plain in part]
        values[key] = override_rule(f"{name}.{plain}").parse(text, key, flag)
    try:
        check_overrides(spec, values)
    except SettingError as error:
        raise SettingError(f"{flag} {error}") from None
    return values


def check_overrides(spec: str | MethodSpec, overrides: dict[str, Any]) -> None:
    """Builds each part's config with its ``overrides`` (official defaults of the first family it
    supports), so that the values' rules and the config's own checks (LD's ``vlr_rule`` choices,
    ...) run before any work; raises ValueError, one line."""
    for name, part in split_overrides(spec, overrides).items():
        config_cls = METHODS[name].Config
        if part:
            try:
                config_cls.for_family(next(iter(config_cls.FAMILY_DEFAULTS)), **part)
            except SettingError:
                raise
            except (TypeError, ValueError) as error:
                given = " ".join(f"{name}.{key}={value!r}" for key, value in part.items())
                raise SettingError(f"{given}: {error}") from None


class CombinedMethod(DistillationMethod):
    """Several methods side by side: their terms, fields and parameter groups joined."""

    def __init__(self, parts: list[DistillationMethod]) -> None:
        super().__init__({part.NAME: part.config for part in parts})
        self.parts = nn.ModuleDict({part.NAME: part for part in parts})
        self.NAME = "+".join(part.NAME for part in parts)

    @property
    def fields(self) -> tuple[str, ...]:
        out: list[str] = []
        for part in self.parts.values():
            out += [f for f in part.fields if f not in out]
        return tuple(out)

    @property
    def reads_teacher_roi_head(self) -> bool:
        return any(part.reads_teacher_roi_head for part in self.parts.values())

    @property
    def cache_options(self) -> dict:
        return {key: value for part in self.parts.values() for key, value in part.cache_options.items()}

    def check_cache_options(self, options: dict, where: str) -> None:
        for part in self.parts.values():
            part.check_cache_options(options, where)

    def param_groups(self) -> list[ParamGroupSpec]:
        return [group for part in self.parts.values() for group in part.param_groups()]

    def warm_up(self, teacher_batches: TeacherBatches) -> dict[str, float] | None:
        reports = [part.warm_up(teacher_batches) for part in self.parts.values()]
        merged = {key: value for report in reports if report for key, value in report.items()}
        return merged or None

    def forward(self, student: DetectorOutput, teacher: TeacherBatch, targets: list[dict[str, Tensor]],
                iteration: int) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for name, part in self.parts.items():
            part_terms = part(student, teacher, targets, iteration)
            clash = set(part_terms) & set(terms)
            if clash:
                raise RuntimeError(f"loss terms {sorted(clash)} of {name!r} clash with another method's")
            terms.update(part_terms)
        return terms
