"""Benchmark of the teacher-output cache: codec size / error / speed, and backend read throughput.

    python bench/bench_store.py                          # synthetic FPN-like data (clearly labelled)
    python bench/bench_store.py --input outputs.pt       # real teacher outputs
    python bench/bench_store.py --out bench_store.md     # also write the markdown tables

--input: a .pt (torch.save) or .npz of teacher fields. Either one sample — a dict field name ->
tensor, e.g. {"fpn.p3": (256, H, W), ..., "head.cls.p3": (A*K, H, W)} — or several: a list of such
dicts (.pt), or keys "0/fpn.p3", "1/fpn.p3", ... (.npz). A leading batch dim of 1 is dropped.
The klt codec is fitted on the first --fit samples and measured on the others (held out).

With --cache, the decoded maps of an existing cache (e.g. the demo teacher's runs/table/cache);
they carry that cache's own codec error, so compare codecs at bounds well above it.

Without --input or --cache the data are synthetic (store.synthetic.StructuredFPN: low rank across channels,
spatially smooth latents, 3% i.i.d. noise). Their compression figures follow from the generator's
parameters and say nothing about a real teacher; they exercise the code paths and the speed.

Measures, per codec on each field group: stored bytes / raw fp16 bytes, relative RMSE
(||x^-x|| / ||x||, all maps together, and the worst single map) and max |x^-x| / max |x| against the
fp32 input, encode and decode throughput in MB/s of raw fp16. Then per backend: streaming read
throughput through a torch DataLoader with 0, 1 and 2 workers, and random access, for the fpn
group. Files are freshly written, so reads come from the page cache: decode is what is measured.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import BACKENDS, LEVELS, Manifest, dequantize, make_codec, open_cache, open_writer  # noqa: E402
from store.synthetic import StructuredFPN  # noqa: E402
from store.torch_data import CacheIterableDataset  # noqa: E402

VIEW_SIZES = [(800, 1216), (800, 1088), (1216, 800), (800, 1344)]    # typical 800/1333 views, padded


def load_input(path: str) -> list[dict]:
    if path.endswith(".npz"):
        with np.load(path) as npz:
            flat = {k: npz[k] for k in npz.files}
        if all("/" in k for k in flat):
            out: dict[str, dict] = {}
            for key, value in flat.items():
                index, name = key.split("/", 1)
                out.setdefault(index, {})[name] = value
            samples = [out[k] for k in sorted(out, key=int)]
        else:
            samples = [flat]
    else:
        import torch
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        samples = loaded if isinstance(loaded, list) else [loaded]
    clean = []
    for sample in samples:
        item = {}
        for name, value in sample.items():
            arr = value.float().numpy() if hasattr(value, "numpy") else np.asarray(value)
            if name.startswith(("fpn.", "head.")) and arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            item[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
        clean.append(item)
    return clean


def load_cache(url: str, count: int) -> list[dict]:
    """``count`` views spread evenly over a cache, its fpn and head.cls fields decoded to float32."""
    cache = open_cache(url)
    keys = cache.keys()
    wanted = [f for f in cache.manifest.fields if f.startswith(("fpn.", "head.cls."))]
    picks = np.linspace(0, len(keys) - 1, count).astype(int)
    return [{k: v for k, v in cache.get(*keys[i], fields=wanted).items() if not k.startswith("__")} for i in picks]


def synthetic_samples(n: int, classes: int = 80, seed: int = 0) -> list[dict]:
    fpn = StructuredFPN(channels=256, rank=32, seed=seed)
    rng = np.random.default_rng(seed + 1)
    samples = []
    for i in range(n):
        h, w = VIEW_SIZES[i % len(VIEW_SIZES)]
        sample = {}
        for level, name in enumerate(LEVELS):
            stride = 2 ** (level + 3)
            hl, wl = -(-h // stride), -(-w // stride)
            sample[f"fpn.{name}"] = fpn.level(level, hl, wl, rng)
            # class logits after focal-loss training: mostly far below the 0.01 prior, a few objects
            logits = rng.normal(-7.0, 1.5, (classes, hl, wl)).astype(np.float32)
            hits = rng.random((classes, hl, wl)) < 0.002
            logits[hits] = rng.normal(0.0, 2.0, int(hits.sum()))
            sample[f"head.cls.{name}"] = logits
        samples.append(sample)
    return samples


def codec_table(samples: list[dict], fit: int, group_prefix: str, presets: dict, sigmoid: bool = False) -> list[dict]:
    """One row per codec. ``sigmoid``: measure errors on sigmoid(x) (class scores), not on x."""
    names = sorted({k for s in samples for k in s if k.startswith(group_prefix)})
    test = samples[fit:] if len(samples) > fit else samples
    rows = []
    for label, spec in presets.items():
        stored = raw = 0
        err2 = ref2 = 0.0
        worst_rel = worst_max = 0.0
        t_enc = t_dec = t_compact = 0.0
        for name in names:
            calibration = [s[name] for s in samples[:fit] if name in s]
            codec = make_codec(spec, calibration=calibration)
            for sample in test:
                x = sample[name]
                t0 = time.perf_counter()
                blob = codec.encode(x)
                t1 = time.perf_counter()
                y = codec.decode(blob)
                t2 = time.perf_counter()
                codec.decode_compact(blob)
                t3 = time.perf_counter()
                t_enc, t_dec, t_compact = t_enc + t1 - t0, t_dec + t2 - t1, t_compact + t3 - t2
                stored += len(blob)
                raw += x.size * 2
                x64, y64 = x.astype(np.float64), y.astype(np.float64)
                if sigmoid:
                    x64, y64 = 1 / (1 + np.exp(-x64)), 1 / (1 + np.exp(-y64))
                diff = y64 - x64
                e2, r2 = float((diff ** 2).sum()), float((x64 ** 2).sum())
                err2, ref2 = err2 + e2, ref2 + r2
                worst_rel = max(worst_rel, math.sqrt(e2 / r2) if r2 else 0.0)
                worst_max = max(worst_max, float(np.abs(diff).max() / (1.0 if sigmoid else max(1e-30, np.abs(x).max()))))
        mb = raw / 1e6
        rows.append(dict(codec=label, lossless=codec.lossless, bound=_bound_text(codec.error_bound()),
                         ratio=stored / raw, bytes_per_view=stored / len(test), rel_rmse=math.sqrt(err2 / ref2),
                         worst_rel_rmse=worst_rel, max_err=worst_max, enc=mb / t_enc, dec=mb / t_dec,
                         dec_compact=mb / t_compact))
    return rows


def _bound_text(bound: dict) -> str:
    return "exact" if bound["kind"] == "exact" else f"{bound['kind']} <= {bound['value']:.3g}"


def gpu_dequant(samples: list[dict], fit: int) -> dict | None:
    """MB/s of raw fp16 produced by dequantize() on the GPU from compact KLT and int8 blobs."""
    import torch
    if not torch.cuda.is_available():
        return None
    out = {}
    for label, spec in (("int8", "int8"), ("klt", "klt")):
        codec = make_codec(spec, calibration=[samples[0]["fpn.p3"]])
        compact = [codec.decode_compact(codec.encode(s["fpn.p3"])) for s in samples[fit:] or samples]
        raw = sum(int(np.prod(c.q.shape if label == "int8" else c.shape)) * 2 for c in compact)
        for c in compact:
            dequantize(c, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            for c in compact:
                dequantize(c, device="cuda")
        torch.cuda.synchronize()
        out[label] = 5 * raw / 1e6 / (time.perf_counter() - t0)
    return out


def backend_table(samples: list[dict], fit: int, workdir: str, repeats: int, random_only: bool = False) -> list[dict]:
    import torch

    rows = []
    items = []
    for i in range(repeats):
        for j, sample in enumerate(samples):
            item = {k: v for k, v in sample.items() if k.startswith("fpn.")}
            h = item["fpn.p3"].shape[1] * 8
            w = item["fpn.p3"].shape[2] * 8
            item.update({"meta.image_id": np.int64(i * len(samples) + j), "meta.view_index": np.int32(0),
                         "meta.valid_hw": np.array([h, w], np.int32)})
            items.append(item)
    raw_fpn = sum(v.size * 2 for item in items for k, v in item.items() if k.startswith("fpn."))
    for backend in BACKENDS:
        url = os.path.join(workdir, f"cache-{backend}")
        manifest = Manifest.create(teacher={"arch": "bench", "checkpoint_sha256": "0" * 64},
                                   dataset={"bench": True}, views=[{"flip": False}],
                                   fields={"fpn": "klt", "meta.valid_hw": "raw"},
                                   calibration=samples[:fit], backend=backend, shard_size=4,
                                   num_samples=len(items))
        t0 = time.perf_counter()
        with open_writer(url, manifest) as writer:
            for item in items:
                writer.write(item)
        write_s = time.perf_counter() - t0
        cache = open_cache(url)
        stored = sum(info["nbytes"] for s in cache.shards.values() for p, info in s["files"].items() if "fpn" in p)
        row = dict(backend=backend, samples=len(items), stored_mb=stored / 1e6, write_mb_s=raw_fpn / 1e6 / write_s)
        for decode in () if random_only else ("torch", "compact"):
            for workers in (0, 1, 2):
                dataset = CacheIterableDataset(url, fields=["fpn"], decode=decode)
                loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                     collate_fn=None if decode == "torch" else _identity)
                t0 = time.perf_counter()
                count, first = 0, None
                for _ in loader:
                    count += 1
                    first = first or time.perf_counter()
                end = time.perf_counter()
                assert count == len(items)
                row[f"{decode}_w{workers}"] = (count - 1) / (end - first)     # steady state, after the first
                row[f"{decode}_w{workers}_start"] = first - t0
        keys = cache.keys()
        order = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
        best = 0.0
        for _ in range(3 if random_only else 1):    # best of 3 passes over every sample, random order
            t0 = time.perf_counter()
            for key in order:
                cache.get(*key, fields=["fpn"])
            best = max(best, len(keys) / (time.perf_counter() - t0))
        row["random_get"] = best
        if random_only and hasattr(cache, "get_many"):   # the loader's path: a batch's views in one call
            for size in (2, 8):
                best = 0.0
                for _ in range(3):
                    t0 = time.perf_counter()
                    for i in range(0, len(order), size):
                        cache.get_many(order[i:i + size], fields=["fpn"])
                    best = max(best, len(keys) / (time.perf_counter() - t0))
                row[f"get_many_{size}"] = best
        row["raw_mb_per_sample"] = raw_fpn / 1e6 / len(items)
        rows.append(row)
    return rows


def _identity(x):
    return x


def markdown(args, source: str, fpn_rows, cls_rows, gpu, backend_rows) -> str:
    import platform

    import torch
    lines = [f"### store benchmark ({source})", "",
             f"Command: `python bench/bench_store.py {' '.join(args)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
             + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"), ""]
    for title, rows, errors in (("fpn group (P3-P7)", fpn_rows, "errors on the values against the fp32 input"),
                                ("head.cls group (class logits)", cls_rows,
                                 "errors on sigmoid probabilities; max err is absolute")):
        if not rows:
            continue
        lines += [f"**{title}** — ratio = stored / raw fp16 bytes; {errors}; MB/s of raw fp16", "",
                  "| codec | lossless | declared bound | ratio | MB per view | rel RMSE | worst map rel RMSE "
                  "| max err / max abs | encode MB/s | decode MB/s | compact decode MB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['codec']} | {'yes' if r['lossless'] else 'no'} | {r['bound']} | {r['ratio']:.3f} | "
                         f"{r['bytes_per_view'] / 1e6:.2f} | {r['rel_rmse']:.2e} | {r['worst_rel_rmse']:.2e} | "
                         f"{r['max_err']:.2e} | {r['enc']:.0f} | {r['dec']:.0f} | {r['dec_compact']:.0f} |")
        lines.append("")
    if gpu:
        lines += ["GPU dequantize (compact -> fp32 on device), fpn.p3, MB/s of raw fp16: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in gpu.items()), ""]
    if backend_rows:
        lines += ["**Backends**, fpn group with the klt codec, shard_size 4, local disk (page cache). Samples/s "
                  "through a torch DataLoader (batch_size=None), steady state after the first sample; decode=torch "
                  "decodes to fp32 on the CPU, decode=compact stops at the codes that go to the device "
                  "(store.dequantize); random get: Cache.get one process.", "",
                  "| backend | samples | raw fp16 MB/sample | stored MB | write MB/s (raw) | decode=torch w0 / w1 / w2 "
                  "| decode=compact w0 / w1 / w2 | random get/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in backend_rows:
            lines.append(f"| {r['backend']} | {r['samples']} | {r['raw_mb_per_sample']:.1f} | {r['stored_mb']:.1f} | "
                         f"{r['write_mb_s']:.0f} | {r['torch_w0']:.1f} / {r['torch_w1']:.1f} / {r['torch_w2']:.1f} | "
                         f"{r['compact_w0']:.1f} / {r['compact_w1']:.1f} / {r['compact_w2']:.1f} | "
                         f"{r['random_get']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help=".pt or .npz of teacher fields (see above); default: synthetic data")
    parser.add_argument("--cache", help="a cache's decoded maps as the input (--samples views, evenly spread; they "
                                        "carry that cache's own codec error)")
    parser.add_argument("--bounds", default="0.04,0.12",
                        help="rel RMSE bounds at which klt, klt-dpcm and klt-dct are compared (default 0.04,0.12)")
    parser.add_argument("--samples", type=int, default=6, help="synthetic samples to generate (default 6)")
    parser.add_argument("--fit", type=int, default=2, help="samples used to fit the klt basis (default 2)")
    parser.add_argument("--repeats", type=int, default=8, help="copies of the samples written per backend")
    parser.add_argument("--skip-backends", action="store_true", help="only the codec tables")
    parser.add_argument("--random-gets", action="store_true",
                        help="only the backends' random gets (Cache.get, best of 3 passes in a random order, and "
                             "Cache.get_many in batches of 2 and 8): no codec tables, no loader runs")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    args = parser.parse_args(argv)
    import torch  # noqa: F401  (imported up front so that its import time is not measured)
    argv_text = sys.argv[1:] if argv is None else list(argv)

    if args.input:
        samples, source = load_input(args.input), f"input {args.input}"
    elif args.cache:
        samples, source = load_cache(args.cache, args.samples), f"cache {args.cache} (decoded)"
    else:
        samples = synthetic_samples(args.samples)
        source = "SYNTHETIC structured FPN-like data, not a real teacher"
    print(f"# {source}: {len(samples)} samples, fields {sorted(samples[0])[:6]}...", flush=True)

    fpn_presets = {"fp16 (exact for fp16 input)": "fp16", "bf16": "bf16", "int8 per-channel": "int8",
                   "klt:0.01 (default)": "klt", "klt:0.005": "klt:0.005", "klt:0.02": "klt:0.02"}
    for bound in args.bounds.split(","):           # the lower-rate variants against klt at the same bound
        fpn_presets.update({f"{name}:{bound}": f"{name}:{bound}" for name in ("klt", "klt-dpcm", "klt-dct")})
    cls_presets = {"fp16 (exact for fp16 input)": "fp16", "int8 per-channel": "int8", "sparse:0.01 (default)": "sparse",
                   "sparse:0.001": "sparse:0.001"}
    codecs = not args.random_gets
    fpn_rows = codec_table(samples, args.fit, "fpn.", fpn_presets) if codecs and "fpn.p3" in samples[0] else []
    cls_rows = (codec_table(samples, args.fit, "head.cls.", cls_presets, sigmoid=True)
                if codecs and "head.cls.p3" in samples[0] else [])
    gpu = gpu_dequant(samples, args.fit) if codecs and "fpn.p3" in samples[0] else None
    backend_rows = []
    if not args.skip_backends and "fpn.p3" in samples[0]:
        workdir = tempfile.mkdtemp(prefix="bench_store_")
        try:
            backend_rows = backend_table(samples, args.fit, workdir, args.repeats, random_only=args.random_gets)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.random_gets:
        print(f"### random gets, fpn group ({source})\n\nCommand: `python bench/bench_store.py {' '.join(argv_text)}`\n")
        print("| backend | samples | stored MB | get/s | get_many(2) views/s | get_many(8) views/s |\n|---|---|---|---|---|---|")
        for r in backend_rows:
            print(f"| {r['backend']} | {r['samples']} | {r['stored_mb']:.1f} | {r['random_get']:.1f} | "
                  + " | ".join(f"{r[k]:.1f}" if k in r else "—" for k in ("get_many_2", "get_many_8")) + " |")
        return 0
    text = markdown(argv_text, source, fpn_rows, cls_rows, gpu, backend_rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
