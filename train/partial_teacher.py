"""The partial teacher: a two-stage teacher's RoI head alone, on its FPN maps and a student's RoIs.

A Faster R-CNN teacher's outputs on a student's RoIs (its sampled proposals) cannot be cached: the
RoIs are drawn at training time. What they are computed from can: the teacher's FPN maps P2..P5 per
view (fields ``fpn.p2`` .. ``fpn.p5``) and its RoI head once per cache (artefact
``store.schema.ROI_HEAD_ARTIFACT``, written by precompute for a two-stage teacher and protected by
its sha256 like every artefact). The partial teacher is that head rebuilt from the artefact alone
(no backbone, neck or RPN) and run on those maps:

    partial = PartialTeacher.from_artifact(cache.artifact(ROI_HEAD_ARTIFACT))   # a cache
    partial = PartialTeacher.from_model(teacher_model)                         # online: the teacher's own head
    samples = source.fetch(batch, payloads, device)                            # reading partial.fields
    pooled, cls_logits, box_deltas = partial.outputs(partial.maps(samples), rois, batch.image_sizes)
    teacher_batch.roi_head = partial.bind(samples, batch.image_sizes)           # what the trainer does

(``train.teacher_source.OpenedTeacher.partial_teacher`` opens the one of a run's teacher.)

Both modes run this code on the same maps: each image's P2..P5 on its canonical region
(``valid_level_sizes``: the image padded on its own to 32), as the cache stores them and as
``precompute.fields.extract_fields`` computes them for the online teacher. The head runs once per
canonical size on those maps stacked, never on maps zero-padded to the student batch's size:
RoIAlign's bilinear samples within a cell of a map's last row or column read that edge (clamped) on
the canonical map but mix in zeros on a padded one, so padding would change the outputs of RoIs at
an image's border. Per canonical size the outputs are exactly the teacher's ``roi_head_outputs`` on
the forward precompute ran (each image at its canonical padding), in either mode.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.detector import valid_level_sizes
from detectors.frcnn import FasterRCNN, RoIBoxHead
from detectors.views import padded_size
from store.schema import ROI_HEAD_ARTIFACT

# The head's format and settings (RoIBoxHead.to_state) as JSON bytes among the artefact's arrays, so
# that the sha256 that protects the weights covers what rebuilds the head too.
SETTINGS_KEY = "settings.json"


def roi_head_artifact(model: FasterRCNN) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays and meta of ``ROI_HEAD_ARTIFACT`` for ``model``: the RoI head's weights (its
    ``state_dict`` keys) and ``SETTINGS_KEY``; the meta repeats the settings for ``python -m store inspect``."""
    if not isinstance(model, FasterRCNN):
        raise ValueError(f"{ROI_HEAD_ARTIFACT} is a two-stage teacher's RoI head; a {model.config.family!r} "
                         f"teacher has none")
    state = model.roi_head_state()
    described = {"format": state["format"], "settings": state["settings"]}
    arrays: dict[str, Any] = dict(state["state_dict"])
    arrays[SETTINGS_KEY] = np.frombuffer(json.dumps(described, sort_keys=True).encode(), dtype=np.uint8)
    return arrays, described


class PartialTeacher:
    """A two-stage teacher's RoI head run on cached (or the online teacher's) FPN maps.

    Args:
        head: the RoI head (``detectors.frcnn.RoIBoxHead``), frozen.
        amp_dtype: run RoIAlign and the fcs under autocast (outputs float32), as ``RoIBoxHead.forward``.
    """

    def __init__(self, head: RoIBoxHead, amp_dtype: torch.dtype | None = None) -> None:
        self.head = head
        self.amp_dtype = amp_dtype

    @classmethod
    def from_artifact(cls, arrays: Mapping[str, np.ndarray], device: torch.device | str = "cpu",
                      amp_dtype: torch.dtype | None = None) -> PartialTeacher:
        """The head rebuilt from the arrays of ``ROI_HEAD_ARTIFACT`` (``Cache.artifact``, which checks
        their sha256), in eval mode, without gradients, on ``device``."""
        if SETTINGS_KEY not in arrays:
            raise ValueError(f"not a {ROI_HEAD_ARTIFACT} artefact: it has no {SETTINGS_KEY!r} "
                             f"(arrays {sorted(arrays)[:6]})")
        described = json.loads(np.asarray(arrays[SETTINGS_KEY], dtype=np.uint8).tobytes().decode())
        state_dict = {key: torch.from_numpy(np.array(value)) for key, value in arrays.items() if key != SETTINGS_KEY}
        with torch.random.fork_rng(devices=[]):   # the head's init draws are overwritten: leave the run's RNG alone
            head = RoIBoxHead.from_state({**described, "state_dict": state_dict})
        return cls(head.requires_grad_(False).to(device), amp_dtype)

    @classmethod
    def from_model(cls, model: FasterRCNN, amp_dtype: torch.dtype | None = None) -> PartialTeacher:
        """The online teacher's own RoI head (shared, not copied; ``load_teacher`` froze it)."""
        if not isinstance(model, FasterRCNN):
            raise ValueError(f"the partial teacher is a two-stage teacher's RoI head; a {model.config.family!r} "
                             f"teacher has none")
        return cls(model.roi_heads, amp_dtype)

    @property
    def fields(self) -> list[str]:
        """The teacher fields the head reads: ``fpn.p2`` .. ``fpn.p5`` (the levels of its strides)."""
        return [f"fpn.p{int(math.log2(stride))}" for stride in self.head.strides]

    def maps(self, samples: Sequence[Mapping[str, Tensor]]) -> list[list[Tensor]]:
        """Per image, its maps of :attr:`fields` from teacher samples (``CachedTeacher.fetch``,
        ``OnlineTeacher.fetch``)."""
        missing = sorted({name for sample in samples for name in self.fields if name not in sample})
        if missing:
            raise ValueError(f"the partial teacher reads {self.fields}; the teacher samples lack {missing} (read "
                             f"them from a two-stage teacher's cache or online teacher)")
        return [[sample[name] for name in self.fields] for sample in samples]

    def bind(self, samples: Sequence[Mapping[str, Tensor]],
             image_sizes: Sequence[tuple[int, int]]) -> Callable[[Sequence[Tensor]], tuple[Tensor, Tensor, Tensor]]:
        """The head on one batch (``TeacherBatch.roi_head``): per-image RoIs -> :meth:`outputs` on the maps
        of ``samples`` (checked now) for the batch's ``image_sizes``."""
        fpn_maps = self.maps(samples)
        return lambda rois: self.outputs(fpn_maps, rois, image_sizes)

    def outputs(self, fpn_maps: Sequence[Sequence[Tensor]], rois: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled (R, C, S, S), class logits (R, K+1), deltas (R, 4(K+1))) of the teacher's RoI head.

        Args:
            fpn_maps: per image, its P2..P5 maps (C, h_l, w_l) on its canonical region (:meth:`maps`).
            rois: per image (R_i, 4) xyxy view pixels; the rows come out image after image in this order.
            image_sizes: valid (h, w) of each image (the student batch's ``image_sizes``).
        """
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        if not len(fpn_maps) == len(rois) == len(sizes):
            raise ValueError(f"{len(fpn_maps)} images of FPN maps, {len(rois)} RoI lists and {len(sizes)} image sizes")
        num_levels = len(self.head.strides)
        for index, (maps, size) in enumerate(zip(fpn_maps, sizes)):
            expected = valid_level_sizes(size, self.head.strides)
            shapes = [tuple(m.shape[-2:]) for m in maps[:num_levels]]
            if shapes != expected:
                raise ValueError(f"image {index} of size {size}: FPN maps of {shapes}, expected {expected} (P2..P5 "
                                 f"on the image's canonical region, as the cache stores them); the teacher maps and "
                                 f"the student batch disagree on the view")
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            by_size.setdefault(padded_size(size), []).append(index)
        per_image: list[tuple[Tensor, ...]] = [()] * len(sizes)
        for members in by_size.values():
            features = [torch.stack([fpn_maps[i][level] for i in members]) for level in range(num_levels)]
            results = self.head(features, [rois[i] for i in members], [sizes[i] for i in members], self.amp_dtype)
            counts = [len(rois[i]) for i in members]
            for index, parts in zip(members, zip(*(result.split(counts) for result in results))):
                per_image[index] = parts
        pooled, cls_logits, box_deltas = (torch.cat([parts[k] for parts in per_image]) for k in range(3))
        return pooled, cls_logits, box_deltas
