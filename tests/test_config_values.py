"""Every command-line value is checked against its config field before any work (GitHub issue #10,
"The cache never lies"): ``python -m train --set``, ``python -m train.sweep --set/--grid`` (and so
the Makefile's EXTRA/GRID), and ``python -m precompute``'s options. A refusal is one line naming
the key and the value, exit status 2 (precompute: 1), never a traceback.

Before: an empty ``--set frs.feat_weight=`` turned the term off and the run exited 0, still called
frs; ``abc`` and ``nan`` failed at the first step with a TypeError; ``warmup_iters=2.5`` was taken;
``python -m train.sweep --set epochs=abc`` and ``python -m precompute --shard-size 0`` printed
tracebacks.
"""
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train.__main__ import main as train_main
from train.config import TrainConfig, train_option_rules
from train.methods import METHODS, build_method, parse_overrides
from train.methods.base import METHOD_LIMITS, SettingError, config_rules
from train.sweep import main as sweep_main
from train.sweep import parse_grid, parse_settings, plan_runs

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# ---------------------------------------------------------------------------------------------- method overrides
@pytest.mark.parametrize("spec, key, text, message", [
    ("frs", "frs.feat_weight", "", "--set frs.feat_weight='': empty value; expected a float >= 0"),
    ("frs", "frs.feat_weight", "  ", "empty value"),
    ("frs", "feat_weight", "abc", "--set feat_weight='abc': not a number; expected a float >= 0"),
    ("frs", "frs.feat_weight", "nan", "not finite"),
    ("frs", "frs.feat_weight", "inf", "not finite"),
    ("frs", "frs.feat_weight", "-0.1", "out of range; expected a float >= 0"),
    ("frs", "frs.warmup_iters", "2.5", "--set frs.warmup_iters='2.5': not an int; expected an int >= 0"),
    ("frs", "frs.warmup_iters", "2.0", "not an int"),
    ("frs", "frs.warmup_iters", "1e3", "not an int"),
    ("frs", "frs.warmup_iters", "-1", "out of range"),
    ("icd", "icd.temperature", "0", "out of range; expected a float > 0"),
    ("icd", "icd.lr", "0", "expected a float > 0"),
    ("icd", "icd.num_heads", "0", "expected an int >= 1"),
    ("ld", "ld.kd_temperature", "-2", "expected a float > 0"),
    ("ld", "ld.vlr_rule", "", "empty value; expected a non-empty string"),
    ("ld", "ld.vlr_rule", "nearest", "vlr_rule must be one of"),   # the config's own check, run now
    ("maskd", "maskd.student_mask_warmup", "x", "not an int; expected an int >= 0"),
])
def test_bad_override_values_are_refused_naming_key_value_and_type(spec, key, text, message):
    with pytest.raises(SettingError) as error:
        parse_overrides(spec, {key: text})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_override_values_are_parsed_by_their_fields_type():
    parsed = parse_overrides("frs+ld", {"frs.feat_weight": "0.2", "warmup_iters": "2", "ld.kd_weight": "1e-1",
                                        "ld.vlr_kd_weight": "0", "ld_temperature": "5"})
    assert parsed == {"frs.feat_weight": 0.2, "warmup_iters": 2, "ld.kd_weight": 0.1, "ld.vlr_kd_weight": 0,
                      "ld_temperature": 5}
    assert type(parsed["warmup_iters"]) is int


@pytest.mark.parametrize("spec, overrides, message", [
    ("frs", {"frs.feat_wieght": "1"}, "known keys: ['frs.feat_weight', 'frs.cls_weight', 'frs.warmup_iters']"),
    ("frs+icd", {"warmup_iters": "1"}, "ambiguous override keys"),
    ("none", {"feat_weight": "1"}, "unknown override keys ['feat_weight']"),
])
def test_unknown_and_ambiguous_keys_are_refused_listing_the_valid_ones(spec, overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_overrides(spec, overrides)


@pytest.mark.parametrize("value", ["", "0.2", float("nan"), -1.0, None, True])
def test_build_method_refuses_values_that_do_not_fit(value):
    with pytest.raises(SettingError, match="frs.feat_weight|feat_weight="):
        build_method("frs", "gfl", {"frs.feat_weight": value})


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_field_has_a_rule_its_defaults_fit(name):
    config_cls = METHODS[name].Config
    rules = config_rules(config_cls, METHOD_LIMITS)
    assert set(rules) == {f.name for f in dataclasses.fields(config_cls)}
    for family in config_cls.FAMILY_DEFAULTS:
        for key, value in config_cls.for_family(family).to_dict().items():
            rules[key].check(value, f"{name}.{key}")


def test_every_trainer_option_has_a_rule_its_defaults_fit():
    rules = train_option_rules()
    for key, value in TrainConfig(data="d", out="o", cache="c").to_dict().items():
        rules[key].check(tuple(value) if isinstance(value, list) else value, key)


# ---------------------------------------------------------------------------------------------- parsers from configs
def test_a_bare_command_line_gives_the_configs_defaults():
    from precompute.__main__ import build_parser as precompute_parser
    from precompute.config import PrecomputeConfig
    from train.__main__ import build_parser as train_parser
    from train.config import config_from_args
    from train.options import config_values
    args = train_parser().parse_args(["--data", "d", "--out", "o", "--cache", "c"])
    assert TrainConfig(**config_from_args(args)) == TrainConfig(data="d", out="o", cache="c")
    options = config_values(precompute_parser().parse_args(["--ckpt", "t", "--data", "d", "--cache", "c"]),
                            PrecomputeConfig)
    assert PrecomputeConfig(**{**options, "codecs": {}}) == PrecomputeConfig(ckpt="t", data="d", cache="c")


def test_options_are_named_by_their_config_keys():
    from train.__main__ import build_parser
    from train.recipes import explicit_dests
    argv = ["--data", "d", "--out", "o", "--cache", "c", "--no-eval", "--set", "frs.feat_weight=1",
            "--student-config", "norm=bn", "--no-inherit", "--milestones", "4", "5"]
    assert explicit_dests(build_parser(), argv) == {"data", "out", "cache", "eval", "overrides", "student_config",
                                                    "inherit", "milestones"}
    args = build_parser().parse_args(argv)
    assert (args.eval, args.tensorboard, args.inherit, args.milestones) == (False, True, False, [4.0, 5.0])


def test_the_amp_choices_are_the_runtimes_dtypes():
    """The configs spell the --amp names so that --help imports no torch; they must stay the runtime's."""
    from detectors.runtime import AMP_DTYPES
    from precompute.config import AMP_CHOICES
    from train.config import AMP_MODES
    assert AMP_CHOICES == tuple(AMP_DTYPES) and AMP_MODES == ("auto", *AMP_DTYPES)


def test_help_imports_no_torch():
    for package in ("train", "precompute"):
        code = f"import sys; from {package}.__main__ import build_parser; build_parser(); print('torch' in sys.modules)"
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == "False", (package, run.stderr[-2000:])


# ---------------------------------------------------------------------------------------------- python -m train
@pytest.mark.parametrize("extra, message", [
    (["--set", "frs.feat_weight="], "error: --set frs.feat_weight='': empty value; expected a float >= 0"),
    (["--set", "feat_weight=abc"], "error: --set feat_weight='abc': not a number; expected a float >= 0"),
    (["--set", "frs.warmup_iters=2.5"], "error: --set frs.warmup_iters='2.5': not an int"),
    (["--set", "frs.bogus=1"], "known keys: ['frs.feat_weight'"),
    (["--set", "frs.feat_weight"], "error: --set 'frs.feat_weight': expected KEY=VALUE"),
    (["--lr", "nan"], "error: --lr=nan: not finite; expected a float > 0"),
    (["--momentum", "-0.5"], "error: --momentum=-0.5: out of range"),
])
def test_train_cli_refuses_before_anything_is_read(tmp_path, capsys, extra, message):
    # the cache does not exist: a refusal about it would mean the value got past the parser
    code = train_main(["--method", "frs", "--data", str(tmp_path / "data"), "--cache", str(tmp_path / "cache"),
                       "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- python -m train.sweep
@pytest.mark.parametrize("extra, message", [
    (["--set", "epochs=abc"], "error: --set epochs='abc': not an int; expected an int >= 1"),
    (["--set", "epochs=0"], "error: --set epochs='0': out of range; expected an int >= 1"),
    (["--set", "frs.feat_weight="], "error: --set frs.feat_weight='': empty value; expected a float >= 0"),
    (["--grid", "frs.feat_weight="], "error: --grid frs.feat_weight='': empty value; expected a float >= 0"),
    (["--grid", "frs.feat_weight=0.1,,0.2"], "error: --grid frs.feat_weight='': empty value"),
    (["--grid", "frs.feat_weight=0.1,nan"], "error: --grid frs.feat_weight='nan': not finite"),
    (["--set", "warmup_iters=2.5"], "error: --set warmup_iters='2.5': not an int"),
    (["--set", "lr=-0.01"], "expected a float > 0 or none"),
    (["--set", "optimizer=adam"], "not a choice; expected one of sgd, adamw"),
    (["--set", "eval=yes"], "not a bool; expected a bool (true, false, 1 or 0)"),
    (["--set", "epoch=3"], "unknown setting 'epoch': expected a trainer option (amp, artifacts_from, batch_size"),
    (["--set", "frs.feat_wieght=1"], "valid keys: ['frs.feat_weight', 'frs.cls_weight', 'frs.warmup_iters']"),
    (["--set", "maskd.loss_weight=1"], "would apply to no run: none of the methods ['none', 'frs'] includes maskd"),
    (["--grid", "lr=0.01,0.01"], "the values [0.01, 0.01] repeat"),
    (["--seeds", "x"], "error: --seeds 'x'"),
    (["--jobs", "0"], "error: --jobs 0"),
])
def test_sweep_cli_refuses_before_anything_is_read(tmp_path, capsys, extra, message):
    code = sweep_main(["--cache", str(tmp_path / "cache"), "--data", str(tmp_path / "data"), "--methods", "none", "frs",
                       "--out", str(tmp_path / "sweep"), "--no-progress", *extra])
    assert code == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "sweep").exists()


def test_sweep_cli_good_values_reach_the_cache_check(tmp_path, capsys):
    code = sweep_main(["--cache", str(tmp_path / "cache"), "--data", str(tmp_path / "data"), "--methods", "none", "frs",
                       "--out", str(tmp_path / "sweep"), "--no-progress", "--set", "milestones=(4,5)",
                       "--set", "frs.warmup_iters=3", "--grid", "frs.feat_weight=0.1,0.2", "--set", "lr=none"])
    assert code == 1 and "is not a teacher cache" in _one_error_line(capsys)


def test_sweep_settings_and_grid_are_parsed_by_type():
    assert parse_settings(["epochs=6", "milestones=(4,5)", "eval=false", "lr=0.02", "frs.warmup_iters=3"]) == \
        {"epochs": 6, "milestones": (4, 5), "eval": False, "lr": 0.02, "frs.warmup_iters": 3}
    assert parse_grid(["milestones=(4,5),(6,)", "frs.feat_weight=0.1, 0.2"]) == \
        {"milestones": [(4, 5), (6,)], "frs.feat_weight": [0.1, 0.2]}


def test_plan_runs_checks_values_given_in_code(tmp_path):
    with pytest.raises(SettingError, match="frs.feat_weight=''"):
        plan_runs(tmp_path, ["frs"], [0], "d", "c", "gfl-nano", settings={"frs.feat_weight": ""})
    with pytest.raises(SettingError, match="warmup_iters=2.5: not an int"):
        plan_runs(tmp_path, ["frs"], [0], "d", "c", "gfl-nano", grid={"frs.warmup_iters": [1, 2.5]})


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_quotes_each_sweep_word_for_the_shell():
    run = subprocess.run(["make", "-n", "sweep", "EXTRA=milestones=(8,11) frs.feat_weight=",
                          "GRID=frs.cls_weight=0.1,0.2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--set 'milestones=(8,11)' --set 'frs.feat_weight=' --grid 'frs.cls_weight=0.1,0.2'" in run.stdout


# ---------------------------------------------------------------------------------------------- python -m precompute
@pytest.mark.parametrize("flag, message", [
    ("--shard-size", "error: shard_size must be >= 1, got 0"),
    ("--batch-size", "error: batch_size must be >= 1, got 0"),
])
def test_precompute_cli_refuses_bad_options_in_one_line(tmp_path, capsys, flag, message):
    from precompute.__main__ import main as precompute_main
    code = precompute_main(["--ckpt", str(tmp_path / "t.pt"), "--data", str(tmp_path / "data"),
                            "--cache", str(tmp_path / "cache"), "--device", "cpu", flag, "0"])
    assert code != 0
    assert _one_error_line(capsys) == message
    assert not (tmp_path / "cache").exists()
