"""Command line of the student trainer: ``python -m train --help``."""
from __future__ import annotations

import argparse
import ast
import sys

from train.recipes import RECIPE_HELP

DESCRIPTION = """\
Train a student detector by knowledge distillation from a teacher cache (python -m precompute),
without ever loading the teacher network; or, for comparison, from a teacher run online.

Each epoch draws one cached view per image (deterministic in --seed and the epoch), rebuilds
exactly that view from the image, and zips it with the view's teacher fields. Only the field
groups the method reads are opened; they are decompressed by the loader workers and dequantised
on the training device. Teacher maps are compared with the student's only inside each image's
valid region.

Methods (--method, combinable with +, e.g. ld+frs):
  none     no distillation (the baseline student)
  frs      Feature Richness Score: fpn + head.cls, 3x3 adapters
  icd      Instance-Conditional KD: fpn; decoder trained by its own AdamW (lr 1e-4, clip 0.01)
  maskd    Masked KD: fpn (+ head.box when maskd.head_weight > 0) and the cached receptive tokens
  ld       Localization Distillation (GFL): region rows (ATSS positives and VLR)
  defeat   Decoupled features: fpn (+ head.cls with the one-stage head term)
Every hyperparameter of a method is overridable: --set frs.feat_weight=0.2 (see train/methods/).
Each --set value and option is checked against its field's type and range before anything is
loaded (an empty, non-numeric or non-finite number, 2.5 for an int, a negative weight or an
unknown key is an error, exit status 2).

Refused before any training step: a cache written for other data (annotation hash, image count)
or other views, lacking a field or artefact the method reads, whose teacher predicts other
classes or box bins than the student, or --inherit into a student of another neck/head shape.

Run directory (--out): log.csv, eval.csv, tensorboard/, last.pt (resume state: rerun with
--resume), student.pt (the trained student, detectors.load_checkpoint), results.json (final COCO
metrics, method, config, train time, cache manifest id).
"""

EPILOG = """\
examples:
  python -m train --method frs --student gfl-nano --data runs/demo/data --cache runs/demo/cache \\
      --out runs/train/frs --epochs 12 --batch-size 8 --lr 0.02
  python -m train --method ld+frs --set frs.feat_weight=0.2 --set ld.kd_weight=5 ...
  python -m train --method icd --inherit ...                    # student neck + head from the teacher
  python -m train --method frs --teacher runs/demo/teacher/best.pt ...   # online teacher (no cache)
  python -m train ... --resume                                  # continue out/last.pt exactly
  torchrun --nproc-per-node 8 -m train --method frs --student r50 --cache ... --device cuda

recipes (--recipe NAME; python -m train.recipes lists them with the AP each should reach):
  python -m train --recipe frs-retina-r101-r50-2x --data coco --cache runs/cache/frs-retina-r101-r50-2x --out DIR
  python -m train --recipe ld-gfl-r101-r50-1x --epochs 6 --set ld.imitation_weight=0 ...   # explicit wins
  A recipe sets the method, student (and its config), schedule, batch, lr, inherit and method weights of
  a published run; every option given explicitly overrides the recipe's (--set and --student-config keys
  one by one; a --student other than the recipe's drops the recipe's student config; --epochs without
  --milestones moves the recipe's lr steps to the same fractions of the run). Its batch is the official
  total: under torchrun each rank takes batch / ranks unless --batch-size is given.
"""


# Ranges and choices of the trainer options (TrainConfig fields), for their flags and the sweep's
# --set/--grid; a number not listed must be >= 0. Types come from TrainConfig itself.
TRAIN_LIMITS = {
    "epochs": {"minimum": 1}, "batch_size": {"minimum": 1}, "eval_batch_size": {"minimum": 1},
    "log_every": {"minimum": 1}, "lr": {"minimum": 0, "exclusive": True}, "momentum": {"maximum": 1},
    "warmup_ratio": {"maximum": 1}, "optimizer": {"choices": ("sgd", "adamw")},
    "schedule": {"choices": ("step", "cosine")}, "on_error": {"choices": ("skip", "raise")},
}


def train_option_rules() -> dict:
    """The ``ValueRule`` of every TrainConfig field (``train.methods.base.config_rules``)."""
    from train.methods.base import config_rules
    from train.trainer import AMP_DTYPES, TrainConfig
    return config_rules(TrainConfig, {**TRAIN_LIMITS, "amp": {"choices": ("auto", *AMP_DTYPES)}})


def split_assignments(items: list[str], flag: str) -> dict[str, str]:
    """``["a.b=0.2", "c=x"]`` -> ``{"a.b": "0.2", "c": "x"}`` (the text; parse it by the key's rule).
    Raises ValueError for an item without ``=`` or without a key."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = text
    return out


def parse_assignments(items: list[str], flag: str) -> dict:
    """``["norm=bn", "trainable_layers=5"]`` -> ``{"norm": "bn", "trainable_layers": 5}`` (Python
    literals; true/false/none too; other text as a string). For ``--student-config``, whose keys
    ``DetectorConfig`` checks; method and trainer settings are parsed by their fields' rules."""
    out = {}
    for key, text in split_assignments(items, flag).items():
        text = text.strip()
        lowered = {"true": "True", "false": "False", "none": "None", "null": "None"}.get(text.lower(), text)
        try:
            value = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            value = text  # a plain string
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", help=RECIPE_HELP)
    g.add_argument("--method", default="none", help="none | frs | icd | maskd | ld | defeat | a+b [none]")
    g.add_argument("--student", default="gfl-r50", help="student zoo name (gfl-r50, retina-r18, gfl-nano, ...) "
                                                          "[gfl-r50]")
    g.add_argument("--student-config", action="append", default=[], metavar="KEY=VALUE",
                   help="student DetectorConfig override, repeatable (e.g. norm=bn, trainable_layers=5)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="method hyperparameter, repeatable: frs.feat_weight=0.2 (or feat_weight=0.2 when unique)")
    g.add_argument("--inherit", action=argparse.BooleanOptionalAction, default=False,
                   help="initialise the student's neck and head from the teacher (shapes must match) [no]")
    g = p.add_argument_group("teacher (exactly one)")
    g.add_argument("--cache", help="teacher cache directory or fsspec URL (python -m precompute)")
    g.add_argument("--teacher", help="online teacher checkpoint: computes the same fields on the fly")
    g.add_argument("--teacher-arch", default="auto", help="online teacher architecture (see precompute) [auto]")
    g.add_argument("--maskd-tokens", help="online MasKD: a cache holding the receptive tokens (else learnt here)")
    g.add_argument("--maskd-iters", type=int, default=2000, help="online MasKD stage 1 iterations [2000]")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="COCO-layout root: annotations/instances_SPLIT.json, SPLIT/")
    g.add_argument("--split", default="train2017", help="[train2017]")
    g.add_argument("--val-split", default="val2017", help="[val2017]")
    g.add_argument("--views", help="cache: the views it must hold (default: its own); online: views to train on, "
                                   "as python -m precompute --views [default]")
    g.add_argument("--workers", type=int, default=2, help="loader processes per rank [2]")
    g.add_argument("--on-error", default="skip", choices=("skip", "raise"),
                   help="a training image that cannot be read: skip it (replaced by the next, counted in "
                        "results.json) or stop with an error naming it; a changed image always stops [skip]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12, help="[12]")
    g.add_argument("--batch-size", type=int, default=8, help="images per step per rank [8]")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="[sgd]")
    g.add_argument("--lr", type=float, help="base lr [sgd 0.01 (mmdet, batch 16), adamw 1e-4]")
    g.add_argument("--momentum", type=float, default=0.9, help="[0.9]")
    g.add_argument("--weight-decay", type=float, help="[sgd 1e-4, adamw 0.05]")
    g.add_argument("--schedule", choices=("step", "cosine"), default="step", help="[step]")
    g.add_argument("--milestones", type=float, nargs="*", help="epochs of the x0.1 steps [8/12 and 11/12 of the run]")
    g.add_argument("--warmup-iters", type=int, default=500, help="linear warmup from 0.001 x lr [500]")
    g.add_argument("--clip-grad", type=float, default=35.0, help="max grad norm of the student (0: off) [35]")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast of the student's backbone and head [auto: bf16 on CUDA, none on CPU]")
    g.add_argument("--max-iters", type=int, default=0, help="cap the schedule at N iterations (0: epochs decide)")
    g.add_argument("--seed", type=int, default=0, help="init, view draws, order [0]")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N [auto]")
    g = p.add_argument_group("evaluation, checkpoints, logs")
    g.add_argument("--no-eval", action="store_true", help="no COCO evaluation (results.json without metrics)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: at the end only)")
    g.add_argument("--eval-batch-size", type=int, default=8, help="[8]")
    g.add_argument("--eval-view", help="SHORT:MAX of the val view [the first training view's scale]")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt when it exists")
    g.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N iterations (0: epoch ends)")
    g.add_argument("--stop-after", type=int, default=0, help="stop after N iterations of this invocation "
                                                             "(checkpointed; --resume continues)")
    g.add_argument("--log-every", type=int, default=10, help="log.csv / TensorBoard every N iterations [10]")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def config_from_args(args: argparse.Namespace) -> dict:
    """TrainConfig keyword arguments, every value checked against its field's rule (``--set`` values
    parsed by the method's config fields); raises ValueError with a one-line message. The config's
    remaining checks run when it is built, inside run_training."""
    from train.methods import parse_overrides
    config = dict(
        data=args.data, out=args.out, method=args.method, student=args.student, cache=args.cache,
        teacher=args.teacher, teacher_arch=args.teacher_arch, views=args.views, split=args.split,
        val_split=args.val_split, overrides=parse_overrides(args.method, split_assignments(args.overrides, "--set")),
        student_config=parse_assignments(args.student_config, "--student-config"), inherit=args.inherit,
        maskd_tokens=args.maskd_tokens, maskd_iters=args.maskd_iters, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, schedule=args.schedule,
        milestones=tuple(args.milestones) if args.milestones else None, clip_grad=args.clip_grad, amp=args.amp,
        device=args.device, workers=args.workers, on_error=args.on_error, eval=not args.no_eval,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size, eval_view=args.eval_view, ckpt_every=args.ckpt_every,
        max_iters=args.max_iters, stop_after=args.stop_after, resume=args.resume, seed=args.seed,
        log_every=args.log_every, tensorboard=not args.no_tensorboard, progress=not args.no_progress)
    rules = train_option_rules()
    for key, value in config.items():
        rules[key].check(value, f"--{key.replace('_', '-')}")
    return config


def run_training(config: dict) -> int:
    """Build the trainer from TrainConfig keywords (every refusal happens here, printed as an error),
    train, print the summary. The exit status: 0 trained, 1 refused."""
    import json

    from detectors.data import DataError
    from store import CacheError
    from train.trainer import StudentTrainer, TrainConfig
    try:
        trainer = StudentTrainer(TrainConfig(**config))
    except (CacheError, DataError, ValueError, FileNotFoundError) as error:  # refused before training
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    try:
        results = trainer.train()
    except (CacheError, DataError, OSError) as error:   # damaged cache, bad image, full disk: named, one line
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if trainer.is_main:
        summary = {k: results.get(k) for k in ("status", "method", "iterations", "train_seconds", "final")
                   if k in results}
        print(json.dumps(summary).replace("NaN", "null"), flush=True)  # COCO AP of an empty size range
    return 0


# Options whose TrainConfig key differs from the flag's dest (recipes: which keys the user gave).
_DEST_KEYS = {"no_eval": "eval", "no_tensorboard": "tensorboard", "no_progress": "progress"}


def resolve_config(argv=None) -> dict:
    """TrainConfig keywords from a command line: its options, or with --recipe the recipe's where the
    command line gives none. ValueError (one line) for a value that does not fit."""
    args = build_parser().parse_args(argv)
    if (args.cache is None) == (args.teacher is None):
        raise ValueError("give exactly one of --cache (the teacher cache) and --teacher (online teacher checkpoint)")
    if not args.recipe:
        return config_from_args(args)
    from train.recipes import explicit_dests, get_recipe
    recipe = get_recipe(args.recipe)
    explicit = {_DEST_KEYS.get(dest, dest) for dest in explicit_dests(build_parser(), argv)}
    for key in ("method", "student"):  # --set and --student-config are parsed for these
        if key not in explicit:
            setattr(args, key, getattr(recipe, key))
    return recipe.apply_train(config_from_args(args), explicit)


def main(argv=None) -> int:
    from train.recipes import print_if_listing
    if print_if_listing(argv):
        return 0
    args = build_parser().parse_args(argv)
    if args.recipe:
        try:
            config = resolve_config(argv)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return run_training(config)
    if (args.cache is None) == (args.teacher is None):
        print("error: give exactly one of --cache (the teacher cache) and --teacher (online teacher checkpoint)",
              file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as error:  # a value that does not fit its field, before anything is loaded
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_training(config)


if __name__ == "__main__":
    sys.exit(main())
