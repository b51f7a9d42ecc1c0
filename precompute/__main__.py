"""Command line of precompute: ``python -m precompute --help``."""
from __future__ import annotations

import argparse
import os
import sys

# Encoding runs in the writer's threads, one numpy call each: OpenBLAS's own threads would only
# oversubscribe the cores (a 128x128 by 128x600 KLT product took 23 ms instead of 0.2 ms on a busy
# 2-core machine). Set before numpy is imported; an explicit setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from train.recipes import RECIPE_HELP, explicit_dests, get_recipe, print_if_listing  # noqa: E402 (after the env)

DESCRIPTION = """\
Run a frozen teacher detector ONCE over every (image, view) of a COCO-layout split and write its
outputs to a compressed teacher cache (see `python -m store --help`), so that student runs
never load the teacher.

What is cached per view (--fields; store field vocabulary, store/schema.py):
  fpn       FPN P3-P7 maps (C, H_l, W_l)                 FRS, ICD, MasKD, DeFeat
  head      dense class logits and box outputs per level  FRS (head.cls), MasKD (head.box)
  region    LD's ATSS-positive and VLR rows: class logits and box distributions there
  meta      image id, view index, sizes, level sizes (always); GT boxes with regions
  backbone  backbone stages C3-C5 (CB_l, H_l, W_l)         DeFeat's COCO recipe (opt-in)
  image     the source image file bytes (opt-in; for a self-contained WebDataset stream)
  all       fpn, head, region, meta + the MasKD tokens
Method names select what a method reads: frs, icd, maskd, ld, defeat (e.g. --fields frs,ld);
defeat-coco is DeFeat's COCO recipe (defeat + head.cls + backbone).
Dense maps cover each view's canonical region (padded on its own to a multiple of 32), so they
do not depend on batching. Per cache, once: the teacher's neck and head weights (students can
"inherit" them) and, for maskd/all, MasKD's receptive tokens (stage 1, --maskd-iters).

Teacher weights (--ckpt): this project's checkpoints (train/teacher.py), torchvision RetinaNet
state dicts, or mmdetection RetinaNet/GFL ResNet-FPN checkpoints (keys converted).

Resume: rerun the same command; committed shards are skipped. A cache directory declared for
another teacher, dataset, views, fields, codecs or shard size is refused, never mixed.
"""

EPILOG = """\
views (--views, comma-separated):
  default                      800:1333 and 800:1333:flip
  SHORT[:MAX][:flip]           e.g. 160:256,160:256:flip (MAX defaults to 1333)
  ms:K:LO-HI[:MAX][:noflip]    K views, short side uniform in [LO, HI], flipped with p=0.5 (ICD)

codecs (--codec FIELD=PRESET, repeatable; FIELD a group, prefix or field name):
  raw, fp16, bf16 (lossless / half precision), int8 (per-channel affine), klt (fitted transform
  coding, FPN default), sparse (class scores under a floor dropped, head.cls default)

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
  A recipe sets --teacher, --views, --fields and MasKD's stage 1 (--maskd-*) of a published run;
  each of these given explicitly overrides the recipe's.
"""


AMP_CHOICES = ("none", "bf16", "fp16")  # precompute.pipeline.AMP_DTYPES (not imported: --help stays fast)
FORMAT_CHOICES = ("zarr", "wds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m precompute", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("teacher")
    g.add_argument("--recipe", help=RECIPE_HELP)
    g.add_argument("--teacher", default="auto",
                   help="architecture: a zoo name (gfl-r101, retina-r50, gfl-small), a depth (r101: family from "
                        "the checkpoint) or 'auto' (from the checkpoint) [auto]")
    g.add_argument("--ckpt", help="teacher checkpoint file (required)")
    g.add_argument("--source", default="auto", choices=("auto", "project", "torchvision", "mmdet"),
                   help="checkpoint layout [auto: from its keys]")
    g = p.add_argument_group("data and views")
    g.add_argument("--data", required=True, help="COCO-layout root: annotations/instances_SPLIT.json, SPLIT/")
    g.add_argument("--split", default="train2017", help="[train2017]")
    g.add_argument("--on-error", default="skip", choices=("skip", "raise"),
                   help="a corrupt or missing image: skip (left out and counted, its id and the reason in the "
                        "cache manifest, so the trainer leaves it out too) or raise (refuse the split) [skip]")
    g.add_argument("--views", default="default", help="views cached per image (see below) [default]")
    g = p.add_argument_group("cache")
    g.add_argument("--cache", required=True, help="cache directory or fsspec URL")
    g.add_argument("--format", default="zarr", choices=FORMAT_CHOICES, help="store backend [zarr]")
    g.add_argument("--fields", default="all",
                   help="all | method names (frs,icd,maskd,ld,defeat,defeat-coco) | groups/prefixes/fields [all]")
    g.add_argument("--codec", action="append", default=[], metavar="FIELD=PRESET",
                   help="codec of a field group, prefix or field (repeatable)")
    g.add_argument("--shard-size", type=int, default=64, help="views per shard [64]")
    g.add_argument("--ld-vlr-rule", default="official", choices=("official", "diou"),
                   help="which 'DIoU' picks LD's VLR rows: official (overlap / anchor area - rho^2/c^2, as the "
                        "official LD code computed it) or diou (the true DIoU); recorded in the manifest [official]")
    g = p.add_argument_group("throughput")
    g.add_argument("--batch-size", type=int, default=8, help="views per teacher forward (one padded shape) [8]")
    g.add_argument("--window", type=int, default=4, help="shards whose views are batched together [4]")
    g.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU) [auto: cuda if available]")
    g.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="autocast dtype of the teacher forward; outputs are cast to float32 [none]")
    g.add_argument("--workers", type=int, default=2, help="data loader processes per rank [2]")
    g.add_argument("--encode-threads", type=int, default=-1,
                   help="encoding threads per rank; -1: auto (GPU: the rank's spare CPU cores, CPU: 2) [-1]")
    g.add_argument("--writer-procs", type=int, default=0,
                   help="encode and write in N processes instead of a thread (spreads encoding over CPU cores; "
                        "for GPU hosts whose encoding cannot keep up with the teacher) [0]")
    g.add_argument("--num-procs", type=int, default=1,
                   help="CPU only: run N processes, each owning every N-th shard [1]")
    g.add_argument("--calibration", type=int, default=16, help="views that fit the KLT codecs [16]")
    g = p.add_argument_group("MasKD stage 1 (receptive tokens; with --fields all or maskd)")
    g.add_argument("--maskd-iters", type=int, default=2000, help="iterations; 0 skips the tokens [2000]")
    g.add_argument("--maskd-batch-size", type=int, default=16, help="[16]")
    g.add_argument("--maskd-lr", type=float, default=0.01, help="[0.01]")
    g = p.add_argument_group("other")
    g.add_argument("--seed", type=int, default=0, help="multi-scale view sampling and MasKD init [0]")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--discard-foreign-shards", action="store_true",
                   help="delete shards whose receipts this cache cannot adopt (damaged, or written under another "
                        "declaration, e.g. after manifest.json was lost) and compute them again; without it such "
                        "a cache is refused, naming the shards")
    return p


def parse_codecs(items: list[str]) -> dict[str, str]:
    codecs = {}
    for item in items:
        name, sep, preset = item.partition("=")
        if not sep or not name or not preset:
            raise SystemExit(f"--codec {item!r}: expected FIELD=PRESET, e.g. fpn=int8")
        codecs[name.strip()] = preset.strip()
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
    from precompute.pipeline import PrecomputeConfig, run_precompute
    from store import CacheError
    try:
        config = PrecomputeConfig(  # checks the options (--shard-size 0 is refused here)
            ckpt=args.ckpt, data=args.data, cache=args.cache, teacher=args.teacher, source=args.source,
            split=args.split, on_error=args.on_error, format=args.format, views=args.views, fields=args.fields,
            codecs=parse_codecs(args.codec), ld_vlr_rule=args.ld_vlr_rule, shard_size=args.shard_size,
            batch_size=args.batch_size,
            window=args.window, device=args.device, amp=args.amp, workers=args.workers,
            encode_threads=args.encode_threads, writer_procs=args.writer_procs, calibration=args.calibration,
            maskd_iters=args.maskd_iters,
            maskd_batch_size=args.maskd_batch_size, maskd_lr=args.maskd_lr, num_procs=args.num_procs,
            seed=args.seed, progress=not args.no_progress, discard_foreign_shards=args.discard_foreign_shards)
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
