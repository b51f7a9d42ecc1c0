"""The cache never lies (store level): every byte a reader relies on is bound to the declaration
it was written under, damage is named, and one writer run owns a cache at a time.

Each test reproduces a hole found by hostile testing (issue #10) that read a damaged or mismatched
cache as if it were right; the reduced fault-injection run (bench/bench_faults.py) keeps them closed."""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.bench_faults import OUTCOMES, build_cache, read_everything, run_trials, same
from store import BACKENDS, CacheError, CorruptShardError, Manifest, open_cache, open_writer
from store.errors import ForeignShardError
from store.integrity import seal
from store.layout import LOCK
from store.lock import CacheLock, CacheLockedError, check_owner
from store.report import verify
from store.synthetic import make_sample

REPO = Path(__file__).resolve().parents[1]


def _manifest(views, backend="wds", artifacts=()):
    return Manifest.create(teacher={"arch": "t", "checkpoint_sha256": "ab" * 32}, dataset={"num_images": 3},
                           views=views, backend=backend, shard_size=2, num_samples=6, artifacts=artifacts,
                           fields={"fpn": "fp16", "meta": "raw"})


def _items():
    return [make_sample(i, v, valid_hw=(64, 64), fields=["fpn", "meta"]) for i in range(3) for v in range(2)]


def _write(url, views, **kwargs):
    with open_writer(url, _manifest(views), **kwargs) as writer:
        for item in _items():
            writer.write(item)


VIEWS_A = [{"flip": False, "short": 64}, {"flip": True, "short": 64}]
VIEWS_B = [{"flip": False, "short": 96}, {"flip": True, "short": 96}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_fault_injection_ends_detected_or_harmless(tmp_path, backend):
    """Every file deleted and truncated once, plus random byte flips: nothing is read wrong in silence,
    and verify names the damaged file."""
    result = run_trials(backend, trials=0, seed=7, work=tmp_path)
    result_flips = run_trials(backend, trials=result["trials"] + 30, seed=8, work=tmp_path / "flips")
    for r in (result, result_flips):
        assert r["detected"] > 0
        assert {k: r[k] for k in ("unnamed", "missed", "silent", "reader_silent", "reader_crash")} == dict(
            unnamed=0, missed=0, silent=0, reader_silent=0, reader_crash=0), r["examples"]
        assert sum(r[k] for k in OUTCOMES) == r["trials"]


def test_shards_of_a_lost_manifest_are_never_adopted_under_another_declaration(tmp_path):
    """Hole 1: cp -r CACHE C2; rm C2/manifest.json; a writer declaring other views used to adopt the old
    shards and report a complete cache."""
    url = str(tmp_path / "c2")
    _write(url, VIEWS_A)
    os.remove(tmp_path / "c2" / "manifest.json")
    with pytest.raises(ForeignShardError, match=r"3 shard receipt\(s\) cannot be adopted.*shards/000000\.json.*"
                                                r"another cache declaration.*--discard-foreign-shards"):
        open_writer(url, _manifest(VIEWS_B))
    assert not (tmp_path / "c2" / "manifest.json").exists()          # refused before writing anything
    # with the explicit flag the foreign shards are deleted and computed again
    with open_writer(url, _manifest(VIEWS_B), discard_foreign=True) as writer:
        assert [t.index for t in writer.pending_shards()] == [0, 1, 2]
        for item in _items():
            writer.write(item)
    cache = open_cache(url)
    assert cache.views == VIEWS_B and verify(url).ok


def test_a_foreign_receipt_without_a_manifest_gives_one_named_error(tmp_path):
    url = tmp_path / "cache"
    (url / "shards").mkdir(parents=True)
    (url / "shards" / "000000.json").write_text(json.dumps({"index": 0, "keys": [[1, 0]]}))
    run = subprocess.run([sys.executable, "-m", "store", "verify", str(url)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and "no manifest.json" in run.stdout and "Traceback" not in run.stderr
    with pytest.raises(ForeignShardError, match=r"shards/000000\.json: has no checksum"):
        open_writer(str(url), _manifest(VIEWS_A))


def test_a_flipped_bit_in_the_manifest_klt_basis_is_refused(tmp_path):
    """Hole 3: the manifest holds the KLT bases; one flipped bit used to pass verify --decode."""
    url = tmp_path / "cache"
    build_cache(str(url), "wds")
    path = url / "manifest.json"
    data = json.loads(path.read_text())
    codec = data["fields"]["fpn.p3"]["codec"]
    key = next(k for k, v in codec.items() if isinstance(v, str) and len(v) > 64)   # a base64 array
    raw = bytearray(base64.b64decode(codec[key]))
    raw[len(raw) // 2] ^= 0x01
    codec[key] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(CorruptShardError, match=r"manifest\.json: checksum mismatch"):
        open_cache(str(url))
    report = verify(str(url), decode=True)
    assert not report.ok and "manifest.json: checksum mismatch" in report.text()


def test_an_artifact_or_its_record_damaged_is_named(tmp_path):
    url = tmp_path / "cache"
    build_cache(str(url), "zarr")
    npz = url / "artifacts" / "tokens.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"artifacts/tokens\.npz does not match its sha256"):
        open_cache(str(url)).artifact("tokens")
    assert "artifacts/tokens.npz sha256 mismatch" in verify(str(url)).text()


def test_a_deleted_receipt_fails_plain_verify(tmp_path):
    """Hole 4a: plain verify used to skip receipts once a cache was complete."""
    url = tmp_path / "cache"
    build_cache(str(url), "wds")
    os.remove(url / "shards" / "000001.json")
    report = verify(str(url))
    assert not report.ok and "shards/000001.json is missing" in report.text()


def _swap_rows(receipt: dict) -> None:
    for layout in receipt["groups"].values():
        layout["offsets"][0], layout["offsets"][1] = layout["offsets"][1], layout["offsets"][0]
        layout["nbytes"][0], layout["nbytes"][1] = layout["nbytes"][1], layout["nbytes"][0]


def test_swapped_offsets_are_refused_by_verify_and_by_the_reader(tmp_path):
    """Hole 4b: swapped offsets used to pass, and training read image 10's features for image 9."""
    url = tmp_path / "cache"
    build_cache(str(url), "zarr")
    path = url / "shards" / "000000.json"
    receipt = json.loads(path.read_text())
    _swap_rows(receipt)
    path.write_text(json.dumps(receipt))
    assert "receipt" in verify(str(url)).text() and "000000.json: checksum mismatch" in verify(str(url)).text()
    with pytest.raises(CorruptShardError, match="checksum mismatch"):
        open_cache(str(url)).get(0, 0)

    # Even a consistent forgery (receipt resealed, the manifest's listing updated) cannot hand a
    # sample another sample's bytes: blob checksums are seeded with the sample key.
    receipt = seal(receipt)
    path.write_text(json.dumps(receipt))
    manifest_path = url / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["receipt"] = receipt["checksum"]
    manifest_path.write_text(json.dumps(seal(manifest)))
    key = tuple(receipt["keys"][0])
    with pytest.raises(CorruptShardError, match=rf"sample \(image_id={key[0]}, view={key[1]}\): checksum mismatch"):
        open_cache(str(url)).get(*key)
    assert "blob checksum mismatch" in verify(str(url), decode=True).text()


def test_a_cache_whose_declared_artifact_is_missing_is_incomplete(tmp_path):
    """Hole 12: a run killed during MasKD stage 1 (shards all written, tokens not) used to verify OK."""
    url = str(tmp_path / "cache")
    manifest = _manifest(VIEWS_A, artifacts=["maskd_tokens"])
    with open_writer(url, manifest) as writer:
        for item in _items():
            writer.write(item)
    assert not open_writer(url, manifest, shards=[]).close()          # not finalized without the artefact
    report = verify(url)
    assert not report.ok and "artefact maskd_tokens is declared but was not written" in report.text()
    assert "incomplete: the manifest is not finalized" in report.text()
    writer = open_writer(url, manifest, shards=[])
    writer.put_artifact("maskd_tokens", np.ones(3, np.float32))
    assert writer.close() and verify(url).ok


def test_a_second_writer_run_is_refused_naming_the_owner(tmp_path):
    """Hole 6: two precompute runs on one cache; one used to die with a FileNotFoundError traceback."""
    url = str(tmp_path / "cache")
    with CacheLock.acquire(url) as lock:
        with pytest.raises(CacheLockedError, match=rf"being written by another precompute run \(run "
                                                   rf"{lock.run_id[:8]}, pid {os.getpid()} on host"):
            CacheLock.acquire(url)
    assert not (tmp_path / "cache" / LOCK).exists()
    CacheLock.acquire(url).release()


def test_a_stale_lock_is_taken_over_and_a_remote_one_explains_how_to_clear_it(tmp_path):
    url = tmp_path / "cache"
    url.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (url / LOCK).write_text(json.dumps(dict(run_id="f" * 32, pid=dead.pid, host=socket.gethostname(),
                                            started="2026-01-01T00:00:00+00:00")))
    said = []
    lock = CacheLock.acquire(str(url), log=said.append)
    assert said and "taking over a stale lock" in said[0] and f"pid {dead.pid}" in said[0]
    lock.release()
    (url / LOCK).write_text(json.dumps(dict(run_id="e" * 32, pid=1, host="elsewhere", started="t")))
    with pytest.raises(CacheLockedError, match=rf"cannot be checked from this host; if that run is dead, remove "
                                               rf"{url / LOCK}"):
        CacheLock.acquire(str(url))


def test_a_writer_whose_run_lost_the_lock_never_commits(tmp_path):
    """Hole 5's second half: a writer of a run that no longer owns the cache cannot commit into it."""
    url = str(tmp_path / "cache")
    lock = CacheLock.acquire(url)
    writer = open_writer(url, _manifest(VIEWS_A), run_id=lock.run_id)
    lock.release()
    other = CacheLock.acquire(url)
    items = _items()
    with pytest.raises(CacheError, match=rf"run {lock.run_id[:8]} no longer owns the cache"):
        writer.write(items[0])
        writer.write(items[1])
    assert not (tmp_path / "cache" / "shards" / "000000.json").exists()
    check_owner(writer.fs, writer.root, other.run_id, where=url)      # the new owner may
    other.release()


def test_an_old_format_cache_is_refused_with_what_to_do(tmp_path):
    url = tmp_path / "cache"
    build_cache(str(url), "wds")
    data = json.loads((url / "manifest.json").read_text())
    data["format_version"] = 1
    data.pop("checksum")
    (url / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match="format_version 1 is not supported.*recompute the cache"):
        open_cache(str(url))


def test_intact_cache_reads_the_same_by_get_and_iter(tmp_path):
    url = tmp_path / "cache"
    build_cache(str(url), "zarr")
    copy = tmp_path / "copy"
    shutil.copytree(url, copy)
    assert same(read_everything(str(url)), read_everything(str(copy)))
    assert verify(str(copy), decode=True).ok


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
    """Hole 9: a full disk (here a file-size limit: errno 27) gave an OSError naming no path."""
    child = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from store import fsutil
try:
    fsutil.write_atomic(fsutil.resolve({str(tmp_path)!r})[0], {str(tmp_path / "big.bin")!r}, bytes(5000))
except OSError as e:
    print(e)
"""
    run = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "big.bin" in run.stdout and "File too large" in run.stdout, run.stdout + run.stderr
    assert os.listdir(tmp_path) == []
