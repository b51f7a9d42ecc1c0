"""How fast ICD's teacher side learns to identify instances, and whether its attention finds them.

ICD distils where its teacher-side decoder's attention of a real instance's query looks. That
decoder learns from the auxiliary task alone (real vs fake boxes, box edges from a jittered
point), online, in the official runs over 90k iterations. This trains the teacher side alone on a
cache's F_t (``ICD.auxiliary_task``, ICD's own AdamW at its official lr, constant, gradient norm
clipped at 0.01: what ``icd.pretrain_batches`` does before a student run) and prints, at each
checkpoint, on a fixed set of held batches:

- ``aux_cls``: the real-vs-fake BCE; predicting the prior (1 real query in 6) scores 0.451;
- attention lift: a real query's attention mass inside its GT box divided by the share of the
  image's keys inside the box (1 = no better than uniform), median and mean over the queries and
  heads, as the student's mask M sums them.

``--runs`` also scores the ICD state saved in student runs' ``last.pt`` (after their schedule).

    python -m bench.bench_icd_teacher_side --cache runs/table/cache --data runs/demo/data \\
        --checkpoints 900,3000,6000 [--runs runs/table/icd-warm/runs/*]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from detectors.data import CocoDetection
from detectors.detector import valid_level_sizes
from detectors.views import ViewSpec
from store import open_cache
from store.schema import STRIDES
from train.methods import ICD, DatasetStats
from train.sources import CachedTeacher, adopt_cache_images
from train.student_data import epoch_plan, make_loader
from train.teacher_batch import collate_teacher

HELD_SEED = 123   # the held batches' image order (the training batches use the seed 0 order)


def teacher_batches(dataset, source, views, batch_size: int, seed: int, count: int):
    """``count`` (student batch, TeacherBatch) pairs in the order of ``seed``, epoch after epoch."""
    done, epoch = 0, 0
    while done < count:
        plan = epoch_plan(len(dataset.image_ids), len(views), seed, epoch, batch_size)[:count - done]
        for item in make_loader(dataset, plan, source, 0, seed, epoch):
            batch = item.batch
            sizes = valid_level_sizes(tuple(batch.images.shape[-2:]))
            yield batch, collate_teacher(source.fetch(batch, item.teacher, "cpu"), sizes, "cpu",
                                         image_sizes=batch.image_sizes, strides=STRIDES)
            done += 1
        epoch += 1


def attention_lift(icd: ICD, held: list) -> tuple[float, float, float]:
    """(aux_cls, median lift, mean lift) on the held batches; queries drawn from a fixed seed."""
    torch.manual_seed(0)
    lifts, losses = [], []
    with torch.no_grad():
        for batch, teacher in held:
            queries = icd.make_queries(batch.targets, batch.image_sizes)
            aux_cls, _, logits, _ = icd.auxiliary_task(teacher, queries)
            losses.append(float(aux_cls.mean()))
            attention = logits.softmax(-1)  # (N, heads, Q, S)
            centres = torch.cat([torch.stack(torch.meshgrid(torch.arange(f.shape[-2]), torch.arange(f.shape[-1]),
                                                            indexing="ij")[::-1], -1).reshape(-1, 2).add(0.5) * stride
                                 for f, stride in zip(teacher.fpn, STRIDES)])  # (S, 2) x, y in pixels
            keys = torch.isfinite(logits[:, 0, 0, :])  # (N, S): the keys each image attends over
            for n, (height, width) in enumerate(batch.image_sizes):
                scale = torch.tensor([width, height, width, height])
                for k in range(int(queries.is_real[n].sum())):
                    x0, y0, x1, y1 = (queries.boxes[n, k] * scale).tolist()
                    inside = ((centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0)
                              & (centres[:, 1] <= y1) & keys[n])
                    share = inside.sum() / keys[n].sum()
                    if share > 0:
                        lifts.append(float(attention[n, :, k, inside].sum(-1).mean() / share))
    lifts = torch.tensor(lifts)
    return sum(losses) / len(losses), float(lifts.median()), float(lifts.mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/demo/cache", help="a teacher cache holding fpn [runs/demo/cache]")
    parser.add_argument("--data", default="runs/demo/data", help="its COCO-layout data [runs/demo/data]")
    parser.add_argument("--checkpoints", default="900,3000", help="teacher-side batches to report at [900,3000]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held", type=int, default=8, help="held batches scored at each checkpoint [8]")
    parser.add_argument("--runs", nargs="*", default=[], help="student run directories whose ICD state to score")
    args = parser.parse_args(argv)
    if not Path(args.cache, "manifest.json").is_file():
        print(f"no teacher cache at {args.cache}: build one with `make demo` or pass --cache and --data")
        return 0
    cache = open_cache(args.cache)
    views = [ViewSpec.from_dict(v) for v in cache.manifest["views"]]
    dataset = CocoDetection(args.data, "train2017", views=views, view_policy="all")
    adopt_cache_images(dataset, cache, where=args.cache)
    source = CachedTeacher(args.cache, ["fpn"], cache=cache)
    channels = int(cache.manifest["teacher"]["config"]["fpn_channels"])
    held = list(teacher_batches(dataset, source, views, args.batch_size, HELD_SEED, args.held))

    def fresh_icd() -> ICD:
        torch.manual_seed(0)
        return ICD(ICD.Config.for_family("gfl"), dataset.num_classes, channels, channels,
                   DatasetStats.from_dataset(dataset))

    print("| teacher side | batches | aux_cls (prior 0.451) | attention lift, median | mean |")
    print("|---|---|---|---|---|")
    icd = fresh_icd()
    print("| initial | 0 | %.4f | %.2f | %.2f |" % attention_lift(icd, held), flush=True)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    params = [p for module in (icd.query_encoder, icd.decoder, icd.aux_head) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=icd.config.lr, weight_decay=icd.config.weight_decay)
    start = time.perf_counter()
    for done, (batch, teacher) in enumerate(teacher_batches(dataset, source, views, args.batch_size, 0,
                                                            checkpoints[-1]), start=1):
        aux_cls, aux_box, _, _ = icd.auxiliary_task(teacher, icd.make_queries(batch.targets, batch.image_sizes))
        optimizer.zero_grad(set_to_none=True)
        (aux_cls.mean() + aux_box.mean()).backward()
        torch.nn.utils.clip_grad_norm_(params, icd.config.max_grad_norm)
        optimizer.step()
        if done in checkpoints:
            seconds = (time.perf_counter() - start) / done
            print("| alone (%.2f s/batch) | %d | %.4f | %.2f | %.2f |" % (seconds, done, *attention_lift(icd, held)),
                  flush=True)
    for run in args.runs:
        state = torch.load(Path(run) / "last.pt", map_location="cpu", weights_only=True)["extra"]["train_state"]
        scored = fresh_icd()
        scored.load_state_dict({k: v for k, v in state["method"].items() if not k.startswith("student_value")},
                               strict=False)
        print("| %s after its run | %d + %d | %.4f | %.2f | %.2f |"
              % (Path(run).name, (state["config"].get("overrides") or {}).get("icd.pretrain_batches", 0),
                 state["iteration"],
                 *attention_lift(scored, held)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
