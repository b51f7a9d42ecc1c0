"""Crash safety and the CLI: a writer process killed with SIGKILL leaves no shard that reads as
complete; resuming completes the cache; `python -m store verify|inspect` report what they find."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store import IncompleteCacheError, open_cache, open_writer
from store.report import verify

REPO = Path(__file__).resolve().parents[1]

SETUP = """
from store import Manifest
from store.synthetic import make_sample
ITEMS = [make_sample(i, v, valid_hw=((64, 96), (96, 64))[i % 2], fields=["fpn", "head", "region", "meta"])
         for i in range(9) for v in range(2)]

def manifest(backend):
    return Manifest.create(teacher={"arch": "t", "checkpoint_sha256": "ab" * 32}, dataset={"num_images": 9},
                           views=[{"flip": False}, {"flip": True}], backend=backend, shard_size=4,
                           num_samples=len(ITEMS), calibration=ITEMS[:2],
                           fields={"fpn": "klt", "head": "int8", "region": "fp16", "meta": "raw"})
"""

# The child writes the cache and stops itself at a chosen point of shard 2 (positions 8..11),
# announces it on stdout and waits there to be killed.
CHILD = SETUP + """
import sys, time
import store.fsutil as fsutil
from store import open_writer

url, backend, moment = sys.argv[1:4]

def pause():
    print("PAUSED", flush=True)
    time.sleep(600)

if moment == "receipt":            # shard data renamed into place, receipt not yet written
    write_atomic = fsutil.write_atomic
    def patched(fs, path, data):
        if path.endswith("000002.json"):
            pause()
        write_atomic(fs, path, data)
    fsutil.write_atomic = patched
elif moment == "files":            # some of the shard's files written under temporary names
    write_local = fsutil._write_local
    def patched(path, data):
        write_local(path, data)
        if "000002" in path and fsutil.TMP_MARK in path:
            pause()
    fsutil._write_local = patched

with open_writer(url, manifest(backend)) as writer:
    for position, item in enumerate(ITEMS):
        if moment == "buffering" and position == 10:
            pause()
        writer.write(item)
"""

namespace: dict = {}
exec(SETUP, namespace)
ITEMS, MANIFEST = namespace["ITEMS"], namespace["manifest"]


def kill_writer_at(url: str, backend: str, moment: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, backend, moment], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "PAUSED", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("backend,moment", [("zarr", "buffering"), ("zarr", "files"), ("zarr", "receipt"),
                                            ("wds", "files"), ("wds", "receipt")])
def test_killed_writer_leaves_no_complete_shard_and_resume_completes(tmp_path, backend, moment):
    url = str(tmp_path / "cache")
    kill_writer_at(url, backend, moment)

    names = os.listdir(tmp_path / "cache" / "shards")
    assert "000000.json" in names and "000001.json" in names and "000002.json" not in names
    if moment == "receipt":
        assert any(n.startswith("000002") and not n.endswith(".json") for n in names), names
    with pytest.raises(IncompleteCacheError, match=r"3 shard\(s\) not committed \(2, 3, 4\)"):
        open_cache(url)
    assert len(open_cache(url, allow_incomplete=True)) == 8
    report = verify(url)
    assert any(p.startswith("shard 2: not committed") for p in report.problems), report.problems

    with open_writer(url, MANIFEST(backend)) as writer:
        assert [t.index for t in writer.pending_shards()] == [2, 3, 4]
        written = [writer.write(item) for item in ITEMS]
    assert written == [False] * 8 + [True] * 10

    report = verify(url, decode=True)
    assert report.ok and not report.warnings, report.text()
    cache = open_cache(url)
    assert len(cache) == len(ITEMS) and cache.manifest["complete"]
    m = cache.manifest
    for item in ITEMS:
        got = cache.get(int(item["meta.image_id"]), int(item["meta.view_index"]))
        for name, value in item.items():
            np.testing.assert_array_equal(got[name], m.codec(name).decode(m.codec(name).encode(value)))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "cache")
    with open_writer(url, MANIFEST("zarr")) as writer:
        for item in ITEMS:
            writer.write(item)
    return url


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "store", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_help_inspect_and_verify(small_cache):
    result = run_cli("--help")
    assert result.returncode == 0 and "inspect" in result.stdout and "verify" in result.stdout
    result = run_cli("inspect", small_cache)
    assert result.returncode == 0, result.stderr
    for text in ("complete: yes", "samples    18 committed (18 declared), shards 5/5", "fpn.p3", "rel_rmse<=0.01",
                 "raw fp16", "ratio", "0: {\"flip\": false}   samples: 9", "zarr="):
        assert text in result.stdout, text
    result = run_cli("verify", small_cache)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_cli_verify_names_a_corrupt_shard(tmp_path):
    url = str(tmp_path / "cache")
    with open_writer(url, MANIFEST("wds")) as writer:
        for item in ITEMS:
            writer.write(item)
    receipt = open_cache(url).receipt(3)
    member = receipt["groups"]["fpn"]
    path = tmp_path / "cache" / member["path"]
    data = bytearray(path.read_bytes())
    data[member["offsets"][1][0] + 40] ^= 0xFF                      # inside a blob of the second sample
    path.write_bytes(bytes(data))
    result = run_cli("verify", url)
    assert result.returncode == 1
    assert "shard 3: shards/000003-fpn.tar sha256 mismatch" in result.stdout, result.stdout
    result = run_cli("verify", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "no manifest.json" in result.stdout
