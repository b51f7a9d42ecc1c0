"""The student trainer: distillation from the teacher cache (or an online teacher), streaming views.

    trainer = StudentTrainer(TrainConfig(method="frs", student="gfl-nano", data="runs/demo/data",
                                         cache="runs/demo/cache", out="runs/train/frs"))
    results = trainer.train()          # also results.json in out/

Everything that can refuse does so in the constructor, before any training step: a cache whose
manifest was written for other data (dataset fingerprint) or other views, that lacks a field or
artefact the method reads, or whose teacher cannot be paired with the student (classes, family,
box bins); ``--inherit`` into a student whose neck and head do not have the teacher's shapes.

One training step (:meth:`StudentTrainer.run_step`):

    batch, payloads  <- loader worker: views rebuilt from the images, teacher fields decompressed
    teacher samples  <- source.fetch: dequantised on the training device
    student forward  (autocast bf16/fp16 for backbone and head on GPU; anchors, assignment and
                      every loss in float32)
    loss = detector losses + method terms (compared only inside each image's valid region)
    backward; clip the student's (and its adapters') gradient norm; clip each separately optimised
    distiller part (ICD: AdamW, norm 0.01); step every optimiser and scheduler

The run state saved in ``out/last.pt`` (a detector checkpoint of the student whose ``extra`` holds
the rest: distiller parts, optimisers, schedulers, AMP scaler, RNG states, and the data position
``(epoch, step)``; ``train.checkpoint``) resumes to exactly the weights an uninterrupted run reaches
(CPU, deterministic kernels). Logs (``train.run_log``): ``log.csv``, ``eval.csv`` and TensorBoard
(``out/tensorboard``); the end of a run
writes ``results.json`` (final COCO metrics, method, config, train time, cache manifest id) and
``student.pt`` (``detectors.load_checkpoint`` reads it).

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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from detectors import build_detector
from detectors.backbone import resnet_stage_channels
from detectors.data import CocoDetection, DataError
from detectors.outputs import Detector, DetectorOutput, valid_level_sizes
from detectors.runtime import dist_env, resolve_amp, resolve_device
from detectors.views import Batch, ViewSpec, parse_view_list
from store import CacheError, load_manifest, open_cache
from store.schema import INHERIT_ARTIFACT
from train.checkpoint import read_run_state, run_state, set_rng_state, write_checkpoint
from train.config import TrainConfig
from train.evaluate import evaluate_detector
from train.methods import (DistillationMethod, MethodSpec, ParamGroupSpec, RunResources, build_method,
                           schedule_warnings)
from train.run_log import RunLog
from train.schedule import ScheduleConfig, build_scheduler, build_sgd
from train.sources import CachedTeacher, OnlineTeacher, adopt_cache_images, field_names, manifest_id
from train.student_data import epoch_plan, make_loader, steps_per_epoch
from train.teacher import seed_everything
from train.teacher_batch import TeacherBatch, collate_teacher

# ---------------------------------------------------------------------------------------------- the model
class DistillationModel(nn.Module):
    """The student and the distiller's learnable parts as one module: one DDP wrapper, one state dict."""

    def __init__(self, student: Detector, method: DistillationMethod) -> None:
        super().__init__()
        self.student = student
        self.method = method
        # A method that reads the teacher's backbone maps compares them with the student's (DeFeat's
        # backbone terms): only then does the student's forward keep its C3..C5 maps.
        self.return_backbone = any(name.startswith("backbone.") for name in field_names(method.fields))

    def forward(self, batch: Batch, teacher_samples: list[dict[str, Tensor]] | None, iteration: int,
                amp_dtype: torch.dtype | None = None) -> tuple[DetectorOutput, dict[str, Tensor]]:
        """Student outputs (with ``losses``) and the method's named, weighted terms on one batch."""
        out = self.student(batch.images, batch.image_sizes, batch.targets, return_backbone=self.return_backbone,
                           amp_dtype=amp_dtype)
        if teacher_samples is None:  # a method that reads no teacher field
            return out, self.method(out, None, batch.targets, iteration)
        teacher = collate_teacher(teacher_samples, [tuple(f.shape[-2:]) for f in out.features],
                                  batch.images.device, image_sizes=batch.image_sizes, strides=out.strides)
        return out, self.method(out, teacher, batch.targets, iteration)


def total_loss(out: DetectorOutput, terms: dict[str, Tensor], iteration: int) -> tuple[Tensor, dict[str, float]]:
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


def inherit_neck_head(student: Detector, state: dict[str, Any], where: str) -> int:
    """Load the teacher's FPN (``backbone.fpn.*``) and head (``head.*``) into the student; every tensor's
    shape must match and the student must have no neck/head tensor the teacher lacks. Returns the count."""
    own = student.state_dict()
    state = {key: torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
             for key, value in state.items()}
    problems = []
    for key, value in state.items():
        if key not in own:
            problems.append(f"{key} is not in the student")
        elif tuple(own[key].shape) != tuple(value.shape):
            problems.append(f"{key}: teacher {tuple(value.shape)}, student {tuple(own[key].shape)}")
    lacking = [key for key in own if key.startswith(("backbone.fpn.", "head.")) and key not in state]
    problems += [f"{key}: the student has it, the teacher does not" for key in lacking]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise ValueError(f"--inherit: the teacher's neck and head ({where}) do not fit the student "
                         f"{student.config.name or student.config.family}: {shown}. Inheriting needs the same FPN "
                         f"width, head convs, classes and box outputs (e.g. a gfl-r50 student of a gfl-r101 teacher)")
    student.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return len(state)


def check_pairing(fields: list[str], student: Detector, teacher_config: dict | None, num_classes: int,
                  where: str) -> None:
    """Refuse a teacher whose outputs cannot be compared with the student's, naming the difference."""
    if teacher_config is None or not fields:
        return
    reads_head = any(name.startswith(("head.", "region.")) for name in fields)
    if not reads_head:
        return
    problems = []
    if teacher_config.get("num_classes") != num_classes:
        problems.append(f"classes: teacher {teacher_config.get('num_classes')}, data/student {num_classes}")
    if teacher_config.get("family") != student.config.family:
        problems.append(f"detector family: teacher {teacher_config.get('family')}, student {student.config.family}")
    elif student.config.family == "gfl" and teacher_config.get("reg_max") != student.config.reg_max:
        problems.append(f"GFL reg_max: teacher {teacher_config.get('reg_max')}, student {student.config.reg_max}")
    if problems:
        raise ValueError(f"the teacher of {where} cannot be paired with the student for head fields "
                         f"{sorted({n.rsplit('.', 1)[0] for n in fields if n.startswith(('head.', 'region.'))})}: "
                         + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- the trainer
class StudentTrainer:
    """A student run: setup (with every refusal) in the constructor, then :meth:`train`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = c = config
        self.rank, self.world_size, self.local_rank = dist_env()
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        self.device = resolve_device(c.device, self.local_rank)
        if self.distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                                 rank=self.rank, world_size=self.world_size,
                                                 timeout=datetime.timedelta(hours=2))
        self.amp_dtype = resolve_amp(c.amp, self.device)
        self.out = Path(c.out)
        seed_everything(c.seed)

        # --- data, the teacher source and its manifest (refusals: dataset, views)
        self.views, self.manifest_id, cache = self._views_and_cache()
        self.train_set = CocoDetection(c.data, c.split, views=self.views, view_policy="all", on_error=c.on_error)
        self.num_classes = self.train_set.num_classes
        teacher_model = None
        if cache is not None:
            adopt_cache_images(self.train_set, cache, where=c.cache)  # the cache's skipped images and image hashes
            expect = dict(dataset=self.train_set.fingerprint(), views=[v.to_dict() for v in self.views])
            cache.manifest.check(expect, where=c.cache)
            self.teacher_config = cache.manifest["teacher"].get("config")
            self.teacher_info = {k: v for k, v in cache.manifest["teacher"].items() if k != "config"}
        else:
            from precompute.teacher import load_teacher
            teacher = load_teacher(c.teacher_arch, c.teacher, self.num_classes, device=self.device,
                                   category_ids=self.train_set.label_to_cat_id)
            teacher_model = teacher.model
            self.teacher_config = teacher.model.config.to_dict()
            self.teacher_info = teacher.manifest_entry()
            self.teacher_info.pop("config", None)

        # --- student and method (refusals: artefacts, fields, pairing, inherit). The student and the
        # distiller's parts are initialised from the seed alone, whatever the teacher source did before.
        spec = MethodSpec.parse(c.method)
        seed_everything(c.seed)
        self.student = build_detector(c.student, num_classes=self.num_classes, **c.student_config)
        family = self.student.config.family
        teacher_channels = self._teacher_channels(cache)
        self.method = build_method(spec, family, c.overrides, student_channels=self.student.config.fpn_channels,
                                   teacher_channels=teacher_channels, num_classes=self.num_classes,
                                   student_backbone_channels=self.student.backbone.stage_channels,
                                   teacher_backbone_channels=self._teacher_backbone_channels(),
                                   run=self._run_resources(cache, teacher_model))
        self.fields = field_names(self.method.fields)  # the only groups the trainer reads
        where = c.cache if cache is not None else c.teacher
        if cache is not None:
            self.method.check_cache_options(cache.manifest["options"], where=c.cache)  # e.g. LD's VLR rule
            self.source = CachedTeacher(c.cache, self.fields, cache=cache)  # refuses a cache lacking a field
        else:
            self.source = OnlineTeacher(teacher_model, self.fields, amp_dtype=self.amp_dtype,
                                        options=self.method.cache_options)
        check_pairing(self.fields, self.student, self.teacher_config, self.num_classes, where)
        if c.inherit:
            state = (self.source.artifact(INHERIT_ARTIFACT, "--inherit reads the teacher's neck and head from it")
                     if cache is not None else _neck_head_state(teacher_model))
            inherit_neck_head(self.student, state, where)

        # --- validation data (refused now rather than after training)
        self.val_set = None
        if c.eval:
            ann = Path(c.data) / "annotations" / f"instances_{c.val_split}.json"
            if not ann.is_file():
                raise FileNotFoundError(f"evaluation needs {ann} (the {c.val_split} split); pass --no-eval to train "
                                        f"without evaluating")
            self.val_set = CocoDetection(c.data, c.val_split, views=(self._eval_view(),), view_policy="all")

        # --- model, optimisers, schedules
        self.model = DistillationModel(self.student, self.method).to(self.device)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set.image_ids), c.batch_size, self.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{c.data}/{c.split}: {len(self.train_set.image_ids)} images make no batch of "
                             f"{c.batch_size} per rank on {self.world_size} rank(s)")
        # Parts that learn from the teacher alone warm up before DDP wraps the model (DDP starts every
        # rank from rank 0's weights); a resumed run finds them warmed up in its checkpoint.
        resuming = c.resume and (self.out / "last.pt").is_file()
        self.warm_up_report = None if resuming else self.method.warm_up(self._teacher_batches)
        self.ddp_model: nn.Module = self.model
        if self.distributed:
            # device_ids=None: the module already lives on its one device; inputs are moved by compute()
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=None)
        self.total_iters = self.steps_per_epoch * c.epochs
        if c.max_iters:
            self.total_iters = min(self.total_iters, c.max_iters)
        self._build_optimizers()
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
        self.images_replaced: list[str] = []      # bad images the skip policy replaced in this invocation
        self.resumed_from: int | None = None
        if c.resume and (self.out / "last.pt").is_file():
            self.load(self.out / "last.pt")

    # ------------------------------------------------------------------ setup pieces
    def _views_and_cache(self):
        c = self.config
        if c.cache is None:
            return parse_view_list(c.views or "default", seed=c.seed), None, None
        manifest = load_manifest(c.cache)
        if manifest is None:
            raise CacheError(f"{c.cache}: no manifest.json (not a teacher cache; build one with python -m precompute)")
        # Expected views: the ones asked for (checked against the manifest with the dataset), else the cache's.
        views = (parse_view_list(c.views, seed=c.seed) if c.views
                 else [ViewSpec.from_dict(v) for v in manifest["views"]])
        cache = open_cache(c.cache)  # refuses an incomplete cache
        return views, manifest_id(cache.manifest), cache

    def _teacher_channels(self, cache) -> int:
        if self.teacher_config is not None and "fpn_channels" in self.teacher_config:
            return int(self.teacher_config["fpn_channels"])
        if cache is not None and "fpn.p3" in cache.manifest.fields:  # a cache written without the teacher config
            image_id, view_index = cache.keys()[0]
            return int(cache.get(image_id, view_index, fields=["fpn.p3"])["fpn.p3"].shape[0])
        return self.student.config.fpn_channels

    def _teacher_backbone_channels(self) -> tuple[int, int, int] | None:
        """C3..C5 widths from the teacher's config (the manifest keeps it), None when unknown."""
        config = self.teacher_config
        if config is None or (config.get("depth") is None and not config.get("widths")):
            return None
        return resnet_stage_channels(config.get("depth"), config.get("widths"))

    def _run_resources(self, cache, teacher_model) -> RunResources:
        """What the methods' prepare steps may read: the training split, the cache's artefacts (online:
        those of ``--maskd-tokens``' cache, if given), the online teacher."""
        c = self.config
        artifact_cache = (CachedTeacher(c.cache, [], cache=cache) if cache is not None
                          else CachedTeacher(c.maskd_tokens, []) if c.maskd_tokens else None)
        return RunResources(dataset=self.train_set, artifact=artifact_cache.artifact if artifact_cache else None,
                            teacher_model=teacher_model, online_iters=c.maskd_iters, device=self.device,
                            seed=c.seed, workers=c.workers, progress=c.progress and self.is_main)

    def _teacher_batches(self, count: int, what: str) -> Iterator[tuple[Batch, TeacherBatch]]:
        """``count`` (student batch, teacher batch) pairs on the training device, for a method's warm-up:
        this rank's share of the training views in an image order of their own (seed + 1), so the
        student's epochs are the same with and without a warm-up."""
        c = self.config
        prefetching = self.source if isinstance(self.source, CachedTeacher) and self.fields else None
        bar = tqdm(total=count, desc=f"warm up: {what}", disable=not (c.progress and self.is_main), dynamic_ncols=True)
        done, epoch = 0, 0
        while done < count:
            plan = epoch_plan(len(self.train_set.image_ids), len(self.views), c.seed + 1, epoch, c.batch_size,
                              self.rank, self.world_size)
            for item in make_loader(self.train_set, plan[:count - done], prefetching, c.workers, c.seed + 1, epoch,
                                    pin_memory=self.device.type == "cuda"):
                if item.error is not None:
                    raise DataError(item.error)
                batch = item.batch.to(self.device, non_blocking=True)
                samples = self.source.fetch(batch, item.teacher, self.device)
                level_sizes = valid_level_sizes(tuple(batch.images.shape[-2:]), tuple(self.student.strides))
                yield batch, collate_teacher(samples, level_sizes, self.device, image_sizes=batch.image_sizes,
                                             strides=tuple(self.student.strides))
                done += 1
                bar.update(1)
            epoch += 1
        bar.close()

    def _eval_view(self) -> ViewSpec:
        if self.config.eval_view:
            view = parse_view_list(self.config.eval_view)[0]
            return ViewSpec(False, view.short, view.max_size)
        return ViewSpec(False, self.views[0].short, self.views[0].max_size)

    def _build_optimizers(self) -> None:
        c = self.config
        groups = self.method.param_groups()
        for group in groups:
            if group.optimizer not in ("student", "adamw"):
                raise ValueError(f"param group {group.name!r} asks for optimiser {group.optimizer!r}")
        self.student_groups = [g for g in groups if g.optimizer == "student"]
        self.aux_groups: list[ParamGroupSpec] = [g for g in groups if g.optimizer == "adamw"]
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for g in self.student_groups for p in g.params if p.requires_grad]
        self.clipped_params = params
        if c.optimizer == "sgd":
            self.optimizer = build_sgd(params, c.lr, c.momentum, c.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        schedule = ScheduleConfig(total_iters=self.total_iters, warmup_iters=min(c.warmup_iters, self.total_iters // 2),
                                  warmup_ratio=c.warmup_ratio, kind=c.schedule,
                                  milestones=tuple(int(m * self.steps_per_epoch) for m in c.milestones))
        self.scheduler = build_scheduler(self.optimizer, schedule)
        built = [group.build(self.total_iters) for group in self.aux_groups]
        self.aux_optimizers = [optimizer for optimizer, _ in built]
        self.aux_schedulers = [scheduler for _, scheduler in built]
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None

    # ------------------------------------------------------------------ one step
    def compute(self, batch: Batch, payloads: list | None, iteration: int) -> tuple[Tensor, dict[str, float]]:
        """The total loss of one batch (the graph kept for backward) and every term as a float."""
        batch = batch.to(self.device, non_blocking=True)
        samples = self.source.fetch(batch, payloads, self.device) if self.fields else None
        out, terms = self.ddp_model(batch, samples, iteration, self.amp_dtype)
        return total_loss(out, terms, iteration)

    def run_step(self, batch: Batch, payloads: list | None = None) -> dict[str, float]:
        """Forward, backward, clip, step every optimiser and scheduler; returns the logged values."""
        self.model.train()
        optimizers = [self.optimizer, *self.aux_optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, values = self.compute(batch, payloads, self.iteration)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for optimizer in optimizers:
                self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.config.clip_grad > 0:
            values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.clipped_params, self.config.clip_grad))
        for group in self.aux_groups:
            norm = group.clip()
            if norm is not None:
                values[f"grad_norm_{group.name}"] = float(norm)
        for optimizer in optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        for scheduler in self.aux_schedulers:
            scheduler.step()
        values["loss"] = sum(v for k, v in values.items() if not k.startswith("grad_norm"))
        values["lr"] = self.scheduler.get_last_lr()[0]
        for group, scheduler in zip(self.aux_groups, self.aux_schedulers):
            values[f"lr_{group.name}"] = scheduler.get_last_lr()[0]
        return values

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end of the schedule (or ``stop_after`` iterations), evaluate, write results.json."""
        c = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        logger = RunLog(self.out, self.iteration, c.tensorboard, resumed=self.resumed_from is not None) \
            if self.is_main else None
        bar = tqdm(total=self.total_iters, initial=self.iteration, desc=f"train {c.student} [{c.method}]",
                   disable=not (c.progress and self.is_main), dynamic_ncols=True)
        prefetching = self.source if isinstance(self.source, CachedTeacher) and self.fields else None
        self._session_start, self._session_eval = time.perf_counter(), 0.0
        session_iters, stopped, saved_at = 0, False, self.iteration
        try:
            while self.iteration < self.total_iters and not stopped:
                plan = epoch_plan(len(self.train_set.image_ids), len(self.views), c.seed, self.epoch, c.batch_size,
                                  self.rank, self.world_size)
                loader = make_loader(self.train_set, plan[self.step:], prefetching, c.workers, c.seed, self.epoch,
                                     pin_memory=self.device.type == "cuda")
                tick = time.perf_counter()
                for item in loader:
                    if item.error is not None:  # a bad image under on_error="raise", or a changed image
                        raise DataError(item.error)
                    if item.replaced:
                        self.images_replaced += item.replaced
                    waited = time.perf_counter() - tick
                    values = self.run_step(item.batch, item.teacher)
                    self.iteration += 1
                    self.step += 1
                    session_iters += 1
                    seconds = time.perf_counter() - tick
                    self.step_times.append(seconds)
                    self.last_values = values
                    if logger is not None and (self.iteration % c.log_every == 0 or self.iteration == 1
                                               or self.iteration == self.total_iters):
                        logger.log(self.iteration, self.epoch, self.step, values, seconds, waited)
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch, loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2g}")
                    if c.ckpt_every and self.iteration % c.ckpt_every == 0:
                        self.save(self.out / "last.pt")
                        saved_at = self.iteration
                    if self.iteration >= self.total_iters:
                        break
                    if c.stop_after and session_iters >= c.stop_after:
                        stopped = True
                        break
                    tick = time.perf_counter()
                del loader
                if self.step >= len(plan):  # the epoch is complete
                    self.epoch, self.step = self.epoch + 1, 0
                    if c.eval and c.eval_every and self.epoch % c.eval_every == 0 and self.iteration < self.total_iters:
                        self._evaluate(logger)
                if self.iteration < self.total_iters and saved_at != self.iteration:
                    self.save(self.out / "last.pt")
                    saved_at = self.iteration
        finally:
            bar.close()
        if stopped:
            self.train_seconds += self._session_seconds()
            if logger is not None:
                logger.close()
            return {"status": "stopped", "iteration": self.iteration, "epoch": self.epoch, "step": self.step}
        final = self._evaluate(logger) if c.eval else {}
        self.train_seconds += self._session_seconds()
        self._session_start = None
        if logger is not None:
            logger.close()
        results = self._results(final)
        if self.is_main:
            self.save(self.out / "last.pt")
            write_checkpoint(self.out / "student.pt", self.student, method=c.method, iteration=self.iteration,
                             metrics=final, label_to_cat_id=self.train_set.label_to_cat_id)
            (self.out / "results.json").write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
        if self.distributed:
            torch.distributed.barrier()
        return results

    def _session_seconds(self) -> float:
        """Training wall time of this invocation so far (evaluation excluded)."""
        if getattr(self, "_session_start", None) is None:
            return 0.0
        return time.perf_counter() - self._session_start - self._session_eval

    def _evaluate(self, logger) -> dict[str, float]:
        """COCO metrics of the student on the val split (rank 0), without touching the training RNG."""
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
            if logger is not None:
                logger.eval(self.iteration, metrics)
        if self.distributed:
            torch.distributed.barrier()
        if getattr(self, "_session_start", None) is not None:
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
            "cache": c.cache, "cache_manifest_id": self.manifest_id, "teacher": self.teacher_info,
            "fields": self.fields, "iterations": self.iteration, "epochs": self.iteration / self.steps_per_epoch,
            "world_size": self.world_size, "train_seconds": round(self.train_seconds, 2),
            "seconds_per_iter": round(float(np.median(timed)), 4) if timed else None,
            "cache_bytes_read": int(bytes_read.item()),
            "final": final, "best_AP": self.best_ap if self.history else None, "history": self.history,
            "last_losses": self.last_values, "config": c.to_dict(),
            "images_replaced": sorted(set(self.images_replaced)),
            "schedule_warnings": self.schedule_warnings, "warm_up": self.warm_up_report, "device": str(self.device), "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
        }

    # ------------------------------------------------------------------ checkpoint and resume
    def state(self) -> dict:
        """Everything but the student's weights needed to continue exactly where the run is."""
        return run_state(
            self.config.to_dict(), cache_manifest_id=self.manifest_id,
            iteration=self.iteration, epoch=self.epoch, step=self.step,
            train_seconds=self.train_seconds, best_ap=self.best_ap, history=self.history,
            cache_bytes_read=self.cache_bytes_read, warm_up=self.warm_up_report,
            method=self.method.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            aux_optimizers=[o.state_dict() for o in self.aux_optimizers],
            aux_schedulers=[s.state_dict() for s in self.aux_schedulers],
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
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
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for optimizer, saved in zip(self.aux_optimizers, state["aux_optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.aux_schedulers, state["aux_schedulers"]):
            scheduler.load_state_dict(saved)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
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


def _neck_head_state(model: Detector) -> dict[str, Tensor]:
    from precompute.teacher import neck_head_state
    return neck_head_state(model)

