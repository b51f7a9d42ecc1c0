"""Student training cost per step: no distillation, each method from the cache, online, and from memory.

    python -m bench.bench_train                         # synthetic set, random gfl-small -> gfl-nano, CPU
    python -m bench.bench_train --teacher frcnn-small --student frcnn-nano   # two-stage: the partial teacher
    python -m bench.bench_train --device cuda --teacher gfl-r101 --student gfl-r50 --size 800 \\
        --max-size 1333 --images 64 --batch-size 4 --steps 20

In one run: builds a synthetic set and a teacher cache with precompute's API (default lossy
codecs), then times training steps of the same student for (a) no distillation, (b) every method
from the cache, (c) every method with the online teacher (precompute's ``extract_fields`` in the
loop), (d) every method with the cache's fields dequantised on the training device before the run
(``InMemoryTeacher``: a step reads and decodes nothing). (b) - (d) is what reading the cache costs a
step; (d) - (a) is the method's own work (its loss, adapters, masks), which no read path removes.
Each configuration runs in a fresh process (``StudentTrainer`` with ``max_iters`` =
warmup + steps, no evaluation) so that its peak memory is its own: CPU peak RSS of that process
(``VmHWM`` of /proc/self/status; ``ru_maxrss`` would carry the parent's peak across exec), GPU
``torch.cuda.max_memory_allocated``. A step is measured from the
end of the previous one: loader wait (image decode, view, cache decompression with
``--workers 0``) + dequantisation + forward + backward + optimiser steps. Prints a markdown table
with the ratios (b)/(a), (c)/(b), (d)/(a) and the read share ((b) - (d)) / (a), and the size of the cache's artefacts (a two-stage teacher's
RoI head, which the partial teacher runs on the student's RoIs over the cached maps in (b) while
(c) runs the whole teacher). Warmups and ramps of the methods are set to 0 so every term is
computed from the first step.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from train.methods import BASELINE, METHODS
    distillers = ",".join(name for name in METHODS if name != BASELINE)
    p = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gfl-small", help="teacher zoo name (random weights unless --ckpt)")
    p.add_argument("--ckpt", help="teacher checkpoint to cache instead of a random one (needs --data)")
    p.add_argument("--student", default="gfl-nano")
    p.add_argument("--data", help="COCO-layout root (default: a synthetic set made here)")
    p.add_argument("--images", type=int, default=16, help="synthetic training images [16]")
    p.add_argument("--size", type=int, default=96, help="view short side (and synthetic image size) [96]")
    p.add_argument("--max-size", type=int, default=128, help="view long-side cap [128]")
    p.add_argument("--methods", default=distillers, help=f"[{distillers}]")
    p.add_argument("--batch-size", type=int, default=2, help="[2]")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration [10]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first [2]")
    p.add_argument("--workers", type=int, default=0, help="loader workers (0: decoding is inside the step) [0]")
    p.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    p.add_argument("--amp", default="auto", help="student (and online teacher) autocast [auto]")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (0: torch default)")
    p.add_argument("--codec", action="append", default=[], metavar="FIELD=SPEC",
                   help="cache codec override, e.g. fpn=klt:0.04 (default: the store's lossy defaults)")
    p.add_argument("--stage1-iters", type=int, default=5,
                   help="MasKD stage 1 iterations in precompute (maskd.stage1_iters) [5]")
    p.add_argument("--work", help="working directory (default: a temporary one, removed)")
    return p.parse_args(argv)


def prepare(args, work: Path) -> dict:
    """Data, teacher checkpoint and cache (reused when already in --work)."""
    import torch

    from detectors import build_detector, save_checkpoint
    from detectors.synth import SynthConfig, generate
    from precompute.config import PrecomputeConfig
    from precompute.pipeline import run_precompute

    data = Path(args.data) if args.data else work / "data"
    if not args.data and not (data / "annotations" / "instances_train2017.json").exists():
        generate(data, args.images, 2, SynthConfig(size=args.size, max_side=min(80, args.size)), seed=0,
                 progress=False)
    ckpt = Path(args.ckpt) if args.ckpt else work / "teacher.pt"
    if not args.ckpt and not ckpt.exists():
        from detectors.data import CocoDetection
        torch.manual_seed(0)
        num_classes = CocoDetection(data, "train2017").num_classes
        save_checkpoint(ckpt, build_detector(args.teacher, num_classes=num_classes))
    cache = work / "cache"
    views = f"{args.size}:{args.max_size},{args.size}:{args.max_size}:flip"
    codecs = dict(item.split("=", 1) for item in args.codec)
    start = time.perf_counter()
    run_precompute(PrecomputeConfig(ckpt=str(ckpt), data=str(data), cache=str(cache), views=views,
                                    device=args.device, amp="none", workers=args.workers, batch_size=4,
                                    overrides={"maskd.stage1_iters": args.stage1_iters, "maskd.stage1_batch_size": 2},
                                    codecs=codecs, progress=False))
    return {"data": str(data), "ckpt": str(ckpt), "cache": str(cache), "views": views,
            "precompute_s": time.perf_counter() - start}


MODES = ("cache", "online", "memory")


class InMemoryTeacher:
    """Every view's fields of a cache, dequantised on ``device`` once: ``fetch`` only looks them up.
    The lower bound of any read path (what a step costs when reading is free)."""

    def __init__(self, cached, device) -> None:
        from train.sources import KEY, NBYTES
        self.fields = cached.fields
        self.samples = {}
        keys = cached.cache.keys()
        for start in range(0, len(keys), 16):
            for payload in cached.prefetch_many(keys[start:start + 16]):
                fields = {k: v for k, v in payload.items() if k not in (KEY, NBYTES)}
                self.samples[tuple(int(k) for k in payload[KEY])] = cached.cache.dequantize(fields, device=device)

    def fetch(self, batch, payloads, device) -> list[dict]:
        return [dict(self.samples[(int(i), int(v))]) for i, v in zip(batch.image_ids, batch.view_indices)]


def measure(args: argparse.Namespace, setup: dict, method: str, mode: str, out: str, results) -> None:
    """In a fresh process: train warmup + steps iterations, report the median step time and peak memory."""
    import torch

    from detectors import get_config
    from train.config import TrainConfig
    from train.methods import default_iteration_settings
    from train.trainer import StudentTrainer
    if args.threads:
        torch.set_num_threads(args.threads)
    if "fork" in mp.get_all_start_methods():
        # This process was spawned, and its loader workers would be spawned too (seconds each, every
        # epoch); `python -m train` on Linux forks them.
        mp.set_start_method("fork", force=True)
    # Every term on from the first iteration (the steady-state cost, not the warmup's): each ramp,
    # warmup and detached phase of the method set to 0.
    overrides = {key: 0 for key in default_iteration_settings(method, get_config(args.student).family)}
    source = dict(teacher=setup["ckpt"], views=setup["views"], artifacts_from=setup["cache"]) if mode == "online" \
        else dict(cache=setup["cache"])
    config = TrainConfig(data=setup["data"], out=out, method=method, student=args.student, batch_size=args.batch_size,
                         max_iters=args.warmup + args.steps, warmup_iters=1, workers=args.workers, device=args.device,
                         amp=args.amp, eval=False, tensorboard=False, progress=False, overrides=overrides, **source)
    trainer = StudentTrainer(config)
    if mode == "memory" and trainer.fields:
        trainer.source = InMemoryTeacher(trainer.source, trainer.device)   # the loader then prefetches nothing
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = trainer.step_times[args.warmup:]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()
    results.put({"method": method, "mode": mode, "step_s": statistics.median(timed), "peak_mb": peak,
                 "cuda": cuda})


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux KiB


def run_one(args, setup, method, mode, work: Path) -> dict:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    out = work / f"run_{method}_{mode}"
    process = context.Process(target=measure, args=(args, setup, method, mode, str(out), results))
    process.start()
    process.join()
    if process.exitcode != 0 or results.empty():
        raise RuntimeError(f"{method} ({mode}) failed with exit code {process.exitcode}")
    return results.get()


def main(argv=None) -> None:
    from store import open_cache
    from train.methods import BASELINE
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != BASELINE]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        setup = prepare(args, work)
        print(f"cache built in {setup['precompute_s']:.1f} s ({setup['cache']}); teacher {args.ckpt or args.teacher}, "
              f"student {args.student}, batch {args.batch_size}, views {setup['views']}, device {args.device}, "
              f"{args.steps} timed steps after {args.warmup}", file=sys.stderr, flush=True)
        artifacts = open_cache(setup["cache"]).artifacts()   # e.g. a two-stage teacher's RoI head
        sizes = ", ".join(f"{name} {record['nbytes'] / 2 ** 20:.2f} MB" for name, record in sorted(artifacts.items()))
        base = run_one(args, setup, BASELINE, "cache", work)
        rows = []
        for method in methods:
            steps = {mode: run_one(args, setup, method, mode, work) for mode in MODES}
            rows.append((method, steps))
            print(f"{method}: " + ", ".join(f"{mode} {step['step_s']:.3f} s/step" for mode, step in steps.items()),
                  file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    memory = "GPU max allocated MB" if base["cuda"] else "peak RSS MB"
    print(f"\ncache artefacts (stored once per cache): {sizes}")
    print(f"\n(a) no distillation: {base['step_s'] * 1000:.0f} ms/step, {memory} {base['peak_mb']:.0f} "
          f"(median of {args.steps} steps after {args.warmup}; batch {args.batch_size}; {args.device})\n")
    print(f"| method | (b) cache ms/step | (c) online ms/step | (d) memory ms/step | (b)/(a) | (c)/(b) | (d)/(a) "
          f"| read share ((b)-(d))/(a) | {memory} (b) | {memory} (c) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    a = base["step_s"]
    for method, steps in rows:
        b, c, d = (steps[mode]["step_s"] for mode in MODES)
        print(f"| {method} | {b * 1000:.0f} | {c * 1000:.0f} | {d * 1000:.0f} | {b / a:.2f} | {c / b:.2f} | {d / a:.2f} | "
              f"{(b - d) / a:+.2f} | {steps['cache']['peak_mb']:.0f} | {steps['online']['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
