"""One student run from a command line or from TrainConfig keywords: ``python -m train`` and each
run of ``python -m train.sweep`` go through :func:`run_training`."""
from __future__ import annotations

import argparse
import json
import sys

from train.config import TrainConfig, add_train_options, config_from_args


def resolve_config(argv: list[str] | None = None) -> dict:
    """TrainConfig keywords from a ``python -m train`` command line: its options, or with --recipe the
    recipe's where the command line gives none. ValueError (one line) for a value that does not fit."""
    from train.recipes import explicit_dests, get_recipe
    args = _parser().parse_args(argv)
    if (args.cache is None) == (args.teacher is None):
        raise ValueError("give exactly one of --cache (the teacher cache) and --teacher (online teacher checkpoint)")
    if not args.recipe:
        return config_from_args(args)
    recipe = get_recipe(args.recipe)
    explicit = explicit_dests(_parser(), argv)   # every dest is a TrainConfig key (or "recipe")
    for key in ("method", "student"):  # --set and --student-config are parsed for these
        if key not in explicit:
            setattr(args, key, getattr(recipe, key))
    return recipe.apply_train(config_from_args(args), explicit)


def run_training(config: dict) -> int:
    """Build the trainer from TrainConfig keywords (every refusal happens here, printed as an error),
    train, print the summary. The exit status: 0 trained, 1 refused."""
    from detectors.data import DataError
    from store import CacheError
    from train.trainer import StudentTrainer
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


def _parser() -> argparse.ArgumentParser:
    """The options of ``python -m train`` (its --help text is train/__main__.py's)."""
    parser = argparse.ArgumentParser(prog="python -m train")
    add_train_options(parser)
    return parser
