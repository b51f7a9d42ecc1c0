"""Benchmark of precompute: views/s of the whole pipeline against a bare teacher forward loop over the
same views in the same run, and the bytes written per view for each field group.

    python bench/bench_precompute.py                         # demo-sized teacher on synthetic data, CPU
    python bench/bench_precompute.py --data runs/demo/data --ckpt runs/demo/teacher/best.pt
    python bench/bench_precompute.py --device cuda --amp bf16 --model gfl-r50 --short 800 --max-size 1333

The bare loop runs ``model(images, sizes)`` under ``torch.no_grad()`` over batches already decoded,
transformed and collated in memory (the same batches precompute plans: views of one padded shape),
so it is the teacher's cost alone. Precompute is ``run_rank`` end to end into a fresh cache: data
loading in worker processes, the forward, field extraction (dense crops, LD regions), encoding in
the writer's threads, atomic shard commits. Overhead = 1 − precompute views/s ÷ bare views/s (goal:
≤ 10%). The two are interleaved (bare, precompute, bare, precompute, ...) and the medians reported,
so a background load affects both alike. CPU milliseconds per view (this process's threads and its
loader workers) are printed too: on a CPU-only machine whose cores the forward already fills, they
say what the extra work costs even when other processes make the wall-clock rates noisy. Without
--ckpt the teacher is randomly initialised (its compression figures then say little about a
trained teacher's; the throughput figures do).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as python -m precompute (see precompute/__main__.py)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors import build_detector, save_checkpoint  # noqa: E402
from detectors.synth import SynthConfig, generate  # noqa: E402
from detectors.views import collate  # noqa: E402
from precompute.config import PrecomputeConfig  # noqa: E402
from precompute.fields import extract_fields, methods_of  # noqa: E402
from precompute.pipeline import Run, run_rank, write_artifacts  # noqa: E402
from precompute.plan import padded_shape_fn, plan_batches  # noqa: E402
from store import BACKENDS, finalize, group_of, open_writer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_precompute.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="COCO-layout root (default: a synthetic set)")
    p.add_argument("--split", default="train2017")
    p.add_argument("--images", type=int, default=100, help="images of the synthetic set (without --data)")
    p.add_argument("--ckpt", type=Path, default=None, help="teacher checkpoint (default: random --model)")
    p.add_argument("--model", default="gfl-small", help="zoo name of the random teacher [gfl-small]")
    p.add_argument("--short", type=int, default=160)
    p.add_argument("--max-size", type=int, default=256)
    p.add_argument("--fields", default="all")
    p.add_argument("--format", default="zarr", choices=BACKENDS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--encode-threads", type=int, default=1)
    p.add_argument("--writer-procs", type=int, default=0, help="writer processes (0: a writer thread)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of (bare, precompute)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its waited-for children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bare_views_per_s(run: Run, batches: list, amp_dtype) -> tuple[float, float]:
    model, device = run.teacher.model, run.device
    views = sum(len(b.image_sizes) for b in batches)
    with torch.no_grad():
        model(batches[0].images.to(device), batches[0].image_sizes)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for batch in batches:
            out = model(batch.images.to(device, non_blocking=True), batch.image_sizes, amp_dtype=amp_dtype)
            del out
        if device.type == "cuda":
            torch.cuda.synchronize()
    return views / (time.perf_counter() - start), (cpu_seconds() - cpu_start) / views


def precompute_round(run: Run, cache: str) -> tuple[float, float, dict]:
    run.config.cache = cache
    manifest = run.prepare_manifest()
    cpu_start = cpu_seconds()
    stats = run_rank(run, manifest, 0, 1)
    cpu = (cpu_seconds() - cpu_start) / max(1, stats.views)
    write_artifacts(run, manifest)    # untimed: once per cache, not per view
    final = finalize(cache)
    return stats.views_per_s, cpu, final


def stage_costs(run: Run, plan: list[list[int]], cache: str) -> dict[str, float]:
    """CPU milliseconds per view of each stage, torch on one thread, on the first views of the plan
    (process CPU time: the zarr backend does its I/O in a thread of its own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = plan[: max(1, 48 // max(1, len(plan[0])))]
        views = sum(len(b) for b in plan)
        clock = time.process_time
        start = clock()
        samples = [[run.dataset.load(*run.order.task(p)) for p in positions] for positions in plan]
        batches = [collate(s) for s in samples]
        costs = {"load + view + collate (loader workers)": clock() - start}
        forward, extract = [], []
        for _ in range(2):  # the first round warms up; the minimum of each is kept
            with torch.no_grad():
                start = clock()
                for batch in batches:
                    run.teacher.model(batch.images, batch.image_sizes)
                forward.append(clock() - start)
            start = clock()
            fields = []
            for batch in batches:
                fields += extract_fields(run.teacher.model, batch, run.fields, output_device="cpu")
            extract.append(clock() - start)
        costs["teacher forward"] = min(forward)
        costs["extract_fields beyond the forward (crops, LD regions, meta)"] = max(0.0, min(extract) - min(forward))
        run.config.cache = cache
        writer = open_writer(cache, run.prepare_manifest())
        by_group: dict[str, float] = {}
        for sample in fields:
            for name, value in sample.items():
                array = value.numpy()
                start = clock()
                writer.manifest.codec(name).encode(array)
                by_group[group_of(name)] = by_group.get(group_of(name), 0.0) + clock() - start
        for group, seconds in sorted(by_group.items()):
            costs[f"encode {group}"] = seconds
        task = writer.pending_shards()[0]
        shard = writer.shard(task.index)
        positions = [p for b in plan for p in b]
        for position, sample in zip(positions, fields):
            if task.start <= position < task.stop:
                shard.write(sample)
        n = len(shard)
        start = clock()
        if n == task.stop - task.start:
            shard.commit()
            costs[f"commit a shard ({run.config.format}: files, sha256, fsync)"] = (clock() - start) * views / n
        return {k: 1e3 * v / views for k, v in costs.items()}
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_precompute_") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = generate(tmp / "data", args.images, 1, SynthConfig(size=args.short), seed=0, progress=False)
        ckpt = args.ckpt
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = tmp / "teacher.pt"
            save_checkpoint(ckpt, build_detector(args.model, num_classes=8 if args.data is None else 80))
        views = f"{args.short}:{args.max_size},{args.short}:{args.max_size}:flip"
        config = PrecomputeConfig(ckpt=str(ckpt), data=str(data), cache="", split=args.split, format=args.format,
                                  views=views, fields=args.fields, shard_size=args.shard_size,
                                  batch_size=args.batch_size, device=args.device, amp=args.amp,
                                  workers=args.workers, encode_threads=args.encode_threads,
                                  # no MasKD tokens: the bench writes the shards alone
                                  overrides={"maskd.stage1_iters": 0} if "maskd" in methods_of(args.fields) else {},
                                  writer_procs=args.writer_procs,
                                  progress=False)
        run = Run(config)
        shape_of = padded_shape_fn(run.dataset, run.order)
        plan = plan_batches(range(run.order.num_samples), shape_of, args.batch_size)
        batches = [collate([run.dataset.load(*run.order.task(p)) for p in positions]) for positions in plan]
        num_views = run.order.num_samples

        bare, pre, bare_cpu, pre_cpu, final = [], [], [], [], None
        for repeat in range(args.repeats):
            rate, cpu = bare_views_per_s(run, batches, run.amp_dtype)
            bare.append(rate)
            bare_cpu.append(cpu)
            rate, cpu, final = precompute_round(run, str(tmp / f"cache{repeat}"))
            pre.append(rate)
            pre_cpu.append(cpu)
        bare_rate, pre_rate = statistics.median(bare), statistics.median(pre)
        bare_ms, pre_ms = 1e3 * statistics.median(bare_cpu), 1e3 * statistics.median(pre_cpu)

        threads = torch.get_num_threads()
        print(f"teacher {run.teacher.arch} ({'random init' if args.ckpt is None else args.ckpt}), "
              f"device {run.device}{'' if run.amp_dtype is None else ' amp ' + args.amp}, torch threads {threads}, "
              f"{num_views} views ({run.order.num_images} images x 2) at {views}, "
              f"batch {args.batch_size} ({len(batches)} batches of one padded shape), fields {args.fields}, "
              f"format {args.format}, loader workers {args.workers}, encode threads {args.encode_threads}, "
              f"writer processes {args.writer_procs}\n")
        print("| loop | views/s (median of %d) | rounds | CPU ms / view (median) |" % args.repeats)
        print("|---|---:|---|---:|")
        print(f"| bare teacher forward (batches in memory) | {bare_rate:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in bare)} | {bare_ms:.1f} |")
        print(f"| precompute (load + forward + fields + encode + write) | {pre_rate:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in pre)} | {pre_ms:.1f} |")
        print(f"\nprecompute / bare views/s = {pre_rate / bare_rate:.3f}  (overhead "
              f"{100 * (1 - pre_rate / bare_rate):.1f}%, goal <= 10%); CPU time per view: precompute / bare = "
              f"{pre_ms / bare_ms:.3f}\n")

        groups: dict[str, list[int]] = {}
        for name, (stored, raw) in final["totals"]["fields"].items():
            entry = groups.setdefault(group_of(name), [0, 0])
            entry[0] += stored
            entry[1] += raw
        print("| field group | stored bytes / view | raw fp16 bytes / view | stored / raw |")
        print("|---|---:|---:|---:|")
        for group, (stored, raw) in sorted(groups.items()):
            print(f"| {group} | {stored / num_views:,.0f} | {raw / num_views:,.0f} | {stored / max(raw, 1):.3f} |")
        stored_total = sum(s for s, _ in groups.values())
        raw_total = sum(r for _, r in groups.values())
        print(f"| total | {stored_total / num_views:,.0f} | {raw_total / num_views:,.0f} | "
              f"{stored_total / max(raw_total, 1):.3f} |")

        if run.device.type != "cpu":     # the per-stage table is CPU time; a GPU's forward is not
            return
        costs = stage_costs(run, plan, str(tmp / "stage_costs"))
        print("\n| stage (one thread each) | CPU ms / view |")
        print("|---|---:|")
        for stage, ms in costs.items():
            print(f"| {stage} | {ms:.2f} |")
        extra = sum(v for k, v in costs.items() if k != "teacher forward")
        print(f"| everything but the forward | {extra:.2f} ({100 * extra / costs['teacher forward']:.0f}% of the "
              f"forward) |")


if __name__ == "__main__":
    main()
