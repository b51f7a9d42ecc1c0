"""FCOS end to end (issue 14): an FCOS teacher through precompute, the cache and the methods.

One tiny synthetic set, one random fcos-small teacher and one lossless cache ("all": FPN, class
logits, side distances and centerness, LD's region rows, MasKD's tokens from a one-iteration stage 1
on the FCOS losses), built once per session with precompute's own API, one view per forward.
Students are fcos-nano (FPN 32 channels against the teacher's 128: adapters are real).
"""
from pathlib import Path

import pytest
import torch

from detectors import build_detector, save_checkpoint
from detectors.synth import SynthConfig, generate
from detectors.views import collate
from precompute.config import PrecomputeConfig
from precompute.pipeline import run_precompute
from precompute.teacher import load_teacher
from store import LEVELS, expand_fields, open_cache
from train.config import TrainConfig
from train.methods import METHODS
from train.sources import CachedTeacher, OnlineTeacher
from train.trainer import StudentTrainer, total_loss

VIEWS = "64:96,64:96:flip"
NUM_TRAIN, NUM_VAL = 4, 2
CENTERNESS = expand_fields(["head.ctr"])
ITERATION = 10_000  # past every method's ramp and warm-up: every term reaches the student


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _precompute(root: Path, name: str, ckpt: Path, **options) -> str:
    config = PrecomputeConfig(ckpt=str(ckpt), data=str(root / "data"), cache=str(root / name), views=VIEWS,
                              device="cpu", shard_size=4, batch_size=1, workers=0, calibration=2, progress=False,
                              **options)
    run_precompute(config)
    return str(root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("fcos")
    generate(root / "data", NUM_TRAIN, NUM_VAL, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_detector("fcos-small", num_classes=8))
    cache = _precompute(root, "cache", root / "teacher.pt", codecs={"fpn": "raw", "head": "raw", "region": "raw"},
                        overrides={"maskd.stage1_iters": 1, "maskd.stage1_batch_size": 2})
    return {"root": root, "data": str(root / "data"), "teacher": str(root / "teacher.pt"), "cache": cache}


def config(world, out, **options) -> TrainConfig:
    values = dict(data=world["data"], out=str(out), student="fcos-nano", batch_size=2, workers=0, eval=False,
                  tensorboard=False, progress=False, warmup_iters=2, cache=world["cache"])
    values.update(options)
    return TrainConfig(**values)


def test_the_cache_holds_the_centerness_losslessly(world):
    manifest = open_cache(world["cache"]).manifest
    assert manifest["teacher"]["config"]["family"] == "fcos"
    assert set(CENTERNESS) <= set(manifest.fields)
    assert all(manifest["fields"][name]["lossless"] for name in manifest.fields)
    assert "maskd_tokens" in open_cache(world["cache"]).artifacts()


def test_cached_fields_equal_the_online_teachers_on_the_same_batch(world):
    """Every dense field, centerness included, and the region rows: exactly equal for one-view
    batches (precompute ran one view per forward); equal up to float summation order for a batch
    of four views of two padded widths."""
    fields = ["fpn", "head", "head.ctr", "region", "meta"]
    cached = CachedTeacher(world["cache"], fields)
    teacher = load_teacher(None, world["teacher"], 8, device="cpu")
    online = OnlineTeacher(teacher.model, fields)
    assert set(CENTERNESS) <= set(cached.fields) and cached.fields == online.fields
    trainer = StudentTrainer(config(world, world["root"] / "pair", method="none"))
    pairs = [(0, 0), (1, 1), (2, 1), (3, 0)]
    for pair in pairs:
        batch = collate([trainer.train_set.load(*pair)])
        [a], [b] = cached.fetch(batch, None, "cpu"), online.fetch(batch, None, "cpu")
        assert sorted(a) == sorted(b) == sorted(cached.fields)
        for name in a:
            assert torch.equal(a[name], b[name]), (pair, name)
    batch = collate([trainer.train_set.load(*pair) for pair in pairs])
    assert len({tuple(s) for s in batch.image_sizes}) > 1  # the batch pads some of its views
    for a, b in zip(cached.fetch(batch, None, "cpu"), online.fetch(batch, None, "cpu")):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
        assert all(a[f"head.ctr.{level}"].shape[0] == 1 for level in LEVELS)


@pytest.mark.filterwarnings("ignore:ICD's teacher side needs many iterations")
@pytest.mark.parametrize("method", ["frs", "icd", "maskd"])
def test_fcos_students_train_from_the_cache_with_the_official_fcos_values(world, tmp_path, method):
    trainer = StudentTrainer(config(world, tmp_path, method=method, epochs=1, max_iters=2))
    assert trainer.method.config == METHODS[method].Config.for_family("fcos")
    results = trainer.train()
    assert results["mode"] == "cache" and results["iterations"] == 2
    losses = results["last_losses"]
    assert {"cls", "box", "centerness"} <= set(losses)      # the FCOS student's own terms
    assert any(name.startswith(method) for name in losses), losses
    assert all(torch.isfinite(torch.tensor(float(v))) for v in losses.values())


@pytest.mark.filterwarnings("ignore:ICD's teacher side needs many iterations")
def test_cache_and_online_teacher_give_the_same_distillation_loss_and_gradients(world, tmp_path):
    """frs+icd+maskd on an fcos-nano student, past every warm-up, from the lossless cache and from
    the online teacher on the same four-view batch."""
    spec = "frs+icd+maskd"
    cached = StudentTrainer(config(world, tmp_path / "cached", method=spec))
    online = StudentTrainer(config(world, tmp_path / "online", method=spec, cache=None, teacher=world["teacher"],
                                   views=VIEWS, artifacts_from=world["cache"]))
    batch = collate([cached.train_set.load(i, v) for i, v in [(0, 0), (1, 1), (2, 1), (3, 0)]])
    results = []
    for trainer in (cached, online):
        model = trainer.model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # ICD's fake queries
        out, terms = model(batch, trainer.source.fetch(batch, None, "cpu"), ITERATION)
        loss, values = total_loss(out, terms, ITERATION)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), values, grads))
    (loss_c, values_c, grads_c), (loss_o, values_o, grads_o) = results
    assert {"frs_feat", "frs_cls", "icd_distill", "maskd_feat"} <= set(values_c) == set(values_o)
    assert all(values_c[k] != 0 for k in ("frs_feat", "frs_cls", "icd_distill", "maskd_feat")), values_c
    assert torch.allclose(loss_c, loss_o, rtol=1e-5, atol=1e-6), (values_c, values_o)
    assert (grads_c - grads_o).norm() <= 1e-4 * grads_o.norm() + 1e-7


@pytest.mark.parametrize("method,pattern", [
    ("ld", r"'fcos' \(LD distils box distributions"),
    ("defeat", r"'fcos' \(the official code builds its GT mask in AnchorHead\.get_gt_mask"),
])
def test_methods_without_fcos_code_refuse_an_fcos_student_before_any_step(world, tmp_path, monkeypatch, method,
                                                                          pattern):
    monkeypatch.setattr(StudentTrainer, "run_step", lambda *a, **k: pytest.fail("a training step ran"))
    with pytest.raises(ValueError, match=pattern):
        StudentTrainer(config(world, tmp_path, method=method)).train()


def test_precompute_refuses_fields_the_teacher_cannot_give_before_declaring_a_cache(world):
    """A GFL teacher asked for the centerness; an FCOS teacher asked for LD's fields (LD refuses FCOS)."""
    torch.manual_seed(0)
    save_checkpoint(world["root"] / "gfl.pt", build_detector("gfl-nano", num_classes=8))
    with pytest.raises(ValueError, match=r"--fields 'head\.ctr': a 'gfl' teacher has no centerness output"):
        _precompute(world["root"], "gfl_cache", world["root"] / "gfl.pt", fields="fpn,head.ctr")
    with pytest.raises(ValueError, match=r"--fields ld: LDConfig has no official settings for detector family "
                                         r"'fcos'"):
        _precompute(world["root"], "ld_cache", Path(world["teacher"]), fields="ld")
    assert not (world["root"] / "gfl_cache" / "manifest.json").exists()
    assert not (world["root"] / "ld_cache" / "manifest.json").exists()


def test_the_detections_picture_decodes_an_fcos_teacher_with_its_cached_centerness(world, tmp_path):
    from train.viz import draw
    skipped = []
    written = draw(world["data"], world["cache"], tmp_path, num_images=1, student_ckpt=world["teacher"],
                   what="detections", score_thresh=0.0, log=skipped.append)
    assert [p.name.endswith("_detections.png") for p in written] == [True] and not skipped, skipped
