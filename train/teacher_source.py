"""The teacher a student run distils from, opened once: a cache, or a teacher checkpoint run in process.

    views = training_views(config)           # the cache's own views unless --views names them
    train_set = CocoDetection(config.data, config.split, views=views, ...)
    teacher = open_teacher(config, train_set, device, amp_dtype)
    method = build_method(..., teacher_channels=teacher.fpn_channels(), run=RunResources(
        artifact=teacher.artifact, teacher_model=teacher.model, ...))
    source = teacher.fields_source(method)   # what the loop fetches per batch (``train.sources``)
    teacher.check_pairing(source.fields, student, num_classes)
    teacher.inherit_into(student)            # --inherit
    partial = teacher.partial_teacher(device)   # a two-stage teacher's RoI head alone (train.partial_teacher)

Each step refuses what does not fit, naming the difference, before any training step: a cache
written for other data (dataset fingerprint, skipped images, image hashes) or other views, an
incomplete cache, one that lacks a field or declares other field options than the method reads, a
teacher whose outputs cannot be compared with the student's, and a neck and head that do not fit
the student. The online teacher is loaded with ``precompute.teacher.load_teacher`` (the only
reason this module imports precompute).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.backbone import resnet_stage_channels
from detectors.data import CocoDetection
from detectors.detector import BaseDetector
from detectors.views import ViewSpec, parse_view_list
from store import Cache, CacheError, load_manifest, open_cache
from store.schema import INHERIT_ARTIFACT, ROI_HEAD_ARTIFACT
from train.config import TrainConfig
from train.methods import DistillationMethod
from train.partial_teacher import PartialTeacher
from train.sources import CachedTeacher, OnlineTeacher, adopt_cache_images, manifest_id


def training_views(config: TrainConfig) -> list[ViewSpec]:
    """The views the student trains on: ``config.views``, else (cache) the views the cache holds."""
    if config.cache is None:
        return parse_view_list(config.views or "default", seed=config.seed)
    manifest = load_manifest(config.cache)
    if manifest is None:
        raise CacheError(f"{config.cache}: no manifest.json (not a teacher cache; build one with python -m precompute)")
    if config.views:  # checked against the manifest with the dataset (open_teacher)
        return parse_view_list(config.views, seed=config.seed)
    return [ViewSpec.from_dict(v) for v in manifest["views"]]


def open_teacher(config: TrainConfig, dataset: CocoDetection, device: torch.device,
                 amp_dtype: torch.dtype | None) -> OpenedTeacher:
    """The run's teacher: ``config.cache`` checked against ``dataset`` (whose image set it adopts:
    ``train.sources.adopt_cache_images``) and its views, or the checkpoint ``config.teacher`` loaded
    on ``device``."""
    if config.cache is not None:
        cache = open_cache(config.cache)  # refuses an incomplete cache
        adopt_cache_images(dataset, cache, where=config.cache)
        cache.manifest.check(dict(dataset=dataset.fingerprint(), views=[v.to_dict() for v in dataset.views]),
                             where=config.cache)
        teacher = cache.manifest["teacher"]
        return OpenedTeacher(config.cache, teacher.get("config"), {k: v for k, v in teacher.items() if k != "config"},
                             manifest_id(cache.manifest), CachedTeacher(config.cache, [], cache=cache).artifact,
                             amp_dtype, cache=cache)
    from precompute.teacher import load_teacher
    loaded = load_teacher(config.teacher_arch, config.teacher, dataset.num_classes, device=device,
                          category_ids=dataset.label_to_cat_id)
    info = loaded.manifest_entry()
    info.pop("config", None)
    # Online, the artefacts a cache would hold come from the cache --artifacts-from names, if any.
    artifact = CachedTeacher(config.artifacts_from, []).artifact if config.artifacts_from else None
    return OpenedTeacher(config.teacher, loaded.model.config.to_dict(), info, None, artifact, amp_dtype,
                         model=loaded.model)


@dataclass
class OpenedTeacher:
    """A run's teacher, before the method says which fields it reads: exactly one of ``cache`` and ``model``."""

    where: str                           # the cache URL or the teacher checkpoint, for messages
    config: dict | None                  # the teacher's DetectorConfig as a dict (None: a cache without it)
    info: dict[str, Any]                 # arch, checkpoint sha256, source, ... (results.json's "teacher")
    manifest_id: str | None              # which cache the run trains from (None online)
    artifact: Callable[[str, str], dict] | None   # (name, why) -> an artefact (MasKD tokens); raises saying why
    amp_dtype: torch.dtype | None        # autocast dtype of the online teacher's forward
    cache: Cache | None = None
    model: BaseDetector | None = None    # the online teacher: frozen, on the training device

    def fields_source(self, method: DistillationMethod) -> CachedTeacher | OnlineTeacher:
        """The per-batch source of the fields ``method`` reads; refuses a cache that lacks one of them
        or declares other field options (e.g. LD's VLR rule)."""
        if self.cache is not None:
            method.check_cache_options(self.cache.manifest["options"], where=self.where)
            return CachedTeacher(self.where, method.fields, cache=self.cache)
        return OnlineTeacher(self.model, method.fields, amp_dtype=self.amp_dtype, options=method.cache_options)

    def partial_teacher(self, device: torch.device | str) -> PartialTeacher:
        """A two-stage teacher's RoI head alone: rebuilt on ``device`` from the cache's
        ``ROI_HEAD_ARTIFACT``, or the online teacher's own; it runs on the maps of its ``fields``."""
        if self.cache is not None:
            arrays = CachedTeacher(self.where, [], cache=self.cache).artifact(
                ROI_HEAD_ARTIFACT, "the partial teacher rebuilds the teacher's RoI head from it (a two-stage "
                                   "teacher's cache holds it)")
            return PartialTeacher.from_artifact(arrays, device, self.amp_dtype)
        return PartialTeacher.from_model(self.model, self.amp_dtype)

    def fpn_channels(self) -> int | None:
        """The teacher's FPN width, None when neither its config nor the cache's fields tell."""
        if self.config is not None and "fpn_channels" in self.config:
            return int(self.config["fpn_channels"])
        if self.cache is not None and "fpn.p3" in self.cache.manifest.fields:  # a cache without the teacher config
            image_id, view_index = self.cache.keys()[0]
            return int(self.cache.get(image_id, view_index, fields=["fpn.p3"])["fpn.p3"].shape[0])
        return None

    def backbone_channels(self) -> tuple[int, int, int] | None:
        """C3..C5 widths from the teacher's config (the manifest keeps it), None when unknown."""
        if self.config is None or (self.config.get("depth") is None and not self.config.get("widths")):
            return None
        return resnet_stage_channels(self.config.get("depth"), self.config.get("widths"))

    def check_pairing(self, fields: list[str], student: BaseDetector, num_classes: int, roi_head: bool = False) -> None:
        """Refuse a teacher whose head outputs cannot be compared with the student's on ``fields`` (store
        field names) or, with ``roi_head``, whose RoI head's outputs cannot, naming the difference."""
        compared = sorted({name.rsplit(".", 1)[0] for name in fields if name.startswith(("head.", "region."))})
        compared += ["the RoI head"] if roi_head else []
        if self.config is None or not compared:
            return
        problems = []
        if self.config.get("num_classes") != num_classes:
            problems.append(f"classes: teacher {self.config.get('num_classes')}, data/student {num_classes}")
        if self.config.get("family") != student.config.family:
            problems.append(f"detector family: teacher {self.config.get('family')}, student {student.config.family}")
        elif student.config.family == "gfl" and self.config.get("reg_max") != student.config.reg_max:
            problems.append(f"GFL reg_max: teacher {self.config.get('reg_max')}, student {student.config.reg_max}")
        elif any(name.startswith("head.rpn") for name in compared):  # RPN maps are per anchor: the same anchors
            for key in ("anchor_scale", "anchor_ratios", "round_anchors"):
                theirs, ours = self.config.get(key), getattr(student.config, key)
                if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != \
                        (list(ours) if isinstance(ours, (list, tuple)) else ours):
                    problems.append(f"RPN {key}: teacher {theirs}, student {ours}")
        if problems:
            raise ValueError(f"the teacher of {self.where} cannot be paired with the student for {compared}: "
                             + "; ".join(problems))

    def inherit_into(self, student: BaseDetector) -> int:
        """Load the teacher's FPN and heads (``student.NECK_AND_HEADS``: ``backbone.fpn.*``, ``head.*``; a two-stage
        student's ``rpn.*``, ``roi_heads.*``) into ``student``; every tensor's shape must match and the student must
        have no neck/head tensor the teacher lacks. Returns the count."""
        if self.cache is not None:
            state = CachedTeacher(self.where, [], cache=self.cache).artifact(
                INHERIT_ARTIFACT, "--inherit reads the teacher's neck and head from it")
        else:
            from precompute.teacher import neck_head_state
            state = neck_head_state(self.model)
        own = student.state_dict()
        state = {key: value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
                 for key, value in state.items()}
        problems = []
        for key, value in state.items():
            if key not in own:
                problems.append(f"{key} is not in the student")
            elif tuple(own[key].shape) != tuple(value.shape):
                problems.append(f"{key}: teacher {tuple(value.shape)}, student {tuple(own[key].shape)}")
        lacking = [key for key in own if key.startswith(student.NECK_AND_HEADS) and key not in state]
        problems += [f"{key}: the student has it, the teacher does not" for key in lacking]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
            raise ValueError(f"--inherit: the teacher's neck and head ({self.where}) do not fit the student "
                             f"{student.config.name or student.config.family}: {shown}. Inheriting needs the same FPN "
                             f"width, head convs, classes and box outputs (e.g. a gfl-r50 student of a gfl-r101 "
                             f"teacher)")
        student.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        return len(state)
