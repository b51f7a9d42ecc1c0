"""The sweep report's figures (matplotlib, written as PNG files).

    ap_per_method.png   mean AP per method with the seeds' standard deviation, each seed as a dot,
                        the baseline (no distillation) and the teacher as lines
    loss_curves.png     training loss against iteration (mean over seeds), and the distillation
                        terms alone
    ap_vs_time.png      AP next to its costs: against wall time per run with the one-off precompute
                        cost shared by the runs that read the cache, against the cache bytes each run
                        read per view, and the total time of N student runs from the cache against an
                        online teacher (the amortisation that makes caching pay)
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from train.methods import BASELINE, METHODS  # noqa: E402

BASELINE_COLOR = "#7f7f7f"
# matplotlib's tab10 without its grey: the methods in registry order, then the combinations.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def color(method: str, index: int = 0) -> str:
    """A method's own colour (the same in every figure); a combination's by its position ``index``."""
    if method == BASELINE:
        return BASELINE_COLOR
    distillers = [name for name in METHODS if name != BASELINE]   # the registry as it is now
    if method in distillers and distillers.index(method) < len(PALETTE):
        return PALETTE[distillers.index(method)]
    others = PALETTE[len(distillers):] or PALETTE
    return others[index % len(others)]


def draw_all(groups, cache, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"AP per method": ap_per_method(groups, cache, out / "ap_per_method.png"),
             "training loss": loss_curves(groups, out / "loss_curves.png"),
             "AP vs wall time": ap_vs_time(groups, cache, out / "ap_vs_time.png")}
    return {name: path for name, path in paths.items() if path is not None}


def ap_per_method(groups, cache, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 4.2))
    xs = range(len(groups))
    for x, group in zip(xs, groups):
        mean, std = group.mean("AP"), group.std("AP")
        if mean is None:
            continue
        ax.bar(x, mean, yerr=std if std is not None else None, capsize=4, color=color(group.method, x), alpha=0.85)
        values = group.values("AP")
        offsets = [0.0] if len(values) == 1 else [-0.15 + 0.3 * i / (len(values) - 1) for i in range(len(values))]
        ax.scatter([x + o for o in offsets], values, color="black", s=12, zorder=3)
        top = max([mean + (std or 0.0), *values])
        ax.annotate(f"{mean:.1f}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    baseline = next((g for g in groups if g.method == BASELINE and g.mean("AP") is not None), None)
    if baseline is not None:
        ax.axhline(baseline.mean("AP"), color=BASELINE_COLOR, linestyle=":",
                   label=f"{BASELINE} ({baseline.mean('AP'):.1f})")
    teacher_ap = (cache.teacher_metrics or {}).get("AP")
    if teacher_ap is not None and not math.isnan(teacher_ap):
        ax.axhline(teacher_ap, color="black", linestyle="--", label=f"teacher {cache.teacher} ({teacher_ap:.1f})")
    ax.set_xticks(list(xs), [g.label for g in groups], rotation=20 if len(groups) > 6 else 0, ha="right"
                  if len(groups) > 6 else "center", fontsize=8)
    ax.set_ylabel("COCO AP (val, %)")
    ax.set_title("Student AP per method (bars: mean ± std over seeds; dots: runs)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_log(run_dir: Path) -> dict[str, list[float]]:
    """log.csv columns as float lists (empty when the run logged nothing)."""
    path = run_dir / "log.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, text in row.items():
            if key is None:
                continue
            columns.setdefault(key, []).append(float(text) if text not in ("", None) else math.nan)
    return columns


def is_distillation_term(name: str) -> bool:
    """Method terms are named after their method (frs_feat, ld_main, icd_distill, ...)."""
    return name.split("_", 1)[0] in METHODS and "_" in name


def _mean_curve(logs: list[dict[str, list[float]]], key) -> tuple[list[float], list[float]]:
    """Mean over seeds at the iterations every seed logged; ``key(log) -> list`` gives the values."""
    series = [dict(zip(log["iteration"], key(log))) for log in logs if log.get("iteration")]
    if not series:
        return [], []
    common = sorted(set.intersection(*(set(s) for s in series)))
    return common, [sum(s[i] for s in series) / len(series) for i in common]


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def loss_curves(groups, path: Path) -> Path | None:
    logs_by_group = [(g, [read_log(r.path) for r in g.runs]) for g in groups]
    if not any(log.get("loss") for _, logs in logs_by_group for log in logs):
        return None
    fig, (total_ax, distill_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (group, logs) in enumerate(logs_by_group):
        logs = [log for log in logs if log.get("loss")]
        if not logs:
            continue
        x, y = _mean_curve(logs, lambda log: log["loss"])
        total_ax.plot(x, _smooth(y), color=color(group.method, index), label=group.label, linewidth=1.3)
        terms = sorted({k for log in logs for k in log if is_distillation_term(k)})
        if terms:
            def distill_sum(log):
                return [sum(0.0 if math.isnan(log[t][i]) else log[t][i] for t in terms if t in log)
                        for i in range(len(log["iteration"]))]
            x, y = _mean_curve(logs, distill_sum)
            y = [v if v > 0 else math.nan for v in y]   # a ramp's zero start has no place on a log axis
            distill_ax.plot(x, _smooth(y), color=color(group.method, index),
                            label=f"{group.label} ({' + '.join(terms)})", linewidth=1.3)
    total_ax.set_title("Training loss (detection + distillation), mean over seeds")
    distill_ax.set_title("Distillation terms alone (weighted, as trained)")
    for ax in (total_ax, distill_ax):
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (moving average of 5 logged points)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    total_ax.set_yscale("log")
    if distill_ax.lines:
        distill_ax.set_yscale("log")   # the methods' terms differ by orders of magnitude
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ap_vs_time(groups, cache, path: Path) -> Path | None:
    """AP next to what it costs, the three costs a user chooses a cache by: student time per run
    (with its share of the one-off precompute), disk per view (the cache bytes each run read per
    image), and the cumulative time of the sweep's runs from the cache against an online teacher.
    One legend below the panels, so that none covers a panel or its labels."""
    runs = [(g, r) for g in groups for r in g.runs if r.final.get("AP") is not None]
    if not runs:
        return None
    readers = [r for _, r in runs if r.mode == "cache" and r.cache_bytes_read > 0]
    precompute = cache.precompute_seconds
    fig, (time_ax, disk_ax, total_ax) = plt.subplots(1, 3, figsize=(15, 5), layout="constrained")
    share = precompute / len(readers) if precompute and readers else 0.0
    seen = set()
    for index, (group, run) in enumerate(runs):
        reads, ap, run_color = run in readers, run.final["AP"], color(group.method, index)
        label = group.label if group.label not in seen else None
        seen.add(group.label)
        time_ax.scatter((run.train_seconds + (share if reads else 0.0)) / 60, ap, color=run_color, label=label,
                        s=30, zorder=3)
        if reads and precompute:  # the first run alone would carry the whole precompute
            time_ax.scatter((run.train_seconds + precompute) / 60, ap, facecolors="none", edgecolors=run_color,
                            s=30, zorder=2)
        per_view = run.cache_bytes_read / run.images_seen if reads and run.images_seen else 0.0
        disk_ax.scatter(per_view / 1e6, ap, color=run_color, s=30, zorder=3)
    teacher_ap = (cache.teacher_metrics or {}).get("AP")
    if teacher_ap is not None and not math.isnan(teacher_ap):
        time_ax.axhline(teacher_ap, color="black", linestyle="--", label=f"teacher ({teacher_ap:.1f})")
        disk_ax.axhline(teacher_ap, color="black", linestyle="--")
    if cache.bytes_per_view:
        disk_ax.axvline(cache.bytes_per_view / 1e6, color="black", linestyle=":",
                        label=f"cache stored per view, every field ({cache.bytes_per_view / 1e6:.2f} MB)")
    time_ax.set_xlabel("wall time per run (min): training + its share of the precompute\n"
                       "(hollow: the whole precompute on one run)")
    time_ax.set_title("AP vs student time", fontsize=10)
    disk_ax.set_xlabel("cache bytes read per view (MB; 0: online or no teacher)")
    disk_ax.set_title("AP vs disk per view", fontsize=10)
    for ax in (time_ax, disk_ax):
        ax.set_ylabel("COCO AP (val, %)")
        ax.grid(alpha=0.3)

    if precompute and readers and cache.samples:
        # Online, every view a run sees costs a teacher pass; the precompute's time per view stands in
        # for it (its forward plus extraction and encoding: an upper bound; bench_train measures steps).
        per_view = (cache.write_seconds or 0.0) / cache.samples
        cached, online = [precompute / 3600], [0.0]
        for run in readers:
            cached.append(cached[-1] + run.train_seconds / 3600)
            online.append(online[-1] + (run.train_seconds + run.images_seen * per_view) / 3600)
        n = list(range(len(readers) + 1))
        total_ax.plot(n, cached, marker="o", color="#444444", label="from the cache: precompute once, then runs")
        total_ax.plot(n, online, marker="s", color="#444444", linestyle="--",
                      label="online teacher (estimated from the precompute's time per view)")
        total_ax.set_xlabel("student runs trained (distilled runs of this sweep)")
        total_ax.set_ylabel("cumulative wall time (hours)")
        total_ax.set_title("Cumulative time: cache vs online teacher", fontsize=10)
        total_ax.grid(alpha=0.3)
    else:
        total_ax.axis("off")
        total_ax.text(0.5, 0.5, "no cache-reading runs with a known precompute cost", ha="center", va="center")
    costs = [f"students {statistics.fmean(r.train_seconds for _, r in runs) / 60:.1f} min per run"]
    if precompute:
        costs.insert(0, f"precompute {precompute / 60:.1f} min once")
    if cache.bytes_per_view:
        costs.insert(0, f"cache {cache.bytes_per_view / 1e6:.2f} MB per view x {cache.samples} views "
                        f"= {cache.stored_bytes / 1e9:.2f} GB on disk")
    fig.suptitle("What AP costs: " + " · ".join(costs), fontsize=10)
    entries = [entry for ax in (time_ax, disk_ax, total_ax) for entry in zip(*ax.get_legend_handles_labels())]
    fig.legend(*zip(*entries), loc="outside lower center", ncol=min(4, len(entries)), fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
