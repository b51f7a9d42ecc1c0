"""A distillation method defined in this one file joins the registry (``register_method``), and every
entry point takes it with no other file changed: ``precompute --fields toy`` caches what it reads
and makes its artefact with its own maker, ``python -m train`` trains it from that cache,
``train.sweep`` runs it (in a child process that registers it from this file), ``train.report``
tables it and ``train.viz`` draws its picture.

The toy reads the teacher's FPN, one per-cache artefact (the teacher's mean P3 channel, made once
by precompute) and adds one loss term: the squared error between the student's adapted P3 and the
teacher's P3 less that mean.
"""
import csv
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from detectors import build_detector, save_checkpoint
from detectors.synth import SynthConfig, generate
from detectors.views import collate
from store import STRIDES, open_cache
from train.methods import METHODS, DistillationMethod, MethodConfig, register_method
from train.methods.base import require

TOY_ARTIFACT = "toy_channel_mean"
SETTINGS = {"epochs": 1, "batch_size": 2, "warmup_iters": 1, "workers": 0, "eval_batch_size": 2,
            "tensorboard": False}


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    weight: float = 1.0        # of the feature term

    FAMILY_DEFAULTS = {"retina": {}, "gfl": {"weight": 2.0}}


class Toy(DistillationMethod):
    NAME = "toy"
    FIELDS = ("fpn",)
    ARTIFACTS = (TOY_ARTIFACT,)
    Config = ToyConfig
    PICTURE_FIELDS = ("fpn",)
    PICTURE_HELP = "toy: the teacher's P3 energy, mean over channels of its square"

    def __init__(self, config: ToyConfig, channel_mean: torch.Tensor, student_channels: int,
                 teacher_channels: int) -> None:
        super().__init__(config)
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.register_buffer("channel_mean", channel_mean.float())  # (C_t,)

    @classmethod
    def make_artifact(cls, name, inputs):
        """The teacher's P3 averaged over the first view of the first image, per channel."""
        batch = collate([inputs.dataset.load(0, 0)]).to(inputs.device)
        with torch.no_grad():
            p3 = inputs.teacher_model(batch.images, batch.image_sizes).features[0]  # (1, C, H, W)
        return {"mean": p3.mean(dim=(0, 2, 3)).cpu()}, {"images": 1}

    @classmethod
    def prepare(cls, config, run):
        return torch.as_tensor(run.artifact(TOY_ARTIFACT, "the toy reads the teacher's mean P3 channel")["mean"])

    @classmethod
    def build(cls, config, context):
        return cls(config, context.prepared[cls.NAME], context.student_channels, context.teacher_channels)

    def forward(self, student, teacher, targets, iteration):
        teacher_p3 = require(teacher.fpn, "fpn", "toy")[0]  # (N, C_t, H, W), zero outside valid
        valid = teacher.valid[0]  # (N, 1, H, W)
        target = teacher_p3 - self.channel_mean[None, :, None, None]
        error = (self.adapter(student.features[0]) - target) ** 2 * valid  # (N, C_t, H, W)
        return {"toy_feat": self.config.weight * error.sum() / (valid.sum() * target.shape[1]).clamp(min=1)}

    @classmethod
    def draw_picture(cls, painter, view):
        from matplotlib.colors import Normalize

        from train import viz
        painter.require(view, cls.NAME, cls.PICTURE_FIELDS)
        energy = view.level_maps("fpn")[0].pow(2).mean(dim=0).numpy()  # (h_3, w_3)
        fig, axes = viz.new_figure(1, 1, view.image_hw)
        viz.show_view(axes[0, 0], view, grey=True)
        viz.overlay_map(axes[0, 0], energy, STRIDES[0], view, Normalize(0, float(energy.max()) or 1.0))
        return painter.save(fig, view, cls.NAME)


@pytest.fixture(scope="module")
def toy():
    """The toy in the registry for this file's tests only."""
    register_method(Toy)
    yield Toy
    METHODS.pop(Toy.NAME)


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy):
    """Tiny synthetic data, a random gfl-small teacher and a cache made by ``precompute --fields toy``."""
    from precompute.__main__ import main as precompute
    root = tmp_path_factory.mktemp("toy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(root / "data", 4, 2, SynthConfig(size=64, max_side=48), seed=5, progress=False)
        torch.manual_seed(0)
        save_checkpoint(root / "teacher.pt", build_detector("gfl-small", num_classes=8))
        status = precompute(["--ckpt", str(root / "teacher.pt"), "--data", str(root / "data"), "--cache",
                             str(root / "cache"), "--views", "64:96", "--fields", "toy", "--device", "cpu",
                             "--shard-size", "4", "--batch-size", "4", "--workers", "0", "--calibration", "4",
                             "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return root


def test_registration_refuses_taken_names(toy):
    register_method(Toy)  # the same class again: nothing changes
    assert list(METHODS)[-1] == "toy"
    for name in ("frs", "fpn", "all", "a+b", "my_toy"):
        clash = type("Clash", (Toy,), {"NAME": name})
        with pytest.raises(ValueError, match="Clash"):
            register_method(clash)
    assert "fpn" not in METHODS


def test_precompute_caches_its_fields_and_makes_its_artefact(world):
    cache = open_cache(str(world / "cache"))
    assert {name.split(".")[0] for name in cache.manifest.fields} == {"fpn", "meta"}
    artefacts = cache.artifacts()
    assert TOY_ARTIFACT in artefacts and artefacts[TOY_ARTIFACT]["meta"]["images"] == 1
    assert "seconds" in artefacts[TOY_ARTIFACT]["meta"]
    assert cache.artifact(TOY_ARTIFACT)["mean"].shape == (build_detector("gfl-small", num_classes=8).config.fpn_channels,)


def test_train_trains_it_from_the_cache(world, tmp_path):
    from train.__main__ import main as train
    out = tmp_path / "run"
    status = train(["--method", "toy", "--set", "toy.weight=0.5", "--student", "gfl-nano", "--data",
                    str(world / "data"), "--cache", str(world / "cache"), "--out", str(out), "--epochs", "1",
                    "--batch-size", "2", "--warmup-iters", "1", "--workers", "0", "--no-eval", "--no-tensorboard",
                    "--no-progress"])
    assert status == 0
    assert json.loads((out / "results.json").read_text())["method"] == "toy"
    with (out / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(row["toy_feat"]) > 0 for row in rows)


@pytest.mark.slow
def test_sweep_runs_it_and_report_and_viz_show_it(world, tmp_path, monkeypatch):
    from train.report import main as report
    from train.sweep import sweep
    from train.viz import build_parser as viz_parser
    from train.viz import draw
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # the sweep's children share two cores with this process
    out = tmp_path / "sweep"
    result = sweep(out, ["none", "toy"], [0], str(world / "data"), str(world / "cache"), "gfl-nano",
                   settings={**SETTINGS, "toy.weight": 0.5}, progress=False)
    assert result["outcome"]["failed"] == [] and sorted(result["outcome"]["finished"]) == ["none_s0", "toy_s0"]
    run_file = json.loads((out / "runs" / "toy_s0" / "run.json").read_text())
    assert run_file["method_sources"] == {"toy": f"{__file__}:Toy"}

    assert report([str(out), "--no-figures"]) == 0
    with (out / "results.csv").open(newline="") as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["none", "toy"]

    paths = draw(world / "data", world / "cache", tmp_path / "viz", num_images=1, what="toy")
    assert [path.name.rsplit("_", 1)[1] for path in paths] == ["toy.png"]
    assert "toy" in viz_parser().format_help()
