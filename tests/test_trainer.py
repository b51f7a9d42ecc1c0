"""The streaming student trainer (train/): cache vs online teacher, resume, refusals, CLI.

One tiny synthetic set, one random gfl-small teacher and three caches built once per session with
precompute's own API: lossless codecs, the default lossy codecs, and an LD-only cache (region and
meta groups). Students are gfl-nano (FPN 64 channels vs the teacher's 128: adapters are real).
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detectors import build_detector, load_checkpoint, save_checkpoint
from detectors.synth import SynthConfig, generate
from detectors.views import collate
from precompute.config import PrecomputeConfig
from precompute.pipeline import run_precompute
from store import CacheError, ManifestMismatch, open_cache
from store.schema import INHERIT_ARTIFACT
from train.config import TrainConfig
from train.sources import CachedTeacher, OnlineTeacher, manifest_id
from train.student_data import epoch_plan, steps_per_epoch
from train.trainer import StudentTrainer, total_loss

REPO = Path(__file__).resolve().parents[1]
VIEWS = "64:96,64:96:flip"
NUM_TRAIN, NUM_VAL = 6, 2
# Past every ramp and warmup of every method (FRS 500, ICD's detached student 1000, MasKD's student
# masks 5000): every term is active and reaches the student.
ITERATION = 10_000
# (method, overrides): every method, with the optional terms that read more fields switched on.
METHOD_CASES = [
    ("none", {}),
    ("frs", {}),
    ("icd", {}),
    ("maskd", {"maskd.head_weight": 1.0}),               # GFL default 0: also read head.box
    ("ld", {}),
    ("defeat", {"defeat.head_fg_weight": 2.0, "defeat.head_bg_weight": 2.0}),   # also read head.cls
    ("ld+frs", {}),
]


def _precompute(root: Path, name: str, **options) -> str:
    if options.get("fields", "all") == "all":   # a short MasKD stage 1
        options.setdefault("overrides", {"maskd.stage1_iters": 1, "maskd.stage1_batch_size": 2})
    config = PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"), cache=str(root / name),
                              views=VIEWS, device="cpu", shard_size=4, batch_size=4, workers=0, calibration=4,
                              progress=False, **options)
    run_precompute(config)
    return str(root / name)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Data, teacher checkpoint and caches, built once for the whole session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_world(tmp_path_factory.mktemp("trainer"))
    finally:
        torch.set_num_threads(threads)


def _build_world(root: Path) -> dict:
    generate(root / "data", NUM_TRAIN, NUM_VAL, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    generate(root / "other_data", NUM_TRAIN, NUM_VAL, SynthConfig(size=64, max_side=48), seed=4, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_detector("gfl-small", num_classes=8))
    lossless = {"fpn": "raw", "head": "raw", "region": "raw"}
    return {
        "root": root, "data": str(root / "data"), "teacher": str(root / "teacher.pt"),
        "raw": _precompute(root, "cache_raw", codecs=lossless),
        "lossy": _precompute(root, "cache_lossy"),                      # klt fpn, sparse head.cls, int8 head.box
        "ld_only": _precompute(root, "cache_ld", fields="ld"),
    }


def config(world, out, **options) -> TrainConfig:
    values = dict(data=world["data"], out=str(out), student="gfl-nano", batch_size=2, workers=0, eval=False,
                  tensorboard=False, progress=False, warmup_iters=2)
    if "teacher" not in options:
        values["cache"] = world["raw"]
    values.update(options)
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------- cache == online
def _batch(trainer):
    """Four images, both views, of two padded widths: the batch pads some of them."""
    pairs = [(0, 0), (1, 1), (2, 1), (3, 0)]
    return collate([trainer.train_set.load(i, v) for i, v in pairs])


def _loss_and_grads(trainer, batch, samples):
    """The trainer's own loss on ``samples`` (teacher fields) and the gradient of every trainable parameter."""
    model = trainer.model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # ICD's fake queries
    out, terms = model(batch, samples if trainer.fields else None, ITERATION)
    loss, values = total_loss(out, terms, ITERATION)
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                       for p in model.parameters() if p.requires_grad])
    return loss.detach(), values, grads


def _pair(world, tmp_path, method, overrides, cache):
    cached = StudentTrainer(config(world, tmp_path / "cached", method=method, overrides=overrides, cache=cache))
    online = StudentTrainer(config(world, tmp_path / "online", method=method, overrides=overrides,
                                   teacher=world["teacher"], views=VIEWS, artifacts_from=cache))
    # Same seed, same run: the online teacher's loading does not change the student's initialisation.
    for (name, a), b in zip(cached.model.state_dict().items(), online.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(cached.source, CachedTeacher) and isinstance(online.source, OnlineTeacher)
    assert cached.source.fields == online.source.fields == cached.fields
    return cached, online


@pytest.mark.parametrize("method,overrides", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_lossless_cache_gives_the_online_teachers_loss_and_gradients(world, tmp_path, method, overrides):
    cached, online = _pair(world, tmp_path, method, overrides, world["raw"])
    batch = _batch(cached)
    from_cache = cached.source.fetch(batch, None, "cpu")
    from_teacher = online.source.fetch(batch, None, "cpu")
    for a, b in zip(from_cache, from_teacher):
        assert sorted(a) == sorted(b) == sorted(cached.fields)
    loss_c, values_c, grads_c = _loss_and_grads(cached, batch, from_cache)
    loss_o, values_o, grads_o = _loss_and_grads(online, batch, from_teacher)
    assert set(values_c) == set(values_o)
    if method != "none":
        assert any(values_c[k] != 0 for k in values_c if k not in ("qfl", "dfl", "giou")), values_c
    # Lossless codecs: the only difference is float summation order (precompute batched each view
    # with other views of its padded shape, the online teacher with this batch's).
    assert torch.allclose(loss_c, loss_o, rtol=1e-5, atol=1e-6), (values_c, values_o)
    assert (grads_c - grads_o).norm() <= 1e-4 * grads_o.norm() + 1e-7


def _perturbed(samples, manifest, mode, generator):
    """The samples with every float field moved by its codec's declared error bound (manifest
    ``error_bound``): ``plus``/``minus`` all the way in one direction, ``random`` with random signs
    (rel_rmse: a random direction of the allowed norm). Exact fields are left alone."""
    out = []
    for sample in samples:
        moved = {}
        for name, x in sample.items():
            bound = manifest["fields"][name]["error_bound"]
            if not x.is_floating_point() or bound["kind"] == "exact":
                moved[name] = x
                continue
            sign = {"plus": torch.ones_like(x), "minus": -torch.ones_like(x),
                    "random": torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1}[mode]
            if bound["kind"] == "elementwise_rel":
                moved[name] = x + sign * (bound["value"] * x.abs() + bound["abs_floor"])
            elif bound["kind"] == "channel_range":
                axis = bound["axis"]
                other = [d for d in range(x.dim()) if d != axis]
                span = x.amax(dim=other, keepdim=True) - x.amin(dim=other, keepdim=True)
                moved[name] = x + sign * bound["value"] * span
            elif bound["kind"] == "rel_rmse":
                direction = x if mode != "random" else torch.randn(x.shape, generator=generator)
                direction = direction * (1 if mode != "minus" else -1)
                moved[name] = x + bound["value"] * x.norm() * direction / direction.norm().clamp(min=1e-12)
            elif bound["kind"] == "abs_prob":  # probabilities σ(x) within ±value
                p = (x.sigmoid() + sign * bound["value"]).clamp(1e-6, 1 - 1e-6)
                moved[name] = torch.log(p) - torch.log1p(-p)
            else:
                raise AssertionError(f"{name}: no perturbation for error bound {bound}")
        out.append(moved)
    return out


@pytest.mark.parametrize("method,overrides", METHOD_CASES[1:], ids=[m for m, _ in METHOD_CASES[1:]])
def test_lossy_cache_is_within_the_tolerance_its_declared_codec_bounds_allow(world, tmp_path, method, overrides):
    """Default codecs (KLT fpn, sparse head.cls, int8 head.box, fp16 region rows). The tolerance is
    derived from the manifest's declared error bounds: 3x the largest change of the loss (and of the
    gradient vector) when the online teacher's fields are moved by exactly those bounds."""
    cached, online = _pair(world, tmp_path, method, overrides, world["lossy"])
    manifest = cached.source.cache.manifest
    assert not all(manifest["fields"][n]["lossless"] for n in cached.fields)
    batch = _batch(cached)
    from_teacher = online.source.fetch(batch, None, "cpu")
    loss_o, _, grads_o = _loss_and_grads(online, batch, from_teacher)
    generator = torch.Generator().manual_seed(0)
    loss_change, grad_change = 0.0, 0.0
    for mode in ("plus", "minus", "random"):
        loss_p, _, grads_p = _loss_and_grads(online, batch, _perturbed(from_teacher, manifest, mode, generator))
        loss_change = max(loss_change, float((loss_p - loss_o).abs()))
        grad_change = max(grad_change, float((grads_p - grads_o).norm()))
    loss_c, _, grads_c = _loss_and_grads(cached, batch, cached.source.fetch(batch, None, "cpu"))
    loss_tolerance = 3 * loss_change + 1e-5 * float(loss_o.abs()) + 1e-6
    grad_tolerance = 3 * grad_change + 1e-4 * float(grads_o.norm()) + 1e-7
    assert float((loss_c - loss_o).abs()) <= loss_tolerance
    assert float((grads_c - grads_o).norm()) <= grad_tolerance
    # The codecs move the gradient far less than a wrong teacher does (the same images' other view).
    if method in ("frs", "icd", "maskd", "defeat"):
        wrong = _other_view_fields(cached, from_teacher)
        _, _, grads_w = _loss_and_grads(online, batch, wrong)
        assert float((grads_c - grads_o).norm()) < 0.5 * float((grads_w - grads_o).norm())


def _other_view_fields(trainer, samples):
    """Each image's dense teacher fields from its other (flipped) view: same shapes, wrong pixels."""
    pairs = [(0, 1), (1, 0), (2, 0), (3, 1)]  # _batch's images with the other view
    other = trainer.source.fetch(collate([trainer.train_set.load(i, v) for i, v in pairs]), None, "cpu")
    return [dict(s, **{k: v for k, v in o.items() if k.startswith(("fpn.", "head."))}) for s, o in zip(samples, other)]


# ---------------------------------------------------------------------------------------------- streaming data
def test_epoch_plan_is_deterministic_draws_cached_views_and_splits_ranks():
    plan = epoch_plan(10, 3, seed=5, epoch=2, batch_size=2)
    assert plan == epoch_plan(10, 3, seed=5, epoch=2, batch_size=2)
    assert plan != epoch_plan(10, 3, seed=5, epoch=3, batch_size=2)
    pairs = [pair for batch in plan for pair in batch]
    assert sorted(i for i, _ in pairs) == list(range(10)) and all(0 <= v < 3 for _, v in pairs)
    views = {v for e in range(6) for b in epoch_plan(10, 3, 5, e, 2) for _, v in b}
    assert views == {0, 1, 2}  # every cached view is drawn sooner or later
    ranks = [epoch_plan(11, 3, 5, 2, batch_size=2, rank=r, world_size=2) for r in range(2)]
    images = [[i for b in plan for i, _ in b] for plan in ranks]
    assert len(images[0]) == len(images[1]) == 4 and not set(images[0]) & set(images[1])
    drawn = {i: v for b in epoch_plan(11, 3, 5, 2, 1) for i, v in b}
    assert all(drawn[i] == v for plan in ranks for b in plan for i, v in b)  # same draw on every rank
    assert steps_per_epoch(11, 2, world_size=2) == 2


def test_trainer_reads_only_the_groups_the_method_needs_and_dequantises_on_the_device(world, tmp_path):
    trainer = StudentTrainer(config(world, tmp_path, method="ld", cache=world["lossy"]))
    assert trainer.fields == [n for n in open_cache(world["lossy"]).manifest.fields if n.startswith("region.")]
    cache = trainer.source.cache
    cache.stats.reset()
    batch = _batch(trainer)
    payloads = [trainer.source.prefetch(i, v) for i, v in zip(batch.image_ids, batch.view_indices)]
    assert {path.split("/")[2] for path in cache.stats.bytes_by_path} == {"region"}
    assert payloads[0]["region.cls"].dtype == torch.float16  # compact: fp16 travels, float32 on the device
    samples = trainer.source.fetch(batch, payloads, "cpu")
    assert samples[0]["region.cls"].dtype == torch.float32 and samples[0]["region.index"].dtype == torch.int32
    frs = StudentTrainer(config(world, tmp_path, method="frs", cache=world["lossy"]))
    cache = frs.source.cache
    cache.stats.reset()
    frs.source.prefetch(batch.image_ids[0], batch.view_indices[0])
    assert {path.split("/")[2] for path in cache.stats.bytes_by_path} == {"fpn", "head"}


# ---------------------------------------------------------------------------------------------- resume
def _weights(path):
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint["state_dict"], checkpoint["extra"]["train_state"]["method"]


def test_a_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(world, tmp_path):
    """icd+frs: ICD's own AdamW (clipped), query sampling (global RNG) and teacher-side warm-up, FRS's
    adapters in the student's SGD, a warmup and a step inside the run; stopped mid-epoch, resumed with
    a loader worker (the resumed run does not warm up again: its checkpoint holds the warmed-up parts)."""
    options = dict(method="icd+frs", epochs=2, milestones=(1.5,), ckpt_every=2, log_every=1,
                   overrides={"icd.pretrain_batches": 3})
    full = StudentTrainer(config(world, tmp_path / "full", **options)).train()
    assert full["iterations"] == 2 * steps_per_epoch(NUM_TRAIN, 2) == 6
    assert set(full["warm_up"]) == {"icd_aux_cls", "icd_aux_box", "seconds"}
    stopped = StudentTrainer(config(world, tmp_path / "cut", stop_after=4, **options)).train()
    assert stopped == {"status": "stopped", "iteration": 4, "epoch": 1, "step": 1}
    resumed = StudentTrainer(config(world, tmp_path / "cut", resume=True, workers=1, **options))
    assert (resumed.iteration, resumed.epoch, resumed.step) == (4, 1, 1)
    assert {k: v for k, v in resumed.warm_up_report.items() if k != "seconds"} == \
        {k: v for k, v in full["warm_up"].items() if k != "seconds"}
    resumed.train()
    student_full, method_full = _weights(tmp_path / "full" / "last.pt")
    student_cut, method_cut = _weights(tmp_path / "cut" / "last.pt")
    for name, value in {**student_full, **method_full}.items():
        other = student_cut.get(name, method_cut.get(name))
        assert torch.equal(value, other), name
    # The resumed log continues the interrupted one, row for row the uninterrupted run's (timings aside).
    def rows(run):
        with (tmp_path / run / "log.csv").open() as f:
            return [{k: v for k, v in row.items() if k not in ("sec_per_iter", "data_sec")}
                    for row in csv.DictReader(f)]
    assert [row["iteration"] for row in rows("cut")] == ["1", "2", "3", "4", "5", "6"]
    assert rows("cut") == rows("full")
    with pytest.raises(ValueError, match="lr: checkpoint"):
        StudentTrainer(config(world, tmp_path / "cut", resume=True, lr=0.5, **options))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("case", ["missing field", "dataset", "views", "artefact", "inherit"])
def test_a_cache_that_does_not_fit_is_refused_before_any_training_step(world, tmp_path, case, monkeypatch):
    monkeypatch.setattr(StudentTrainer, "run_step", lambda *a, **k: pytest.fail("a training step ran"))
    options, error, pattern = {
        "missing field": (dict(method="frs", cache=world["ld_only"]), ManifestMismatch,
                          r"lacks fields the caller needs: fpn\.p3, .*head\.cls\.p3"),
        "dataset": (dict(method="frs", data=str(world["root"] / "other_data")), ManifestMismatch,
                    r"different dataset: dataset\.annotation_sha256"),
        "views": (dict(method="frs", views="64:96"), ManifestMismatch,
                  r"holds different views: views: the cache has 2 entries, expected 1"),
        "artefact": (dict(method="maskd", cache=world["ld_only"]), CacheError, r"no artifact 'maskd_tokens'"),
        "inherit": (dict(method="icd", inherit=True), ValueError, r"--inherit: .*backbone\.fpn\..*teacher \(128"),
    }[case]
    with pytest.raises(error, match=pattern):
        StudentTrainer(config(world, tmp_path, **options)).train()
    assert not (tmp_path / "last.pt").exists()


def test_inherit_copies_the_teachers_neck_and_head_when_shapes_match(world, tmp_path):
    trainer = StudentTrainer(config(world, tmp_path, method="none", student="gfl-small", inherit=True))
    teacher = open_cache(world["raw"]).artifact(INHERIT_ARTIFACT)
    own = trainer.student.state_dict()
    assert teacher and all(torch.equal(own[k], torch.as_tensor(v)) for k, v in teacher.items())
    assert any(k.startswith("backbone.body.") for k in own) and not any(k.startswith("backbone.body.")
                                                                         for k in teacher)


# ---------------------------------------------------------------------------------------------- end to end
def test_online_teacher_mode_trains_and_evaluates_every_epoch(world, tmp_path):
    results = StudentTrainer(config(world, tmp_path, method="ld+frs", teacher=world["teacher"], views=VIEWS,
                                    epochs=2, max_iters=4, eval=True, eval_every=1, eval_batch_size=2)).train()
    assert results["mode"] == "online" and results["iterations"] == 4 and results["cache_manifest_id"] is None
    assert set(results["last_losses"]) >= {"ld_main", "ld_kd", "frs_feat", "frs_cls", "loss"}
    assert [h["iteration"] for h in results["history"]] == [3, 4]  # end of epoch 1, then the final evaluation
    assert (tmp_path / "eval.csv").read_text().count("\n") == 3


def test_bf16_autocast_step_on_cpu_is_close_to_float32(world, tmp_path):
    """The AMP path (backbone and head under autocast; anchors, assignment, losses in float32)."""
    losses = {}
    for amp in ("none", "bf16"):
        results = StudentTrainer(config(world, tmp_path / amp, method="ld+frs", amp=amp, max_iters=1)).train()
        assert results["amp"] == ("bfloat16" if amp == "bf16" else "none")
        losses[amp] = results["last_losses"]["loss"]
    assert abs(losses["bf16"] - losses["none"]) <= 0.05 * abs(losses["none"])


def test_cli_trains_from_a_cache_and_writes_results(world, tmp_path):
    """The lossy cache through a loader worker: KLT coefficients travel without their basis."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "train", "--method", "ld+frs", "--set", "frs.feat_weight=0.2",
               "--student", "gfl-nano", "--data", world["data"], "--cache", world["lossy"], "--out", str(out),
               "--batch-size", "2", "--max-iters", "3", "--warmup-iters", "1", "--workers", "1", "--log-every", "1",
               "--eval-batch-size", "2", "--no-progress"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "ld+frs" and results["iterations"] == 3 and results["mode"] == "cache"
    assert set(results["final"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert results["cache_manifest_id"] == manifest_id(open_cache(world["lossy"]).manifest)
    assert results["config"]["overrides"] == {"frs.feat_weight": 0.2} and results["train_seconds"] > 0
    assert results["cache_bytes_read"] > 0
    # FRS's official 500-iteration ramp fills this 3-iteration run: said on stderr and in the results
    assert any(w.startswith("frs.warmup_iters=500 spans 3 of this run's 3 iterations")
               for w in results["schedule_warnings"])
    assert "--set frs.warmup_iters=1 keeps the official fraction" in run.stderr
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert {"iteration", "loss", "lr", "ld_main", "frs_feat", "qfl"} <= set(header)
    assert any((out / "tensorboard").iterdir())
    student, extra = load_checkpoint(out / "student.pt")
    assert student.config.name == "gfl-nano" and extra["iteration"] == 3
    refused = subprocess.run([*command[:command.index("--cache")], "--cache", world["ld_only"], "--out",
                              str(tmp_path / "refused"), "--no-progress"], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env=env)
    assert refused.returncode == 1 and "lacks fields the caller needs: fpn.p3" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_cli_help():
    run = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--cache" in run.stdout and "--set" in run.stdout and "ld+frs" in run.stdout


def test_ddp_two_cpu_ranks_with_gloo(world, tmp_path):
    """torchrun, 2 processes, gloo: each rank trains on its half of every epoch; rank 0 writes the run."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(29500 + os.getpid() % 1000), "-m", "train", "--method", "frs", "--student", "gfl-nano",
                          "--data", world["data"], "--cache", world["raw"], "--out", str(out), "--batch-size", "1",
                          "--max-iters", "3", "--workers", "0", "--no-eval", "--no-progress", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["iterations"] == 3
    assert results["epochs"] == 1.0  # 6 images, 3 per rank, batches of 1: one epoch is 3 steps
    assert run.stdout.count('"method": "frs"') == 1  # only rank 0 reports
