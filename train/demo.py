"""`make demo`: the main job on the embedded default, end to end on a CPU.

Generates the synthetic COCO-format set (skipped when present), trains the small demo teacher
from scratch, evaluates it with COCO mAP and prints the metrics and where the files are.
Every step is resumable by rerunning: finished steps are detected by their outputs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from detectors import synth
from train import teacher

DEMO_TEACHER = "gfl-small"
# Schedule sized so the whole demo stays well under 15 minutes on a 2-core CPU. Images load in the
# main process: a loader worker beside torch's two threads on two cores stalls the thread pool.
DEMO_SCHEDULE = ["--epochs", "12", "--batch-size", "8", "--lr", "0.02", "--warmup-iters", "100",
                 "--milestones", "9", "11", "--short", "160", "--max-size", "256", "--workers", "0"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    start = time.time()

    data = args.out / "data"
    if not (data / "annotations" / "instances_val2017.json").exists():
        synth.main(["--out", str(data)])
    teacher_dir = args.out / "teacher"
    if not (teacher_dir / "metrics.json").exists():
        teacher.main(["--model", DEMO_TEACHER, "--data", str(data), "--out", str(teacher_dir), *DEMO_SCHEDULE,
                      *(["--no-progress"] if args.no_progress else [])])
    metrics = json.loads((teacher_dir / "metrics.json").read_text())["final"]

    print(f"\ndemo finished in {time.time() - start:.0f} s")
    print(f"teacher {DEMO_TEACHER} on {data}/val2017: " + "  ".join(
        f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"checkpoint: {teacher_dir / 'best.pt'}\nmetrics:    {teacher_dir / 'metrics.json'}")


if __name__ == "__main__":
    main()
