"""The partial teacher (issue 14): a Faster R-CNN teacher's FPN P2..P6 and RPN maps in the cache, its RoI
head as a protected artefact, and that head rebuilt alone on the cached maps (train/partial_teacher.py).

One tiny synthetic set, one random frcnn-small teacher and two caches of "all" (FPN P2..P6, the RPN maps,
meta) built once per module with precompute's own API, one view per forward: lossless (raw) and with the
default codecs (klt FPN maps, fp16 RPN maps). The RoIs are what a student's sampler gives (jittered GT
boxes, random boxes) and a few boxes larger than the view, so that every level P2..P5 is read.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors import build_detector, save_checkpoint
from detectors.data import CocoDetection
from detectors.synth import SynthConfig, generate
from detectors.views import Batch, collate, padded_size, parse_view_list
from precompute.config import PrecomputeConfig
from precompute.fields import TeacherOutputs, extract_fields, resolve_fields
from precompute.pipeline import run_precompute
from precompute.teacher import load_teacher
from store import FIELDS, CacheError, expand_fields, open_cache
from store.__main__ import main as store_cli
from store.report import verify
from store.schema import ROI_HEAD_ARTIFACT, TWO_STAGE_LEVELS, validate_sample
from store.synthetic import make_sample
from train.partial_teacher import SETTINGS_KEY, PartialTeacher, roi_head_artifact
from train.sources import CachedTeacher, OnlineTeacher
from train.teacher_source import OpenedTeacher

VIEWS = "96:128,96:128:flip"
NUM_CLASSES = 8
TWO_STAGE = TeacherOutputs("frcnn", (), two_stage=True)
MAP_FIELDS = [f"fpn.{level}" for level in TWO_STAGE_LEVELS] + expand_fields(["head.rpn"])
PAIRS = [(0, 0), (1, 1), (2, 1), (3, 0)]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _precompute(root: Path, name: str, **options) -> str:
    config = PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"), cache=str(root / name),
                              views=VIEWS, device="cpu", shard_size=4, batch_size=1, workers=0, calibration=2,
                              progress=False, overrides={"maskd.stage1_iters": 0}, **options)   # no MasKD tokens
    run_precompute(config)
    return str(root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("frcnn")
    generate(root / "data", 4, 1, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_detector("frcnn-small", num_classes=NUM_CLASSES))
    dataset = CocoDetection(str(root / "data"), "train2017", views=parse_view_list(VIEWS), view_policy="all")
    return {"root": root, "teacher": load_teacher(None, root / "teacher.pt", NUM_CLASSES).model, "dataset": dataset,
            "lossless": _precompute(root, "lossless", codecs={"fpn": "raw", "head": "raw"}),
            "lossy": _precompute(root, "lossy")}


def batch_of(world, pairs):
    return collate([world["dataset"].load(*pair) for pair in pairs])


def student_rois(batch, seed: int) -> list[torch.Tensor]:
    """Per image: its GT boxes jittered, random boxes inside the view, and three boxes larger than the view
    (scales 160, 320 and 640 pixels: P3, P4, P5 by mmdetection's mapping; the rest go to P2)."""
    generator = torch.Generator().manual_seed(seed)
    rois = []
    for (h, w), target in zip(batch.image_sizes, batch.targets):
        gt = target["boxes"]
        sizes = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        jittered = gt + 0.1 * sizes * torch.randn(gt.shape, generator=generator)
        corners = torch.rand(12, 2, 2, generator=generator) * torch.tensor([w, h])
        random = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 2], dim=1)
        centre = torch.tensor([w / 2, h / 2]).repeat(2)
        large = torch.stack([centre + torch.tensor([-s, -s, s, s]) / 2 for s in (160.0, 320.0, 640.0)])
        rois.append(torch.cat([jittered, random, large]).float())
    return rois


@torch.no_grad()
def teacher_reference(model, batch, rois):
    """The full teacher's own ``roi_head_outputs`` on the P2..P5 maps of its own forwards, one forward per
    image at its canonical padding (as precompute ran it), the head once per canonical size; rows in batch order."""
    features = []
    for index, (h, w) in enumerate(batch.image_sizes):
        pad_h, pad_w = padded_size((h, w))
        features.append(model(batch.images[index:index + 1, :, :pad_h, :pad_w], [(h, w)]).features)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(batch.image_sizes):
        by_size.setdefault(padded_size(tuple(size)), []).append(index)
    per_image = [None] * len(rois)
    for members in by_size.values():
        maps = [torch.cat([features[i][level] for i in members]) for level in range(5)]
        outputs = model.roi_head_outputs(maps, [rois[i] for i in members], [batch.image_sizes[i] for i in members])
        for index, parts in zip(members, zip(*(o.split([len(rois[i]) for i in members]) for o in outputs))):
            per_image[index] = parts
    return tuple(torch.cat([parts[k] for parts in per_image]) for k in range(3))


def cached_partial(world, name: str) -> PartialTeacher:
    cache = open_cache(world[name])
    return OpenedTeacher(world[name], None, {}, None, None, None, cache=cache).partial_teacher("cpu")


def test_the_cache_holds_p2_to_p6_the_rpn_maps_and_the_roi_head(world):
    manifest = open_cache(world["lossless"]).manifest
    assert manifest.fields == resolve_fields("all", TWO_STAGE)
    assert set(MAP_FIELDS) <= set(manifest.fields)
    assert not [name for name in manifest.fields if name.startswith(("head.cls", "head.box", "region"))]
    assert "fpn.p7" not in manifest.fields and all(manifest["fields"][n]["lossless"] for n in manifest.fields)
    assert ROI_HEAD_ARTIFACT in manifest["declared_artifacts"]
    record = open_cache(world["lossless"]).artifacts()[ROI_HEAD_ARTIFACT]
    assert record["meta"]["settings"] == world["teacher"].roi_head_state()["settings"]
    lossy = open_cache(world["lossy"]).manifest
    assert lossy["fields"]["fpn.p2"]["codec"]["id"] == lossy["fields"]["fpn.p3"]["codec"]["id"] == "detkd.klt"
    assert all(lossy["fields"][name]["codec"] == lossy["fields"]["head.rpn.obj.p3"]["codec"]
               for name in expand_fields(["head.rpn"]))
    assert not lossy["fields"]["head.rpn.obj.p3"]["lossless"]   # fp16


def test_cached_rpn_and_fpn_maps_equal_the_online_teachers_and_the_forward(world):
    """One-view batches (as precompute ran them): exactly equal, and equal to the forward's own maps cut
    to the view's canonical region; a batch of four views of two padded widths: equal up to float rounding."""
    cached = CachedTeacher(world["lossless"], MAP_FIELDS + ["meta"])
    online = OnlineTeacher(world["teacher"], MAP_FIELDS + ["meta"])
    for pair in PAIRS:
        batch = batch_of(world, [pair])
        [a], [b] = cached.fetch(batch, None, "cpu"), online.fetch(batch, None, "cpu")
        assert sorted(a) == sorted(b) == sorted(cached.fields)
        for name in a:
            assert torch.equal(a[name], b[name]), (pair, name)
    with torch.no_grad():
        out = world["teacher"](batch.images, batch.image_sizes)
    for level, (objectness, deltas, feature) in enumerate(zip(out.rpn_objectness, out.rpn_deltas, out.features)):
        name = TWO_STAGE_LEVELS[level]
        h, w = a[f"fpn.{name}"].shape[-2:]
        assert torch.equal(a[f"head.rpn.obj.{name}"], objectness[0, :, :h, :w])
        assert torch.equal(a[f"head.rpn.box.{name}"], deltas[0, :, :h, :w])
        assert torch.equal(a[f"fpn.{name}"], feature[0, :, :h, :w])
    assert a["head.rpn.obj.p2"].shape[0] == 3 and a["head.rpn.box.p2"].shape[0] == 12  # A = 3 anchors
    batch = batch_of(world, PAIRS)
    assert len({padded_size(tuple(s)) for s in batch.image_sizes}) > 1
    for a, b in zip(cached.fetch(batch, None, "cpu"), online.fetch(batch, None, "cpu")):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("pairs", [[(0, 0)], [(1, 1)], PAIRS], ids=["view", "flipped view", "mixed batch"])
def test_the_partial_teacher_on_the_lossless_cache_equals_the_full_teacher_exactly(world, pairs):
    batch = batch_of(world, pairs)
    rois = student_rois(batch, seed=len(pairs))
    partial = cached_partial(world, "lossless")
    assert partial.fields == ["fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5"]
    assert set(partial.head.map_levels(torch.cat(rois)).tolist()) == {0, 1, 2, 3}   # every level is read
    samples = CachedTeacher(world["lossless"], partial.fields).fetch(batch, None, "cpu")
    got = partial.outputs(partial.maps(samples), rois, batch.image_sizes)
    expected = teacher_reference(world["teacher"], batch, rois)
    assert got[0].shape == (sum(len(r) for r in rois), 128, 7, 7) and got[1].shape[1] == NUM_CLASSES + 1
    for value, reference in zip(got, expected):
        assert torch.equal(value, reference)


def test_maps_padded_to_the_student_batch_would_change_the_rois_at_an_image_border(world):
    """Why the head runs per canonical size: RoIAlign near a map's last row or column clamps to that edge on
    the canonical map but mixes in zeros on a map padded for a bigger batch-mate."""
    batch = batch_of(world, PAIRS)
    rois = student_rois(batch, seed=5)
    partial = cached_partial(world, "lossless")
    maps = partial.maps(CachedTeacher(world["lossless"], partial.fields).fetch(batch, None, "cpu"))
    padded = []
    for level in range(4):
        shape = [max(m[level].shape[d] for m in maps) for d in (-2, -1)]
        stacked = torch.zeros(len(maps), maps[0][level].shape[0], *shape)
        for index, image_maps in enumerate(maps):
            stacked[index, :, :image_maps[level].shape[-2], :image_maps[level].shape[-1]] = image_maps[level]
        padded.append(stacked)
    with torch.no_grad():
        on_padding = partial.head(padded, rois, batch.image_sizes)[0]
    canonical = partial.outputs(maps, rois, batch.image_sizes)[0]
    differ = (on_padding - canonical).flatten(1).abs().amax(dim=1) > 0   # (R,)
    assert 0 < int(differ.sum()) < len(differ)


def test_online_the_teachers_own_head_runs_the_same_code_on_its_own_maps(world):
    opened = OpenedTeacher("teacher.pt", None, {}, None, None, None, model=world["teacher"])
    online = opened.partial_teacher("cpu")
    assert online.head is world["teacher"].roi_heads
    cached = cached_partial(world, "lossless")
    for pair in PAIRS:   # one-view batches: the online maps are the cached ones exactly
        batch = batch_of(world, [pair])
        rois = student_rois(batch, seed=7)
        maps = online.maps(OnlineTeacher(world["teacher"], online.fields).fetch(batch, None, "cpu"))
        cached_maps = cached.maps(CachedTeacher(world["lossless"], cached.fields).fetch(batch, None, "cpu"))
        for a, b in zip(online.outputs(maps, rois, batch.image_sizes),
                        cached.outputs(cached_maps, rois, batch.image_sizes)):
            assert torch.equal(a, b)


def test_default_codecs_move_the_roi_outputs_within_the_bound_the_codec_implies(world):
    """The klt codec bounds each map's relative RMSE by eps (its declared bound, 0.01), quantising every
    KLT coefficient with the same step, so the error is spread evenly over channels and cells. RoIAlign
    averages cells with convex weights, which cannot raise the error's energy (Jensen: a bin's squared
    error is at most the weighted mean of the squared errors it reads) and keeps the signal's local energy;
    over RoIs spread over the view the pooled relative error is therefore about eps, times the square root
    of how much more energy the maps carry on average than where the RoIs pool: tested <= 3 eps. The fcs
    then move the outputs of each RoI by at most L |dpooled|, L the product of the spectral norms of fc6,
    fc7 and the predictor (ReLU is 1-Lipschitz): tested per RoI."""
    batch = batch_of(world, PAIRS)
    rois = student_rois(batch, seed=11)
    exact_partial, lossy_partial = cached_partial(world, "lossless"), cached_partial(world, "lossy")
    exact_maps = exact_partial.maps(CachedTeacher(world["lossless"], exact_partial.fields).fetch(batch, None, "cpu"))
    lossy_maps = lossy_partial.maps(CachedTeacher(world["lossy"], lossy_partial.fields).fetch(batch, None, "cpu"))
    manifest = open_cache(world["lossy"]).manifest
    eps = manifest["fields"]["fpn.p2"]["error_bound"]["value"]
    assert eps == 0.01 and all(manifest["fields"][n]["error_bound"]["value"] == eps for n in exact_partial.fields)
    for exact_image, lossy_image in zip(exact_maps, lossy_maps):  # the codec kept its bound on every map
        for exact, lossy in zip(exact_image, lossy_image):
            assert (lossy - exact).norm() <= eps * exact.norm() * 1.001
    exact = exact_partial.outputs(exact_maps, rois, batch.image_sizes)
    lossy = lossy_partial.outputs(lossy_maps, rois, batch.image_sizes)
    pooled_error = (lossy[0] - exact[0]).flatten(1).norm(dim=1)  # (R,)
    relative = float(pooled_error.norm() / exact[0].norm())
    assert 0 < relative <= 3 * eps, relative
    head = exact_partial.head
    predictor = torch.cat([head.box_predictor.cls_score.weight, head.box_predictor.bbox_pred.weight])
    lipschitz = float(torch.linalg.matrix_norm(head.box_head.fc6.weight, 2) *
                      torch.linalg.matrix_norm(head.box_head.fc7.weight, 2) * torch.linalg.matrix_norm(predictor, 2))
    output_error = torch.cat([lossy[1] - exact[1], lossy[2] - exact[2]], dim=1).norm(dim=1)  # (R,)
    assert (output_error <= lipschitz * pooled_error * (1 + 1e-4) + 1e-6).all()
    assert float(output_error.max()) > 0


def test_the_roi_head_artefact_is_protected_by_its_sha256(world, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(world["lossless"], damaged)
    path = damaged / "artifacts" / f"{ROI_HEAD_ARTIFACT}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"artifact artifacts/{ROI_HEAD_ARTIFACT}.npz does not match its "
                                                f"sha256; the partial teacher rebuilds"):
        OpenedTeacher(str(damaged), None, {}, None, None, None, cache=open_cache(str(damaged))).partial_teacher("cpu")
    report = verify(str(damaged))
    assert [p for p in report.problems if ROI_HEAD_ARTIFACT in p] == [
        f"artifact {ROI_HEAD_ARTIFACT}: artifacts/{ROI_HEAD_ARTIFACT}.npz sha256 mismatch (corrupt bytes)"]
    assert store_cli(["verify", str(damaged)]) == 1 and store_cli(["verify", world["lossless"]]) == 0


def test_the_artefact_rebuilds_the_head_alone(world):
    arrays, meta = roi_head_artifact(world["teacher"])
    assert meta == {"format": "detkd-roi-head/1", "settings": world["teacher"].roi_head_state()["settings"]}
    stored = open_cache(world["lossless"]).artifact(ROI_HEAD_ARTIFACT)
    assert sorted(stored) == sorted(arrays) and SETTINGS_KEY in stored
    partial = PartialTeacher.from_artifact(stored)
    own = world["teacher"].roi_heads.state_dict()
    assert all(torch.equal(value, own[key]) for key, value in partial.head.state_dict().items())
    assert not any(p.requires_grad for p in partial.head.parameters()) and not partial.head.training
    with pytest.raises(ValueError, match=f"not a {ROI_HEAD_ARTIFACT} artefact"):
        PartialTeacher.from_artifact({k: v for k, v in stored.items() if k != SETTINGS_KEY})
    dense = build_detector("gfl-nano", num_classes=3)
    with pytest.raises(ValueError, match="a 'gfl' teacher has none"):
        roi_head_artifact(dense)
    with pytest.raises(ValueError, match="a 'gfl' teacher has none"):
        PartialTeacher.from_model(dense)


def test_the_partial_teacher_refuses_maps_of_another_view(world):
    batch = batch_of(world, [(0, 0)])
    partial = cached_partial(world, "lossless")
    [sample] = CachedTeacher(world["lossless"], partial.fields).fetch(batch, None, "cpu")
    maps = partial.maps([sample])
    rois = student_rois(batch, seed=0)
    with pytest.raises(ValueError, match=r"image 0 of size .*the teacher maps and the student batch disagree"):
        partial.outputs([[m[:, :-1] for m in maps[0]]], rois, batch.image_sizes)
    with pytest.raises(ValueError, match=r"the teacher samples lack \['fpn.p2'\]"):
        partial.maps([{k: v for k, v in sample.items() if k != "fpn.p2"}])


def test_each_kind_of_teacher_is_refused_the_other_kinds_fields():
    torch.manual_seed(1)
    frcnn, gfl = build_detector("frcnn-nano", num_classes=3), build_detector("gfl-nano", num_classes=3)
    assert TeacherOutputs.probe(frcnn) == TWO_STAGE
    assert TeacherOutputs.probe(gfl) == TeacherOutputs("gfl", ("head.ctr",))
    for spec, what in (("head.cls", "head.cls"), ("head.box.p3", "head.box"), ("region", "the region group"),
                       ("head.ctr", "head.ctr"), ("fpn.p7", "fpn.p7"), ("backbone", "the backbone group")):
        with pytest.raises(ValueError, match=f"a 'frcnn' teacher is a two-stage detector, so it cannot provide "
                                             f"{what}: it gives fpn.p2 .. fpn.p6"):
            resolve_fields(spec, TWO_STAGE)
    for spec, what in (("fpn.p2", "fpn.p2"), ("head.rpn", "head.rpn.obj, head.rpn.box"),
                       ("head.rpn.box.p4", "head.rpn.box")):
        with pytest.raises(ValueError, match=f"a 'gfl' teacher is a dense detector .* cannot provide {what}: those "
                                             f"are a two-stage teacher's"):
            resolve_fields(spec, TeacherOutputs.probe(gfl))
    # groups mean what the teacher gives of them; "all" leaves out the groups it gives nothing of
    assert resolve_fields("fpn", TWO_STAGE) == resolve_fields("fpn.p2,fpn.p3,fpn.p4,fpn.p5,fpn.p6")
    assert resolve_fields("head", TWO_STAGE) == resolve_fields("head.rpn")
    assert resolve_fields("all", TWO_STAGE) == resolve_fields("fpn.p2,fpn.p3,fpn.p4,fpn.p5,fpn.p6,head.rpn,meta")
    assert resolve_fields("fpn,head", TeacherOutputs.probe(gfl)) == resolve_fields("fpn,head")  # dense: unchanged
    # a method name means what its default config reads on the teacher's family; LD has no two-stage config
    assert resolve_fields("frs", TWO_STAGE) == resolve_fields("fpn.p2,fpn.p3,fpn.p4,fpn.p5,fpn.p6,head.rpn.obj")
    assert resolve_fields("defeat,icd,maskd", TWO_STAGE) == resolve_fields("fpn", TWO_STAGE)
    with pytest.raises(ValueError, match="--fields ld: LDConfig has no official settings for detector family "
                                         "'frcnn'"):
        resolve_fields("ld", TWO_STAGE)
    batch = Batch(torch.randn(1, 3, 64, 96), [(64, 96)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}],
                  [1], [0], [None], [(64, 96)])
    with pytest.raises(ValueError, match="'frcnn' teacher is a two-stage detector, so it cannot provide head.cls"):
        extract_fields(frcnn.eval(), batch, "fpn,head.cls")
    with pytest.raises(ValueError, match="'gfl' teacher is a dense detector"):
        extract_fields(gfl.eval(), batch, "head.rpn")


def test_the_schema_keeps_dense_caches_and_groups_as_they_were():
    assert expand_fields(["fpn"]) == [f"fpn.p{i}" for i in range(3, 8)]
    assert expand_fields(["head"]) == expand_fields(["head.cls", "head.box"])
    assert FIELDS["fpn.p2"].optional and FIELDS["fpn.p2"].level == "p2" and FIELDS["fpn.p2"].default_codec == "klt"
    assert all(FIELDS[n].optional and FIELDS[n].default_codec == "fp16" for n in expand_fields(["head.rpn"]))
    assert expand_fields(["head.rpn"]) == [f"head.rpn.{kind}.p{i}" for kind in ("obj", "box") for i in range(2, 7)]
    dense = make_sample(3, 1)
    two_stage = make_sample(3, 1, fields=["fpn.p2", "fpn", "head.rpn", "meta"])
    validate_sample(two_stage, list(two_stage))
    assert all(np.array_equal(two_stage[name], dense[name]) for name in dense if name in two_stage)
    assert two_stage["fpn.p2"].shape[1:] == tuple(2 * d for d in two_stage["fpn.p3"].shape[1:])
    assert "fpn.p2" not in dense and not any(name.startswith("head.rpn") for name in dense)
