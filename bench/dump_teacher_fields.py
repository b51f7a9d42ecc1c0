"""Dump a trained teacher's fields on real images, as input for `bench/bench_store.py --input`.

    python -m bench.dump_teacher_fields --ckpt runs/demo/teacher/best.pt \
        --data ../shared/data/tiny_coco --split val2017 --views 320:512 --images 12 --out runs/bench/fields.pt

Writes a list of store-vocabulary sample dicts (fpn, head and region fields) computed with
precompute's own field extraction, so the codec benchmark measures real teacher outputs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from detectors.data import CocoDetection
from detectors.views import collate, parse_view_list
from precompute.fields import extract_fields
from precompute.teacher import load_teacher


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dump_teacher_fields", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="teacher checkpoint (this project's format)")
    p.add_argument("--data", type=Path, required=True, help="COCO-layout root")
    p.add_argument("--split", default="val2017")
    p.add_argument("--views", default="320:512", help="view list, as precompute's --views")
    p.add_argument("--images", type=int, default=12, help="number of images")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    views = parse_view_list(args.views)
    dataset = CocoDetection(args.data, args.split, views=views, view_policy="all")
    # The teacher's classes need not be the data's: only its maps are measured (regions use GT boxes).
    teacher = load_teacher(None, args.ckpt)
    samples = []
    with torch.no_grad():
        for index in range(min(args.images * len(views), len(dataset))):
            batch = collate([dataset[index]])
            samples += extract_fields(teacher.model, batch, ["fpn", "head", "region"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save([{k: v.cpu() for k, v in s.items() if not k.startswith("meta.")} for s in samples], args.out)
    print(f"wrote {len(samples)} samples of {teacher.arch} fields to {args.out}")


if __name__ == "__main__":
    main()
