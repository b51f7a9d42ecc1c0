"""Teacher/student gap on the synthetic set: both trained from scratch on the same schedule.

    python -m bench.bench_teacher_student [--data runs/demo/data] [--out runs/bench/pair]

Prints each model's COCO AP and training wall time on this machine, and the AP gap that later
distillation runs have to close. The schedule is the full one of BENCHMARKS.md (12 epochs; the
demo trains its teacher 8 to fit its time budget); the per-method table distils from this teacher.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from detectors import synth
from train import teacher

FULL_SCHEDULE = ["--epochs", "12", "--batch-size", "8", "--lr", "0.02", "--warmup-iters", "100",
                 "--milestones", "9", "11", "--short", "160", "--max-size", "256", "--workers", "0"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_teacher_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    p.add_argument("--out", type=Path, default=Path("runs/bench/pair"))
    p.add_argument("--teacher", default="gfl-small")
    p.add_argument("--student", default="gfl-nano")
    args = p.parse_args(argv)
    if not (args.data / "annotations" / "instances_val2017.json").exists():
        synth.main(["--out", str(args.data)])
    rows = {}
    for role, name in (("teacher", args.teacher), ("student", args.student)):
        run = args.out / name
        if not (run / "metrics.json").exists():
            teacher.main(["--model", name, "--data", str(args.data), "--out", str(run), *FULL_SCHEDULE,
                          "--no-progress"])
        rows[role] = json.loads((run / "metrics.json").read_text())
    print("| role | model | AP | AP50 | AP75 | train s |")
    print("|---|---|---|---|---|---|")
    for role, r in rows.items():
        m = r["final"]
        print(f"| {role} | {r['model']} | {m['AP']:.1f} | {m['AP50']:.1f} | {m['AP75']:.1f} | {r['train_seconds']:.0f} |")
    gap = rows["teacher"]["final"]["AP"] - rows["student"]["final"]["AP"]
    print(f"teacher - student AP gap: {gap:.1f} points")


if __name__ == "__main__":
    main()
