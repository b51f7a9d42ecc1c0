"""Named recipes: each method's published COCO headline setting, as one name.

    python -m train.recipes                      # the recipes and the numbers they should reach
    python -m train.recipes frs-retina-r101-r50-2x   # one recipe in full, with its commands
    python -m precompute --recipe NAME --ckpt TEACHER.pth --data coco --cache runs/cache/NAME
    python -m train --recipe NAME --data coco --cache runs/cache/NAME --out runs/train/NAME
    python -m train.sweep --recipe NAME --data coco --cache runs/cache/NAME --seeds 2

A recipe fixes what the official run fixed: teacher and student architecture (and the neck the
teacher's code base builds, which an inheriting student must share), the cached views and fields,
MasKD's stage 1, the schedule, batch and learning rate of the official config, the method's
weights, and whether the student starts from the teacher's neck and head ("inherit"). It also
says which AP it should reach and where that number was published. Options given on the command
line override the recipe's, one key at a time (``--set`` keys likewise); everything else comes
from the recipe. Another number of epochs without milestones moves the recipe's lr steps to the
same fractions of the run.

Schedules: 1x = 12 epochs with lr steps (x0.1) after epochs 8 and 11, 2x = 24 epochs with steps
after 16 and 22 (mmdetection; 12 epochs of COCO train2017 at batch 16 are ~89k iterations).
``batch_size`` is the official total batch: on N ranks (torchrun) each rank takes batch_size / N
unless --batch-size is given. The learning rate is the official one for that total batch.

Where the numbers come from: /work/shared/METHODS.md (the methods' official code at the commits
named there) and, for details it leaves out, the official configs read at those commits
(FRS ``config/distill_frs/*``, ICD ``pytorch_release/configs/*``, MasKD
``mmrazor/configs/distill/maskd/*`` and ``mmdetection/configs/maskd/*``, LD ``configs/ld/*``).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

# ImageNet initialisation of the students: mmdetection's 'torchvision://resnet50' (ICD's detectron2
# configs start from MSRA's R-50.pkl, a caffe-style ResNet this project does not load).
RESNET50_IMAGENET = "ResNet50_Weights.IMAGENET1K_V1"

# The neck each teacher's code base builds (detectors.convert.mmdet_config_overrides for mmdetection;
# detectron2's RetinaNet backbone builds P6 from C5 and applies a ReLU before P7). A student that
# inherits the teacher's neck, or whose FPN maps are compared with the teacher's, is built the same way.
TEACHER_NECKS: dict[str, dict[str, dict[str, Any]]] = {
    "mmdet": {"retina": {"p6_from": "c5", "relu_before_p7": False},
              "gfl": {"p6_from": "p5", "relu_before_p7": False}},
    "detectron2": {"retina": {"p6_from": "c5", "relu_before_p7": True}},
}

SINGLE_SCALE = "default"          # 800:1333 and 800:1333:flip: resize (1333, 800) keep ratio, flip p=0.5
# ICD: detectron2 MIN_SIZE_TRAIN (640, 672, ..., 800), max 1333, flip p=0.5, drawn per iteration. A cache
# holds K views per image; K=6 (as many as detectron2's short sides) is this project's choice, not official.
MULTI_SCALE = "ms:6:640-800"
EVAL_VIEW = "800:1333"             # every official test: single scale 1333x800, no flip


def _schedule(epochs: int, milestones: tuple[float, ...], batch_size: int, lr: float, warmup_iters: int,
              clip_grad: float) -> dict[str, Any]:
    """TrainConfig options of an SGD step schedule (momentum 0.9, weight decay 1e-4, linear warmup from
    0.001 x lr: every official config here)."""
    return dict(epochs=epochs, milestones=milestones, batch_size=batch_size, optimizer="sgd", lr=lr,
                momentum=0.9, weight_decay=1e-4, warmup_iters=warmup_iters, warmup_ratio=0.001, schedule="step",
                clip_grad=clip_grad, eval_view=EVAL_VIEW)


@dataclass(frozen=True)
class Expected:
    """The published result a recipe should reproduce (COCO val2017 box AP)."""

    ap: float                          # the distilled student
    baseline_ap: float                 # the same student without distillation
    teacher_ap: float | None           # None: not published with the result
    source: str                        # paper table or repository README that reports ``ap``


@dataclass(frozen=True)
class Recipe:
    """One published headline run: what precompute and the trainer are told to reproduce it."""

    name: str
    method: str                                   # train.methods name
    teacher: str                                  # zoo name (precompute --teacher)
    teacher_weights: str                          # the official teacher checkpoint (precompute --ckpt)
    teacher_source: str                           # its code base: mmdet | detectron2 (TEACHER_NECKS)
    student: str                                  # zoo name (train --student)
    student_config: dict[str, Any]                # DetectorConfig overrides of that student
    precompute: dict[str, Any]                    # PrecomputeConfig keys: views, fields
    train: dict[str, Any]                         # TrainConfig keys: schedule, batch, lr, inherit, ...
    overrides: dict[str, Any]                     # METHOD.KEY hyperparameters (train and precompute --set)
    expected: Expected
    notes: tuple[str, ...] = ()                   # where this recipe differs from the official run

    @property
    def family(self) -> str:
        from detectors.zoo import get_config
        return get_config(self.student).family

    @property
    def schedule(self) -> str:
        return {12: "1x", 24: "2x"}.get(self.train["epochs"], f"{self.train['epochs']} epochs")

    def precompute_options(self) -> dict[str, Any]:
        """PrecomputeConfig keywords (teacher included; the method hyperparameters are
        :meth:`precompute_settings`'s)."""
        return {"teacher": self.teacher, **self.precompute}

    def precompute_settings(self, fields: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Precompute's ``--set`` values: the recipe's hyperparameters of the methods ``fields`` names
        (its MasKD stage 1, ...), with the command line's ``given`` ones (qualified keys) over them."""
        from train.methods import methods_named
        methods = methods_named(fields.split(","))
        own = {key: value for key, value in self.overrides.items() if key.split(".", 1)[0] in methods}
        return {**own, **dict(given or {})}

    def train_options(self) -> dict[str, Any]:
        """TrainConfig keywords other than data, out and the teacher source."""
        return {"method": self.method, "student": self.student, "student_config": dict(self.student_config),
                "overrides": dict(self.overrides), **self.train}

    # ------------------------------------------------------------------ command-line merging
    def apply_train(self, config: dict[str, Any], explicit: set[str], world_size: int | None = None
                    ) -> dict[str, Any]:
        """TrainConfig keywords: the recipe's, with those the user gave explicitly (``explicit``: the
        TrainConfig keys of the options on the command line) kept from ``config``. ``--set`` keys
        override the recipe's per key; ``--student-config`` keys likewise, but a student other than
        the recipe's gets none of the recipe's student config (it belongs to the recipe's student).
        On ``world_size`` > 1 ranks the recipe's total batch is split between them."""
        from train.config import train_option_rules
        from train.methods import MethodSpec, check_overrides, split_overrides

        out = dict(config)
        for key, value in self.train.items():
            if key not in explicit:
                out[key] = value
        if "epochs" in explicit and "milestones" not in explicit:  # the steps at the same fractions of the run
            out["milestones"] = self.milestones_for(out["epochs"])
        for key in ("method", "student"):
            if key not in explicit:
                out[key] = getattr(self, key)
        student_config = dict(self.student_config) if out["student"] == self.student else {}
        out["student_config"] = {**student_config, **config.get("student_config", {})}
        spec = MethodSpec.parse(out["method"])
        own = {key: value for key, value in self.overrides.items() if key.split(".", 1)[0] in spec}
        given = {f"{name}.{key}": value
                 for name, part in split_overrides(spec, dict(config.get("overrides", {}))).items()
                 for key, value in part.items()}
        out["overrides"] = {**own, **given}
        check_overrides(spec, out["overrides"])
        if out.get("teacher") and "views" not in explicit:  # online teacher: train on the recipe's views
            out["views"] = self.precompute["views"]
        world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and "batch_size" not in explicit:
            if self.train["batch_size"] % world_size:
                raise ValueError(f"recipe {self.name}: its batch of {self.train['batch_size']} images does not split "
                                 f"over {world_size} ranks; give --batch-size (per rank) and the lr for that batch")
            out["batch_size"] = self.train["batch_size"] // world_size
        rules = train_option_rules()
        for key in self.train:
            rules[key].check(out[key], f"recipe {self.name} {key}")
        return out

    def milestones_for(self, epochs: int) -> tuple[float, ...]:
        """The recipe's lr steps moved to a run of ``epochs``, at the same fractions of the run."""
        return tuple(round(m * epochs / self.train["epochs"], 4) for m in self.train["milestones"])

    def apply_precompute(self, args: argparse.Namespace, explicit: set[str]) -> None:
        """Sets the recipe's precompute options on ``args`` (precompute's parsed command line) where the
        user gave none."""
        for key, value in self.precompute_options().items():
            if key not in explicit:
                setattr(args, key, value)

    def sweep_settings(self, methods: list[str], student: str, given: dict[str, Any] | None = None,
                       grid: dict[str, list] | None = None) -> dict[str, Any]:
        """``train.sweep`` --set settings: the recipe's trainer options and the hyperparameters of the swept
        methods, with the command line's ``given`` settings over them. Another number of epochs moves the
        lr steps to the same fractions of the run (an epochs grid axis: the trainer's default steps)."""
        from train.methods import MethodSpec
        given, grid = dict(given or {}), dict(grid or {})
        swept = {name for method in methods for name in MethodSpec.parse(method).names}
        settings: dict[str, Any] = dict(self.train)
        if "milestones" not in given and "milestones" not in grid:
            if "epochs" in grid:
                del settings["milestones"]
            elif "epochs" in given:
                settings["milestones"] = self.milestones_for(given["epochs"])
        if student == self.student and self.student_config:
            settings["student_config"] = dict(self.student_config)
        settings.update({key: value for key, value in self.overrides.items() if key.split(".", 1)[0] in swept})
        return {**settings, **given}

    # ------------------------------------------------------------------ text
    def headline(self) -> str:
        e = self.expected
        teacher = f"teacher {e.teacher_ap}" if e.teacher_ap is not None else "teacher AP not published"
        return f"{e.baseline_ap} -> {e.ap} AP ({teacher})"

    def describe(self) -> str:
        t = self.train
        lines = [
            f"{self.name}: {self.method} on COCO, {self.teacher} -> {self.student}, {self.schedule}",
            f"  expected   {self.headline()}",
            f"  source     {self.expected.source}",
            f"  teacher    {self.teacher} ({self.teacher_source}): {self.teacher_weights}",
            f"  student    {self.student} " + " ".join(f"{k}={v}" for k, v in self.student_config.items()),
            "  precompute " + " ".join(f"{k}={v}" for k, v in self.precompute.items()),
            f"  train      {t['epochs']} epochs, lr x0.1 after epochs {', '.join(f'{m:g}' for m in t['milestones'])}; "
            f"batch {t['batch_size']} (total), {t['optimizer']} lr {t['lr']:g}, warmup {t['warmup_iters']} iters, "
            f"clip_grad {t['clip_grad']:g}" + (", inherit neck + head" if t.get("inherit") else ""),
            "  method     " + (" ".join(f"{k}={v}" for k, v in self.overrides.items()) or "(family defaults)"),
        ]
        lines += [f"  note       {note}" for note in self.notes]
        lines += [
            "  commands",
            f"    python -m precompute --recipe {self.name} --ckpt TEACHER.pth --data COCO "
            f"--cache runs/cache/{self.name}",
            f"    python -m train --recipe {self.name} --data COCO --cache runs/cache/{self.name} "
            f"--out runs/train/{self.name}",
        ]
        return "\n".join(lines)


def _mmdet(family: str, config: str, stamp: str) -> str:
    """The URL of an mmdetection v2 model-zoo checkpoint."""
    return f"https://download.openmmlab.com/mmdetection/v2.0/{family}/{config}/{config}_{stamp}.pth"


_RETINA_STUDENT = {**TEACHER_NECKS["mmdet"]["retina"], "backbone_weights": RESNET50_IMAGENET}
_GFL_STUDENT = {**TEACHER_NECKS["mmdet"]["gfl"], "backbone_weights": RESNET50_IMAGENET}

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe(
        name="frs-retina-r101-r50-2x", method="frs",
        teacher="retina-r101",
        teacher_weights=_mmdet("retinanet", "retinanet_r101_fpn_1x_coco", "20200130-7a93545f"),
        teacher_source="mmdet", student="retina-r50", student_config=_RETINA_STUDENT,
        precompute={"views": SINGLE_SCALE, "fields": "frs"},
        train=_schedule(24, (16, 22), batch_size=16, lr=0.01, warmup_iters=500, clip_grad=0.0),
        overrides={"frs.feat_weight": 0.005, "frs.cls_weight": 0.02, "frs.warmup_iters": 500},
        expected=Expected(39.7, 37.4, 38.9, "duzhixing/FRS README, Experiments table (Retina-Res50 2x); "
                                            "METHODS.md FRS"),
        notes=("config config/distill_frs/resnet50_resnet101_retinanet_frs.py: student retinanet_r50_fpn_2x_coco "
               "(SGD lr 0.01, 8 GPUs x 2, no grad clip); the README lists the teacher at 38.9 (2x) while the config "
               "loads retinanet_r101_fpn_1x_coco",)),
    Recipe(
        name="frs-gfl-r101-r50-1x", method="frs",
        teacher="gfl-r101",
        teacher_weights=_mmdet("gfl", "gfl_r101_fpn_mstrain_2x_coco", "20200629_200126-dd12f847"),
        teacher_source="mmdet", student="gfl-r50", student_config=_GFL_STUDENT,
        precompute={"views": SINGLE_SCALE, "fields": "frs"},
        train=_schedule(12, (8, 11), batch_size=16, lr=0.01, warmup_iters=500, clip_grad=0.0),
        overrides={"frs.feat_weight": 0.1, "frs.cls_weight": 0.05, "frs.warmup_iters": 500},
        expected=Expected(43.6, 40.2, 44.9, "duzhixing/FRS README, Experiments table (GFL-Resnet50 1x); "
                                            "METHODS.md FRS"),
        notes=("config config/distill_frs/resnet50_resnet101_gfl_frs.py: student gfl_r50_fpn_1x_coco (SGD lr 0.01, "
               "batch 16, no grad clip)",)),
    Recipe(
        name="icd-retina-r101-r50-1x", method="icd",
        teacher="retina-r101",
        teacher_weights="detectron2 model zoo COCO-Detection/retinanet_R_101_FPN_3x (40.4 AP)",
        teacher_source="detectron2", student="retina-r50",
        student_config={**TEACHER_NECKS["detectron2"]["retina"], "backbone_weights": RESNET50_IMAGENET},
        precompute={"views": MULTI_SCALE, "fields": "icd"},
        # detectron2 1x: 90k iterations of 16 images, steps at 60k and 80k, warmup 1000 iterations: here 12
        # epochs with the steps at the same fractions of the run (60/90 and 80/90 of 12 epochs).
        train={**_schedule(12, (8.0, 10.6667), batch_size=16, lr=0.01, warmup_iters=1000, clip_grad=0.0),
               "inherit": True},
        overrides={"icd.distill_weight": 8.0, "icd.detach_student_iters": 1000, "icd.lr": 1e-4,
                   "icd.weight_decay": 1e-4, "icd.max_grad_norm": 0.01, "icd.warmup_iters": 0},
        expected=Expected(40.7, 37.4, 40.4, "megvii-research/ICD pytorch_release/README.md results table (Retinanet "
                                            "37.4 -> 40.7); teacher R101 3x per METHODS.md ICD"),
        notes=("config pytorch_release/configs/Distillation-ICD/retinanet_R_50_R101_icd_FPN_1x.yaml (IMS_PER_BATCH 16, "
               "BASE_LR 0.01, MAX_ITER 90000, STEPS 60000/80000, MIN_SIZE_TRAIN 640-800)",
               "the official teacher is a detectron2 checkpoint, which precompute does not convert (torchvision, "
               "mmdetection and project checkpoints only)",
               "the official student clips each gradient element to +-1 (detectron2 CLIP_TYPE value); the trainer "
               "clips by norm only, so the recipe does not clip",
               "student starts from torchvision's ImageNet ResNet-50, not MSRA's R-50.pkl")),
    Recipe(
        name="maskd-retina-r101-r50-2x", method="maskd",
        teacher="retina-r101",
        teacher_weights=_mmdet("retinanet", "retinanet_r101_fpn_2x_coco", "20200131-5560aee8"),
        teacher_source="mmdet", student="retina-r50", student_config=_RETINA_STUDENT,
        precompute={"views": SINGLE_SCALE, "fields": "maskd"},
        train={**_schedule(24, (16, 22), batch_size=16, lr=0.02, warmup_iters=1000, clip_grad=35.0),
               "inherit": True},
        # Stage 1 (precompute, or an online run): 2000 iterations of 16 images, Adam lr 0.01 (wd 1e-3, cosine
        # to 1e-6), 6 tokens per level.
        overrides={"maskd.loss_weight": 7.0, "maskd.student_mask_warmup": 7000, "maskd.head_weight": 1.0,
                   "maskd.stage1_iters": 2000, "maskd.stage1_batch_size": 16, "maskd.stage1_lr": 0.01},
        expected=Expected(39.9, 37.4, 38.9, "hunto/MasKD README results table (RetinaNet-R50 37.4, teacher "
                                            "RetinaNet-R101 38.9 -> 39.9); METHODS.md MasKD"),
        notes=("config mmrazor/configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py (schedule_2x, SGD lr 0.02, "
               "grad clip 35, warmup 1000; neck and head initialised from the teacher) and stage 1 "
               "mmdetection/configs/maskd/retinanet_r101_fpn_2x_coco.py (2000 iterations)",)),
    Recipe(
        name="ld-gfl-r101-r50-1x", method="ld",
        teacher="gfl-r101",
        teacher_weights=_mmdet("gfl", "gfl_r101_fpn_mstrain_2x_coco", "20200629_200126-dd12f847"),
        teacher_source="mmdet", student="gfl-r50", student_config=_GFL_STUDENT,
        precompute={"views": SINGLE_SCALE, "fields": "ld,fpn"},   # fpn: the imitation term
        # samples_per_gpu=2, lr 0.0025: by LD's README rule lr = total batch / 16 x 0.01, a total batch of 4.
        train=_schedule(12, (8, 11), batch_size=4, lr=0.0025, warmup_iters=500, clip_grad=0.0),
        overrides={"ld.ld_weight": 0.25, "ld.vlr_weight": 0.25, "ld.kd_weight": 10.0, "ld.imitation_weight": 2.0,
                   "ld.images_per_group": 2, "ld.vlr_rule": "official"},
        expected=Expected(42.1, 40.1, 44.7, "HikariTJU/LD README, 'Ours = Main KD + Main LD + VLR LD' table "
                                            "(R-101 -> R-50 1x); METHODS.md LD"),
        notes=("config configs/ld/ld_r50_gflv1_r101_fpn_coco_1x.py (samples_per_gpu=2, SGD lr 0.0025, loss_im 2.0 "
               "'finegrained', no grad clip); the README's model-zoo row next to that config reads 41.1 "
               "(main LD), the paper's full scheme 42.1",
               "teacher gfl_r101_fpn_mstrain_2x_coco: 44.7 AP in mmdetection's model zoo (DETECTORS.md; the FRS "
               "README lists the same checkpoint at 44.9)")),
    Recipe(
        name="defeat-retina-r101-r50-1x", method="defeat",
        teacher="retina-r101",
        teacher_weights="not published: a RetinaNet ResNet-101 COCO checkpoint (e.g. mmdetection's "
                        "retinanet_r101_fpn_1x_coco)",
        teacher_source="mmdet", student="retina-r50", student_config=_RETINA_STUDENT,
        precompute={"views": SINGLE_SCALE, "fields": "defeat-coco"},
        train=_schedule(12, (8, 11), batch_size=16, lr=0.01, warmup_iters=500, clip_grad=35.0),
        overrides={"defeat.fg_weight": 4.0, "defeat.bg_weight": 16.0, "defeat.backbone_fg_weight": 4.0,
                   "defeat.backbone_bg_weight": 16.0, "defeat.head_fg_weight": 2.0, "defeat.head_bg_weight": 2.0},
        expected=Expected(39.7, 36.5, None, "DeFeat paper (CVPR 2021) abstract and ggjy/DeFeat.pytorch README; "
                                            "METHODS.md DeFeat"),
        notes=("no COCO config is released: the weights 4/16 are the author's (DeFeat.pytorch issue #18); the 1x "
               "schedule follows from the student's 36.5 (mmdetection RetinaNet R50 1x); grad clip 35 as the "
               "README's distillation runs",
               "the author's COCO recipe also distils backbone stages 3-4 (C4, C5 here) and the classification "
               "head; their weights are not published: the backbone reuses the neck's 4/16 and the head the VOC "
               "release's 2/2 (train/methods/defeat.py)")),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)} (python -m train.recipes)")
    return RECIPES[name]


def list_recipes() -> list[str]:
    return list(RECIPES)


def table() -> str:
    """One line per recipe: name, method, models, schedule, batch and lr, expected AP and its source."""
    rows = [("recipe", "teacher -> student", "sched", "batch/lr", "expected AP", "source")]
    for r in RECIPES.values():
        rows.append((r.name, f"{r.teacher} -> {r.student}", r.schedule, f"{r.train['batch_size']}/{r.train['lr']:g}",
                     r.headline(), r.expected.source))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)


# ---------------------------------------------------------------------------------------------- command lines
RECIPE_HELP = ("a named recipe (python -m train.recipes; 'list' prints them): the published setting of a method. "
               "Options given explicitly override the recipe's")


def print_if_listing(argv: list[str] | None) -> bool:
    """``--recipe list`` anywhere on a command line: prints the recipes; True when it did."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.recipe == "list":
        print(table())
        return True
    return False


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The ``dest`` of every option given on the command line ``argv``: ``parser`` (a fresh one: it is
    changed) parses it with every default suppressed, so only the options present are set."""
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.recipes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="recipes to describe in full [all: one line each]")
    args = p.parse_args(argv)
    if not args.names:
        print(table())
        return 0
    try:
        print("\n\n".join(get_recipe(name).describe() for name in args.names))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["EVAL_VIEW", "Expected", "MULTI_SCALE", "RECIPES", "Recipe", "SINGLE_SCALE", "TEACHER_NECKS",
           "explicit_dests", "get_recipe", "list_recipes", "main", "print_if_listing", "table"]

if __name__ == "__main__":
    sys.exit(main())
