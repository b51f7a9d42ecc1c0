"""The report of a sweep: tables and figures read from the runs' results.json files.

    python -m train.report runs/sweep            # results.csv, results.md, runs.csv, figures/*.png

Runs whose configurations differ only in the seed form one row: the mean and sample standard
deviation over seeds of AP, AP50, AP75, APs, APm and APl, the gain in AP over the baseline run
(``train.methods.BASELINE``, no distillation) with the same trainer options, train time per run
and cache bytes read per run. The teacher's row comes from the metrics its checkpoint recorded
(carried in the cache manifest); the one-off precompute cost (the writers' seconds plus MasKD
stage 1) comes from the cache manifest too. Unfinished runs are listed, never averaged in.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.methods import BASELINE, METHODS
from train.checkpoint import RESUME_FREE_KEYS

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Config keys that do not make two runs different experiments: the seed, where the inputs are, and
# what a resumed run may change (train.checkpoint's RESUME_FREE_KEYS).
NOT_A_SETTING = ("seed", "data", "cache", "teacher", *RESUME_FREE_KEYS)


@dataclass
class RunRecord:
    """One finished run, as its results.json tells it."""

    name: str
    path: Path
    method: str
    seed: int
    settings: dict[str, Any]        # config keys (method hyperparameters as METHOD.KEY) minus seed and cosmetics
    final: dict[str, float | None]
    train_seconds: float
    seconds_per_iter: float | None
    iterations: int
    images_seen: int
    cache_bytes_read: int
    cache: str | None
    mode: str

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        path = run_dir / "results.json"
        try:
            results = json.loads(path.read_text())
            config = results["config"]
            settings = {k: v for k, v in config.items() if k not in NOT_A_SETTING and k != "overrides"}
            settings.update({k: v for k, v in (config.get("overrides") or {}).items()})
            return cls(name=run_dir.name, path=run_dir, method=results["method"], seed=int(config["seed"]),
                       settings=settings, final=results.get("final") or {},
                       train_seconds=float(results["train_seconds"]),
                       seconds_per_iter=results.get("seconds_per_iter"), iterations=int(results["iterations"]),
                       images_seen=int(results["iterations"]) * int(config["batch_size"]) * int(
                           results.get("world_size") or 1),
                       cache_bytes_read=int(results.get("cache_bytes_read") or 0), cache=results.get("cache"),
                       mode=results.get("mode", "cache"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a student run's results.json ({type(error).__name__}: {error})") from None


@dataclass
class Group:
    """Runs that differ only in their seed."""

    method: str
    label: str
    settings: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    gain: float | None = None       # mean AP minus the matching baseline group's mean AP

    def values(self, metric: str) -> list[float]:
        return [r.final[metric] for r in self.runs if r.final.get(metric) is not None]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def train_seconds(self) -> float:
        return statistics.fmean(r.train_seconds for r in self.runs)

    @property
    def cache_bytes_read(self) -> float:
        return statistics.fmean(r.cache_bytes_read for r in self.runs)


@dataclass
class CacheInfo:
    """What the report needs of the cache the runs read (None fields: the cache is not reachable)."""

    url: str | None
    teacher: str | None = None
    teacher_metrics: dict[str, float] | None = None
    stored_bytes: int | None = None
    samples: int | None = None
    write_seconds: float | None = None       # the precompute writers' wall time, summed over shards and ranks
    artifact_seconds: float = 0.0            # MasKD stage 1

    @property
    def precompute_seconds(self) -> float | None:
        return None if self.write_seconds is None else self.write_seconds + self.artifact_seconds

    @property
    def bytes_per_view(self) -> float | None:
        """Stored bytes per view over every field the cache holds (its disk cost per view)."""
        return self.stored_bytes / self.samples if self.stored_bytes and self.samples else None

    @classmethod
    def read(cls, url: str | None) -> CacheInfo:
        if url is None:
            return cls(None)
        from store import CacheError, load_manifest
        try:
            manifest = load_manifest(url)
        except (CacheError, OSError, ValueError):
            manifest = None
        if manifest is None or not manifest["complete"]:
            return cls(url)
        totals = manifest["totals"] or {}
        extra = manifest["extra"] or {}
        artifacts = manifest["artifacts"] or {}
        return cls(url, teacher=manifest["teacher"].get("arch"), teacher_metrics=extra.get("teacher_metrics"),
                   stored_bytes=sum(stored for stored, _ in totals.get("fields", {}).values()),
                   samples=manifest["num_samples"], write_seconds=totals.get("seconds"),
                   artifact_seconds=sum(float(a.get("meta", {}).get("seconds", 0.0)) for a in artifacts.values()))


def collect(sweep_dir: Path) -> tuple[list[RunRecord], list[Path]]:
    """Finished runs (with results.json) under sweep_dir/runs, and the run directories still unfinished."""
    root = sweep_dir / "runs"
    if not root.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory: no runs/ in it (python -m train.sweep)")
    records, unfinished = [], []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if (run_dir / "results.json").is_file():
            records.append(RunRecord.load(run_dir))
        else:
            unfinished.append(run_dir)
    return records, unfinished


def group_runs(records: list[RunRecord]) -> list[Group]:
    """One group per (method, settings); labels name only the settings that vary in the sweep."""
    varying = set()
    keys = {k for r in records for k in r.settings}
    for key in keys:
        if "." in key:   # a method hyperparameter varies when runs of its method disagree on it
            values = {json.dumps(r.settings.get(key), sort_keys=True) for r in records if key in r.settings}
        else:
            values = {json.dumps(r.settings.get(key), sort_keys=True) for r in records}
        if len(values) > 1:
            varying.add(key)
    groups: dict[str, Group] = {}
    for record in records:
        key = json.dumps(record.settings, sort_keys=True)
        if key not in groups:
            shown = {k: record.settings.get(k) for k in sorted(varying) if k != "method" and
                     ("." not in k or k in record.settings)}
            label = record.method + "".join(f" {k}={_value_text(v)}" for k, v in shown.items())
            groups[key] = Group(record.method, label, shown)
        groups[key].runs.append(record)
    ordered = sorted(groups.values(), key=lambda g: (_method_order(g.method), g.label))
    for group in ordered:
        baseline = _baseline(group, ordered)
        if baseline is not None and group.mean("AP") is not None and baseline.mean("AP") is not None:
            group.gain = group.mean("AP") - baseline.mean("AP")
    return ordered


def _baseline(group: Group, groups: list[Group]) -> Group | None:
    """The baseline group trained with the same trainer options (method hyperparameters aside)."""
    common = {k: v for k, v in group.runs[0].settings.items() if "." not in k and k != "method"}
    for other in groups:
        if other.method == BASELINE and {k: v for k, v in other.runs[0].settings.items()
                                         if "." not in k and k != "method"} == common:
            return other
    return None


def _method_order(method: str) -> tuple[int, str]:
    """The registry's order (the baseline first); combinations after the single methods."""
    known = list(METHODS)
    return (known.index(method) if method in known else len(known), method)


def _value_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _mean_std(group: Group, metric: str) -> str:
    mean, std = group.mean(metric), group.std(metric)
    if mean is None:
        return "—"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _megabytes(n: float | None) -> str:
    return "—" if not n else f"{n / 1e6:.1f} MB"


def _seconds(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.0f} s"


def markdown_table(groups: list[Group], cache: CacheInfo) -> str:
    header = ["method", "seeds", *METRICS, f"ΔAP vs {BASELINE}", "train time / run", "cache read / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if cache.teacher_metrics:
        row = [f"teacher ({cache.teacher})", "—"] + [
            "—" if cache.teacher_metrics.get(m) is None or math.isnan(cache.teacher_metrics[m])
            else f"{cache.teacher_metrics[m]:.1f}" for m in METRICS] + ["—", "(once) " + _seconds(
                cache.precompute_seconds) + " precompute", "—"]
        lines.append("| " + " | ".join(row) + " |")
    for group in groups:
        gain = "—" if group.gain is None or group.method == BASELINE else f"{group.gain:+.1f}"
        row = [group.label, str(len(group.runs)), *(_mean_std(group, m) for m in METRICS), gain,
               _seconds(group.train_seconds), _megabytes(group.cache_bytes_read)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_csvs(out: Path, groups: list[Group]) -> tuple[Path, Path]:
    results, runs = out / "results.csv", out / "runs.csv"
    with results.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "label", "settings", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
                         f"AP_gain_over_{BASELINE}", "train_seconds_mean", "cache_bytes_read_mean", "runs"])
        for g in groups:
            writer.writerow([g.method, g.label, json.dumps(g.settings, sort_keys=True), len(g.runs),
                             *(_num(v) for m in METRICS for v in (g.mean(m), g.std(m))), _num(g.gain),
                             _num(g.train_seconds), int(g.cache_bytes_read), " ".join(r.name for r in g.runs)])
    with runs.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "method", "label", "seed", *METRICS, "train_seconds", "seconds_per_iter",
                         "iterations", "cache_bytes_read", "path"])
        for g in groups:
            for r in g.runs:
                writer.writerow([r.name, r.method, g.label, r.seed, *(_num(r.final.get(m)) for m in METRICS),
                                 _num(r.train_seconds), _num(r.seconds_per_iter), r.iterations, r.cache_bytes_read,
                                 str(r.path)])
    return results, runs


def _num(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def write_report(sweep_dir: str | Path, figures: bool = True) -> dict[str, Any]:
    """Write results.csv, runs.csv, results.md and figures/*.png into sweep_dir; returns their paths."""
    sweep_dir = Path(sweep_dir)
    records, unfinished = collect(sweep_dir)
    if not records:
        raise ValueError(f"{sweep_dir}: no finished run (no runs/*/results.json) to report on")
    caches = {r.cache for r in records}
    if len(caches) > 1:
        raise ValueError(f"{sweep_dir}: runs read different caches ({', '.join(sorted(map(str, caches)))}); a report "
                         "compares students of one cache")
    cache = CacheInfo.read(records[0].cache)
    groups = group_runs(records)
    results_csv, runs_csv = write_csvs(sweep_dir, groups)
    paths: dict[str, str] = {"results.csv": str(results_csv), "runs.csv": str(runs_csv)}
    figure_paths = {}
    if figures:
        from train import figures as fig
        figure_dir = sweep_dir / "figures"
        figure_paths = fig.draw_all(groups, cache, figure_dir)
        paths.update({name: str(path) for name, path in figure_paths.items()})
    student = records[0].settings.get("student", "?")
    lines = [f"# Sweep report: {sweep_dir}", ""]
    facts = [f"student **{student}**", f"{len(records)} finished runs"]
    if cache.teacher:
        facts.insert(0, f"teacher **{cache.teacher}**")
    if cache.stored_bytes:
        facts.append(f"cache {_megabytes(cache.stored_bytes)} for {cache.samples} views, written once in "
                     f"{_seconds(cache.precompute_seconds)}")
    lines += [" · ".join(facts), "", markdown_table(groups, cache), ""]
    lines.append("AP is COCO box AP in percent on the val split, mean ± sample std over seeds; ΔAP is the gain over "
                 f"`{BASELINE}` trained with the same options; cache read counts the stored (compressed) bytes each "
                 "run pulled from the cache.")
    if unfinished:
        lines += ["", "Unfinished (not in the table): " + ", ".join(p.name for p in unfinished)]
    if figure_paths:
        lines += [""] + [f"![{name}](figures/{Path(path).name})" for name, path in figure_paths.items()]
    markdown = sweep_dir / "results.md"
    markdown.write_text("\n".join(lines) + "\n")
    paths["results.md"] = str(markdown)
    return {"markdown": str(markdown), "table": markdown_table(groups, cache), "paths": paths,
            "groups": groups, "unfinished": [str(p) for p in unfinished]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep directory (python -m train.sweep --out)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    args = p.parse_args(argv)
    try:
        report = write_report(args.sweep, figures=not args.no_figures)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report["table"])
    print("\n".join(f"{name}: {path}" for name, path in report["paths"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
