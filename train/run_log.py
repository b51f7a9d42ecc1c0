"""The logs of a student run: ``log.csv`` (one row per logged iteration), ``eval.csv`` (one row per
evaluation) and TensorBoard scalars (``out/tensorboard``), continued where a resumed run's
checkpoint left them."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path


class RunLog:
    """``log.csv``, ``eval.csv`` and TensorBoard scalars of one run directory, resumable."""

    def __init__(self, out: Path, iteration: int, tensorboard: bool, resumed: bool) -> None:
        self.path = out / "log.csv"
        self.rows: list[dict] = []
        self.columns: list[str] | None = None
        if resumed and self.path.is_file():  # keep what the interrupted run logged up to its checkpoint
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = reader.fieldnames
                self.rows = [row for row in reader if int(row["iteration"]) <= iteration]
        self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=iteration if resumed else None)
            except ImportError as error:  # tensorboard is a dependency; tolerate its absence
                warnings.warn(f"TensorBoard logging is off: {error}")

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as f:
            if self.columns:
                writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.rows)

    def log(self, iteration: int, epoch: int, step: int, values: dict[str, float], seconds: float,
            waited: float) -> None:
        """One training row: the logged values, the step's wall seconds and the seconds it waited for data."""
        row = {"iteration": iteration, "epoch": epoch, "step": step, **{k: f"{v:.6g}" for k, v in values.items()},
               "sec_per_iter": f"{seconds:.4f}", "data_sec": f"{waited:.4f}"}
        missing = [k for k in row if k not in (self.columns or [])]
        if self.columns is None or missing:  # the first row, or a term that appeared later: (re)write the header
            self.columns = (self.columns or []) + missing
            self.rows.append(row)
            self._rewrite()
        else:
            self.rows.append(row)
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, iteration)
            self.writer.add_scalar("time/sec_per_iter", seconds, iteration)

    def eval(self, iteration: int, metrics: dict[str, float]) -> None:
        """One evaluation's metrics."""
        with (self.path.parent / "eval.csv").open("a", newline="") as f:
            writer = csv.DictWriter(f, ["iteration", *metrics])
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({"iteration": iteration, **metrics})
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"val/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
