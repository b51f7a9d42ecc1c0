"""What a student run is told: :class:`TrainConfig`, the one description of ``python -m train``'s options.

Each field carries its command-line help and ``--help`` group in its metadata (``train.options``
builds the parser from them); :data:`TRAIN_LIMITS` gives the ranges and choices that the flags,
recipes and the sweep's ``--set``/``--grid`` values are checked against (:func:`train_option_rules`).
Nothing here imports torch, so that ``python -m train --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from train.options import add_config_options, config_values, option_groups, parse_assignments, split_assignments

# The --help sections, in order.
WHAT, TEACHER, DATA, OPTIMISATION, OUTPUT = (
    "what to train", "teacher (exactly one)", "data", "optimisation", "evaluation, checkpoints, logs")
OPTION_GROUPS = (WHAT, TEACHER, DATA, OPTIMISATION, OUTPUT)

# The autocast modes: the names of the trainer's AMP dtypes (spelled here so that --help imports no
# torch; tests/test_config_values.py checks that they agree), and "auto".
AMP_MODES = ("auto", "none", "bf16", "fp16")

# Ranges and choices of the trainer options, for their flags and the sweep's --set/--grid; a number
# not listed must be >= 0. Types come from TrainConfig itself.
TRAIN_LIMITS = {
    "epochs": {"minimum": 1}, "batch_size": {"minimum": 1}, "eval_batch_size": {"minimum": 1},
    "log_every": {"minimum": 1}, "lr": {"minimum": 0, "exclusive": True}, "momentum": {"maximum": 1},
    "warmup_ratio": {"maximum": 1}, "optimizer": {"choices": ("sgd", "adamw")},
    "schedule": {"choices": ("step", "cosine")}, "on_error": {"choices": ("skip", "raise")},
    "amp": {"choices": AMP_MODES},
}


@dataclass
class TrainConfig:
    """Everything a student run is told (the CLI's options, ``python -m train --help``)."""

    data: str = field(metadata={"group": DATA, "help": "COCO-layout root: annotations/instances_SPLIT.json, SPLIT/"})
    out: str = field(metadata={"group": OUTPUT, "help": "run directory"})
    method: str = field(default="none", metadata={
        "group": WHAT, "help": "a method's name, or a+b (python -m train.methods lists them)"})
    student: str = field(default="gfl-r50", metadata={
        "group": WHAT, "help": "student zoo name (gfl-r50, retina-r18, gfl-nano, ...)"})
    cache: str | None = field(default=None, metadata={
        "group": TEACHER, "help": "teacher cache directory or fsspec URL (python -m precompute)"})
    teacher: str | None = field(default=None, metadata={
        "group": TEACHER, "help": "online teacher checkpoint: computes the same fields on the fly"})
    teacher_arch: str = field(default="auto", metadata={
        "group": TEACHER, "help": "online teacher architecture: zoo name, rNN or auto (see precompute)"})
    views: str | None = field(default=None, metadata={
        "group": DATA, "help": "cache: the views it must hold (default: its own); online: views to train on, as "
                               "python -m precompute --views", "default_text": "default"})
    split: str = field(default="train2017", metadata={"group": DATA, "help": "training split"})
    val_split: str = field(default="val2017", metadata={"group": DATA, "help": "evaluation split"})
    on_error: str = field(default="skip", metadata={
        "group": DATA, "help": "a training image that cannot be read: skip it (replaced by the next, counted in "
                               "results.json) or stop with an error naming it; a changed image always stops"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "group": WHAT, "flag": "--set", "help": "method hyperparameter, repeatable: frs.feat_weight=0.2 (or "
                                                "feat_weight=0.2 when unique)"})
    student_config: dict[str, Any] = field(default_factory=dict, metadata={
        "group": WHAT, "help": "student DetectorConfig override, repeatable (e.g. norm=bn, trainable_layers=5)"})
    inherit: bool = field(default=False, metadata={
        "group": WHAT, "action": argparse.BooleanOptionalAction,
        "help": "initialise the student's neck and head from the teacher (shapes must match)"})
    artifacts_from: str | None = field(default=None, metadata={
        "group": TEACHER, "help": "online teacher: a cache whose per-cache artefacts an online-teacher run reads "
                                  "(else a method that needs one makes it here, with its --set settings)"})
    epochs: int = field(default=12, metadata={"group": OPTIMISATION, "help": "training epochs"})
    batch_size: int = field(default=8, metadata={"group": OPTIMISATION, "help": "images per step per rank"})
    optimizer: str = field(default="sgd", metadata={"group": OPTIMISATION, "help": "the student's optimiser"})
    lr: float | None = field(default=None, metadata={
        "group": OPTIMISATION, "help": "base lr", "default_text": "sgd 0.01 (mmdet, batch 16), adamw 1e-4"})
    momentum: float = field(default=0.9, metadata={"group": OPTIMISATION, "help": "SGD momentum"})
    weight_decay: float | None = field(default=None, metadata={
        "group": OPTIMISATION, "help": "weight decay", "default_text": "sgd 1e-4, adamw 0.05"})
    warmup_iters: int = field(default=500, metadata={
        "group": OPTIMISATION, "help": "iterations of the linear warmup from warmup-ratio x lr"})
    warmup_ratio: float = field(default=0.001, metadata={
        "group": OPTIMISATION, "help": "the warmup's first lr, as a fraction of the lr"})
    schedule: str = field(default="step", metadata={"group": OPTIMISATION, "help": "lr schedule after the warmup"})
    milestones: tuple[float, ...] | None = field(default=None, metadata={
        "group": OPTIMISATION, "help": "epochs of the x0.1 steps", "default_text": "8/12 and 11/12 of the run"})
    clip_grad: float = field(default=35.0, metadata={
        "group": OPTIMISATION, "help": "max grad norm of the student and its adapters (0: off)"})
    amp: str = field(default="auto", metadata={
        "group": OPTIMISATION, "help": "autocast of the student's backbone and head",
        "default_text": "auto: bf16 on CUDA, none on CPU"})
    device: str = field(default="auto", metadata={"group": OPTIMISATION, "help": "auto | cpu | cuda | cuda:N"})
    cudnn_benchmark: bool = field(default=False, metadata={
        "group": OPTIMISATION, "help": "let cuDNN time its kernels for each new input shape: pays only when batches "
                                       "repeat a few padded shapes (fixed-size views); with COCO's many aspect "
                                       "ratios it re-times every conv at almost every step"})
    workers: int = field(default=2, metadata={"group": DATA, "help": "loader processes per rank"})
    prefetch_batches: int = field(default=2, metadata={
        "group": DATA, "help": "teacher reads of the next N batches started ahead of the step, concurrently, in "
                               "each loader process: hides a remote cache's latency (HTTP, object store); 0: read "
                               "with the batch"})
    eval: bool = field(default=True, metadata={
        "group": OUTPUT, "help": "no COCO evaluation (results.json without metrics)"})
    eval_every: int = field(default=0, metadata={
        "group": OUTPUT, "help": "evaluate every N epochs (0: at the end only)", "default_text": ""})
    eval_batch_size: int = field(default=8, metadata={"group": OUTPUT, "help": "images per evaluation batch"})
    eval_view: str | None = field(default=None, metadata={
        "group": OUTPUT, "help": "SHORT:MAX of the val view", "default_text": "the first training view's scale"})
    ckpt_every: int = field(default=0, metadata={
        "group": OUTPUT, "help": "checkpoint every N iterations (0: at epoch ends)", "default_text": ""})
    max_iters: int = field(default=0, metadata={
        "group": OPTIMISATION, "help": "cap the schedule at N iterations (0: epochs decide)", "default_text": ""})
    stop_after: int = field(default=0, metadata={
        "group": OUTPUT, "help": "stop after N iterations of this invocation (checkpointed; --resume continues)",
        "default_text": ""})
    resume: bool = field(default=False, metadata={"group": OUTPUT, "help": "continue from OUT/last.pt when it exists"})
    seed: int = field(default=0, metadata={"group": OPTIMISATION, "help": "init, view draws, order"})
    log_every: int = field(default=10, metadata={"group": OUTPUT, "help": "log.csv / TensorBoard every N iterations"})
    tensorboard: bool = field(default=True, metadata={"group": OUTPUT, "help": "no TensorBoard logs"})
    progress: bool = field(default=True, metadata={"group": OUTPUT, "help": "no tqdm bars"})

    def __post_init__(self) -> None:
        from train.methods import MethodSpec  # imports torch: not at --help
        if (self.cache is None) == (self.teacher is None):
            raise ValueError("give exactly one teacher source: cache (the teacher cache) or teacher (a checkpoint, "
                             "online teacher)")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {self.amp!r}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "prefetch_batches", "eval_every", "ckpt_every", "max_iters", "stop_after",
                     "warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        MethodSpec.parse(self.method)
        if self.lr is None:
            self.lr = 0.01 if self.optimizer == "sgd" else 1e-4
        if self.weight_decay is None:
            self.weight_decay = 1e-4 if self.optimizer == "sgd" else 0.05
        if self.milestones is None:
            self.milestones = (self.epochs * 8 / 12, self.epochs * 11 / 12)
        self.milestones = tuple(float(m) for m in self.milestones)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def train_option_rules() -> dict:
    """The ``ValueRule`` of every TrainConfig field (``train.methods.base.config_rules``)."""
    from train.methods.base import config_rules  # imports torch: not at --help
    return config_rules(TrainConfig, TRAIN_LIMITS)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """``--recipe`` and an option per TrainConfig field, in the --help sections of OPTION_GROUPS."""
    from train.recipes import RECIPE_HELP
    groups = option_groups(parser, OPTION_GROUPS)
    groups[WHAT].add_argument("--recipe", help=RECIPE_HELP)
    add_config_options(groups, TrainConfig, TRAIN_LIMITS)


def config_from_args(args: argparse.Namespace) -> dict:
    """TrainConfig keyword arguments from parsed options (:func:`add_train_options`), every value checked
    against its field's rule (``--set`` values parsed by the method's config fields); raises ValueError
    with a one-line message. The config's remaining checks run when it is built."""
    from train.methods import parse_overrides  # imports torch: not at --help
    config = config_values(args, TrainConfig)
    config["overrides"] = parse_overrides(config["method"], split_assignments(config["overrides"], "--set"))
    config["student_config"] = parse_assignments(config["student_config"], "--student-config")
    rules = train_option_rules()
    for key, value in config.items():
        rules[key].check(value, f"--{key.replace('_', '-')}")
    return config
