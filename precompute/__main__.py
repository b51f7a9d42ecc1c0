"""Command line of precompute: ``python -m precompute --help``.

The options are PrecomputeConfig's fields (precompute/config.py: their defaults and help); the run
itself is ``precompute.pipeline.run_precompute``."""
from __future__ import annotations

import argparse
import os
import sys

# Encoding runs in the writer's threads, one numpy call each: OpenBLAS's own threads would only
# oversubscribe the cores (a 128x128 by 128x600 KLT product took 23 ms instead of 0.2 ms on a busy
# 2-core machine). Set before numpy is imported; an explicit setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# After the env (store imports numpy):
from precompute.config import OPTION_GROUPS, TEACHER, PrecomputeConfig  # noqa: E402
from store import FIELDS, PRESETS, CacheError, parse_codec_spec  # noqa: E402
from train.options import add_config_options, config_values, option_groups, split_assignments  # noqa: E402
from train.recipes import RECIPE_HELP, explicit_dests, get_recipe, print_if_listing  # noqa: E402

DESCRIPTION = """\
Run a frozen teacher detector ONCE over every (image, view) of a COCO-layout split and write its
outputs to a compressed teacher cache (see `python -m store --help`), so that student runs
never load the teacher.

What is cached per view (--fields; store field vocabulary, store/schema.py):
  fpn       FPN P3-P7 maps (C, H_l, W_l)
  head      dense class logits and box outputs per level
  region    LD's ATSS-positive and VLR rows: class logits and box distributions there
  meta      image id, view index, sizes, level sizes (always); GT boxes with regions
  backbone  backbone stages C3-C5 (CB_l, H_l, W_l) (opt-in)
  image     the source image file bytes (opt-in; for a self-contained WebDataset stream)
  all       fpn, head, region, meta + every method's artefacts
A method's name selects what it reads, and its field presets what other configurations of it
read (e.g. --fields frs,ld); `python -m train.methods` lists the methods, their fields, presets
and artefacts.
Dense maps cover each view's canonical region (padded on its own to a multiple of 32), so they
do not depend on batching. Per cache, once: the teacher's neck and head weights (students can
"inherit" them) and the artefacts of the methods named (or of all), each made by its method
with its hyperparameters (--set, as python -m train takes them; e.g. MasKD's receptive tokens:
--set maskd.stage1_iters=500, 0 makes none).

Teacher weights (--ckpt): this project's checkpoints (train/teacher.py), torchvision RetinaNet
state dicts, or mmdetection RetinaNet/GFL ResNet-FPN checkpoints (keys converted).

Resume: rerun the same command; committed shards are skipped. A cache directory declared for
another teacher, dataset, views, fields, codecs or shard size is refused, never mixed.
"""



def codec_help() -> str:
    """One line per codec of store.codecs.PRESETS, with the fields it is the default of."""
    lines = []
    for name, preset in PRESETS.items():
        defaults = sorted({field.rsplit(".", 1)[0] + spec.default_codec[len(name):]
                           for field, spec in FIELDS.items() if spec.kind == "float" and not spec.optional
                           and spec.default_codec.split(":")[0] == name})
        default = f" [default: {', '.join(defaults)}]" if defaults else ""
        keys = f"; keys {', '.join(preset.params)}" if preset.params else ""
        lines.append(f"  {name:9s} {preset.summary}{default}{keys}")
    return "\n".join(lines)


EPILOG = """\
views (--views, comma-separated):
  default                      800:1333 and 800:1333:flip
  SHORT[:MAX][:flip]           e.g. 160:256,160:256:flip (MAX defaults to 1333)
  ms:K:LO-HI[:MAX][:noflip]    K views, short side uniform in [LO, HI], flipped with p=0.5 (ICD)

codecs (--codec FIELD=SPEC, repeatable; FIELD a group, prefix or field name; the most specific wins):
  SPEC is NAME[:VALUE][,KEY=VALUE...]; VALUE is the codec's error bound, e.g. --codec fpn=klt:0.04
  --codec fpn.p7=klt:0.12 (the manifest records each field's spec, bound and measured error)
{codec_lines}

examples:
  python -m precompute --teacher r101 --ckpt gfl_r101.pth --data coco --cache runs/cache \\
      --device cuda --amp bf16 --batch-size 8
  python -m precompute --ckpt runs/demo/teacher/best.pt --data runs/demo/data \\
      --cache runs/demo/cache --views 160:256,160:256:flip --device cpu
  torchrun --nproc-per-node 8 -m precompute --teacher r101 --ckpt ... --device cuda ...
  python -m precompute ... --num-procs 2          # CPU: 2 processes, disjoint shards
  python -m store inspect runs/cache              # what was written

recipes (--recipe NAME; python -m train.recipes lists them with the AP each should reach):
  python -m precompute --recipe maskd-retina-r101-r50-2x --ckpt retinanet_r101_fpn_2x_coco.pth \\
      --data coco --cache runs/cache/maskd-retina-r101-r50-2x --device cuda
  A recipe sets --teacher, --views, --fields and the hyperparameters (--set) of a published run;
  each of these given explicitly overrides the recipe's (--set per key).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m precompute", description=DESCRIPTION, epilog=EPILOG.replace("{codec_lines}", codec_help()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = option_groups(parser, OPTION_GROUPS)
    groups[TEACHER].add_argument("--recipe", help=RECIPE_HELP)
    add_config_options(groups, PrecomputeConfig)
    return parser


def parse_codecs(items: list[str]) -> dict[str, str]:
    """--codec FIELD=SPEC items -> {field: canonical spec}; a bad spec stops here, in one line."""
    codecs = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise SystemExit(f"error: --codec {item!r}: expected FIELD=SPEC, e.g. fpn=klt:0.04")
        try:
            codecs[name.strip()] = str(parse_codec_spec(spec, field=name.strip()))
        except CacheError as error:
            raise SystemExit(f"error: --codec {item!r}: {error}") from None
    return codecs


def main(argv=None) -> int:
    if print_if_listing(argv):
        return 0
    args = build_parser().parse_args(argv)
    recipe = None
    if args.recipe:
        try:
            recipe = get_recipe(args.recipe)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        recipe.apply_precompute(args, explicit_dests(build_parser(), argv))
    if not args.ckpt:
        official = f" (recipe {recipe.name}: {recipe.teacher_weights})" if recipe else ""
        print(f"error: --ckpt is required: the teacher checkpoint file{official}", file=sys.stderr)
        return 2
    options = config_values(args, PrecomputeConfig)
    options["codecs"] = parse_codecs(options["codecs"])
    try:   # the methods' --set values, parsed by the registry (imports torch: not at --help), before any work
        from precompute.fields import parse_method_settings
        given = parse_method_settings(options["fields"], split_assignments(options["overrides"], "--set"))
        options["overrides"] = recipe.precompute_settings(options["fields"], given) if recipe else given
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from precompute.pipeline import run_precompute
    try:
        config = PrecomputeConfig(**options)  # checks the options (--shard-size 0 is refused here)
        run_precompute(config)
    except (CacheError, ValueError, OSError) as error:  # bad input, a full disk: the message says what and where
        hint = ""
        if isinstance(error, FileNotFoundError) and "runs/demo/teacher" in str(error):
            hint = " (make demo trains the demo teacher there)"
        print(f"error: {error}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
