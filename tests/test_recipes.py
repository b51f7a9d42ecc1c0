"""Named recipes (train/recipes.py): every recipe is a complete configuration that precompute, the
trainer, the sweep and the zoo accept; the command lines take a recipe with explicit options over it;
and two recipes run end to end (precompute + a few iterations) with small zoo models on a tiny set."""
import json
import re
from pathlib import Path

import pytest
import torch

from detectors import build_detector, list_models, save_checkpoint
from detectors.backbone import resnet_stage_channels
from detectors.convert import mmdet_config_overrides
from detectors.synth import SynthConfig, generate
from detectors.views import parse_view_list
from detectors.zoo import get_config
from precompute.config import PrecomputeConfig
from precompute.fields import artifacts_for, resolve_fields
from train.config import TrainConfig, train_option_rules
from train.methods import METHODS, MethodSpec, build_method, check_overrides
from train.methods.maskd_tokens import MASKD_ARTIFACT
from train.recipes import EVAL_VIEW, RECIPES, TEACHER_NECKS, get_recipe
from train.run import resolve_config
from train.sweep import apply_recipe, build_parser as sweep_parser, plan_runs

METHODS_MD = Path(__file__).resolve().parents[2] / "shared" / "METHODS.md"
SCHEDULES = {"1x": 12, "2x": 24}
NAMES = list(RECIPES)


class StubTokens:
    """Stands in for MasKD's stage-1 tokens where only the method's fields are asked for."""

    def masks(self, features, level):
        return features[:, :6].sigmoid()

    def weights(self, features, level):
        return torch.full((features.shape[0], 6), 1 / 6)


def test_every_method_has_a_recipe():
    assert {r.method for r in RECIPES.values()} == set(METHODS) - {"none"}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_is_a_complete_valid_configuration(name):
    r = get_recipe(name)
    assert r.teacher in list_models() and r.student in list_models()
    teacher, student = get_config(r.teacher), get_config(r.student, **r.student_config)
    assert teacher.family == student.family == r.family
    assert name == f"{r.method}-{r.family}-r{teacher.depth}-r{student.depth}-{r.schedule}"

    # trainer: every option passes its rule and TrainConfig takes the whole recipe
    assert {"epochs", "milestones", "batch_size", "optimizer", "lr", "warmup_iters", "clip_grad",
            "eval_view"} <= set(r.train)
    rules = train_option_rules()
    for key, value in r.train.items():
        rules[key].check(value, key)
    config = TrainConfig(data="d", out="o", cache="c", **r.train_options())
    assert config.epochs == SCHEDULES[r.schedule] and config.eval_view == EVAL_VIEW
    assert config.milestones[0] == config.epochs * 8 / 12 and config.milestones[-1] <= config.epochs * 11 / 12

    # method: overrides pass the config rules of the recipe's family; the cache holds what the method reads
    check_overrides(r.method, r.overrides)
    assert all(key.split(".", 1)[0] in MethodSpec.parse(r.method) for key in r.overrides)
    method = build_method(r.method, r.family, r.overrides, prepared={"maskd": StubTokens()},
                          student_backbone_channels=resnet_stage_channels(student.depth, student.widths),
                          teacher_backbone_channels=resnet_stage_channels(teacher.depth, teacher.widths))
    PrecomputeConfig(ckpt="teacher.pth", data="d", cache="c", **r.precompute_options(),
                     overrides=r.precompute_settings(r.precompute["fields"]))
    parse_view_list(r.precompute["views"])
    cached = resolve_fields(r.precompute["fields"])
    assert set(resolve_fields(list(method.fields))) <= set(cached), (method.fields, cached)
    if r.method == "maskd":
        assert MASKD_ARTIFACT in artifacts_for(r.precompute["fields"])
        assert r.precompute_settings(r.precompute["fields"])["maskd.stage1_iters"] == 2000

    # the student's neck is the teacher code base's (inherit and FPN comparisons need it)
    neck = TEACHER_NECKS[r.teacher_source][r.family]
    assert {key: getattr(student, key) for key in neck} == neck
    if r.teacher_source == "mmdet":
        assert neck == mmdet_config_overrides(r.family)
    if r.train.get("inherit"):
        for key in ("fpn_channels", "head_convs", "reg_max", "num_classes"):  # reg_max: GFL's key only
            assert teacher.to_dict().get(key) == student.to_dict().get(key)

    # the sweep accepts the recipe as its settings
    runs = plan_runs("out", ["none", r.method], [0], "d", "c", r.student, settings=r.sweep_settings(["none", r.method],
                                                                                                      r.student))
    assert runs[1].config.overrides == r.overrides and runs[0].config.overrides == {}


@pytest.mark.parametrize("name", NAMES)
def test_expected_numbers_are_the_published_ones(name):
    e = get_recipe(name).expected
    assert e.ap > e.baseline_ap and e.source
    if not METHODS_MD.is_file():
        pytest.skip(f"{METHODS_MD} is absent")
    text = METHODS_MD.read_text()
    method = get_recipe(name).method
    section = re.search(rf"^## {re.escape(method)}\b.*?(?=^## )", text, re.S | re.I | re.M).group(0)
    assert f"{e.baseline_ap} → {e.ap}" in section or (f"{e.baseline_ap} →" in section and f"{e.ap}" in section)


def test_listing(capsys):
    from train.recipes import main
    assert main([]) == 0
    out = capsys.readouterr().out
    for r in RECIPES.values():
        assert r.name in out and f"{r.expected.baseline_ap} -> {r.expected.ap}" in out
    assert main(["ld-gfl-r101-r50-1x"]) == 0 and "ld.imitation_weight=2.0" in capsys.readouterr().out
    from train.__main__ import main as train_main
    assert train_main(["--recipe", "list"]) == 0 and "maskd-retina-r101-r50-2x" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_explicit_options_override_the_recipe():
    base = ["--data", "d", "--cache", "c", "--out", "o"]
    config = resolve_config(["--recipe", "frs-retina-r101-r50-2x", *base, "--epochs", "12", "--set", "feat_weight=0.2",
                             "--student-config", "norm=bn", "--no-eval"])
    assert (config["method"], config["student"], config["batch_size"], config["lr"]) == ("frs", "retina-r50", 16, 0.01)
    assert config["epochs"] == 12 and config["milestones"] == (8, 11)     # steps moved with the epochs
    assert config["overrides"] == {"frs.feat_weight": 0.2, "frs.cls_weight": 0.02, "frs.warmup_iters": 500}
    assert config["student_config"]["norm"] == "bn" and config["student_config"]["p6_from"] == "c5"
    assert config["eval"] is False
    config = resolve_config(["--recipe", "maskd-retina-r101-r50-2x", *base, "--student", "retina-nano", "--no-inherit",
                             "--lr", "0.03"])
    assert config["student_config"] == {} and config["inherit"] is False and config["lr"] == 0.03
    assert config["milestones"] == (16, 22)
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config(["--recipe", "frs-nope", *base])
    recipe = get_recipe("icd-retina-r101-r50-1x")
    assert recipe.apply_train(resolve_config(base), set(), world_size=8)["batch_size"] == 2
    with pytest.raises(ValueError, match="does not split"):
        get_recipe("ld-gfl-r101-r50-1x").apply_train(resolve_config(base), set(), world_size=8)

    from precompute.__main__ import build_parser
    from train.recipes import explicit_dests
    from precompute.fields import parse_method_settings
    from train.options import split_assignments
    argv = ["--recipe", "maskd-retina-r101-r50-2x", "--ckpt", "t", "--data", "d", "--cache", "c",
            "--set", "stage1_iters=5"]
    args = build_parser().parse_args(argv)
    recipe = get_recipe(args.recipe)
    recipe.apply_precompute(args, explicit_dests(build_parser(), argv))
    assert (args.teacher, args.views, args.fields) == ("retina-r101", "default", "maskd")
    settings = recipe.precompute_settings(args.fields, parse_method_settings(args.fields,
                                                                             split_assignments(args.overrides, "--set")))
    assert (settings["maskd.stage1_iters"], settings["maskd.stage1_batch_size"]) == (5, 16)   # per key
    # another --fields: the recipe's settings of the methods it no longer names are left out
    assert recipe.precompute_settings("frs") == {}

    argv = ["--recipe", "ld-gfl-r101-r50-1x", "--cache", "c", "--data", "d", "--set", "epochs=6"]
    args = sweep_parser().parse_args(argv)
    settings = apply_recipe(args, {"epochs": 6}, {}, argv)
    assert args.methods == ["ld"] and args.student == "gfl-r50"
    assert settings["epochs"] == 6 and settings["milestones"] == (4, 5.5) and settings["lr"] == 0.0025


# ---------------------------------------------------------------------------------------------- small variants
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    generate(root / "data", 4, 2, SynthConfig(size=64, max_side=48), seed=5, progress=False)
    torch.manual_seed(0)
    for name in ("retina-nano", "gfl-nano"):
        save_checkpoint(root / f"{name}.pt", build_detector(name, num_classes=8))
    return root


@pytest.mark.parametrize("name, small", [("maskd-retina-r101-r50-2x", "retina-nano"),
                                         ("ld-gfl-r101-r50-1x", "gfl-nano"),
                                         ("defeat-retina-r101-r50-1x", "retina-nano")])
def test_small_variant_runs(tiny, tmp_path, name, small):
    """The recipe with small zoo models and tiny views: precompute, then two training iterations; everything
    not given here (fields, MasKD stage 1, lr, inherit, method weights) is the recipe's."""
    from precompute.__main__ import main as precompute_main
    from train.__main__ import main as train_main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache, out = tmp_path / "cache", tmp_path / "run"
        assert precompute_main(["--recipe", name, "--teacher", small, "--ckpt", str(tiny / f"{small}.pt"),
                                "--data", str(tiny / "data"), "--cache", str(cache), "--views", "64:96,64:96:flip",
                                "--device", "cpu", "--shard-size", "4", "--batch-size", "4", "--workers", "0",
                                "--calibration", "4", "--no-progress",
                                *(["--set", "maskd.stage1_iters=1", "--set", "maskd.stage1_batch_size=2"]
                                  if get_recipe(name).method == "maskd" else [])]) == 0
        assert train_main(["--recipe", name, "--student", small, "--data", str(tiny / "data"), "--cache", str(cache),
                           "--out", str(out), "--epochs", "1", "--batch-size", "2", "--max-iters", "2",
                           "--warmup-iters", "1", "--workers", "0", "--device", "cpu", "--no-eval",
                           "--no-tensorboard", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    recipe = get_recipe(name)
    assert results["iterations"] == 2 and results["method"] == recipe.method
    config = results["config"]
    assert config["lr"] == recipe.train["lr"] and config["inherit"] == recipe.train.get("inherit", False)
    assert config["overrides"] == recipe.overrides and config["student"] == small
