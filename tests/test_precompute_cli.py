"""`python -m precompute` end to end on a tiny synthetic set: cached fields equal the teacher's online
outputs within the codecs' declared bounds; a SIGKILLed run resumes to the same cache; two CPU
processes write disjoint shards; a different configuration is refused."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors import build_detector, save_checkpoint
from detectors.data import CocoDetection
from detectors.synth import SynthConfig, generate
from detectors.views import collate, parse_view_list
from precompute.__main__ import main
from precompute.fields import extract_fields, resolve_fields
from store import FIELDS, measure_error, open_cache
from store.report import verify
from store.schema import IMAGE_HASHES_ARTIFACT, INHERIT_ARTIFACT
from train.methods.maskd_tokens import MASKD_ARTIFACT

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
VIEWS = "64:96,64:96:flip"
NUM_IMAGES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    generate(root / "data", NUM_IMAGES, 1, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_detector("gfl-nano", num_classes=8))
    return root


def _args(root: Path, cache: Path, *extra: str, batch_size: int = 2, stage1: bool = True) -> list[str]:
    """``stage1``: a short MasKD stage 1 (--fields must name MasKD: the default all)."""
    maskd = ["--set", "maskd.stage1_iters=1", "--set", "maskd.stage1_batch_size=2"] if stage1 else []
    return ["--ckpt", str(root / "teacher.pt"), "--data", str(root / "data"), "--cache", str(cache),
            "--views", VIEWS, "--device", "cpu", "--shard-size", "1", "--batch-size", str(batch_size),
            "--workers", "0", *maskd, "--calibration", "4", "--no-progress", *extra]


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted single-process run (in process, one loader worker)."""
    cache = setup / "reference"
    assert main(_args(setup, cache, "--workers", "1")) == 0
    return cache


def _shard_sets(cache) -> dict[int, set]:
    out: dict[int, set] = {}
    for key in cache.keys():
        out.setdefault(cache.locate(*key)[0], set()).add(key)
    return out


def within_bound(bound: dict, x: np.ndarray, x_hat: np.ndarray, noise: float = 1e-4) -> bool:
    """The codec's declared bound, plus float noise of noise * max|x|: the online forward runs the view
    alone while precompute batched it with views of the same shape (float sums in another order)."""
    measured, allowed = measure_error(bound, x, x_hat)
    if measured <= allowed:
        return True
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    slack = noise * max(float(np.abs(x).max(initial=0.0)), 1e-3)
    error = np.abs(x_hat - x)
    if bound["kind"] == "channel_range":
        other = tuple(range(1, x.ndim))
        span = x.max(axis=other, keepdims=True) - x.min(axis=other, keepdims=True)
        return bool((error <= bound["value"] * span + slack).all())
    if bound["kind"] == "elementwise_rel":
        return bool((error <= bound["value"] * np.abs(x) + bound["abs_floor"] + slack).all())
    if bound["kind"] == "rel_rmse":
        return np.linalg.norm(x_hat - x) <= (bound["value"] + noise) * np.linalg.norm(x) + slack
    if bound["kind"] == "abs_prob":
        return measured <= allowed + noise
    return False


def assert_matches_online(root: Path, url: Path) -> None:
    """Every cached sample decodes to the teacher's output on that view alone, within the codec bounds."""
    from precompute.teacher import load_teacher

    cache = open_cache(str(url))
    views = parse_view_list(VIEWS)
    assert cache.views == [v.to_dict() for v in views]
    dataset = CocoDetection(root / "data", "train2017", views=views, view_policy="all")
    teacher = load_teacher(None, root / "teacher.pt", dataset.num_classes)
    assert len(cache) == len(dataset.image_ids) * len(views)
    fields = resolve_fields("all")
    assert sorted(cache.manifest.fields) == sorted(fields)
    for image_index, image_id in enumerate(dataset.image_ids):
        for view_index in range(len(views)):
            online = extract_fields(teacher.model, collate([dataset.load(image_index, view_index)]), fields)[0]
            cached = cache.get(image_id, view_index, decode="torch")
            assert cached["__key__"] == (image_id, view_index)
            for name in fields:
                bound = cache.manifest["fields"][name]["error_bound"]
                if FIELDS[name].kind != "float" or bound["kind"] == "exact":
                    assert torch.equal(cached[name], online[name].to(cached[name].dtype)), name
                    continue
                assert within_bound(bound, online[name].numpy(), cached[name].numpy()), (name, image_id, view_index)


def test_cached_fields_equal_the_online_teacher_within_the_codec_bounds(setup, reference):
    report = verify(str(reference), decode=True)
    assert report.ok, report.text()
    assert_matches_online(setup, reference)
    cache = open_cache(str(reference))
    assert cache.manifest["complete"] and cache.manifest["teacher"]["arch"] == "gfl-nano"
    assert set(cache.artifacts()) == {INHERIT_ARTIFACT, MASKD_ARTIFACT, IMAGE_HASHES_ARTIFACT}
    weights = cache.artifact(INHERIT_ARTIFACT)
    teacher_state = torch.load(setup / "teacher.pt", weights_only=True)["state_dict"]
    assert set(weights) == {k for k in teacher_state if k.startswith(("backbone.fpn.", "head."))}
    np.testing.assert_array_equal(weights["head.gfl_cls.weight"], teacher_state["head.gfl_cls.weight"].numpy())


def test_sigkill_then_rerun_finishes_the_same_cache(setup, reference):
    cache_dir = setup / "killed"
    args = _args(setup, cache_dir, "--encode-threads", "1", "--set", "maskd.stage1_iters=0", batch_size=1)
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    receipts = cache_dir / "shards"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if receipts.is_dir() and any(p.suffix == ".json" for p in receipts.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "precompute ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # a real kill: no cleanup, no atexit, files as they are
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len([p for p in receipts.iterdir() if p.suffix == ".json"])
    assert 0 < done < 2 * NUM_IMAGES, "the kill did not land part-way"
    assert not verify(str(cache_dir)).ok  # incomplete: shards missing

    finished = _cli(args)  # the same command again
    assert finished.returncode == 0, finished.stderr
    report = verify(str(cache_dir), decode=True)
    assert report.ok, report.text()
    resumed, uninterrupted = open_cache(str(cache_dir)), open_cache(str(reference))
    assert _shard_sets(resumed) == _shard_sets(uninterrupted)  # same samples in the same shards
    exact = ["meta", "region.level", "region.index", "region.kind", "region.gt"]
    for image_id, view_index in uninterrupted.keys():
        a = resumed.get(image_id, view_index, fields=exact)
        b = uninterrupted.get(image_id, view_index, fields=exact)
        for name in a:
            if not name.startswith("__"):
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert_matches_online(setup, cache_dir)


def test_two_cpu_processes_write_disjoint_shards(setup, reference):
    cache_dir = setup / "two_procs"
    run = _cli(_args(setup, cache_dir, "--num-procs", "2", "--fields", "frs,ld", "--format", "wds", stage1=False))
    assert run.returncode == 0, run.stderr
    report = verify(str(cache_dir))
    assert report.ok, report.text()
    two, one = open_cache(str(cache_dir)), open_cache(str(reference))
    assert _shard_sets(two) == _shard_sets(one)  # shard k holds the same samples however many ranks wrote
    ranks = {two.receipt(i)["writer"]["rank"] for i in two.shards}
    pids = {two.receipt(i)["writer"]["pid"] for i in two.shards}
    assert ranks == {0, 1} and len(pids) == 2
    assert {two.receipt(i)["writer"]["rank"] for i in two.shards if i % 2 == 1} == {1}
    assert set(two.artifacts()) == {INHERIT_ARTIFACT, IMAGE_HASHES_ARTIFACT}  # no maskd requested
    assert "region.box_dist" in two.manifest.fields and "head.box.p3" not in two.manifest.fields
    assert two.manifest.backend == "wds"


def test_torchrun_ranks_write_disjoint_shards_and_rank0_finalizes_once(setup, reference):
    """torchrun (gloo on CPU): ranks share the work, rank 0 alone learns the MasKD tokens (whose teacher
    loss would all-reduce across ranks if the process group were still there) and finalizes. Each rank
    encodes and writes in a writer process (--writer-procs)."""
    cache_dir = setup / "torchrun"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "precompute", *_args(setup, cache_dir, "--writer-procs", "1")], cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("complete —") == 1  # one finalization
    report = verify(str(cache_dir))
    assert report.ok, report.text()
    cache = open_cache(str(cache_dir))
    assert _shard_sets(cache) == _shard_sets(open_cache(str(reference)))
    assert {i % 2 for i in cache.shards} == {0, 1}
    assert all(cache.receipt(i)["writer"]["rank"] == i % 2 for i in cache.shards)
    assert len({cache.receipt(i)["writer"]["pid"] for i in cache.shards}) == 2  # one writer process per rank
    assert set(cache.artifacts()) == {INHERIT_ARTIFACT, MASKD_ARTIFACT, IMAGE_HASHES_ARTIFACT}


def test_a_different_configuration_is_refused_not_mixed(setup, reference, tmp_path):
    before = (reference / "manifest.json").read_bytes()
    other_views = _args(setup, reference)
    other_views[other_views.index("--views") + 1] = "64:96"
    other_shards = _args(setup, reference)
    other_shards[other_shards.index("--shard-size") + 1] = "2"
    for argv, what in [(other_views, "views"), (_args(setup, reference, "--fields", "frs", stage1=False), "fields"),
                       (_args(setup, reference, "--codec", "fpn=int8"), "codecs"), (other_shards, "shard_size"),
                       (_args(setup, reference, "--ld-vlr-rule", "diou"), "options")]:
        assert main(argv) == 1, what
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "other.pt", build_detector("gfl-nano", num_classes=8))
    other_teacher = _args(setup, reference)
    other_teacher[other_teacher.index("--ckpt") + 1] = str(tmp_path / "other.pt")
    assert main(other_teacher) == 1
    assert (reference / "manifest.json").read_bytes() == before
    assert main(_args(setup, reference)) == 0  # the same command: complete, nothing to do


def test_help_documents_the_options():
    out = _cli(["--help"])
    assert out.returncode == 0
    for option in ("--teacher", "--ckpt", "--views", "--fields", "--num-procs", "--amp", "--set", "torchrun"):
        assert option in out.stdout
    assert "--maskd" not in out.stdout   # method settings are --set keys of the method's config


@pytest.mark.parametrize("setting, message", [
    ("maskd.stage1_iters=abc", r"--set maskd\.stage1_iters='abc': not an int"),
    ("maskd.stage1_bogus=1", r"unknown override keys \['maskd\.stage1_bogus'\]"),
    ("maskd.stage1_lr=0", r"--set maskd\.stage1_lr='0'"),
])
def test_bad_method_setting_stops_before_any_work(tmp_path, setting, message):
    cache = tmp_path / "cache"
    run = _cli(["--ckpt", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "missing"), "--cache", str(cache),
                "--device", "cpu", "--set", setting])
    err = run.stderr.strip()
    assert run.returncode == 2 and "\n" not in err and re.search(message, err), err
    assert not cache.exists()   # nothing was read or written: the data and checkpoint do not even exist
