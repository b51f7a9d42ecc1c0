"""Sweeps (train/sweep.py) and their report (train/report.py, train/figures.py).

The report is checked on a sweep directory this file fabricates (results.json files with known
metrics: means, standard deviations and gains computed by hand), and end to end on a tiny real
sweep from a tiny cache, including an interruption that the rerun must finish without redoing
finished runs.
"""
import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import build_detector, save_checkpoint
from detectors.synth import SynthConfig, generate
from precompute.config import PrecomputeConfig
from precompute.pipeline import run_precompute
from train import report as report_module
from train.config import TrainConfig
from train.sweep import check_reusable, execute, parse_grid, parse_seeds, plan_runs, sweep, write_run_file

# ---------------------------------------------------------------------------------------------- planning


def test_plan_names_order_and_grid(tmp_path):
    runs = plan_runs(tmp_path, ["none", "frs", "ld+frs"], [0, 1], "data", "cache", "gfl-nano",
                     settings={"epochs": 2, "frs.feat_weight": 0.5}, grid={"frs.cls_weight": [0.1, 0.2]})
    names = [r.name for r in runs]
    # seed-major; the frs axis multiplies only runs whose method includes frs
    assert names == ["none_s0", "frs_frs.cls_weight=0.1_s0", "frs_frs.cls_weight=0.2_s0",
                     "ld+frs_frs.cls_weight=0.1_s0", "ld+frs_frs.cls_weight=0.2_s0",
                     "none_s1", "frs_frs.cls_weight=0.1_s1", "frs_frs.cls_weight=0.2_s1",
                     "ld+frs_frs.cls_weight=0.1_s1", "ld+frs_frs.cls_weight=0.2_s1"]
    by_name = {r.name: r for r in runs}
    assert by_name["none_s0"].config.overrides == {}
    assert by_name["frs_frs.cls_weight=0.2_s1"].config.overrides == {"frs.feat_weight": 0.5, "frs.cls_weight": 0.2}
    assert all(r.config.epochs == 2 and r.config.resume for r in runs)
    assert by_name["none_s1"].config.seed == 1
    assert by_name["none_s1"].config.out == str(tmp_path / "runs" / "none_s1")


def test_plan_trainer_option_grid(tmp_path):
    runs = plan_runs(tmp_path, ["none"], [0], "d", "c", "gfl-nano", grid={"lr": [0.01, 0.02]})
    assert [(r.name, r.config.lr) for r in runs] == [("none_lr=0.01_s0", 0.01), ("none_lr=0.02_s0", 0.02)]


@pytest.mark.parametrize("settings, message", [
    ({"epoch": 3}, "unknown setting 'epoch'"),
    ({"seed": 3}, "set by the sweep itself"),
    ({"epochs": 0}, "epochs=0: out of range; expected an int >= 1"),
])
def test_plan_refuses_bad_settings(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        plan_runs(tmp_path, ["none"], [0], "d", "c", "gfl-nano", settings=settings)


def test_plan_refuses_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="fsr"):
        plan_runs(tmp_path, ["fsr"], [0], "d", "c", "gfl-nano")


def test_parse_helpers():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,5,7") == [0, 5, 7]
    assert parse_grid(["frs.feat_weight=0.1,0.2", "lr=0.02"]) == {"frs.feat_weight": [0.1, 0.2], "lr": [0.02]}


def test_finished_run_of_another_config_is_refused(tmp_path):
    run = plan_runs(tmp_path, ["none"], [0], "d", "c", "gfl-nano", settings={"epochs": 2})[0]
    write_run_file(run)
    check_reusable(run)                          # same configuration: fine
    changed = plan_runs(tmp_path, ["none"], [0], "d", "c", "gfl-nano", settings={"epochs": 3})[0]
    with pytest.raises(ValueError, match="epochs: was 2, now 3"):
        check_reusable(changed)
    cosmetic = plan_runs(tmp_path, ["none"], [0], "d", "c", "gfl-nano", settings={"epochs": 2, "workers": 0})[0]
    check_reusable(cosmetic)                     # loader workers do not change the experiment


# ---------------------------------------------------------------------------------------------- report on a fabricated sweep

FAKE = {  # name: (method, seed, AP, train seconds, cache bytes read)
    "none_s0": ("none", 0, 10.0, 100.0, 0),
    "none_s1": ("none", 1, 12.0, 110.0, 0),
    "frs_s0": ("frs", 0, 13.0, 120.0, 4_000_000),
    "frs_s1": ("frs", 1, 16.0, 130.0, 6_000_000),
    "ld_s0": ("ld", 0, 11.5, 105.0, 1_000_000),
}


def _fabricate(sweep_dir: Path, cache: str | None = None) -> None:
    for name, (method, seed, ap, seconds, nbytes) in FAKE.items():
        run = sweep_dir / "runs" / name
        run.mkdir(parents=True)
        config = TrainConfig(data="d", out=str(run), method=method, student="gfl-nano", cache=cache or "c",
                             seed=seed, epochs=2).to_dict()
        final = {"AP": ap, "AP50": ap + 10, "AP75": ap - 1, "APs": ap / 2, "APm": ap, "APl": None}
        results = {"method": method, "student": "gfl-nano", "mode": "cache", "cache": cache or "c",
                   "iterations": 20, "world_size": 1, "train_seconds": seconds, "seconds_per_iter": seconds / 20,
                   "cache_bytes_read": nbytes, "final": final, "config": config}
        (run / "results.json").write_text(json.dumps(results))
        with (run / "log.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            terms = [f"{method}_main"] if method != "none" else []
            writer.writerow(["iteration", "loss_cls", *terms, "loss", "lr"])
            for it in range(10, 101, 10):
                distill = [0.5 / it * 10] if terms else []
                writer.writerow([it, 2.0 / it * 10, *distill, 2.0 / it * 10 + sum(distill), 0.01])
    (sweep_dir / "runs" / "defeat_s0").mkdir()             # an unfinished run: listed, not averaged
    (sweep_dir / "runs" / "defeat_s0" / "last.pt").write_bytes(b"")


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path, min_size=(300, 200)):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 5, f"{path} looks blank"


def test_report_on_fabricated_sweep(tmp_path):
    _fabricate(tmp_path)
    report = report_module.write_report(tmp_path)
    rows = {row["label"]: row for row in _rows(tmp_path / "results.csv")}
    assert list(rows) == ["none", "frs", "ld"]
    none, frs, ld = rows["none"], rows["frs"], rows["ld"]
    assert int(none["seeds"]) == 2 and int(ld["seeds"]) == 1
    assert float(none["AP_mean"]) == pytest.approx(11.0)
    assert float(none["AP_std"]) == pytest.approx(math.sqrt(2.0), rel=1e-5)          # sample std of 10, 12
    assert float(frs["AP_mean"]) == pytest.approx(14.5)
    assert float(frs["AP_std"]) == pytest.approx(math.sqrt(4.5), rel=1e-5)           # sample std of 13, 16
    assert float(frs["AP50_mean"]) == pytest.approx(24.5)
    assert float(frs["AP_gain_over_none"]) == pytest.approx(3.5)
    assert float(ld["AP_gain_over_none"]) == pytest.approx(0.5)
    assert ld["AP_std"] == "" and frs["APl_mean"] == ""                     # one seed; no large objects
    assert float(frs["train_seconds_mean"]) == pytest.approx(125.0)
    assert int(frs["cache_bytes_read_mean"]) == 5_000_000
    per_run = _rows(tmp_path / "runs.csv")
    assert sorted(r["name"] for r in per_run) == sorted(FAKE)

    markdown = (tmp_path / "results.md").read_text()
    assert "| frs | 2 | 14.5 ± 2.1 | 24.5 ± 2.1 |" in markdown
    assert "| +3.5 |" in markdown and "| +0.5 |" in markdown
    assert "5.0 MB" in markdown and "defeat_s0" in markdown.split("Unfinished")[1]
    for name in ("ap_per_method.png", "loss_curves.png", "ap_vs_time.png"):
        assert f"figures/{name}" in markdown
        _assert_png(tmp_path / "figures" / name)
    assert report["unfinished"] == [str(tmp_path / "runs" / "defeat_s0")]


def test_ap_vs_time_shows_the_costs_beside_ap_and_its_legend_covers_no_panel(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from train import figures
    _fabricate(tmp_path)
    groups = report_module.group_runs(report_module.collect(tmp_path)[0])
    cache = report_module.CacheInfo("c", teacher="gfl-small", teacher_metrics={"AP": 20.0}, stored_bytes=240_000_000,
                                    samples=200, write_seconds=600.0, artifact_seconds=60.0)
    drawn, close = [], figures.plt.close
    monkeypatch.setattr(figures.plt, "close", lambda fig: (drawn.append(fig), close(fig)))
    _assert_png(figures.ap_vs_time(groups, cache, tmp_path / "ap_vs_time.png"))
    (fig,) = drawn
    time_ax, disk_ax, total_ax = fig.axes
    # disk per view: the bytes each run read over the images it saw (20 iterations x batch 8 = 160)
    read = sorted(float(x) for points in disk_ax.collections for x, _ in points.get_offsets())
    assert read == pytest.approx([0.0, 0.0, 1e6 / 160 / 1e6, 4e6 / 160 / 1e6, 6e6 / 160 / 1e6])
    assert disk_ax.lines[-1].get_xdata()[0] == pytest.approx(1.2)         # stored: 240 MB / 200 views
    title = fig.get_suptitle()
    assert "1.20 MB per view x 200 views = 0.24 GB" in title and "precompute 11.0 min once" in title
    assert "students 1.9 min per run" in title                           # mean of 100, 110, 120, 130, 105 s
    assert [line.get_ydata()[0] for line in total_ax.lines] == pytest.approx([660 / 3600, 0.0])
    canvas = FigureCanvasAgg(fig)                # closed figures lose theirs; lay it out and draw it again
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends
    assert all(ax.get_legend() is None for ax in fig.axes)
    box = legend.get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    for ax in fig.axes:                  # each panel with its tick labels, axis labels and title
        assert not box.overlaps(ax.get_tightbbox(renderer)), f"the legend covers {ax.get_title()!r}"
        assert ax.yaxis.label.get_text()


def test_report_labels_grid_settings_and_matches_baselines(tmp_path):
    for name, method, lr, weight, ap in [("none_lr=0.01_s0", "none", 0.01, None, 10.0),
                                         ("none_lr=0.02_s0", "none", 0.02, None, 20.0),
                                         ("frs_lr=0.01_s0", "frs", 0.01, 0.5, 13.0),
                                         ("frs_lr=0.02_s0", "frs", 0.02, 0.5, 21.0)]:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        overrides = {"frs.feat_weight": weight} if weight else {}
        config = TrainConfig(data="d", out=str(run), method=method, cache="c", lr=lr, overrides=overrides).to_dict()
        (run / "results.json").write_text(json.dumps({
            "method": method, "iterations": 1, "train_seconds": 1.0, "final": {"AP": ap}, "config": config}))
    report_module.write_report(tmp_path, figures=False)
    rows = {row["label"]: row for row in _rows(tmp_path / "results.csv")}
    # frs.feat_weight is the same in every frs run: not part of the labels
    assert set(rows) == {"none lr=0.01", "none lr=0.02", "frs lr=0.01", "frs lr=0.02"}
    assert float(rows["frs lr=0.01"]["AP_gain_over_none"]) == pytest.approx(3.0)
    assert float(rows["frs lr=0.02"]["AP_gain_over_none"]) == pytest.approx(1.0)


def test_report_refuses_what_is_not_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs/"):
        report_module.write_report(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"runs/x/results.json"):
        report_module.write_report(tmp_path)


# ---------------------------------------------------------------------------------------------- a real tiny sweep

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(root / "data", 4, 2, SynthConfig(size=64, max_side=48), seed=5, progress=False)
        torch.manual_seed(0)
        save_checkpoint(root / "teacher.pt", build_detector("gfl-small", num_classes=8),
                        metrics={"AP": 30.0, "AP50": 40.0})
        run_precompute(PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"),
                                        cache=str(root / "cache"), views="64:96", fields="frs", device="cpu",
                                        shard_size=4, batch_size=4, workers=0, calibration=4, progress=False))
    finally:
        torch.set_num_threads(threads)
    return root


SETTINGS = {"epochs": 1, "batch_size": 2, "warmup_iters": 1, "workers": 0, "eval_batch_size": 2,
            "tensorboard": False}


@pytest.fixture
def one_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # the children share two cores with this process


@pytest.mark.slow
def test_sweep_end_to_end_and_interrupted(tiny_cache, tmp_path, one_thread_children):
    root, out = tiny_cache, tmp_path / "sweep"
    runs = plan_runs(out, ["none", "frs"], [0, 1], str(root / "data"), str(root / "cache"), "gfl-nano",
                     settings=SETTINGS)

    def interrupt(run):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # two side by side; the first to finish stops the sweep
        execute(runs, jobs=2, progress=False, on_finish=interrupt)
    finished = [r.name for r in runs if r.status() == "finished"]
    assert 1 <= len(finished) < len(runs)      # (two only if both ended within one poll)
    first_results = {name: (out / "runs" / name / "results.json").stat().st_mtime_ns for name in finished}

    result = sweep(out, ["none", "frs"], [0, 1], str(root / "data"), str(root / "cache"), "gfl-nano",
                   settings=SETTINGS, progress=False)
    assert result["outcome"]["skipped"] == finished
    assert sorted(result["outcome"]["finished"]) == sorted(set(r.name for r in runs) - set(finished))
    assert result["outcome"]["failed"] == []
    for name, mtime in first_results.items():   # the finished run was not trained again
        assert (out / "runs" / name / "results.json").stat().st_mtime_ns == mtime

    for run in runs:
        results = json.loads((run.out / "results.json").read_text())
        assert results["iterations"] == 2 and results["config"]["seed"] == run.seed
        assert (results["cache_bytes_read"] > 0) == (run.method == "frs")
        assert (run.out / "run.json").is_file() and (run.out / "train.log").is_file()
    rows = {row["label"]: row for row in _rows(out / "results.csv")}
    assert set(rows) == {"none", "frs"} and rows["frs"]["seeds"] == "2"
    ap = [json.loads((out / "runs" / f"frs_s{s}" / "results.json").read_text())["final"]["AP"] for s in (0, 1)]
    assert float(rows["frs"]["AP_mean"]) == pytest.approx(sum(ap) / 2, abs=1e-3)
    markdown = (out / "results.md").read_text()
    assert "teacher (gfl-small)" in markdown and "| 30.0 | 40.0 |" in markdown
    for path in result["report"]["paths"].values():
        if path.endswith(".png"):
            _assert_png(path)

    again = sweep(out, ["none", "frs"], [0, 1], str(root / "data"), str(root / "cache"), "gfl-nano",
                  settings=SETTINGS, progress=False, report=False)
    assert sorted(again["outcome"]["skipped"]) == sorted(r.name for r in runs) and not again["outcome"]["finished"]


@pytest.mark.slow
def test_sweep_cli_refuses_another_cache(tiny_cache, tmp_path, one_thread_children):
    from train.sweep import main
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"cache": "elsewhere", "cache_manifest_id": "0" * 64}))
    code = main(["--cache", str(tiny_cache / "cache"), "--data", str(tiny_cache / "data"), "--methods", "none",
                 "--out", str(out), "--no-progress"])
    assert code == 1
    assert os.listdir(out) == ["sweep.json"]


def test_children_get_one_gpu_each_or_a_share_of_the_cores(monkeypatch):
    from train.sweep import child_environment
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env, device = child_environment(slot=3, jobs=4, gpus=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and device == "cuda"
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env, device = child_environment(slot=0, jobs=4, gpus=0)
    assert env["OMP_NUM_THREADS"] == "2" and device is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env, _ = child_environment(slot=0, jobs=1, gpus=0)   # one run alone keeps the environment's setting
    assert env["OMP_NUM_THREADS"] == "3"
