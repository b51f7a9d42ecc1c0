"""Command line of the student trainer: ``python -m train --help``.

The options are TrainConfig's fields (train/config.py: their defaults and help); the run itself is
``train.run``."""
from __future__ import annotations

import argparse
import sys

from train.config import add_train_options
from train.run import resolve_config, run_training

DESCRIPTION = """\
Train a student detector by knowledge distillation from a teacher cache (python -m precompute),
without ever loading the teacher network; or, for comparison, from a teacher run online.

Each epoch draws one cached view per image (deterministic in --seed and the epoch), rebuilds
exactly that view from the image, and zips it with the view's teacher fields. Only the field
groups the method reads are opened; they are decompressed by the loader workers and dequantised
on the training device. Teacher maps are compared with the student's only inside each image's
valid region.

Methods (--method, combinable with +, e.g. ld+frs): `python -m train.methods` lists them, with
the teacher fields and cache artefacts each reads and its hyperparameters' official values.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(parser)
    return parser


def main(argv=None) -> int:
    from train.recipes import print_if_listing
    if print_if_listing(argv):
        return 0
    build_parser().parse_args(argv)  # --help, and a malformed command line, with the full documentation
    try:
        config = resolve_config(argv)
    except ValueError as error:  # a value that does not fit its field, before anything is loaded
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_training(config)


if __name__ == "__main__":
    sys.exit(main())
