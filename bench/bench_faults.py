"""Fault injection: damage a small cache at random and check that nothing is read wrong in silence.

For each backend a small cache is written (synthetic teacher fields with the lossy and lossless
codecs, an artefact, finalized). Each trial copies it, damages one file (a byte XORed with a random
non-zero value at a random position, a truncation at a random length, or the file deleted; files
are drawn uniformly so that every kind of file is hit: shards, receipts, index, manifest, artefacts
and their records), then runs ``verify`` (what a user runs) and a full decode (every sample by
random access and by streaming, every artefact: what a trainer reads). Each trial ends

    detected   verify fails and names the damaged file
    harmless   verify passes and every decoded array is bit-identical to the intact cache's
    unnamed    verify fails without naming the file (a weak message)
    missed     verify passes but the reader refuses the cache (verify should have caught it)
    silent     verify passes and a decoded array differs: the worst outcome

and separately ``reader_silent`` counts trials where the reader returned different arrays without
an error (what a trainer that never ran verify would see), and ``reader_crash`` those where it
raised something other than a named CacheError. Goal: 0 for every outcome but detected and harmless.

    python -m bench.bench_faults [--trials 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from store import BACKENDS, CacheError, Manifest, open_cache, open_writer
from store.report import verify
from store.synthetic import make_sample

OUTCOMES = ("detected", "harmless", "unnamed", "missed", "silent")
KINDS = ("flip", "truncate", "delete")


def build_cache(url: str, backend: str) -> None:
    """Three shards of a small cache, lossy and lossless codecs, one artefact, finalized."""
    items = [make_sample(i, v, valid_hw=((64, 96), (96, 64))[i % 2], fields=["fpn", "head", "region", "meta"])
             for i in range(5) for v in range(2)]
    manifest = Manifest.create(teacher={"arch": "t", "checkpoint_sha256": "ab" * 32}, dataset={"num_images": 5},
                               views=[{"flip": False}, {"flip": True}], backend=backend, shard_size=4,
                               num_samples=len(items), calibration=items[:2], artifacts=["tokens"],
                               fields={"fpn": "klt", "head": "int8", "region": "fp16", "meta": "raw"})
    with open_writer(url, manifest) as writer:
        writer.put_artifact("tokens", {"tokens": np.arange(24, dtype=np.float32).reshape(4, 6)}, {"iters": 3})
        for item in items:
            writer.write(item)


def read_everything(url: str) -> dict:
    """Every decoded array of the cache, by random access and by streaming, and every artefact."""
    cache = open_cache(url)
    out = {}
    for key in cache.keys():
        for name, value in cache.get(*key).items():
            if not name.startswith("__"):
                out[("get", key, name)] = np.ascontiguousarray(value)
    for sample in cache.iter():
        for name, value in sample.items():
            if not name.startswith("__"):
                out[("iter", sample["__key__"], name)] = np.ascontiguousarray(value)
    for name in cache.artifacts():
        for key, value in cache.artifact(name).items():
            out[("artifact", name, key)] = value
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        a[k].tobytes() == b[k].tobytes() for k in a)


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def damage(root: Path, rel: str, kind: str, rng: np.random.Generator) -> str:
    path = root / rel
    data = bytearray(path.read_bytes())
    if kind == "delete" or not data:
        path.unlink()
        return f"delete {rel}"
    if kind == "truncate":
        size = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:size]))
        return f"truncate {rel} to {size}/{len(data)} bytes"
    pos = int(rng.integers(0, len(data)))
    data[pos] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return f"flip {rel} byte {pos}/{len(data)}"


def names_file(text: str, rel: str) -> bool:
    """Whether a verify report names the damaged file (a zarr shard's files by their shard directory)."""
    if rel in text or Path(rel).name in ("manifest.json", "index.npy") and Path(rel).name in text:
        return True
    parts = Path(rel).parts
    return len(parts) >= 2 and parts[0] == "shards" and str(Path(*parts[:2])) in text


def run_trials(backend: str, trials: int, seed: int, work: Path, kinds=KINDS, weights=(0.7, 0.15, 0.15)) -> dict:
    intact = work / f"intact-{backend}"
    build_cache(str(intact), backend)
    reference = read_everything(str(intact))
    files = cache_files(intact)
    rng = np.random.default_rng(seed)
    counts, reader_silent, reader_crash, examples = Counter(), 0, 0, {}
    # every file is deleted and truncated once, then random flips (and more cuts) fill the rest
    plan = [(rel, "delete") for rel in files] + [(rel, "truncate") for rel in files]
    while len(plan) < trials:
        plan.append((files[int(rng.integers(len(files)))], str(rng.choice(kinds, p=weights))))
    for rel, kind in plan:
        trial = work / "trial"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(intact, trial)
        what = damage(trial, rel, kind, rng)
        report = verify(str(trial))
        try:
            decoded, read_error = read_everything(str(trial)), None
        except CacheError as e:
            decoded, read_error = None, e
        except Exception as e:                 # a traceback instead of a named error: a bug too
            decoded, read_error = None, e
            reader_crash += 1
            examples.setdefault("reader_crash", f"{what}: {type(e).__name__}: {e}")
        if decoded is not None and not same(decoded, reference):
            reader_silent += 1
            examples.setdefault("reader_silent", what)
        if not report.ok:
            outcome = "detected" if names_file(report.text(), rel) else "unnamed"
        elif read_error is not None:
            outcome = "missed"
        else:
            outcome = "harmless" if same(decoded, reference) else "silent"
        counts[outcome] += 1
        if outcome != "detected":
            examples.setdefault(outcome, f"{what}: {report.text()[:300]} {read_error or ''}")
    shutil.rmtree(work / "trial", ignore_errors=True)
    return dict(backend=backend, trials=len(plan), files=len(files), **{k: counts[k] for k in OUTCOMES},
                reader_silent=reader_silent, reader_crash=reader_crash, examples=examples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=400, help="trials per backend [400]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{'backend':8s} {'trials':>6s} {'files':>5s} " + " ".join(f"{k:>9s}" for k in OUTCOMES) + "  reader_silent  reader_crash")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            start = time.perf_counter()
            result = run_trials(backend, args.trials, args.seed, Path(tmp))
            print(f"{backend:8s} {result['trials']:6d} {result['files']:5d} " +
                  " ".join(f"{result[k]:9d}" for k in OUTCOMES) + f"  {result['reader_silent']:13d}  {result['reader_crash']:12d}"
                  f"   ({time.perf_counter() - start:.0f} s)")
            if result["examples"]:
                print("  " + json.dumps(result["examples"], indent=1).replace("\n", "\n  "))
            bad += sum(result[k] for k in ("silent", "missed", "unnamed", "reader_silent", "reader_crash"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
