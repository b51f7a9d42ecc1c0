"""Feed rate at real scale (issue 12, item 7): the teacher views one CPU core hands a GPU student.

    python -m bench feed_rate                          # 32 synthetic views per cache, every codec, both backends
    python bench/bench_feed_rate.py --sizes-from /path/to/real/cache \\
        --sizes-from klt:0.01=0.422,klt:0.04=0.293,klt:0.12=0.193 --out feed_rate.md

For each backend (zarr, wds) and fpn codec, a cache of ``--views`` views of a COCO-sized view
(``--size 800:1333``: P3..P7 of 100x167, 50x84, 25x42, 13x21, 7x11) of a 256-channel teacher is
written through ``CacheWriter.put`` into a temporary directory (``--views`` / 4 views per shard,
two views per image), with head.cls (K = 80 class logits, one anchor per location, sparse codec)
and head.box (GFL's 4 x 17 distribution logits, int8). Then, with the process pinned to one CPU
(``os.sched_setaffinity``; torch and Blosc at one thread), its views are read in random batches of
``--batch`` through the student loader's own path, ``CachedTeacher.prefetch_many``
(``Cache.get_many`` with ``decode="compact"``: decompressed, still quantised; the student's device
dequantises them), for the fpn group alone and for fpn + head; best of ``--passes`` passes.
The files were just written, so they are read from the page cache: decoding is what is measured
(a cold disk adds bytes per view / its throughput).

Speed comes from synthetic maps (``store.synthetic.StructuredFPN``, tuned to compress like the
demo teacher's maps of real photos, see ``synthetic_views``; head logits mostly far below the
score floor). Sizes must come from real outputs: ``--sizes-from`` takes a real cache (its
manifest totals give the stored / raw fp16 ratio of its fpn codec, head.cls and head.box) or
ratios, ``CODEC=RATIO`` or ``head.cls=RATIO``, comma-separated, e.g. the coco128 800:1333 ratios
in BENCHMARKS.md ("Lower-rate KLT variants"). A ratio times the raw fp16 bytes of the view above
gives bytes per view. Sizes without a real source are the synthetic caches' own ratios, marked
``*``: they say nothing about a teacher.

The table: bytes per view, views/s on one core, CPU cores one GPU student needs at
``--student-rate`` images/s (one view per image per step), and the disk for COCO train2017
(118,287 images) x 2 views.

With ``--device cuda`` (issue 12, item 8) a second table gives the other half of the path: the
same compact batches, pinned as the student loader pins them, copied to the GPU and dequantised
there by ``Cache.dequantize`` (what ``CachedTeacher.fetch`` runs in the training step), timed
with the device synchronised: views/s, milliseconds per batch, the compact bytes that cross the
bus against the float32 maps they expand to, and the largest difference from dequantising the
same payload on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numcodecs.blosc
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_rate_distortion import bytes_per_view  # noqa: E402
from store import (BACKENDS, LEVELS, STRIDES, CacheError, KLTCodec, Manifest, load_manifest,  # noqa: E402
                   open_writer, parse_codec_spec)
from store.codecs import map_tensors  # noqa: E402
from store.synthetic import StructuredFPN  # noqa: E402
from train.sources import KEY, NBYTES, CachedTeacher  # noqa: E402

CODECS = ("fp16", "int8", "klt:0.01", "klt:0.04", "klt:0.12", "klt:0.25", "klt-dpcm:0.04")
TRAIN2017_IMAGES = 118_287
VIEWS_PER_IMAGE = 2
BOX_CHANNELS = 4 * (16 + 1)          # GFL: 4 sides x (reg_max + 1) bins, reg_max 16
HEAD = ("head.cls", "head.box")
READS = {"fpn": ["fpn"], "fpn+head": ["fpn", *HEAD]}
DISTINCT_VIEWS = 8                   # views synthesised; the cache repeats them (each blob is coded alone)


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(H_l, W_l) of P3..P7 for an input of height x width: ceil(side / stride)."""
    return [(-(-height // s), -(-width // s)) for s in STRIDES]


def raw_fp16_bytes(sizes, channels: int, classes: int) -> dict[str, int]:
    """Raw fp16 bytes per view of each dense group: fpn (C), head.cls (K, 1 anchor), head.box."""
    locations = sum(h * w for h, w in sizes)
    return {"fpn": 2 * channels * locations, "head.cls": 2 * classes * locations,
            "head.box": 2 * BOX_CHANNELS * locations}


def synthetic_views(sizes, channels: int, classes: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` views of FPN-like maps, focal-loss-like class logits (mostly around -7, 0.2 % of
    them objects near 0) and smooth box logits; float32, as a teacher's outputs reach the writer.

    The FPN maps have full rank across channels; their spectrum decay and noise are chosen so that
    the codecs store as much of them as of real maps (so that the decoders have as many bytes to
    expand): on 256 channels at 800:1333 klt keeps 0.418 / 0.289 / 0.188 of raw fp16 at 1 / 4 / 12 %
    rel RMSE and fp16 0.915, against 0.422 / 0.293 / 0.193 and 0.912 for the demo teacher on
    coco128 (BENCHMARKS.md); int8 0.491 against its 0.506 at 320:512. The default StructuredFPN
    (rank 32) stores 3x less at 4 % and would flatter the decoders."""
    fpn = StructuredFPN(channels=channels, rank=channels, decay=0.3, noise=0.2, seed=seed)
    box = StructuredFPN(channels=BOX_CHANNELS, rank=8, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    views = []
    for _ in range(count):
        view = {}
        for index, (level, (h, w)) in enumerate(zip(LEVELS, sizes)):
            view[f"fpn.{level}"] = fpn.level(index, h, w, rng)
            logits = rng.normal(-7.0, 1.5, (classes, h, w)).astype(np.float32)
            hits = rng.random((classes, h, w)) < 0.002
            logits[hits] = rng.normal(0.0, 2.0, int(hits.sum()))
            view[f"head.cls.{level}"] = logits
            view[f"head.box.{level}"] = box.level(index, h, w, rng)
        views.append(view)
    return views


def codec_label(manifest: Manifest, where: str) -> str:
    """The spec the cache's fpn codec answers to: the KLT family by its bound (a bare ``klt`` spec
    is ``klt:0.01``), the others by the spec the manifest records."""
    codec = manifest.codec("fpn.p3")
    if isinstance(codec, KLTCodec):
        name = "klt" if codec.spatial == "none" else f"klt-{codec.spatial}"
        return f"{name}:{codec.max_rel_rmse:g}"
    spec = manifest["fields"]["fpn.p3"].get("spec")
    if spec is None:
        raise SystemExit(f"{where}: the manifest records no codec spec for fpn.p3; give its ratio as CODEC=RATIO")
    return spec


def group_ratios(manifest: Manifest) -> dict[str, float]:
    """stored / raw fp16 bytes of each dense group the cache holds (its manifest totals)."""
    ratios = {}
    for group in ("fpn", *HEAD):
        stored, raw = bytes_per_view(manifest, [group])
        if raw:
            ratios[group] = stored / raw
    return ratios


def parse_sizes(items: list[str]) -> tuple[dict[str, tuple[float, str]], dict[str, tuple[float, str]]]:
    """``--sizes-from`` values -> (fpn codec label -> (ratio, source), head group -> (ratio, source))."""
    fpn, head = {}, {}
    for item in items:
        if "=" not in item:                        # a cache
            manifest = load_manifest(item)
            if manifest is None or not manifest["complete"]:
                raise SystemExit(f"--sizes-from {item}: not a complete cache (no finalized manifest.json)")
            ratios = group_ratios(manifest)
            if "fpn" in ratios:
                fpn[codec_label(manifest, item)] = (ratios["fpn"], item)
            head.update({group: (ratios[group], item) for group in HEAD if group in ratios})
            continue
        for pair in item.split(","):
            key, _, value = pair.partition("=")
            try:
                ratio = float(value)
            except ValueError:
                ratio = -1.0
            if not 0 < ratio <= 2:
                raise SystemExit(f"--sizes-from {item!r}: {pair!r} needs a ratio in (0, 2] after '='")
            if key in HEAD:
                head[key] = (ratio, "given")
                continue
            try:
                spec = parse_codec_spec(key, field="fpn")
            except CacheError as error:
                raise SystemExit(f"--sizes-from: {error}") from None
            if spec.preset.fitted and spec.preset.main not in dict(spec.params):
                raise SystemExit(f"--sizes-from {item!r}: give {key}'s bound ({key}:0.01={value})")
            fpn[str(spec)] = (ratio, "given")
    return fpn, head


def cores_needed(images_per_second: float, views_per_second: float) -> float:
    """CPU cores that feed a student taking one view per image at ``images_per_second``."""
    return images_per_second / views_per_second


def train2017_bytes(bytes_per_view: float) -> float:
    return bytes_per_view * TRAIN2017_IMAGES * VIEWS_PER_IMAGE


@contextlib.contextmanager
def one_core():
    """Run the block on one CPU: torch and Blosc at one thread, this thread pinned to one core
    (the decoders run in it; zarr's own event loop is not on the direct read path)."""
    threads, blosc = torch.get_num_threads(), numcodecs.blosc.get_nthreads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        numcodecs.blosc.set_nthreads(blosc)
        if affinity:
            os.sched_setaffinity(0, affinity)


def write_cache(url: str, backend: str, codec: str, views: list[dict], count: int, size) -> Manifest:
    """A cache of ``count`` views (the synthetic ones repeated), written with ``CacheWriter.put``."""
    view_specs = [dict(short=size[0], max_size=size[1], flip=flip) for flip in (False, True)]
    manifest = Manifest.create(teacher={"arch": "bench-feed-rate", "checkpoint_sha256": "0" * 64},
                               dataset={"bench": "feed_rate", "views": count}, views=view_specs,
                               fields={"fpn": codec, "head.cls": "sparse", "head.box": "int8"},
                               calibration=views[:2], backend=backend, shard_size=max(1, count // 4),
                               num_samples=count)
    with open_writer(url, manifest) as writer:
        for position in range(count):
            sample = dict(views[position % len(views)])
            sample["meta.image_id"] = np.int64(position // VIEWS_PER_IMAGE)
            sample["meta.view_index"] = np.int32(position % VIEWS_PER_IMAGE)
            writer.put(position, sample)
    return load_manifest(url)


def read_rate(url: str, manifest: Manifest, fields: list[str], batch: int, passes: int, seed: int) -> dict:
    """Views/s through ``CachedTeacher.prefetch_many`` in random batches (best pass), the CPU time
    over the wall time of that pass, and the stored bytes per view it read (checked against the manifest)."""
    teacher = CachedTeacher(url, fields)
    keys = teacher.cache.keys()
    teacher.prefetch_many(keys[:batch])          # receipts, shard indexes and codecs, read once per process
    expected = bytes_per_view(manifest, fields)[0]
    best = None
    for p in range(passes):
        order = [keys[i] for i in np.random.default_rng([seed, p]).permutation(len(keys))]
        nbytes = 0
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(order), batch):
            nbytes += sum(payload[NBYTES] for payload in teacher.prefetch_many(order[start:start + batch]))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if nbytes != round(expected * len(keys)):
            raise RuntimeError(f"{url}: a pass over {fields} read {nbytes} bytes, the manifest stores "
                               f"{expected * len(keys):.0f}: the read path did not read every field once")
        rate = dict(views_per_s=len(keys) / wall, cpu_per_wall=cpu / wall, bytes_per_view=nbytes / len(keys))
        if best is None or rate["views_per_s"] > best["views_per_s"]:
            best = rate
    return best


def _fields_only(payload: dict) -> dict:
    return {k: v for k, v in payload.items() if k not in (KEY, NBYTES)}


def _nbytes(value) -> int:
    """Bytes of a compact payload value that cross to the device per view (tensors, also inside
    Affine / KLTCoeffs; a KLT basis and mean are the codec's, copied once)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, f)) for f in value.__dataclass_fields__ if f not in ("basis", "mean"))
    return 0


def device_rate(url: str, fields: list[str], batch: int, passes: int, device: torch.device, pin: bool = True) -> dict:
    """Views/s of ``Cache.dequantize`` on ``device`` from compact batches (copy included), pinned as
    the student loader pins them (``pin=False``: pageable), the compact and expanded bytes per view,
    and the largest |device - CPU| over the first view."""
    teacher = CachedTeacher(url, fields)
    keys = teacher.cache.keys()
    batches = []
    for start in range(0, len(keys), batch):
        payloads = teacher.prefetch_many(keys[start:start + batch])
        batches.append([{k: map_tensors(v, torch.Tensor.pin_memory) if pin and device.type == "cuda" else v
                         for k, v in _fields_only(payload).items()} for payload in payloads])
    first = batches[0][0]
    on_device = teacher.cache.dequantize(first, device=device)
    on_cpu = teacher.cache.dequantize(first, device="cpu")
    max_diff = max(float((on_device[k].cpu() - on_cpu[k]).abs().max()) for k in on_cpu)
    compact = sum(_nbytes(v) for v in first.values())
    expanded = sum(t.numel() * t.element_size() for t in on_cpu.values())
    best = None
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(passes + 1):                  # the first pass warms the kernels and the bases' copies
        synchronize()
        start = time.perf_counter()
        for payloads in batches:
            for payload in payloads:
                teacher.cache.dequantize(payload, device=device)
        synchronize()
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    return dict(views_per_s=len(keys) / best, ms_per_batch=1e3 * best / len(batches), compact=compact,
                expanded=expanded, max_diff=max_diff)


def measure(args, views: list[dict], workdir: Path) -> list[dict]:
    """One row per backend and codec: the synthetic cache's group ratios and the read rates."""
    rows = []
    for codec in args.codecs:
        for backend in args.backends:
            url = str(workdir / f"{backend}-{codec.replace(':', '_')}")
            manifest = write_cache(url, backend, codec, views, args.views, args.size)
            row = dict(backend=backend, codec=codec_label(manifest, url), synthetic=group_ratios(manifest))
            with one_core():
                for name, fields in READS.items():
                    row[name] = read_rate(url, manifest, fields, args.batch, args.passes, args.seed)
            print(f"# {backend} {row['codec']}: " + ", ".join(
                f"{name} {row[name]['views_per_s']:.1f} views/s" for name in READS), flush=True)
            if args.device.type == "cuda":
                row["device"] = {name: device_rate(url, fields, args.batch, args.passes, args.device)
                                 for name, fields in READS.items()}
                row["pageable"] = device_rate(url, READS["fpn+head"], args.batch, args.passes, args.device, pin=False)
                print(f"# {backend} {row['codec']} on {args.device}: " + ", ".join(
                    f"{name} {rate['views_per_s']:.0f} views/s" for name, rate in row["device"].items()), flush=True)
            rows.append(row)
            shutil.rmtree(url, ignore_errors=True)
    return rows


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e12:.2f} TB" if nbytes >= 1e12 else f"{nbytes / 1e9:.0f} GB"


def table(rows: list[dict], raw: dict[str, int], fpn_sizes: dict, head_sizes: dict, rate: float) -> list[str]:
    """The markdown table. A size is a ratio x raw fp16: the real one where ``--sizes-from`` gave it,
    else the synthetic cache's own, marked ``*``."""
    lines = [f"| backend | fpn codec | fpn MB/view (x raw fp16) | head.cls + head.box MB/view "
             f"| views/s/core fpn / +head | CPU/wall | cores per GPU at {rate:g} img/s fpn / +head "
             f"| train2017 x 2 views fpn / +head |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fpn_ratio, fpn_real = fpn_sizes.get(row["codec"], (row["synthetic"]["fpn"], None))
        fpn_bytes, fpn_mark = fpn_ratio * raw["fpn"], "" if fpn_real else "*"
        head = [head_sizes.get(g, (row["synthetic"][g], None)) for g in HEAD]
        cls_bytes, box_bytes = (ratio * raw[g] for g, (ratio, _) in zip(HEAD, head))
        head_bytes, head_mark = cls_bytes + box_bytes, "" if all(real for _, real in head) else "*"
        fast, full = row["fpn"], row["fpn+head"]
        lines.append(
            f"| {row['backend']} | {row['codec']} | {fpn_bytes / 1e6:.2f} ({fpn_ratio:.3f}){fpn_mark} | "
            f"{cls_bytes / 1e6:.2f} + {box_bytes / 1e6:.2f}{head_mark} | "
            f"{fast['views_per_s']:.1f} / {full['views_per_s']:.1f} | "
            f"{fast['cpu_per_wall']:.2f} / {full['cpu_per_wall']:.2f} | "
            f"{cores_needed(rate, fast['views_per_s']):.2f} / {cores_needed(rate, full['views_per_s']):.2f} | "
            f"{_size(train2017_bytes(fpn_bytes))}{fpn_mark} / {_size(train2017_bytes(fpn_bytes + head_bytes))}"
            f"{fpn_mark or head_mark} |")
    return lines


def device_table(rows: list[dict], device_name: str, batch: int) -> list[str]:
    """The second table: compact batches dequantised on the GPU."""
    lines = [f"Dequantised on {device_name} (`Cache.dequantize` of pinned compact batches of {batch}, "
             "copy included, device synchronised):", "",
             f"| backend | fpn codec | GPU views/s fpn / +head | ms per batch of {batch} fpn / +head "
             f"| +head from pageable memory: views/s, ms per batch "
             "| compact MB/view over the bus fpn / +head | float32 MB/view on the GPU fpn / +head "
             "| max abs GPU - CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "device" not in row:
            continue
        fast, full = row["device"]["fpn"], row["device"]["fpn+head"]
        lines.append(f"| {row['backend']} | {row['codec']} | {fast['views_per_s']:.0f} / {full['views_per_s']:.0f} | "
                     f"{fast['ms_per_batch']:.2f} / {full['ms_per_batch']:.2f} | "
                     f"{row['pageable']['views_per_s']:.0f}, {row['pageable']['ms_per_batch']:.2f} | "
                     f"{fast['compact'] / 1e6:.2f} / {full['compact'] / 1e6:.2f} | "
                     f"{fast['expanded'] / 1e6:.1f} / {full['expanded'] / 1e6:.1f} | "
                     f"{max(fast['max_diff'], full['max_diff']):.2g} |")
    return lines


def report(args, argv: list[str], rows: list[dict], raw: dict[str, int], sizes) -> str:
    fpn_sizes, head_sizes = sizes
    h, w = args.size
    lines = table(rows, raw, fpn_sizes, head_sizes, args.student_rate)
    text = [f"### Feed rate: {h}x{w} views of a {args.channels}-channel teacher, K = {args.classes} classes", "",
            f"Command: `python bench/bench_feed_rate.py {' '.join(argv)}`  ",
            f"Machine: {os.cpu_count()} CPU cores, one used (pinned); {args.views} views per cache, batches of "
            f"{args.batch}, best of {args.passes} passes, page cache  ",
            "Raw fp16 per view: " + ", ".join(f"{g} {n / 1e6:.2f} MB" for g, n in raw.items()), "", *lines, "",
            "Views/s: `CachedTeacher.prefetch_many` (decode=compact) on one core, of fpn alone and of fpn + "
            "head.cls (sparse) + head.box (int8); CPU/wall: process CPU time over wall time of those passes "
            "(under 1: the core was shared or waited). Cores per GPU: student images/s over views/s. Sizes: "
            "ratio x raw fp16 per view; train2017: 118,287 images x 2 views."]
    real = {**{f"fpn {k}": v for k, v in fpn_sizes.items()}, **head_sizes}
    if real:
        text.append("Real sizes: " + "; ".join(f"{k} {ratio:.3f} ({source})" for k, (ratio, source) in real.items())
                    + ".")
    unused = sorted(set(fpn_sizes) - {row["codec"] for row in rows})
    if unused:
        text.append(f"Ratios given for codecs not measured here (no row): {', '.join(unused)}.")
    if any("*" in line for line in lines[2:]):
        text.append("\\* measured on the synthetic maps (store.synthetic.StructuredFPN), not a real teacher's "
                    "size: give --sizes-from a real cache or its ratios.")
    if args.device.type == "cuda":
        text += ["", *device_table(rows, torch.cuda.get_device_name(args.device), args.batch)]
    return "\n".join(text)


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition(":")
    try:
        size = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size wants HEIGHT:WIDTH, e.g. 800:1333, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"--size {text}: sides must be positive")
    return size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_feed_rate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=32, help="views per cache [32]")
    parser.add_argument("--codec", action="append", dest="codecs", metavar="SPEC",
                        help=f"an fpn codec to measure (repeatable) [{' '.join(CODECS)}]")
    parser.add_argument("--backends", default=",".join(BACKENDS), type=lambda t: t.split(","),
                        help=f"[{','.join(BACKENDS)}]")
    parser.add_argument("--sizes-from", action="append", default=[], metavar="CACHE|CODEC=RATIO,...",
                        help="real sizes: a cache (its manifest totals) or ratios such as klt:0.04=0.293,"
                             "head.cls=0.35 (repeatable)")
    parser.add_argument("--size", type=parse_size, default=(800, 1333), help="input HEIGHT:WIDTH [800:1333]")
    parser.add_argument("--channels", type=int, default=256, help="teacher FPN channels [256]")
    parser.add_argument("--classes", type=int, default=80, help="head.cls channels, A*K with A = 1 [80]")
    parser.add_argument("--batch", type=int, default=8, help="views per prefetch_many call [8]")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per read, the best kept [2]")
    parser.add_argument("--student-rate", type=float, default=20.0, help="images/s of one GPU student [20]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the caches are written, one at a time, each removed once read "
                             "(default: a temporary directory)")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                        help="cuda: also time the compact batches dequantised on this GPU (item 8) [cpu]")
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here")
    argv_text = sys.argv[1:] if argv is None else list(argv)
    args.codecs = args.codecs or list(CODECS)
    for codec in args.codecs:
        try:
            parse_codec_spec(codec, field="fpn")
        except CacheError as error:
            raise SystemExit(f"--codec: {error}") from None
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or args.views < 1 or args.batch < 1 or args.passes < 1:
        raise SystemExit(f"--backends must be among {BACKENDS} (got {unknown}); --views, --batch and --passes >= 1")
    sizes = parse_sizes(args.sizes_from)

    level_hw = level_sizes(*args.size)
    raw = raw_fp16_bytes(level_hw, args.channels, args.classes)
    print(f"# synthesising {min(args.views, DISTINCT_VIEWS)} views at {level_hw}", flush=True)
    views = synthetic_views(level_hw, args.channels, args.classes, min(args.views, DISTINCT_VIEWS), args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_feed_rate_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(args, views, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, argv_text, rows, raw, sizes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
