"""Two-stage students in the trainer (issue 14): a Faster R-CNN student distils from a Faster R-CNN
teacher's cache (P2..P6, the RPN maps) and, through the partial teacher, from its RoI head.

One tiny synthetic set, one random frcnn-small teacher and one lossless cache of "all", built once per
module with precompute's own API.
"""
from dataclasses import dataclass

import pytest
import torch

from detectors import build_detector, save_checkpoint
from detectors.frcnn import TwoStageOutput
from detectors.synth import SynthConfig, generate
from detectors.data import CocoDetection
from detectors.views import collate, parse_view_list
from precompute.config import PrecomputeConfig
from precompute.pipeline import run_precompute
from precompute.teacher import load_teacher
from store import open_cache
from store.schema import TWO_STAGE_LEVELS
from train.config import TrainConfig
from train.methods import build_method
from train.methods.base import DistillationMethod, MethodConfig, pyramid_fields
from train.sources import CachedTeacher, OnlineTeacher
from train.teacher_batch import collate_teacher, level_names
from train.teacher_source import OpenedTeacher
from train.trainer import DistillationModel, StudentTrainer

VIEWS = "96:128,96:128:flip"
NUM_CLASSES = 8
STRIDES = (4, 8, 16, 32, 64)

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("two_stage")
    generate(root / "data", 8, 4, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_detector("frcnn-small", num_classes=NUM_CLASSES))
    run_precompute(PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"), cache=str(root / "cache"),
                                    views=VIEWS, device="cpu", shard_size=4, batch_size=2, workers=0, calibration=2,
                                    progress=False, codecs={"fpn": "raw", "head": "raw"},
                                    overrides={"maskd.stage1_iters": 1, "maskd.stage1_batch_size": 2}))
    return {"root": root, "cache": str(root / "cache"), "teacher": load_teacher(None, root / "teacher.pt",
                                                                                NUM_CLASSES).model}


def train_config(world, name: str, **keys) -> TrainConfig:
    values = dict(method="none", student="frcnn-nano", data=str(world["root"] / "data"), cache=world["cache"],
                  out=str(world["root"] / name), epochs=1, batch_size=4, workers=0, progress=False, tensorboard=False)
    return TrainConfig(**{**values, **keys})


def test_level_names_follow_the_strides():
    assert level_names(STRIDES) == list(TWO_STAGE_LEVELS)
    assert level_names((8, 16, 32, 64, 128)) == ["p3", "p4", "p5", "p6", "p7"]
    with pytest.raises(ValueError, match="power of 2"):
        level_names((12,))


def test_collate_teacher_lays_out_a_two_stage_pyramid_and_its_rpn_maps():
    """P2..P6 and head.rpn.* of two images of different sizes, top-left on the batch grids of strides 4..64."""
    sizes = [(64, 96), (96, 64)]
    samples = []
    for h, w in sizes:
        sample = {}
        for level, stride in zip(TWO_STAGE_LEVELS, STRIDES):
            hl, wl = -(-h // stride), -(-w // stride)   # canonical region of a size divisible by 32
            sample[f"fpn.{level}"] = torch.rand(4, hl, wl)
            sample[f"head.rpn.obj.{level}"] = torch.rand(3, hl, wl)
            sample[f"head.rpn.box.{level}"] = torch.rand(12, hl, wl)
        samples.append(sample)
    level_sizes = [(-(-96 // s), -(-96 // s)) for s in STRIDES]
    teacher = collate_teacher(samples, level_sizes, "cpu", image_sizes=sizes, strides=STRIDES)
    assert len(teacher.fpn) == len(teacher.rpn_obj) == len(teacher.rpn_box) == 5
    assert teacher.cls is None and teacher.box is None and teacher.roi_head is None
    assert teacher.valid_sizes[0][0] == (16, 24) and teacher.valid_sizes[1][0] == (24, 16)   # P2, stride 4
    for index, sample in enumerate(samples):
        h, w = teacher.valid_sizes[index][0]
        assert torch.equal(teacher.rpn_obj[0][index, :, :h, :w], sample["head.rpn.obj.p2"])
        assert teacher.fpn[0][index, :, h:, :].abs().sum() == 0 and teacher.fpn[0][index, :, :, w:].abs().sum() == 0
        assert int(teacher.valid[0][index].sum()) == h * w


def test_a_two_stage_method_reads_p2_to_p6():
    assert pyramid_fields("frcnn") == tuple(f"fpn.{level}" for level in TWO_STAGE_LEVELS)
    assert pyramid_fields("gfl") == ("fpn",)
    method = build_method("none", "frcnn")
    assert method.family == "frcnn" and not method.reads_teacher_roi_head


def test_a_frcnn_student_trains_and_evaluates_from_the_cache_and_inherits_its_teachers_heads(world):
    results = StudentTrainer(train_config(world, "none", max_iters=2)).train()
    assert results["iterations"] == 2 and {"rpn_cls", "rpn_box", "cls", "box"} <= set(results["last_losses"])
    assert 0 <= results["final"]["AP"] <= 100
    trainer = StudentTrainer(train_config(world, "inherit", student="frcnn-small", inherit=True, eval=False,
                                           seed=1))   # the teacher was drawn from seed 0
    teacher_state, student_state = world["teacher"].state_dict(), trainer.student.state_dict()
    inherited = [key for key in student_state if key.startswith(("backbone.fpn.", "rpn.", "roi_heads."))]
    assert any(key.startswith("roi_heads.") for key in inherited) and any(key.startswith("rpn.") for key in inherited)
    for key in inherited:
        assert torch.equal(student_state[key], teacher_state[key]), key
    assert not torch.equal(student_state["backbone.body.conv1.weight"], teacher_state["backbone.body.conv1.weight"])


@dataclass(frozen=True)
class _RecordConfig(MethodConfig):
    FAMILY_DEFAULTS = {"frcnn": {}}


class _RecordRoIHead(DistillationMethod):
    """Records the teacher's RoI outputs on the student's RoIs (what a two-stage method compares)."""

    NAME = "record_roi_head"
    FIELDS = pyramid_fields("frcnn")   # P2..P6: the RoI head reads P2..P5 of them
    Config = _RecordConfig

    @property
    def reads_teacher_roi_head(self) -> bool:
        return True

    def forward(self, student: TwoStageOutput, teacher, targets, iteration):
        self.recorded = (student.rois, teacher.roi_head(student.rois))
        return {}


def test_the_trainer_binds_the_teachers_roi_head_to_the_batch_cached_and_online_alike(world):
    """The RoI outputs a method gets on the student's sampled RoIs: from the lossless cache those of the online
    teacher on the same batch (tests/test_partial_teacher.py: exactly, one view per batch), and the same RoIs."""
    opened = {"cache": OpenedTeacher(world["cache"], None, {}, None, None, None, cache=open_cache(world["cache"])),
              "online": OpenedTeacher("teacher.pt", None, {}, None, None, None, model=world["teacher"])}
    method = _RecordRoIHead(_RecordConfig())
    cache = CachedTeacher(world["cache"], method.fields)
    sources = {"cache": cache, "online": OnlineTeacher(world["teacher"], method.fields)}
    dataset = CocoDetection(str(world["root"] / "data"), "train2017", views=parse_view_list(VIEWS), view_policy="all")
    batch = collate([dataset.load(image, view) for image, view in [(0, 0), (1, 1), (2, 0), (3, 1)]])
    recorded = {}
    for mode in ("cache", "online"):
        samples = sources[mode].fetch(batch, None, "cpu")
        torch.manual_seed(1)   # the same student and RoI sampling in both modes
        student = build_detector("frcnn-nano", num_classes=NUM_CLASSES).train()
        model = DistillationModel(student, method, opened[mode].partial_teacher("cpu"))
        model(batch, samples, iteration=0)
        recorded[mode] = method.recorded
    rois, cached = recorded["cache"]
    assert sum(len(r) for r in rois) == cached[1].shape[0] and cached[1].shape[1] == NUM_CLASSES + 1
    assert all(torch.equal(a, b) for a, b in zip(rois, recorded["online"][0]))
    for a, b in zip(cached, recorded["online"][1]):   # the online teacher pads views of other sizes together
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# Every method with official Faster R-CNN settings, with its terms; DeFeat with its RoI-head term on too.
TWO_STAGE_RUNS = {"frs": ({}, {"frs_feat", "frs_cls"}),
                  "icd": ({"icd.detach_student_iters": 0}, {"icd_distill"}),
                  "maskd": ({"maskd.student_mask_warmup": 0}, {"maskd_feat", "maskd_head"}),
                  "defeat": ({"defeat.head_fg_weight": 2.0, "defeat.head_bg_weight": 2.0},
                             {"defeat_fg", "defeat_bg", "defeat_head_fg", "defeat_head_bg"})}


@pytest.mark.parametrize("method", sorted(TWO_STAGE_RUNS))
def test_each_method_trains_a_frcnn_student_from_the_cache_as_from_the_online_teacher(world, method):
    """Two steps of each method on a frcnn student: the same terms from the lossless cache as from the online
    teacher (up to the float rounding of the online teacher's batch padding), every one finite."""
    overrides, terms = TWO_STAGE_RUNS[method]
    values = {}
    for mode in ("cache", "online"):
        where = {} if mode == "cache" else {"cache": None, "teacher": str(world["root"] / "teacher.pt"),
                                            "views": VIEWS, "artifacts_from": world["cache"]}
        config = train_config(world, f"{method}_{mode}", method=method, max_iters=2, eval=False,
                              overrides=overrides, **where)
        values[mode] = StudentTrainer(config).train()["last_losses"]
    assert terms <= set(values["cache"])
    for name in terms:
        assert values["cache"][name] > 0 and values["cache"][name] == pytest.approx(values["online"][name], rel=1e-3)


def test_a_stopped_and_resumed_frcnn_run_ends_with_the_weights_of_an_uninterrupted_run(world):
    """DeFeat with its RoI-head term (the partial teacher on the student's sampled RoIs: RoI sampling draws
    from the global RNG), stopped mid-run and resumed with a loader worker."""
    options = dict(method="defeat", epochs=2, eval=False, ckpt_every=1,
                   overrides={"defeat.head_fg_weight": 2.0, "defeat.head_bg_weight": 2.0})
    StudentTrainer(train_config(world, "resume_full", **options)).train()
    assert StudentTrainer(train_config(world, "resume_cut", stop_after=3, **options)).train()["status"] == "stopped"
    StudentTrainer(train_config(world, "resume_cut", resume=True, workers=1, **options)).train()
    full, cut = (torch.load(world["root"] / run / "last.pt", weights_only=True) for run in ("resume_full", "resume_cut"))
    assert full["extra"]["train_state"]["iteration"] == cut["extra"]["train_state"]["iteration"] == 4
    for name, value in full["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][name]), name
    method_full, method_cut = (run["extra"]["train_state"]["method"] for run in (full, cut))
    for name, value in method_full.items():
        assert torch.equal(value, method_cut[name]), name


def test_the_registry_listing_names_what_a_method_reads_on_a_two_stage_family():
    from train.methods import METHODS
    from train.methods.__main__ import describe
    assert "frcnn: fpn.p2, fpn.p3, fpn.p4, fpn.p5, fpn.p6, head.rpn.obj" in describe(METHODS["frs"])
    assert "frcnn: fpn.p2, fpn.p3, fpn.p4, fpn.p5, fpn.p6\n" in describe(METHODS["defeat"]) + "\n"


def test_a_teacher_whose_rpn_anchors_differ_is_refused_for_its_rpn_maps(world):
    """FRS compares RPN objectness per anchor: the teacher's anchors must be the student's."""
    with pytest.raises(ValueError, match=r"cannot be paired .*\['head.rpn.obj'\]: RPN anchor_scale: teacher 8.0, "
                                         r"student 4.0"):
        StudentTrainer(train_config(world, "anchors", method="frs", eval=False,
                                    student_config={"anchor_scale": 4.0}))
    with pytest.raises(ValueError, match=r"cannot be paired .*\['the RoI head'\]: classes: teacher 8, data/student 3"):
        OpenedTeacher(world["cache"], {"family": "frcnn", "num_classes": 8}, {}, None, None, None).check_pairing(
            [], build_detector("frcnn-nano", num_classes=3), 3, roi_head=True)
