"""View budget: what a cache's fixed views cost a student against an online teacher's fresh augmentation.

A cache holds K views per image, fixed at precompute time; an online teacher can follow a fresh
random flip and scale every epoch. Students from caches of K = 1 (no flip), 2 (flip), 4 and 8
(multi-scale, ``ms:K:LO-HI``) views per image, against the teacher run online on 64 multi-scale
views (short sides 128..191, every other one flipped: a fresh draw nearly every epoch of a 12-epoch
schedule), all evaluated at the same view:

    python -m bench.bench_view_budget --ckpt runs/bench/pair/gfl-small/best.pt --data runs/demo/data \\
        --out runs/views --methods frs --seeds 2 --jobs 2

Same teacher, student, schedule and default codecs as ``bench_rate_distortion``; resumable the
same way. Writes OUT/views.md: AP per K with the cache's bytes per image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.bench_rate_distortion import PAIR_CKPT, PRECOMPUTE_SETTINGS, online_command, run, sweep_command
from train.report import RunRecord

EVAL_VIEW = "160:256"
BUDGETS = {                       # K -> the views a cache of K views per image holds
    "1": "160:256",
    "2": "160:256,160:256:flip",
    "4": "ms:4:128-192:256",
    "8": "ms:8:128-192:256",
}
# 64 distinct scales, flipped every other one: a fresh scale nearly every epoch (ms:64:128-192 draws
# scales with replacement and repeats some, which a view list refuses)
ONLINE_VIEWS = ",".join(f"{short}:256" + (":flip" if i % 2 else "") for i, short in enumerate(range(128, 192)))


def make_cache(args, k: str, cache: Path) -> None:
    manifest = cache / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
        return
    cmd = [sys.executable, "-m", "precompute", "--ckpt", args.ckpt, "--data", args.data, "--cache", str(cache),
           "--views", BUDGETS[k], "--fields", ",".join(args.methods), "--device", "cpu", "--no-progress"]
    for setting in PRECOMPUTE_SETTINGS if "maskd" in args.methods else []:
        cmd += ["--set", setting]
    run(cmd, args.out / "logs" / f"precompute_k{k}.log")


def sweep(args, k: str, cache: Path) -> None:
    run(sweep_command(args, cache, args.out / "sweeps" / f"k{k}", args.methods, [f"eval_view={EVAL_VIEW}"]),
        args.out / "logs" / f"sweep_k{k}.log")


def online(args, method: str, seed: int, artifacts: Path) -> None:
    out = args.out / "online" / "runs" / f"{method}_s{seed}"
    if not (out / "results.json").exists():
        run(online_command(args, method, seed, ONLINE_VIEWS, out, artifacts, ["--eval-view", EVAL_VIEW]),
            args.out / "logs" / f"online_{method}_s{seed}.log", threads=1)


def report(args) -> str:
    lines = ["| views per image | views | method | cache bytes / image (fields read) | AP (seeds) | mean ± std |",
             "|---|---|---|---|---|---|"]
    for k in list(BUDGETS) + ["online"]:
        for method in args.methods:
            base = args.out / ("online" if k == "online" else f"sweeps/k{k}") / "runs"
            records = [RunRecord.load(d) for d in sorted(base.glob(f"{method}_s*")) if (d / "results.json").exists()]
            if not records:
                continue
            per_image = ""
            if k != "online":
                manifest = json.loads((args.out / "caches" / f"k{k}" / "manifest.json").read_text())
                fields = json.loads((records[0].path / "results.json").read_text())["fields"]
                stored = sum(v[0] for name, v in manifest["totals"]["fields"].items()
                             if any(name == f or name.startswith(f + ".") for f in fields))
                per_image = f"{stored / manifest['num_samples'] * len(manifest['views']) / 1e3:.0f} kB"
            ap = [r.final["AP"] for r in records]
            spread = statistics.stdev(ap) if len(ap) > 1 else 0.0
            lines.append(f"| {k if k != 'online' else 'online (fresh)'} | "
                         f"{BUDGETS.get(k, '128..191:256, alternate flips')} | {method} | {per_image} | "
                         f"{', '.join(f'{a:.1f}' for a in ap)} | {statistics.fmean(ap):.1f} ± {spread:.1f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "views.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", default=PAIR_CKPT)
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--out", type=Path, default=Path("runs/views"))
    parser.add_argument("--budgets", default="1,2,4,8", help="K values to run, in order [1,2,4,8]")
    parser.add_argument("--methods", nargs="+", default=["frs"])
    parser.add_argument("--student", default="gfl-nano")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-online", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        print(f"no teacher checkpoint at {args.ckpt}: train one with python -m bench.bench_teacher_student")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = [k.strip() for k in args.budgets.split(",") if k.strip()]
    unknown = [k for k in budgets if k not in BUDGETS]
    if unknown:
        parser.error(f"--budgets: {unknown} not in {list(BUDGETS)}")
    if not args.report_only:
        for k in budgets:
            make_cache(args, k, args.out / "caches" / f"k{k}")
            sweep(args, k, args.out / "caches" / f"k{k}")
        if not args.no_online:
            artifacts = args.out / "caches" / f"k{budgets[0]}"
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda job: online(args, *job, artifacts),
                              [(m, s) for m in args.methods for s in range(args.seeds)]))
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
