"""The student trainer: distillation from the teacher cache (or an online teacher), streaming views.

    trainer = StudentTrainer(TrainConfig(method="frs", student="gfl-nano", data="runs/demo/data",
                                         cache="runs/demo/cache", out="runs/train/frs"))
    results = trainer.train()          # also results.json in out/

The constructor is the run's setup, in steps: the training data, the teacher
(``train.teacher_source.open_teacher``: a cache or a teacher run in process, with its artefacts),
the student and the method, the validation data, the model and its optimisers, the run state.
Everything that can refuse does so there, before any training step: a cache whose manifest was
written for other data (dataset fingerprint) or other views, that lacks a field or artefact the
method reads, or whose teacher cannot be paired with the student (classes, family, box bins);
``--inherit`` into a student whose neck and head do not have the teacher's shapes.

:meth:`StudentTrainer.train` is a short loop over the epochs' batches; what happens around a step
(log rows, the progress bar, periodic evaluation and checkpoints) is its hooks (``train.hooks``).
One training step (:meth:`StudentTrainer.run_step`):

    batch, payloads  <- loader worker: views rebuilt from the images, teacher fields decompressed
    teacher samples  <- source.fetch: dequantised on the training device
    student forward  (autocast bf16/fp16 for backbone and head on GPU; anchors, assignment and
                      every loss in float32)
    loss = detector losses + method terms (compared only inside each image's valid region)
    backward; clip the student's (and its adapters') gradient norm; clip each separately optimised
    distiller part (ICD: AdamW, norm 0.01); step every optimiser and scheduler (``train.optimizers``)

The run state saved in ``out/last.pt`` (a detector checkpoint of the student whose ``extra`` holds
the rest: distiller parts, optimisers, schedulers, AMP scaler, RNG states, and the data position
``(epoch, step)``; ``train.checkpoint``) resumes to exactly the weights an uninterrupted run reaches
(CPU, deterministic kernels). Logs (``train.run_log``): ``log.csv``, ``eval.csv`` and TensorBoard
(``out/tensorboard``); the end of a run writes ``results.json`` (final COCO metrics, method,
config, train time without evaluation, cache manifest id) and ``student.pt``
(``detectors.load_checkpoint`` reads it).

DDP: launch with ``torchrun``; each rank trains on its share of every epoch's images
(``train.student_data.epoch_plan``), the student and the distiller's parts are one DDP module,
rank 0 evaluates, logs and saves.
"""
from __future__ import annotations

import datetime
import json
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from detectors import build_detector
from detectors.data import CocoDetection, DataError
from detectors.detector import BaseDetector, DetectorOutput, valid_level_sizes
from detectors.frcnn import TwoStageOutput
from detectors.runtime import dist_env, resolve_amp, resolve_device
from detectors.views import Batch, ViewSpec, parse_view_list
from train.checkpoint import read_run_state, run_state, set_rng_state, write_checkpoint
from train.config import TrainConfig
from train.evaluate import evaluate_detector
from train.hooks import Evaluation, HookBase, LogRows, PeriodicCheckpoint, ProgressBar
from train.methods import DistillationMethod, MethodSpec, RunResources, build_method, schedule_warnings
from train.optimizers import RunOptimizers
from train.partial_teacher import PartialTeacher
from train.run_log import RunLog
from train.sources import CachedTeacher, field_names
from train.student_data import epoch_plan, make_loader, steps_per_epoch
from train.teacher import seed_everything
from train.teacher_batch import TeacherBatch, collate_teacher
from train.teacher_source import open_teacher, training_views

# ---------------------------------------------------------------------------------------------- the model
class DistillationModel(nn.Module):
    """The student and the distiller's learnable parts as one module: one DDP wrapper, one state dict.

    ``partial_teacher``: a two-stage teacher's RoI head (``train.partial_teacher``) for a method that
    reads the teacher's RoI outputs on the student's RoIs; it is not a submodule (frozen, not saved).
    """

    def __init__(self, student: BaseDetector, method: DistillationMethod,
                 partial_teacher: PartialTeacher | None = None) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.partial_teacher = partial_teacher
        # A method that reads the teacher's backbone maps compares them with the student's (DeFeat's
        # backbone terms): only then does the student's forward keep its C3..C5 maps.
        self.return_backbone = any(name.startswith("backbone.") for name in field_names(method.fields))

    def forward(self, batch: Batch, teacher_samples: list[dict[str, Tensor]] | None, iteration: int,
                amp_dtype: torch.dtype | None = None) -> tuple[DetectorOutput | TwoStageOutput, dict[str, Tensor]]:
        """Student outputs (with ``losses``) and the method's named, weighted terms on one batch."""
        out = self.student(batch.images, batch.image_sizes, batch.targets, return_backbone=self.return_backbone,
                           amp_dtype=amp_dtype)
        if teacher_samples is None:  # a method that reads no teacher field
            return out, self.method(out, None, batch.targets, iteration)
        teacher = self.teacher_batch(batch, teacher_samples, [tuple(f.shape[-2:]) for f in out.features],
                                     tuple(out.strides))
        return out, self.method(out, teacher, batch.targets, iteration)

    def teacher_batch(self, batch: Batch, teacher_samples: list[dict[str, Tensor]],
                      level_sizes: list[tuple[int, int]], strides: tuple[int, ...]) -> TeacherBatch:
        """The teacher side of ``batch`` on the student's level grids, with the RoI head bound to its maps."""
        teacher = collate_teacher(teacher_samples, level_sizes, batch.images.device, image_sizes=batch.image_sizes,
                                  strides=strides)
        if self.partial_teacher is not None:
            teacher.roi_head = self.partial_teacher.bind(teacher_samples, batch.image_sizes)
        return teacher


def total_loss(out: DetectorOutput | TwoStageOutput, terms: dict[str, Tensor], iteration: int) -> tuple[Tensor, dict[str, float]]:
    """The sum of the detector's losses and the method's terms, and every term as a float (for the logs).

    Raises FloatingPointError naming the terms when the sum is not finite (DETR's rule: stop).
    """
    named = {**out.losses, **terms}
    clash = set(out.losses) & set(terms)
    if clash:
        raise RuntimeError(f"method terms {sorted(clash)} clash with the detector's loss names")
    loss = sum(named.values())
    values = {name: float(value.detach()) for name, value in named.items()}
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"non-finite loss at iteration {iteration}: "
                                 + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    return loss, values


# ---------------------------------------------------------------------------------------------- the trainer
class StudentTrainer:
    """A student run: setup (with every refusal) in the constructor, then :meth:`train`."""

    def __init__(self, config: TrainConfig) -> None:
        # --- runtime: rank, device, process group, autocast dtype, seed
        self.config = c = config
        self.rank, self.world_size, self.local_rank = dist_env()
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        self.device = resolve_device(c.device, self.local_rank, c.cudnn_benchmark)
        if self.distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                                 rank=self.rank, world_size=self.world_size,
                                                 timeout=datetime.timedelta(hours=2))
        self.amp_dtype = resolve_amp(c.amp, self.device)
        self.out = Path(c.out)
        seed_everything(c.seed)

        # --- data (its views: the cache's own unless --views names them)
        self.views = training_views(c)
        self.train_set = CocoDetection(c.data, c.split, views=self.views, view_policy="all", on_error=c.on_error)
        self.num_classes = self.train_set.num_classes

        # --- the teacher: cache or online, with its artefacts (refusals: dataset, views, incomplete cache)
        self.teacher = open_teacher(c, self.train_set, self.device, self.amp_dtype)
        self.manifest_id = self.teacher.manifest_id

        # --- student and method (refusals: artefacts, fields, pairing, inherit). The student and the
        # distiller's parts are initialised from the seed alone, whatever the teacher source did before.
        spec = MethodSpec.parse(c.method)
        seed_everything(c.seed)
        self.student = build_detector(c.student, num_classes=self.num_classes, **c.student_config)
        self.method = build_method(spec, self.student.config.family, c.overrides,
                                   student_channels=self.student.config.fpn_channels,
                                   teacher_channels=self.teacher.fpn_channels() or self.student.config.fpn_channels,
                                   num_classes=self.num_classes,
                                   student_backbone_channels=self.student.backbone.stage_channels,
                                   teacher_backbone_channels=self.teacher.backbone_channels(),
                                   run=self._run_resources())
        self.source = self.teacher.fields_source(self.method)
        self.fields = self.source.fields  # the only groups the trainer reads
        self.teacher.check_pairing(self.fields, self.student, self.num_classes,
                                   roi_head=self.method.reads_teacher_roi_head)
        # A method that compares RoI outputs runs the teacher's RoI head on the student's RoIs.
        self.partial_teacher = self.teacher.partial_teacher(self.device) if self.method.reads_teacher_roi_head else None
        if c.inherit:
            self.teacher.inherit_into(self.student)

        # --- validation data (refused now rather than after training)
        self.val_set = self._validation_set() if c.eval else None

        # --- model, optimisers, schedules
        self.model = DistillationModel(self.student, self.method, self.partial_teacher).to(self.device)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set.image_ids), c.batch_size, self.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{c.data}/{c.split}: {len(self.train_set.image_ids)} images make no batch of "
                             f"{c.batch_size} per rank on {self.world_size} rank(s)")
        # Parts that learn from the teacher alone warm up before DDP wraps the model (DDP starts every
        # rank from rank 0's weights); a resumed run finds them warmed up in its checkpoint.
        resuming = c.resume and (self.out / "last.pt").is_file()
        self.warm_up_report = None if resuming else self._warm_up()
        self.ddp_model: nn.Module = self.model
        if self.distributed:
            # device_ids=None: the module already lives on its one device; inputs are moved by compute()
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=None)
        self.total_iters = self.steps_per_epoch * c.epochs
        if c.max_iters:
            self.total_iters = min(self.total_iters, c.max_iters)
        self.optimizers = RunOptimizers(c, self.student, self.method.param_groups(), self.total_iters,
                                        self.steps_per_epoch, self.amp_dtype)
        self.schedule_warnings = schedule_warnings(self.method, self.total_iters)
        if self.is_main:
            for text in self.schedule_warnings:
                warnings.warn(text, stacklevel=2)

        # --- run state
        self.iteration, self.epoch, self.step = 0, 0, 0
        self.train_seconds, self.best_ap = 0.0, -1.0
        self.bytes_read_before = 0   # cache bytes read by the sessions this run resumed from
        self.history: list[dict] = []
        self.step_times: list[float] = []          # wall seconds per iteration in this invocation
        self.last_values: dict[str, float] = {}
        self.step_seconds = self.data_seconds = 0.0  # the last step's wall seconds, and how long it waited for data
        self.images_replaced: list[str] = []      # bad images the skip policy replaced in this invocation
        self.resumed_from: int | None = None
        self.run_log: RunLog | None = None        # rank 0, while train() runs
        self._session_start: float | None = None  # perf_counter() when this invocation's train() began
        if c.resume and (self.out / "last.pt").is_file():
            self.load(self.out / "last.pt")

    # ------------------------------------------------------------------ setup pieces
    def _run_resources(self) -> RunResources:
        """What the methods' prepare steps may read: the training split, the teacher's artefacts, the
        online teacher."""
        c = self.config
        return RunResources(dataset=self.train_set, artifact=self.teacher.artifact, teacher_model=self.teacher.model,
                            device=self.device, seed=c.seed, workers=c.workers,
                            progress=c.progress and self.is_main)

    def _validation_set(self) -> CocoDetection:
        """The val split in one unflipped view (``eval_view``, else the first training view's size)."""
        c = self.config
        ann = Path(c.data) / "annotations" / f"instances_{c.val_split}.json"
        if not ann.is_file():
            raise FileNotFoundError(f"evaluation needs {ann} (the {c.val_split} split); pass --no-eval to train "
                                    f"without evaluating")
        view = parse_view_list(c.eval_view)[0] if c.eval_view else self.views[0]
        return CocoDetection(c.data, c.val_split, views=(ViewSpec(False, view.short, view.max_size),),
                             view_policy="all")

    @property
    def _prefetching_source(self) -> CachedTeacher | None:
        """The source loader workers prefetch from: a cache that the method reads fields of."""
        return self.source if isinstance(self.source, CachedTeacher) and self.fields else None

    def _warm_up(self) -> dict[str, float] | None:
        """The method's warm-up (e.g. ICD's ``pretrain_batches``): what it reports, with its wall time."""
        start = time.perf_counter()
        report = self.method.warm_up(self._teacher_batches)
        return None if report is None else {**report, "seconds": round(time.perf_counter() - start, 2)}

    def _teacher_batches(self, count: int, what: str) -> Iterator[tuple[Batch, TeacherBatch]]:
        """``count`` (student batch, teacher batch) pairs on the training device, for a method's warm-up:
        this rank's share of the training views in an image order of their own (seed + 1), so the
        student's epochs are the same with and without a warm-up."""
        c = self.config
        bar = tqdm(total=count, desc=f"warm up: {what}", disable=not (c.progress and self.is_main), dynamic_ncols=True)
        done, epoch = 0, 0
        while done < count:
            plan = epoch_plan(len(self.train_set.image_ids), len(self.views), c.seed + 1, epoch, c.batch_size,
                              self.rank, self.world_size)
            for item in make_loader(self.train_set, plan[:count - done], self._prefetching_source, c.workers,
                                    c.seed + 1, epoch, pin_memory=self.device.type == "cuda",
                                    prefetch_batches=c.prefetch_batches):
                if item.error is not None:
                    raise DataError(item.error)
                batch = item.batch.to(self.device, non_blocking=True)
                samples = self.source.fetch(batch, item.teacher, self.device)
                level_sizes = valid_level_sizes(tuple(batch.images.shape[-2:]), tuple(self.student.strides))
                yield batch, self.model.teacher_batch(batch, samples, level_sizes, tuple(self.student.strides))
                done += 1
                bar.update(1)
            epoch += 1
        bar.close()

    # ------------------------------------------------------------------ one step
    def compute(self, batch: Batch, payloads: list | None, iteration: int) -> tuple[Tensor, dict[str, float]]:
        """The total loss of one batch (the graph kept for backward) and every term as a float."""
        batch = batch.to(self.device, non_blocking=True)
        samples = self.source.fetch(batch, payloads, self.device) if self.fields else None
        out, terms = self.ddp_model(batch, samples, iteration, self.amp_dtype)
        return total_loss(out, terms, iteration)

    def run_step(self, batch: Batch, payloads: list | None = None) -> dict[str, float]:
        """Forward, backward, clip, step every optimiser and scheduler; returns the logged values (every
        loss term, the gradient norms, their sum ``loss`` and the learning rates)."""
        self.model.train()
        self.optimizers.zero_grad()
        loss, values = self.compute(batch, payloads, self.iteration)
        values.update(self.optimizers.step(loss))
        values["loss"] = sum(v for k, v in values.items() if not k.startswith("grad_norm"))
        values.update(self.optimizers.learning_rates())
        return values

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end of the schedule, evaluate, write results.json and return its content; or,
        after ``stop_after`` iterations of this session, save the run state and return where it stopped."""
        self._start_session()
        try:
            self._call_hooks("before_train")
            while self.iteration < self.total_iters and not self._session_limit_reached():
                self._train_epoch()
            self.finished = self.iteration >= self.total_iters
            self.stopped = not self.finished
        finally:
            self._call_hooks("after_train")
        self.train_seconds += self._session_seconds()
        self._session_start = None
        if self.run_log is not None:
            self.run_log.close()
        if self.stopped:
            return {"status": "stopped", "iteration": self.iteration, "epoch": self.epoch, "step": self.step}
        results = self._results(self.final_metrics)
        if self.is_main:
            self.save(self.out / "last.pt")
            write_checkpoint(self.out / "student.pt", self.student, method=self.config.method,
                             iteration=self.iteration, metrics=self.final_metrics,
                             label_to_cat_id=self.train_set.label_to_cat_id)
            (self.out / "results.json").write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
        if self.distributed:
            torch.distributed.barrier()
        return results

    def _train_epoch(self) -> None:
        """The current epoch's remaining batches, up to the end of the run or of this session."""
        c = self.config
        plan = epoch_plan(len(self.train_set.image_ids), len(self.views), c.seed, self.epoch, c.batch_size,
                          self.rank, self.world_size)
        loader = make_loader(self.train_set, plan[self.step:], self._prefetching_source, c.workers, c.seed,
                             self.epoch, pin_memory=self.device.type == "cuda", prefetch_batches=c.prefetch_batches)
        tick = time.perf_counter()
        for item in loader:
            if item.error is not None:  # a bad image under on_error="raise", or a changed image
                raise DataError(item.error)
            self.images_replaced += item.replaced
            self.data_seconds = time.perf_counter() - tick
            self.last_values = self.run_step(item.batch, item.teacher)
            self.iteration, self.step, self.session_iters = self.iteration + 1, self.step + 1, self.session_iters + 1
            self.step_seconds = time.perf_counter() - tick
            self.step_times.append(self.step_seconds)
            self._call_hooks("after_step")
            if self.iteration >= self.total_iters or self._session_limit_reached():
                break
            tick = time.perf_counter()
        del loader  # its workers end before an evaluation after the epoch
        if self.step >= len(plan):  # the epoch is complete
            self.epoch, self.step = self.epoch + 1, 0
            self._call_hooks("after_epoch")

    def _start_session(self) -> None:
        """config.json and the logs (rank 0), this invocation's clock and counters, and its hooks."""
        c = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
            self.run_log = RunLog(self.out, self.iteration, c.tensorboard, resumed=self.resumed_from is not None)
        self.hooks: list[HookBase] = [LogRows(c.log_every), ProgressBar(c.progress and self.is_main)]
        if c.eval:
            self.hooks.append(Evaluation(c.eval_every))
        self.hooks.append(PeriodicCheckpoint(self.out / "last.pt", c.ckpt_every))  # after the epoch's evaluation
        for hook in self.hooks:
            hook.trainer = self
        self._session_start, self._session_eval = time.perf_counter(), 0.0
        self.session_iters, self.finished, self.stopped = 0, False, False
        self.final_metrics: dict[str, float] = {}

    def _call_hooks(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()

    def _session_limit_reached(self) -> bool:
        return bool(self.config.stop_after) and self.session_iters >= self.config.stop_after

    def _session_seconds(self) -> float:
        """Training wall time of this invocation so far (evaluation excluded)."""
        if self._session_start is None:
            return 0.0
        return time.perf_counter() - self._session_start - self._session_eval

    def evaluate(self) -> dict[str, float]:
        """COCO metrics of the student on the val split (rank 0), without touching the training RNG; in
        ``history`` and ``eval.csv``, and not in the session's training time."""
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.is_main:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                metrics = evaluate_detector(self.student, self.val_set, batch_size=self.config.eval_batch_size,
                                            device=self.device, progress=self.config.progress)
            self.history.append({"epoch": self.epoch, "iteration": self.iteration, **metrics})
            self.best_ap = max(self.best_ap, metrics.get("AP", -1.0))
            tqdm.write(f"iteration {self.iteration} (epoch {self.epoch}): "
                       + " ".join(f"{k}={v:.1f}" for k, v in metrics.items()))
            if self.run_log is not None:
                self.run_log.eval(self.iteration, metrics)
        if self.distributed:
            torch.distributed.barrier()
        if self._session_start is not None:
            self._session_eval += time.perf_counter() - start
        return metrics

    @property
    def cache_bytes_read(self) -> int:
        """Stored bytes this rank has read from the cache, over every session of the run."""
        now = self.source.bytes_read if isinstance(self.source, CachedTeacher) else 0
        return self.bytes_read_before + now

    def _results(self, final: dict[str, float]) -> dict:
        c = self.config
        bytes_read = torch.tensor(float(self.cache_bytes_read), dtype=torch.float64, device=self.device)
        if self.distributed:  # every rank read its own share
            torch.distributed.all_reduce(bytes_read)
        timed = self.step_times[1:] or self.step_times
        return {
            "method": c.method, "student": c.student, "mode": "cache" if c.cache else "online",
            "cache": c.cache, "cache_manifest_id": self.manifest_id, "teacher": self.teacher.info,
            "fields": self.fields, "iterations": self.iteration, "epochs": self.iteration / self.steps_per_epoch,
            "world_size": self.world_size, "train_seconds": round(self.train_seconds, 2),
            "seconds_per_iter": round(float(np.median(timed)), 4) if timed else None,
            "cache_bytes_read": int(bytes_read.item()),
            "final": final, "best_AP": self.best_ap if self.history else None, "history": self.history,
            "last_losses": self.last_values, "config": c.to_dict(),
            "images_replaced": sorted(set(self.images_replaced)),
            "schedule_warnings": self.schedule_warnings, "warm_up": self.warm_up_report, "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
        }

    # ------------------------------------------------------------------ checkpoint and resume
    def state(self) -> dict:
        """Everything but the student's weights needed to continue exactly where the run is."""
        return run_state(
            self.config.to_dict(), cache_manifest_id=self.manifest_id,
            iteration=self.iteration, epoch=self.epoch, step=self.step,
            train_seconds=self.train_seconds, best_ap=self.best_ap, history=self.history,
            cache_bytes_read=self.cache_bytes_read, warm_up=self.warm_up_report,
            method=self.method.state_dict(), **self.optimizers.state_dict(),
        )

    def save(self, path: Path) -> None:
        """``path``: the student (a detector checkpoint) with the run state in its extra (rank 0 only)."""
        if not self.is_main:
            return
        state = self.state()
        state["train_seconds"] += self._session_seconds()
        write_checkpoint(path, self.student, train_state=state)

    def load(self, path: Path) -> None:
        """Continue the run saved in ``path`` (refused when it was configured otherwise)."""
        weights, state = read_run_state(path, self.config.to_dict(), self.manifest_id)
        self.student.load_state_dict(weights)
        self.method.load_state_dict(state["method"])
        self.warm_up_report = state.get("warm_up")
        self.optimizers.load_state_dict(state)
        self.iteration, self.epoch, self.step = state["iteration"], state["epoch"], state["step"]
        self.train_seconds, self.best_ap, self.history = state["train_seconds"], state["best_ap"], state["history"]
        self.bytes_read_before = state.get("cache_bytes_read", 0)
        set_rng_state(state["rng"])
        self.resumed_from = self.iteration


def _finite(value):
    """JSON-ready: NaN (COCO AP of a size range without objects) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

