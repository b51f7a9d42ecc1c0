"""Train a detector from scratch: the teacher that precompute will cache (or a baseline student).

    python -m train.teacher --model gfl-small --data runs/demo/data --out runs/teacher

SGD with linear warmup and a step or cosine schedule, horizontal flip, checkpoints with the model
config inside (``last.pt``, and ``best.pt`` by val AP), tqdm progress, evaluation every
``--eval-every`` epochs and at the end, and a final ``metrics.json``. No weights can be
downloaded here, so every model starts from random initialisation.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detectors import build_detector, list_models, save_checkpoint
from detectors.data import CocoDetection
from detectors.views import ViewSpec, collate
from train.evaluate import evaluate_detector
from train.schedule import ScheduleConfig, build_scheduler, build_sgd


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"zoo name, one of: {', '.join(list_models())}")
    p.add_argument("--data", required=True, type=Path,
                   help="COCO-layout root: annotations/instances_{split}.json and {split}/ images")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics.json)")
    p.add_argument("--train-split", default="train2017")
    p.add_argument("--val-split", default="val2017")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01, help="base lr (mmdet: 0.01 for batch 16; scale it with the batch)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=500)
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--milestones", type=float, nargs="*", default=(8, 11),
                   help="epochs at which the lr is multiplied by 0.1 (step schedule)")
    p.add_argument("--clip-grad", type=float, default=35.0, help="max gradient norm (0 disables)")
    p.add_argument("--short", type=int, default=800, help="training/eval view short side")
    p.add_argument("--max-size", type=int, default=1333, help="training/eval view long-side cap")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-iters", type=int, default=0, help="stop after this many iterations (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_teacher(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    views = (ViewSpec(False, args.short, args.max_size), ViewSpec(True, args.short, args.max_size))
    train_set = CocoDetection(args.data, args.train_split, views=views, view_policy="random")
    val_set = CocoDetection(args.data, args.val_split, views=views[:1], view_policy="all")
    model = build_detector(args.model, num_classes=train_set.num_classes).to(args.device)

    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, collate_fn=collate,
                        persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise SystemExit(f"{args.data}/{args.train_split}: {len(train_set)} images is fewer than one batch "
                         f"of {args.batch_size}")
    total = iters_per_epoch * args.epochs
    if args.max_iters:
        total = min(total, args.max_iters)
    optimizer = build_sgd(model.parameters(), args.lr, args.momentum, args.weight_decay)
    schedule = ScheduleConfig(total_iters=total, warmup_iters=min(args.warmup_iters, total // 2),
                              kind=args.schedule,
                              milestones=tuple(int(m * iters_per_epoch) for m in args.milestones))
    scheduler = build_scheduler(optimizer, schedule)

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    history, best_ap, it, start = [], -1.0, 0, time.time()
    model.train()
    bar = tqdm(total=total, desc=f"train {args.model}", disable=args.no_progress)
    for epoch in range(args.epochs):
        for batch in loader:
            batch = batch.to(args.device)
            losses = model(batch.images, batch.image_sizes, batch.targets).losses
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss at iteration {it}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            it += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2g}")
            if it >= total:
                break
        last_epoch = it >= total or epoch == args.epochs - 1
        if last_epoch or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            metrics = evaluate_detector(model, val_set, batch_size=args.batch_size, device=args.device,
                                        progress=not args.no_progress)
            history.append({"epoch": epoch + 1, "iteration": it, **metrics})
            tqdm.write(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.1f}" for k, v in metrics.items()))
            if metrics["AP"] > best_ap:
                best_ap = metrics["AP"]
                save_checkpoint(args.out / "best.pt", model, epoch=epoch + 1, metrics=metrics,
                                label_to_cat_id=train_set.label_to_cat_id)
        save_checkpoint(args.out / "last.pt", model, epoch=epoch + 1, iteration=it,
                        label_to_cat_id=train_set.label_to_cat_id)
        if it >= total:
            break
    bar.close()
    result = {"model": args.model, "iterations": it, "train_seconds": round(time.time() - start, 1),
              "final": history[-1], "best_AP": best_ap, "history": history}
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> None:
    result = train_teacher(parse_args(argv))
    print(json.dumps({"model": result["model"], "train_seconds": result["train_seconds"], **result["final"]}))


if __name__ == "__main__":
    main()
