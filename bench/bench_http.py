"""A cache read over HTTP: random-get throughput and the training step, against the local disk.

    python -m bench.bench_http                     # bench_train's scale: synthetic set, random gfl-small -> gfl-nano
    python -m bench.bench_http --latency-ms 0 20 50 --depths 0 2 4 8 --steps 20

Builds a synthetic set, a random teacher and its cache in each backend with precompute's API (the
fields ``--method`` reads), serves the caches read-only from a local HTTP server in a process of
its own (``store.http_server``: byte ranges, and a delay before every answer that stands in for a
remote store's round trip; concurrent requests wait concurrently), and measures per backend:

1. random ``Cache.get_many`` throughput in views/s: batches of ``--get-batch`` random views, the
   method's fields, compact decode (what a loader worker does), from the local disk and over HTTP
   at each latency; every shard is touched once first (receipts, shard indexes), so this is the
   steady state of a long run;
2. the training step (median of ``--steps`` after ``--warmup``, measured as bench_train does: loader
   wait + dequantisation + forward + backward + optimiser) from the local disk and over HTTP at
   each latency, for each read-ahead depth (``--prefetch-batches``: teacher reads of the next N
   batches started ahead of the step). Ratios are to the local disk at the same depth.

Prints two markdown tables. The goal of issue 12: at 20 ms per request, a step within 1.10 of the
local disk's.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BACKEND_NAMES = ("zarr", "wds")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gfl-small", help="teacher zoo name, random weights [gfl-small]")
    p.add_argument("--student", default="gfl-nano", help="[gfl-nano]")
    p.add_argument("--method", default="frs", help="the method trained (its fields are cached and read) [frs]")
    p.add_argument("--images", type=int, default=16, help="synthetic training images [16]")
    p.add_argument("--size", type=int, default=96, help="view short side (and synthetic image size) [96]")
    p.add_argument("--max-size", type=int, default=128, help="view long-side cap [128]")
    p.add_argument("--shard-size", type=int, default=8, help="views per shard (several shards per cache) [8]")
    p.add_argument("--backends", nargs="+", default=list(BACKEND_NAMES), choices=BACKEND_NAMES)
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0],
                   help="delay per HTTP request, one server each [0 20]")
    p.add_argument("--depths", type=int, nargs="+", default=[0, 2, 4], help="--prefetch-batches values [0 2 4]")
    p.add_argument("--batch-size", type=int, default=2, help="training batch [2]")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration [10]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first [2]")
    p.add_argument("--workers", type=int, default=0, help="loader workers (0: reads in the training process) [0]")
    p.add_argument("--get-batch", type=int, default=8, help="views per get_many in the throughput test [8]")
    p.add_argument("--gets", type=int, default=256, help="views read per throughput measurement [256]")
    p.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--work", help="working directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    for name in ("images", "steps", "get_batch", "gets", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.depths) < 0 or min(args.latency_ms) < 0:
        p.error("--depths and --latency-ms must be >= 0")
    return args


def prepare(args, work: Path) -> dict:
    """Synthetic data, a random teacher, and its cache of the method's fields in each backend (reused in --work)."""
    import torch

    from detectors import build_detector, save_checkpoint
    from detectors.data import CocoDetection
    from detectors.synth import SynthConfig, generate
    from precompute.config import PrecomputeConfig
    from precompute.pipeline import run_precompute

    data, ckpt, served = work / "data", work / "teacher.pt", work / "served"
    if not (data / "annotations" / "instances_train2017.json").exists():
        generate(data, args.images, 2, SynthConfig(size=args.size, max_side=min(80, args.size)), seed=0,
                 progress=False)
    if not ckpt.exists():
        torch.manual_seed(0)
        save_checkpoint(ckpt, build_detector(args.teacher, num_classes=CocoDetection(data, "train2017").num_classes))
    views = f"{args.size}:{args.max_size},{args.size}:{args.max_size}:flip"
    for backend in args.backends:
        run_precompute(PrecomputeConfig(ckpt=str(ckpt), data=str(data), cache=str(served / backend), views=views,
                                        fields=args.method, format=backend, device=args.device, amp="none",
                                        workers=0, batch_size=4, shard_size=args.shard_size, progress=False))
    return {"data": str(data), "served": served}


def _serve(root: str, latency: float, pipe) -> None:
    """Child process: serve ``root`` until the parent sends anything (or goes away)."""
    from store.http_server import serve_directory
    with serve_directory(root, latency=latency) as base:
        pipe.send(base)
        try:
            pipe.recv()
        except EOFError:
            pass


class Servers:
    """One HTTP server process per latency, serving the caches' directory."""

    def __init__(self, root: Path, latencies_ms: list[float]) -> None:
        context = mp.get_context("spawn")
        self.running, self.base = [], {}
        try:
            for latency in latencies_ms:
                parent, child = context.Pipe()
                process = context.Process(target=_serve, args=(str(root), latency / 1000, child), daemon=True)
                process.start()
                self.running.append((process, parent))
                if not parent.poll(120):
                    raise RuntimeError(f"the HTTP server for {latency} ms did not start")
                self.base[latency] = parent.recv()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for process, pipe in self.running:
            try:
                pipe.send("stop")
            except OSError:
                pass
            process.join(10)
            if process.is_alive():
                process.terminate()


def sources(args, setup: dict, servers: Servers, backend: str) -> list[tuple[str, str]]:
    """(label, cache URL): the local directory, then the cache over HTTP at each latency."""
    return [("local disk", str(setup["served"] / backend))] + [
        (f"http {latency:g} ms", f"{servers.base[latency]}/{backend}") for latency in args.latency_ms]


def get_rate(args, url: str) -> float:
    """Views/s of random get_many batches (compact decode) after every shard was touched once."""
    import numpy as np

    from store import open_cache
    from train.methods import MethodSpec, named_field_sets
    from train.sources import field_names

    cache = open_cache(url)
    sets = named_field_sets()
    fields = field_names([group for name in MethodSpec.parse(args.method).names for group in sets[name]])
    keys = cache.keys()
    for index in sorted(cache.shards):       # receipts, sizes, zarr metadata and shard indexes, once
        cache.get_many([tuple(cache.receipt(index)["keys"][0])], fields=fields, decode="compact")
    rng = np.random.default_rng(0)
    done, start = 0, time.perf_counter()
    while done < args.gets:
        batch = [keys[i] for i in rng.integers(0, len(keys), size=args.get_batch)]
        cache.get_many(batch, fields=fields, decode="compact")
        done += len(batch)
    return done / (time.perf_counter() - start)


def step_time(args, setup: dict, url: str, depth: int, out: Path) -> float:
    """Median seconds per training step from ``url`` with read-ahead ``depth``."""
    from detectors import get_config
    from train.config import TrainConfig
    from train.methods import default_iteration_settings
    from train.trainer import StudentTrainer

    # every term on from the first step, as bench_train: the steady-state cost
    overrides = {key: 0 for key in default_iteration_settings(args.method, get_config(args.student).family)}
    config = TrainConfig(data=setup["data"], out=str(out), cache=url, method=args.method, student=args.student,
                         batch_size=args.batch_size, max_iters=args.warmup + args.steps, warmup_iters=1,
                         workers=args.workers, prefetch_batches=depth, device=args.device, eval=False,
                         tensorboard=False, progress=False, overrides=overrides)
    trainer = StudentTrainer(config)
    trainer.train()
    return statistics.median(trainer.step_times[args.warmup:])


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_http_"))
    work.mkdir(parents=True, exist_ok=True)
    rates, steps = {}, {}
    try:
        setup = prepare(args, work)
        servers = Servers(setup["served"], args.latency_ms)
        try:
            for backend in args.backends:
                for label, url in sources(args, setup, servers, backend):
                    rates[backend, label] = get_rate(args, url)
                    for depth in args.depths:
                        steps[backend, label, depth] = step_time(args, setup, url, depth,
                                                                 work / "runs" / f"{backend}-{label}-{depth}")
                        print(f"{backend}, {label}, depth {depth}: {steps[backend, label, depth] * 1000:.0f} ms/step",
                              file=sys.stderr, flush=True)
        finally:
            servers.close()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    labels = ["local disk"] + [f"http {latency:g} ms" for latency in args.latency_ms]
    print(f"\nRandom get_many: batches of {args.get_batch} views, fields of {args.method}, compact decode, "
          f"{args.gets} views per cell\n")
    print("| backend | " + " | ".join(f"{label} views/s" for label in labels) + " | "
          + " | ".join(f"{label} / local" for label in labels[1:]) + " |")
    print("|---" * (2 * len(labels)) + "|")
    for backend in args.backends:
        local = rates[backend, "local disk"]
        print(f"| {backend} | " + " | ".join(f"{rates[backend, label]:.0f}" for label in labels) + " | "
              + " | ".join(f"{rates[backend, label] / local:.2f}" for label in labels[1:]) + " |")
    print(f"\nTraining step ({args.method}, {args.student}, batch {args.batch_size}, {args.workers} loader workers, "
          f"{args.device}; median of {args.steps} steps after {args.warmup}), ms/step and ratio to the local disk "
          "at the same read-ahead depth\n")
    print("| backend | prefetch batches | " + " | ".join(f"{label} ms" for label in labels) + " | "
          + " | ".join(f"{label} / local" for label in labels[1:]) + " |")
    print("|---" * (2 * len(labels) + 1) + "|")
    for backend in args.backends:
        for depth in args.depths:
            row = [steps[backend, label, depth] for label in labels]
            print(f"| {backend} | {depth} | " + " | ".join(f"{step * 1000:.0f}" for step in row) + " | "
                  + " | ".join(f"{step / row[0]:.2f}" for step in row[1:]) + " |")


if __name__ == "__main__":
    main()
