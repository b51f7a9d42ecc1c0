"""`make bench` (python -m bench): finds every benchmark module and refuses an unknown name."""
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import benchmark_names, main

REPO = Path(__file__).resolve().parents[1]


def test_the_runner_finds_every_benchmark_module():
    expected = sorted(p.stem[len("bench_"):] for p in (REPO / "bench").glob("bench_*.py"))
    assert benchmark_names() == expected and "train" in expected


def test_an_unknown_benchmark_is_refused_with_the_list_of_known_ones():
    with pytest.raises(SystemExit, match=r"unknown benchmark\(s\) \['nope'\]; available: .*'store'"):
        main(["nope"])
    run = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "available" in run.stderr
