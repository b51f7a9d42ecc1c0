"""Kill matrix: precompute killed with SIGKILL at random moments, then resumed, must give the cache
an uninterrupted run gives, decoded sample for sample and artefact for artefact, and leave no
process behind.

Each trial starts from an empty cache and kills the run 1 to 3 times before letting it finish:
at a random time (single process, or ``--num-procs 2`` where only the parent is killed: its
ranks must die with it and commit nothing after), or at a chosen moment (during MasKD stage 1,
during finalization: a child process pauses there). After each kill ``verify`` must fail (the
cache is incomplete) unless the run had already finished; after the last rerun, ``verify --decode``
must pass and every decoded array and artefact must equal the uninterrupted run's.

    python -m bench.bench_kill [--trials 12] [--images 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_faults import read_everything, same
from store.report import verify

REPO = Path(__file__).resolve().parents[1]

# Runs precompute in process and pauses at a chosen moment (announced on stdout) to be killed there.
PAUSING_CHILD = """
import sys, time
moment, argv = sys.argv[1], sys.argv[2:]
def pause(*args, **kwargs):
    print("PAUSED", flush=True)
    time.sleep(600)
if moment == "maskd":
    import train.methods.maskd_tokens
    train.methods.maskd_tokens.learn_receptive_tokens = pause
elif moment == "finalize":
    import store.writer
    store.writer._finalize = pause
from precompute.__main__ import main
main(argv)
"""


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def precompute(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env(), **kwargs)


def start_paused(moment: str, args: list[str]) -> subprocess.Popen:
    """A precompute child stopped at ``moment`` ("maskd" or "finalize"), ready to be killed."""
    child = subprocess.Popen([sys.executable, "-c", PAUSING_CHILD, moment, *args], cwd=REPO, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline().strip()
    if line != "PAUSED":
        child.kill()
        raise RuntimeError(f"the child did not reach {moment}: {child.stderr.read()[-2000:]}")
    return child


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_and_reap(process: subprocess.Popen, wait_children: float = 10.0) -> list[int]:
    """SIGKILL the parent only; return the pids of its children still alive ``wait_children`` s later."""
    kids = children(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.time() + wait_children
    while time.time() < deadline and any(alive(p) for p in kids):
        time.sleep(0.05)
    return [p for p in kids if alive(p)]


def make_setup(root: Path, images: int) -> None:
    import torch

    from detectors import build_detector, save_checkpoint
    from detectors.synth import SynthConfig, generate
    generate(root / "data", images, 1, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_detector("gfl-nano", num_classes=8))


def args_for(root: Path, cache: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(root / "teacher.pt"), "--data", str(root / "data"), "--cache", str(cache),
            "--views", "64:96,64:96:flip", "--device", "cpu", "--shard-size", "2", "--batch-size", "2",
            "--workers", "0", "--set", "maskd.stage1_iters=20", "--set", "maskd.stage1_batch_size=2",
            "--calibration", "4",
            "--no-progress", *extra]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_setup(root, args.images)
        references, durations = {}, {}
        for mode, extra in (("single", ()), ("num-procs", ("--num-procs", "2"))):
            start = time.perf_counter()
            run = precompute(args_for(root, root / f"reference-{mode}", *extra))
            assert run.returncode == 0, run.stderr
            durations[mode] = time.perf_counter() - start
            references[mode] = read_everything(str(root / f"reference-{mode}"))
        print(f"uninterrupted: {durations['single']:.1f} s single process, {durations['num-procs']:.1f} s with "
              "--num-procs 2")
        moments = ["maskd", "finalize"] + ["random"] * max(0, args.trials - 2)
        failures, kills, orphans = 0, 0, 0
        for trial, moment in enumerate(moments):
            mode = "num-procs" if trial % 2 else "single"
            extra = ("--num-procs", "2") if mode == "num-procs" else ()
            cache = root / f"trial{trial}"
            shutil.rmtree(cache, ignore_errors=True)
            events = []
            for _ in range(int(rng.integers(1, 4)) if moment == "random" else 1):
                if moment == "random":
                    delay = float(rng.uniform(1.0, 0.9 * durations[mode]))   # after the imports, before the end
                    process = subprocess.Popen([sys.executable, "-m", "precompute", *args_for(root, cache, *extra)],
                                               cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                    time.sleep(delay)
                    if process.poll() is not None:
                        events.append(f"finished before {delay:.1f} s")
                        break
                    events.append(f"killed at {delay:.1f} s")
                else:
                    process = start_paused(moment, list(args_for(root, cache, *extra)))
                    events.append(f"killed during {moment}")
                left = kill_and_reap(process)
                kills += 1
                orphans += len(left)
                if verify(str(cache)).ok:
                    events.append("it had finished")
                    break
            run = precompute(args_for(root, cache, *extra))
            report = verify(str(cache), decode=True)
            resumed = run.returncode == 0 and report.ok and same(read_everything(str(cache)), references[mode])
            failures += not resumed
            print(f"trial {trial:2d} {mode:9s} {'; '.join(events):45s} -> rerun {'identical' if resumed else 'DIFFERS'}"
                  f"{'' if run.returncode == 0 else ' (rerun failed: ' + run.stderr[-300:] + ')'}")
        print(f"{len(moments)} trials, {kills} kills: {len(moments) - failures} identical after resume, "
              f"{failures} not; orphan processes left: {orphans}")
    return 1 if failures or orphans else 0


if __name__ == "__main__":
    raise SystemExit(main())
