"""`make demo`: the whole story on the embedded default, end to end on a CPU.

    1. data     a synthetic COCO-format set (detectors.synth)
    2. teacher  the small demo teacher trained from scratch, COCO-evaluated
    3. cache    its outputs for every method written once (python -m precompute)
    4. sweep    one short student run per method from that one cache (python -m train.sweep)
    5. report   results.md / results.csv and figures (python -m train.report)
    6. viz      what the methods see on two images (python -m train.viz)

Every step is resumable by rerunning: finished steps are recognised by their outputs, and an
interrupted sweep finishes only its missing runs. The schedules are sized for about 15 minutes on
a 2-core CPU; they are far too short for the method ranking to mean much (see BENCHMARKS.md for
the full-schedule table).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from detectors import synth
from train import teacher

DEMO_TEACHER = "gfl-small"
DEMO_STUDENT = "gfl-nano"
# Images load in the main process: a loader worker beside torch's two threads on two cores stalls
# the thread pool.
DEMO_SCHEDULE = ["--epochs", "8", "--batch-size", "8", "--lr", "0.02", "--warmup-iters", "100",
                 "--milestones", "6", "7", "--short", "160", "--max-size", "256", "--workers", "0"]
DEMO_VIEWS = "160:256,160:256:flip"
DEMO_MASKD = ["--set", "maskd.stage1_iters=50", "--set", "maskd.stage1_batch_size=4"]
# 3 epochs of 75 iterations. The methods' iteration counts (FRS ramp, ICD's detached phase, MasKD's
# student-mask warmup) are meant for a 90k-iteration schedule; they are scaled to the same fraction
# of this one, or ICD would never reach the student.
STUDENT_SETTINGS = {"epochs": 3, "batch_size": 8, "lr": 0.02, "warmup_iters": 50, "milestones": (2.5,),
                    "workers": 0, "frs.warmup_iters": 1, "icd.detach_student_iters": 3,
                    "maskd.student_mask_warmup": 12}
VIZ_IMAGES = 2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--jobs", type=int, default=2, help="student runs side by side, one core each [2]")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    progress = [] if not args.no_progress else ["--no-progress"]
    start = time.time()
    timings = {}

    def step(name: str, started: float) -> None:
        timings[name] = time.time() - started
        print(f"[demo] {name} done in {timings[name]:.0f} s", flush=True)

    data = args.out / "data"
    t = time.time()
    if not (data / "annotations" / "instances_val2017.json").exists():
        synth.main(["--out", str(data)])
    step("data", t)

    teacher_dir = args.out / "teacher"
    t = time.time()
    if not (teacher_dir / "metrics.json").exists():
        teacher.main(["--model", DEMO_TEACHER, "--data", str(data), "--out", str(teacher_dir), *DEMO_SCHEDULE,
                      *progress])
    metrics = json.loads((teacher_dir / "metrics.json").read_text())["final"]
    step("teacher", t)

    from precompute.__main__ import main as precompute_main
    cache = args.out / "cache"
    t = time.time()
    code = precompute_main(["--ckpt", str(teacher_dir / "best.pt"), "--data", str(data), "--cache", str(cache),
                            "--views", DEMO_VIEWS, "--fields", "all", "--workers", "0", *DEMO_MASKD, *progress])
    if code:
        raise SystemExit(f"precompute failed (exit {code}); rerun make demo to resume it")
    step("cache", t)

    from train.methods import METHODS
    from train.sweep import sweep
    t = time.time()
    result = sweep(args.out / "sweep", list(METHODS), [0], str(data), str(cache), DEMO_STUDENT,
                   settings=STUDENT_SETTINGS, jobs=args.jobs, progress=not args.no_progress)
    step("sweep + report", t)
    failed = result["outcome"]["failed"]

    from train import viz
    t = time.time()
    runs = args.out / "sweep" / "runs"
    student_ckpt, icd_run = runs / "frs_s0" / "student.pt", runs / "icd_s0"
    pictures = viz.main(["--data", str(data), "--cache", str(cache), "--num-images", str(VIZ_IMAGES),
                         "--out", str(args.out / "viz"),
                         *(["--icd-run", str(icd_run)] if (icd_run / "last.pt").is_file() else []),
                         *(["--student-ckpt", str(student_ckpt)] if student_ckpt.is_file() else [])])
    step("viz", t)

    report = result["report"]
    print(f"\ndemo finished in {time.time() - start:.0f} s ("
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()) + ")")
    print(f"teacher {DEMO_TEACHER}: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50", "AP75")))
    print(f"\nstudents ({DEMO_STUDENT}, {STUDENT_SETTINGS['epochs']} epochs, from {cache}):\n")
    print(report["table"])
    print("\nreport:  " + report["markdown"])
    for name, path in report["paths"].items():
        if path.endswith(".png"):
            print(f"figure:  {path}  ({name})")
    for path in pictures:
        print(f"picture: {path}")
    if failed:
        raise SystemExit(f"runs failed: {', '.join(failed)} (see their train.log; rerun make demo to retry)")


if __name__ == "__main__":
    main()
