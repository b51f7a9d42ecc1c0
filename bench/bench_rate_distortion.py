"""Rate–distortion by the student: student AP against the bytes per view a cache stores (issue 12).

One teacher, one student schedule; a cache per fidelity point, every method from each, two seeds or
more, and the same methods from the teacher run online (fp32, no codec) for reference:

    python -m bench.bench_rate_distortion --ckpt runs/bench/pair/gfl-small/best.pt --data runs/demo/data \\
        --out runs/rd --points fp16,klt:0.25,klt:0.08,klt:0.04,klt:0.15,klt:0.02 --online \\
        --methods frs maskd defeat icd ld --seeds 2 --jobs 2

A point is the fpn codec (``fp16``, lossless for the fp16 teacher, or ``klt:BOUND``); LD's region
rows get the matching point of their own axis (``fp16`` or ``uniform:BOUND``), so one cache per
point serves every method. ``--cache-for klt:0.01=runs/table/cache --sweep-for klt:0.01=runs/table/after``
adds a point measured before. Everything resumes: precompute resumes its cache, the sweeps skip
finished runs, finished online runs are kept; ``--report-only`` writes the table and figure from
what exists.

The x axis is what each run read: the stored bytes per view of the fields its method reads (from
the cache's manifest; fpn for FRS, MasKD, ICD and DeFeat, region rows for LD), as a fraction of
the same fields in raw fp16 too. The seed-noise band is the lossless point's mean ± its seeds'
standard deviation (a run's spread), and ± its standard error (the band of the mean, which more
seeds narrow); each point's mean is compared with the lossless mean with the standard error of
the difference. Writes OUT/rd.md (the table), OUT/rd.csv and OUT/rd.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train.report import RunRecord

PAIR_CKPT = "runs/bench/pair/gfl-small/best.pt"     # bench_teacher_student's teacher
VIEWS = "160:256,160:256:flip"
# the per-method table's schedule (BENCHMARKS.md), with the four iteration counts meant for 90k
# iterations scaled to this 900-iteration run
SCHEDULE = ["epochs=12", "batch_size=8", "lr=0.02", "warmup_iters=100", "milestones=(9,11)", "workers=0"]
METHOD_SETTINGS = ["frs.warmup_iters=5", "icd.detach_student_iters=10", "maskd.student_mask_warmup=50"]
PRECOMPUTE_SETTINGS = ["maskd.stage1_iters=100", "maskd.stage1_batch_size=4"]


def point_codecs(point: str) -> list[str]:
    """``--codec`` options of a point: fpn at the point, LD's float region rows at the matching bound."""
    if point == "fp16":
        return ["fpn=fp16", "region.cls=fp16", "region.box_dist=fp16"]
    name, _, bound = point.partition(":")
    if not name.startswith("klt") or not bound:
        raise SystemExit(f"point {point!r}: expected fp16 or klt[-dpcm|-dct]:BOUND")
    return [f"fpn={point}", f"region.cls=uniform:{bound}", f"region.box_dist=uniform:{bound}"]


def slug(point: str) -> str:
    return point.replace(":", "_")


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "a") as out:
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)} (see {log})")


def make_cache(args, point: str, cache: Path) -> None:
    if (cache / "manifest.json").exists() and json.loads((cache / "manifest.json").read_text()).get("complete"):
        return
    cmd = [sys.executable, "-m", "precompute", "--ckpt", args.ckpt, "--data", args.data, "--cache", str(cache),
           "--views", VIEWS, "--fields", "all", "--device", "cpu", "--no-progress"]
    for codec in point_codecs(point):
        cmd += ["--codec", codec]
    for setting in PRECOMPUTE_SETTINGS:
        cmd += ["--set", setting]
    run(cmd, args.out / "logs" / f"precompute_{slug(point)}.log")


def sweep_command(args, cache: Path, out: Path, methods: list[str], extra: list[str] = ()) -> list[str]:
    """``python -m train.sweep`` of ``methods`` × ``args.seeds`` from ``cache``, on this bench's schedule."""
    cmd = [sys.executable, "-m", "train.sweep", "--cache", str(cache), "--data", args.data, "--student",
           args.student, "--methods", *methods, "--seeds", str(args.seeds), "--jobs", str(args.jobs),
           "--out", str(out), "--no-progress", "--no-report"]
    for setting in SCHEDULE + list(extra) + [s for s in METHOD_SETTINGS if s.split(".")[0] in methods]:
        cmd += ["--set", setting]
    return cmd


def online_command(args, method: str, seed: int, views: str, out: Path, artifacts: Path | None,
                   extra: list[str] = ()) -> list[str]:
    """``python -m train`` of one online-teacher run on this bench's schedule (``extra``: more options)."""
    options = dict(s.split("=", 1) for s in SCHEDULE)
    milestones = options["milestones"].strip("()").split(",")
    cmd = [sys.executable, "-m", "train", "--method", method, "--student", args.student, "--data", args.data,
           "--teacher", args.ckpt, "--views", views, "--out", str(out), "--seed", str(seed),
           "--epochs", options["epochs"], "--batch-size", options["batch_size"], "--lr", options["lr"],
           "--warmup-iters", options["warmup_iters"], "--milestones", *milestones, "--workers", options["workers"],
           "--device", "cpu", "--no-progress", "--no-tensorboard", *extra]
    cmd += ["--artifacts-from", str(artifacts)] if artifacts else []
    cmd += ["--resume"] if (out / "last.pt").exists() else []
    for setting in METHOD_SETTINGS:
        if setting.startswith(method + "."):
            cmd += ["--set", setting]
    return cmd


def run_sweep(args, cache: Path, sweep: Path, methods: list[str]) -> None:
    run(sweep_command(args, cache, sweep, methods, args.set),
        args.out / "logs" / f"sweep_{sweep.name}.log")


def online_run(args, method: str, seed: int, artifacts: Path) -> None:
    out = args.out / "online" / "runs" / f"{method}_s{seed}"
    if (out / "results.json").exists():
        return
    extra = [item for setting in args.set if setting.startswith(method + ".") for item in ("--set", setting)]
    run(online_command(args, method, seed, VIEWS, out, artifacts, extra),
        args.out / "logs" / f"online_{method}_s{seed}.log", threads=max(1, (os.cpu_count() or 1) // args.jobs))


# ---------------------------------------------------------------------------------------------
# the report
def bytes_per_view(manifest: dict, fields: list[str]) -> tuple[float, float]:
    """(stored, raw fp16) bytes per view of ``fields`` (a run's results.json list) in a cache."""
    totals = manifest["totals"]["fields"]
    read = [name for name in totals if any(name == f or name.startswith(f + ".") for f in fields)]
    read = [name for name in read if not name.startswith("meta.")]      # the GT the loader reads anyway
    stored = sum(totals[name][0] for name in read)
    raw = sum(totals[name][1] for name in read)
    return stored / manifest["num_samples"], raw / manifest["num_samples"]


def measured_error(manifest: dict, fields: list[str]) -> float | None:
    """The worst calibration error the manifest records for the float fields the method reads."""
    worst = None
    for name, entry in manifest["fields"].items():
        if not any(name == f or name.startswith(f + ".") for f in fields) or name.startswith("meta."):
            continue
        error = (entry.get("measured_error") or {}).get("worst")
        if error is not None and entry.get("error_bound", {}).get("kind") == "rel_rmse":
            worst = error if worst is None else max(worst, error)
    return worst


def collect(args, points: list[str], methods: list[str]) -> list[dict]:
    rows = []
    for point in points:
        cache, sweep = locate(args, point)
        manifest = json.loads((cache / "manifest.json").read_text()) if (cache / "manifest.json").exists() else None
        for method in methods:
            records = [RunRecord.load(d) for d in sorted((sweep / "runs").glob(f"{method}_s*"))
                       if (d / "results.json").exists()]
            if not records or manifest is None:
                continue
            fields = json.loads((records[0].path / "results.json").read_text())["fields"]
            stored, raw = bytes_per_view(manifest, fields)
            rows.append(dict(point=point, method=method, bytes_per_view=stored, raw_fp16=raw,
                             ratio=stored / raw if raw else None, rel_rmse=measured_error(manifest, fields),
                             codecs=codecs_of(manifest, fields), ap=[r.final["AP"] for r in records],
                             seeds=[r.seed for r in records]))
    # a point whose fields the method reads are stored exactly as at the lossless point (LD's region
    # rows in a cache that varied only fpn) repeats that point: the same inputs, the same runs
    lossless = {r["method"]: r["bytes_per_view"] for r in rows if r["point"] == "fp16"}
    rows = [r for r in rows if r["point"] == "fp16" or r["bytes_per_view"] != lossless.get(r["method"])]
    for method in methods + ["none"]:
        records = [RunRecord.load(d) for d in sorted((args.out / "online" / "runs").glob(f"{method}_s*"))
                   if (d / "results.json").exists()]
        if method == "none":
            first = locate(args, points[0])[1] / "runs"
            records = [RunRecord.load(d) for d in sorted(first.glob("none_s*")) if (d / "results.json").exists()]
        if records:
            rows.append(dict(point="online" if method != "none" else "none", method=method, bytes_per_view=None,
                             raw_fp16=None, ratio=None, rel_rmse=None, codecs="", seeds=[r.seed for r in records],
                             ap=[r.final["AP"] for r in records]))
    return rows


def codecs_of(manifest: dict, fields: list[str]) -> str:
    specs = {}
    for name, entry in manifest["fields"].items():
        if any(name == f or name.startswith(f + ".") for f in fields) and not name.startswith("meta."):
            specs.setdefault(entry.get("spec") or entry["codec"]["id"], []).append(name)
    return "; ".join(sorted(specs))


def size_table(args, points: list[str]) -> str:
    """Every stored group of each point's cache: bytes per view and × raw fp16 (the sizes alone)."""
    groups = ("fpn", "head.cls", "head.box", "region", "meta")
    lines = ["| point | " + " | ".join(f"{g} kB/view (× raw fp16)" for g in groups) + " | total kB/view |",
             "|---" * (len(groups) + 2) + "|"]
    for point in dict.fromkeys(points):
        path = locate(args, point)[0] / "manifest.json"
        if not path.exists():
            continue
        manifest = json.loads(path.read_text())
        cells = []
        for group in groups:
            stored, raw = bytes_per_view(manifest, [group]) if group != "meta" else (
                sum(v[0] for k, v in manifest["totals"]["fields"].items() if k.startswith("meta.")) /
                manifest["num_samples"], 0)
            cells.append(f"{stored / 1e3:.1f}" + (f" ({stored / raw:.3f})" if raw else ""))
        total = sum(v[0] for v in manifest["totals"]["fields"].values()) / manifest["num_samples"]
        lines.append(f"| {point} | " + " | ".join(cells) + f" | {total / 1e3:.1f} |")
    return "\n".join(lines)


def band(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def difference_of_means(values: list[float], reference: list[float]) -> tuple[float, float | None]:
    """mean(values) - mean(reference) and its standard error, sqrt(s1^2/n1 + s2^2/n2) (None below two
    runs on either side): the noise band of a point's mean against the lossless point's, which shrinks
    with more seeds where the per-run std does not."""
    delta = statistics.fmean(values) - statistics.fmean(reference)
    if len(values) < 2 or len(reference) < 2:
        return delta, None
    return delta, (statistics.variance(values) / len(values) + statistics.variance(reference) / len(reference)) ** 0.5


def write_report(args, rows: list[dict], methods: list[str]) -> None:
    lossless = {r["method"]: r for r in rows if r["point"] == "fp16"}
    lines = ["| method | point | codecs of the fields it reads | bytes / view | × raw fp16 | calib. rel RMSE | "
             "AP (seeds) | mean ± std | Δ mean vs lossless ± s.e. | Δ vs lossless (paired by seed) |", "|---" * 10 + "|"]
    with open(args.out / "rd.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "point", "codecs", "bytes_per_view", "ratio_raw_fp16", "rel_rmse", "seeds", "ap"])
        for r in sorted(rows, key=lambda r: (methods.index(r["method"]) if r["method"] in methods else -1,
                                             -(r["bytes_per_view"] or 1e18))):
            out.writerow([r["method"], r["point"], r["codecs"], r["bytes_per_view"], r["ratio"], r["rel_rmse"],
                          " ".join(map(str, r["seeds"])), " ".join(f"{a:.2f}" for a in r["ap"])])
            base = lossless.get(r["method"])
            paired = difference = ""
            if base and r is not base:
                delta, error = difference_of_means(r["ap"], base["ap"])
                difference = f"{delta:+.1f}" + ("" if error is None else f" ± {error:.1f}")
                by_seed = dict(zip(base["seeds"], base["ap"]))
                deltas = [a - by_seed[s] for s, a in zip(r["seeds"], r["ap"]) if s in by_seed]
                paired = " / ".join(f"{d:+.1f}" for d in deltas)
            kb = "" if r["bytes_per_view"] is None else f"{r['bytes_per_view'] / 1e3:.1f} kB"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
            rmse = "" if r["rel_rmse"] is None else f"{r['rel_rmse']:.3g}"
            seeds = ", ".join(f"{a:.1f}" for a in r["ap"])
            lines.append(f"| {r['method']} | {r['point']} | {r['codecs']} | {kb} | {ratio} | {rmse} | {seeds} | "
                         f"{statistics.fmean(r['ap']):.1f} ± {band(r['ap']):.1f} | {difference} | {paired} |")
    lines += ["", size_table(args, [r["point"] for r in rows if r["bytes_per_view"]])]
    (args.out / "rd.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, rows, methods)


def plot(args, rows: list[dict], methods: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    shown = [m for m in methods if any(r["method"] == m and r["bytes_per_view"] for r in rows)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 3.2), squeeze=False)
    none = next((r for r in rows if r["point"] == "none"), None)
    for ax, method in zip(axes[0], shown):
        points = sorted((r for r in rows if r["method"] == method and r["bytes_per_view"]),
                        key=lambda r: r["bytes_per_view"])
        x = [r["ratio"] for r in points]
        y = [statistics.fmean(r["ap"]) for r in points]
        lo = [statistics.fmean(r["ap"]) - min(r["ap"]) for r in points]
        hi = [max(r["ap"]) - statistics.fmean(r["ap"]) for r in points]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label="cache (seed range)")
        base = next((r for r in points if r["point"] == "fp16"), None)
        if base:
            mean, spread = statistics.fmean(base["ap"]), band(base["ap"])
            ax.axhspan(mean - spread, mean + spread, color="tab:blue", alpha=0.15, label="lossless ± std")
            error = spread / len(base["ap"]) ** 0.5
            ax.axhspan(mean - error, mean + error, color="tab:blue", alpha=0.25, label="lossless mean ± s.e.")
        online = next((r for r in rows if r["method"] == method and r["point"] == "online"), None)
        if online:
            ax.axhline(statistics.fmean(online["ap"]), color="tab:green", ls="--", label="online teacher")
        if none:
            ax.axhline(statistics.fmean(none["ap"]), color="gray", ls=":", label="no distillation")
        for r, xi, yi in zip(points, x, y):
            ax.annotate(r["point"].split(":")[-1], (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xticks([0.1, 0.15, 0.25, 0.5, 1.0])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(method)
        ax.set_xlabel("stored bytes / raw fp16 (fields read)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("student AP")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "rd.png", dpi=120)
    print(f"wrote {args.out / 'rd.png'}")


def locate(args, point: str) -> tuple[Path, Path]:
    return (Path(args.cache_for.get(point, args.out / "caches" / slug(point))),
            Path(args.sweep_for.get(point, args.out / "sweeps" / slug(point))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", default=PAIR_CKPT, help=f"teacher checkpoint [{PAIR_CKPT}]")
    parser.add_argument("--data", default="runs/demo/data", help="COCO-layout data [runs/demo/data]")
    parser.add_argument("--out", type=Path, default=Path("runs/rd"))
    parser.add_argument("--points", default="fp16,klt:0.25,klt:0.08,klt:0.04,klt:0.15,klt:0.02",
                        help="fidelity points in the order they are run; fp16 is the lossless reference")
    parser.add_argument("--methods", nargs="+", default=["frs", "maskd", "defeat", "icd", "ld"])
    parser.add_argument("--student", default="gfl-nano")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (cores split between them)")
    parser.add_argument("--set", action="append", default=[], help="extra METHOD.KEY=VALUE for every run")
    parser.add_argument("--online", action="store_true", help="also the online teacher (after the points)")
    parser.add_argument("--cache-for", action="append", default=[], metavar="POINT=DIR",
                        help="a point's existing cache (its sweep then goes to OUT/sweeps unless --sweep-for)")
    parser.add_argument("--sweep-for", action="append", default=[], metavar="POINT=DIR",
                        help="a point's existing sweep directory")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.cache_for = dict(item.split("=", 1) for item in args.cache_for)
    args.sweep_for = dict(item.split("=", 1) for item in args.sweep_for)
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    if not Path(args.ckpt).exists():
        print(f"no teacher checkpoint at {args.ckpt}: train one with python -m bench.bench_teacher_student, "
              "or pass --ckpt")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for index, point in enumerate(points):
            cache, sweep = locate(args, point)
            make_cache(args, point, cache)
            run_sweep(args, cache, sweep, args.methods + (["none"] if index == 0 else []))
        if args.online:
            artifacts = locate(args, points[0])[0]
            jobs = [(m, s) for m in args.methods for s in range(args.seeds)]
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda job: online_run(args, *job, artifacts), jobs))
    write_report(args, collect(args, points, args.methods), args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
