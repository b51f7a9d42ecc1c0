"""MasKD stage 2: masked feature distillation with frozen receptive tokens.

Paper: Huang et al., "Masked Distillation with Receptive Tokens", ICLR 2023.
Official code: https://github.com/hunto/MasKD @b5af34f (``mmrazor/mmrazor/models/losses/maskd.py``,
``mmrazor/configs/distill/maskd/*``, ``mmrazor/mmrazor/models/distillers/single_teacher.py``).

Teacher fields: the FPN maps (``fpn``: P3..P7; ``fpn.p2`` .. ``fpn.p6`` for Faster R-CNN, whose
P2..P5 the partial teacher's RoI head reads too), plus ``head.box`` for a dense head term. The
Faster R-CNN head term reads the teacher's RoI head on the student's RoIs (``teacher.roi_head``,
:attr:`MasKD.reads_teacher_roi_head`), never ``head.box``.

Stage 1 (learning the tokens on the frozen teacher, :mod:`train.methods.maskd_tokens`) runs once
per cache in precompute (:meth:`MasKD.make_artifact`, the cache's ``maskd_tokens`` artefact), or,
with an online teacher and no such cache, in :meth:`MasKD.prepare` before the student's first step;
this module receives its result, frozen. Stage 1's settings are keys of :class:`MasKDConfig`
(``stage1_iters``, ``stage1_batch_size``, ``stage1_optimizer``, ``stage1_lr``, ``stage1_weight_decay``:
the official 2000 iterations of 16 images, Adam lr 0.01 and weight decay 1e-3 for the dense families,
SGD lr 0.1 and weight decay 1e-4 for Faster R-CNN), given as ``--set maskd.stage1_iters=N`` to
precompute (which makes the artefact with them; ``stage1_iters=0`` makes none) and to an
online-teacher training run (which learns the tokens with them unless ``--artifacts-from`` names a
cache holding them). Per level l, with the
align conv A_l (1×1, C_s → C_t, bias, PyTorch default init, trained with the student):

    M_t = σ(token_t · F_t)                                     (N, T, H, W), no gradient
          after ``student_mask_warmup`` iterations also × σ(token_t · A_l(F_s)) (no gradient)
    p   = softmax_t(prob_head(F_t))                            (N, T)
    L_l = mean_n Σ_t p_t · mean_c [ Σ_hw M_t²·(A_l(F_s) − F_t)² / Σ_hw M_t ]
    maskd_feat = λ · Σ_l L_l

plus, when ``head_weight`` > 0, ``maskd_head``:

- dense families: ``head_weight · Σ_l mean |box_s − box_t|`` over the valid locations and all box
  channels (the official config distils ``bbox_head.retina_reg`` with mmdet's ``L1Loss``, reduction
  mean, once per level);
- Faster R-CNN: ``head_weight · mean SmoothL1_β=1(deltas_s − deltas_t)`` over the student's sampled
  RoIs and the 4K class columns of the RoI head's class-specific deltas (the background's 4 columns
  dropped: mmdet's ``fc_reg`` has none), deltas_t being the teacher's RoI head on the student's
  RoIs (``teacher.roi_head(student.rois)``). Official: the component ``roi_head.bbox_head.fc_reg``
  with ``mmdet.SmoothL1Loss`` (beta 1.0, reduction mean), its forward pre-hook
  (``single_teacher.py:162-178``) copying the student's RoIs (``bbox_roi_extractor`` input 1) into
  the teacher's extractor. No classification term.

Official settings (``mmrazor/configs/distill/maskd/``): RetinaNet λ = 7, student masks after
7000 iterations, head term weight 1 (``retinanet_r101-retinanet_r50_coco.py``); FCOS λ = 10,
student masks after 5000 iterations, no head term (``fcos_r101-fcos_r50_coco.py`` distils the
neck alone: nothing reads the box outputs or the centerness); Faster R-CNN λ = 1 on P2..P6, student
masks after 7330 iterations, RoI head term weight 1 (``fpn_r101-fpn_r50_coco.py`` lines 232-271).
Stage 1 (``mmdetection/configs/maskd/{retinanet_r101_fpn_2x,fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x,
faster_rcnn_r101_fpn_2x}_coco.py``): 2000 iterations, the frozen teacher's own detection loss on the
masked maps (FCOS's includes its centerness term, as ``Detector.losses`` does; Faster R-CNN's is RPN
+ RoI) + Dice diversity. The official repository has no GFL config; GFL uses the closest released
one-stage config, FCOS's (no head term: L1 on GFL's distribution logits is not something the authors
tried). The official RetinaNet runs also initialise the student's neck and head from the teacher
("inherit"; the Faster R-CNN config does not); that is the trainer's business.

Batch semantics: the official runs put 2 images on each GPU and DDP averages the GPUs. The
feature term is already a mean over images (``MasKDLoss.forward``: per image and token, Σ_hw /
Σ_hw M_t, then ``loss.mean()`` over the images), so grouping changes nothing for an even B. The
dense head term is mmdet's ``L1Loss`` (mean over all elements of the 2 images' maps); per image it
is Σ |box_s − box_t| / (valid cells · box channels) summed over the 2 images. The Faster R-CNN head
term is the mean over the 2 images' RoIs (R_0 + R_1 rows of 4K deltas). So a batch of B images
is split into groups of 2 consecutive images (the last group of an odd B holds 1 image, which
then weighs as much as a pair, for both terms), each term is computed per group and the terms
are the mean over the groups: 1 device × 16 images trains like 8 GPUs × 2.
``tests/test_reference_maskd.py`` checks this against a plain-torch transcription of
``MasKDLoss.forward`` / ``MaskModule`` and mmdet's ``L1Loss`` at 2 and 8 images, with and
without padding; ``tests/test_two_stage_maskd.py`` the Faster R-CNN terms against mmdet's
``SmoothL1Loss`` and the formula on P2..P6.

Remaining differences from the official code (the first two only where a batch has padding: a
pair of equal sizes has none; a portrait 1333×800 image paired with a landscape one is 41 % padding):

- The sums over h, w (and the dense head term's mean) run over each image's valid region only; the
  official ones also cover batch padding, where the teacher's features and box outputs are real
  values of the zero-padded image. Not reproducible from the cache, which holds only each
  image's own region.
- p is computed per image on its valid crop of F_t (the official prob head pools over the padded
  batch map, which makes p depend on batch-mates).
- Faster R-CNN: the teacher's RoI head pools its maps of each image at its canonical padding (the
  partial teacher, ``train/partial_teacher.py``), not the batch's padded maps.
- Faster R-CNN stage 1: the official config inherits the R50 model
  (``_base_ = '../faster_rcnn/faster_rcnn_r50_fpn_2x_coco.py'``) and loads the R101 teacher's
  checkpoint into it non-strictly (``init_cfg``), so its tokens would be learnt on an R50 that
  holds the R101's neck and heads; not reproduced: the tokens are learnt on the teacher itself.

Tokens module: any object with
``masks(features, level) -> (N, T, H, W)`` and ``weights(features, level) -> (N, T)``
(:class:`train.methods.maskd_tokens.ReceptiveTokens`, rebuilt with ``load_receptive_tokens``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.detector import DetectorOutput
from detectors.frcnn import TwoStageOutput
from store.schema import LEVELS, TWO_STAGE_LEVELS
# Stage 1 is called through its module: bench/bench_kill.py pauses it there to kill precompute.
from train.methods import maskd_tokens
from train.methods.base import (ArtifactInputs, BuildContext, DistillationMethod, MethodConfig, PictureOption,
                                RunResources, check_same_shape, pyramid_fields, require, sum_per_gpu_batch)
from train.methods.maskd_tokens import MASKD_ARTIFACT, OPTIMIZERS, load_receptive_tokens
from train.teacher_batch import TeacherBatch

ROI_SMOOTH_L1_BETA = 1.0  # mmdet SmoothL1Loss's default, which the Faster R-CNN config keeps


class ReceptiveTokensLike(Protocol):
    """What stage 2 needs from stage 1's tokens (``train.methods.maskd_tokens.ReceptiveTokens``)."""

    def masks(self, features: Tensor, level: int) -> Tensor:
        """(N, C, H, W) -> σ(tokens · F) (N, T, H, W)."""

    def weights(self, features: Tensor, level: int) -> Tensor:
        """(N, C, H, W) -> token weights p (N, T), a softmax over tokens."""


@dataclass(frozen=True)
class MasKDConfig(MethodConfig):
    loss_weight: float = 7.0            # λ (RetinaNet 7; FCOS, and GFL, 10; Faster R-CNN 1)
    student_mask_warmup: int = 7000     # iterations before masks are also multiplied by the student's
    # L1 on dense box outputs (RetinaNet 1; FCOS and GFL 0); SmoothL1 on the RoI deltas (Faster R-CNN 1)
    head_weight: float = 1.0
    # Stage 1 (the receptive tokens; official mmdetection/configs/maskd/*: 2000 iterations, 16 images,
    # Adam lr 0.01, weight decay 1e-3). Not student iterations: the sweep's schedule checks leave them alone.
    stage1_iters: int = field(default=2000, metadata={"student_schedule": False})  # 0: no tokens made
    stage1_batch_size: int = 16         # images per stage-1 iteration
    stage1_optimizer: str = "adam"      # "adam" | "sgd" (momentum 0.9)
    stage1_lr: float = 0.01             # stage 1's lr (cosine to 1e-6)
    stage1_weight_decay: float = 1e-3   # L2, in the optimiser

    # hunto/MasKD @b5af34f mmrazor/configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py (RetinaNet) and
    # fcos_r101-fcos_r50_coco.py (FCOS: loss_weight=10, custom_mask_warmup=5000, no bbox_head component);
    # no GFL config: FCOS's values (the docstring). Stage 1: mmdetection/configs/maskd/retinanet_r101_fpn_2x_coco.py
    # and fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco.py (optimizer: Adam, lr=0.01, weight_decay=0.001).
    FAMILY_DEFAULTS = {
        "retina": {},
        "fcos": {"loss_weight": 10.0, "student_mask_warmup": 5000, "head_weight": 0.0},
        "gfl": {"loss_weight": 10.0, "student_mask_warmup": 5000, "head_weight": 0.0},
        "frcnn": {
            "loss_weight": 1.0,            # mmrazor/configs/distill/maskd/fpn_r101-fpn_r50_coco.py:245 loss_weight=1
            "student_mask_warmup": 7330,   # fpn_r101-fpn_r50_coco.py:243 custom_mask_warmup=7330
            "head_weight": 1.0,            # fpn_r101-fpn_r50_coco.py:255-271 fc_reg, mmdet.SmoothL1Loss loss_weight=1
            "stage1_optimizer": "sgd",     # mmdetection/configs/maskd/faster_rcnn_r101_fpn_2x_coco.py:25 keeps the
            #                                base's SGD (configs/_base_/schedules/schedule_2x.py:2, momentum 0.9)
            "stage1_lr": 0.1,              # faster_rcnn_r101_fpn_2x_coco.py:25 optimizer = dict(lr=0.1)
            "stage1_weight_decay": 1e-4,   # schedule_2x.py:2 weight_decay=0.0001
        },
    }

    def __post_init__(self) -> None:
        if self.stage1_optimizer not in OPTIMIZERS:
            raise ValueError(f"MasKD stage1_optimizer={self.stage1_optimizer!r}; expected one of {OPTIMIZERS}")


class MasKD(DistillationMethod):
    NAME = "maskd"
    FIELDS = ("fpn", "head.box")
    FAMILY_FIELDS = {"frcnn": pyramid_fields("frcnn")}   # the head term runs the teacher's RoI head on P2..P5
    ARTIFACTS = (MASKD_ARTIFACT,)   # stage 1's receptive tokens, learnt once per cache
    Config = MasKDConfig
    PICTURE_FIELDS = ("fpn",)
    PICTURE_HELP = ("MasKD: the masks σ(token_t · F_t) of the receptive tokens learnt in precompute (the cache's "
                    f"{MASKD_ARTIFACT} artefact) on one level (--maskd-level), with their weights")
    # p3 (stride 8) is a level of both pyramids; prepare_picture refuses one the cache lacks.
    PICTURE_OPTIONS = (PictureOption("--maskd-level", "level of the MasKD token masks: p3..p7 on a dense teacher's "
                                     "cache, p2..p6 on a two-stage one's [p3]", default="p3",
                                     choices=tuple(dict.fromkeys(TWO_STAGE_LEVELS + LEVELS))),)

    def __init__(self, config: MasKDConfig, tokens: ReceptiveTokensLike, student_channels: int = 256,
                 teacher_channels: int = 256, num_levels: int = 5) -> None:
        super().__init__(config)
        if tokens is None:
            raise ValueError("MasKD needs the receptive tokens learnt in precompute (stage 1): "
                             "train.methods.maskd_tokens.load_receptive_tokens(cache.artifact('maskd_tokens'))")
        for attribute in ("masks", "weights"):
            if not callable(getattr(tokens, attribute, None)):
                raise TypeError(f"MasKD tokens must have a {attribute}(features, level) method; got {type(tokens)}")
        if isinstance(tokens, nn.Module):
            tokens.eval().requires_grad_(False)
        self.tokens = tokens  # registered as a submodule when it is one (moves with .to(device)); frozen
        self.align = nn.ModuleList([nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                                    for _ in range(num_levels)])

    @classmethod
    def artifacts_made(cls, config: MasKDConfig) -> tuple[str, ...]:
        return cls.ARTIFACTS if config.stage1_iters else ()   # --set maskd.stage1_iters=0 skips the tokens

    @classmethod
    def make_artifact(cls, name: str, inputs: ArtifactInputs) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stage 1 on the cached split and views (each image's view drawn at random), the teacher
        frozen, with the config's ``stage1_*`` settings."""
        config = inputs.config
        result = maskd_tokens.learn_receptive_tokens(
            inputs.teacher_model, _stage1_data(inputs.dataset), iters=config.stage1_iters,
            optimizer=config.stage1_optimizer, lr=config.stage1_lr, weight_decay=config.stage1_weight_decay,
            batch_size=config.stage1_batch_size, device=inputs.device, progress=inputs.progress,
            seed=inputs.seed, num_workers=inputs.workers)
        return result["state"], result["meta"]

    @classmethod
    def prepare(cls, config: MasKDConfig, run: RunResources) -> ReceptiveTokensLike:
        """Stage 1's receptive tokens: the cache's artefact, or learnt here on the online teacher
        (the config's stage-1 settings, at least one iteration, on the training split, its views
        drawn at random)."""
        if run.artifact is not None:
            return load_receptive_tokens(run.artifact(
                MASKD_ARTIFACT, "MasKD reads the receptive tokens learnt in precompute (python -m precompute "
                                "--fields all or maskd)"))
        if run.teacher_model is None or run.dataset is None:
            raise ValueError("MasKD needs its receptive tokens: a teacher cache holding them, or an online teacher "
                             "and the training data to learn them on")
        result = maskd_tokens.learn_receptive_tokens(
            run.teacher_model, _stage1_data(run.dataset), iters=max(1, config.stage1_iters),
            optimizer=config.stage1_optimizer, lr=config.stage1_lr, weight_decay=config.stage1_weight_decay,
            batch_size=config.stage1_batch_size, device=run.device, progress=run.progress, seed=run.seed,
            num_workers=run.workers)
        return load_receptive_tokens(result)

    @classmethod
    def build(cls, config: MasKDConfig, context: BuildContext) -> MasKD:
        return cls(config, context.prepared.get(cls.NAME), context.student_channels, context.teacher_channels,
                   context.num_levels)

    @property
    def fields(self) -> tuple[str, ...]:
        dense_head = self.config.head_weight and not self.two_stage  # Faster R-CNN's head term: the RoI head
        return pyramid_fields(self.family) + (("head.box",) if dense_head else ())

    @property
    def reads_teacher_roi_head(self) -> bool:
        return self.two_stage and self.config.head_weight > 0

    def train(self, mode: bool = True) -> MasKD:
        super().train(mode)
        if isinstance(self.tokens, nn.Module):
            self.tokens.eval()  # frozen, always
        return self

    def forward(self, student: DetectorOutput | TwoStageOutput, teacher: TeacherBatch,
                targets: list[dict[str, Tensor]], iteration: int) -> dict[str, Tensor]:
        config = self.config
        teacher_fpn = require(teacher.fpn, "fpn", "MasKD")
        use_student_masks = iteration >= config.student_mask_warmup
        feat_loss = 0.0
        for level, valid in enumerate(teacher.valid):
            f_t = teacher_fpn[level]  # (N, C, H, W), zero outside valid
            aligned = self.align[level](student.features[level])  # (N, C, H, W)
            check_same_shape(aligned, f_t, f"aligned features of level {level}")
            with torch.no_grad():
                masks = self.tokens.masks(f_t, level) * valid  # (N, T, H, W), zero outside valid
                if use_student_masks:
                    masks = masks * self.tokens.masks(aligned, level)
                weights = torch.cat([self.tokens.weights(f_t[i:i + 1, :, :h, :w], level)  # (1, T) each
                                     for i, (h, w) in enumerate(size[level] for size in teacher.valid_sizes)])
            squared_error = (aligned - f_t) ** 2  # (N, C, H, W)
            # Σ_hw M_t² (A(F_s) − F_t)² for every (n, t, c) without materialising (N, T, C, H, W).
            masked_error = torch.einsum("nthw,nchw->ntc", masks ** 2, squared_error)  # (N, T, C)
            mask_area = masks.sum(dim=(2, 3)).clamp(min=1e-12)  # (N, T)
            per_token = (masked_error / mask_area[:, :, None]).mean(dim=2)  # (N, T): mean over channels
            per_image = (per_token * weights).sum(dim=1)  # (N,)
            images_per_gpu = sum_per_gpu_batch(torch.ones_like(per_image))  # (G,) 2, or 1 for an odd B's last
            feat_loss = feat_loss + sum_per_gpu_batch(per_image) / images_per_gpu  # (G,): mean over its images
        terms = {"maskd_feat": config.loss_weight * feat_loss.mean()}  # mean over the per-GPU batches
        if config.head_weight:
            two_stage = isinstance(student, TwoStageOutput)
            head_loss = roi_box_loss(student, teacher) if two_stage else dense_box_loss(student, teacher)
            terms["maskd_head"] = config.head_weight * head_loss
        return terms

    @classmethod
    def prepare_picture(cls, painter) -> None:
        """Refuses a ``--maskd-level`` that the cache's pyramid lacks (p2 of a dense one, p7 of a two-stage one)."""
        level = painter.options["maskd_level"]
        if level not in painter.levels:
            kind = "a two-stage" if painter.two_stage else "a dense"
            raise ValueError(f"--maskd-level {level}: the cache's teacher is {kind} detector with the levels "
                             f"{', '.join(painter.levels)}")

    @classmethod
    def draw_picture(cls, painter, view):
        """The token masks and weights on one level (``--maskd-level``), from the cache's tokens artefact."""
        from matplotlib.colors import Normalize

        from store import CacheError
        from train import viz
        painter.require(view, cls.NAME, cls.PICTURE_FIELDS)
        if cls.NAME not in painter.state:
            try:
                painter.state[cls.NAME] = load_receptive_tokens(painter.cache.artifact(MASKD_ARTIFACT))
            except CacheError as error:
                raise viz.Skipped(f"{error} (MasKD stage 1: python -m precompute --fields all or maskd, "
                                  f"--set maskd.stage1_iters > 0)") from None
        tokens, level = painter.state[cls.NAME], view.levels.index(painter.options["maskd_level"])
        features = view.level_maps("fpn")[level][None]  # (1, C, h_l, w_l)
        with torch.no_grad():
            masks = tokens.masks(features, level)[0].numpy()  # (T, h_l, w_l)
            weights = tokens.weights(features, level)[0].tolist()  # (T,)
        num_tokens = masks.shape[0]
        cols = math.ceil((num_tokens + 1) / 2)
        fig, axes = viz.new_figure(2, cols, view.image_hw)
        viz.show_view(axes[0, 0], view)
        painter.draw_gt(axes[0, 0], view)
        axes[0, 0].set_title("view image, GT dashed", fontsize=9)
        norm = Normalize(0, 1)
        mappable = None
        for token, ax in enumerate(axes.flat[1:]):
            if token >= num_tokens:
                ax.set_axis_off()
                continue
            viz.show_view(ax, view, grey=True)
            mappable = viz.overlay_map(ax, masks[token], view.strides[level], view, norm, cmap="viridis")
            painter.draw_gt(ax, view, with_labels=False)
            ax.set_title(f"token {token}: weight p = {weights[token]:.2f}", fontsize=9)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label="mask M_t")
        meta = painter.cache.artifacts().get(MASKD_ARTIFACT, {}).get("meta", {})
        learnt = f", tokens learnt in {meta['iters']} stage-1 iterations" if "iters" in meta else ""
        fig.suptitle(f"MasKD receptive-token masks M_t = σ(token_t · F_t) at {viz.level_title(level, view)}\n"
                     f"{view.describe()}; p_t = token weight (softmax of the prob head){learnt}", fontsize=10)
        return painter.save(fig, view, cls.NAME)


def dense_box_loss(student: DetectorOutput, teacher: TeacherBatch) -> Tensor:
    """Σ_l mmdet ``L1Loss`` (mean) between the student's and the teacher's box maps over the valid
    locations, per per-GPU batch, averaged over them."""
    teacher_box = require(teacher.box, "head.box", "MasKD (head term)")
    head_loss = 0.0
    for level, valid in enumerate(teacher.valid):
        s_box, t_box = student.box_outputs[level], teacher_box[level]  # (N, A*B, H, W)
        check_same_shape(s_box, t_box, f"box outputs of level {level}")
        error = sum_per_gpu_batch(((s_box - t_box).abs() * valid).sum(dim=(1, 2, 3)))  # (G,)
        count = sum_per_gpu_batch(valid.sum(dim=(1, 2, 3))).clamp(min=1) * s_box.shape[1]  # (G,)
        head_loss = head_loss + error / count  # (G,): L1Loss's mean over one per-GPU batch
    return head_loss.mean()


def roi_box_loss(student: TwoStageOutput, teacher: TeacherBatch) -> Tensor:
    """mmdet ``SmoothL1Loss`` (beta 1, mean) between the class columns of the student's RoI deltas and
    the teacher's RoI head's on the same RoIs (the student's), per per-GPU batch, averaged over them."""
    if teacher.roi_head is None:
        raise ValueError("MasKD's Faster R-CNN head term needs the teacher's RoI head on the student's RoIs "
                         "(TeacherBatch.roi_head, bound by the trainer when reads_teacher_roi_head)")
    _, _, teacher_deltas = teacher.roi_head(student.rois)  # (R, 4(K+1)), no gradient
    check_same_shape(student.roi_box_deltas, teacher_deltas, "RoI box deltas")
    # Columns 0..3 are the background's deltas, which mmdet's fc_reg (4K columns) does not have.
    error = F.smooth_l1_loss(student.roi_box_deltas[:, 4:], teacher_deltas[:, 4:], reduction="none",
                             beta=ROI_SMOOTH_L1_BETA).sum(dim=1)  # (R,)
    rois_per_image = torch.tensor([len(r) for r in student.rois], device=error.device)  # (N,)
    image_of_roi = torch.repeat_interleave(torch.arange(len(student.rois), device=error.device), rois_per_image)
    per_image = error.new_zeros(len(student.rois)).index_add(0, image_of_roi, error)  # (N,)
    count = sum_per_gpu_batch(rois_per_image).clamp(min=1) * error.new_tensor(teacher_deltas.shape[1] - 4)  # (G,)
    return (sum_per_gpu_batch(per_image) / count).mean()  # SmoothL1Loss's mean per per-GPU batch, then DDP's


def _stage1_data(dataset: Any) -> Any:
    """The split of ``dataset`` (a CocoDetection) with one view drawn at random per image, as stage 1 reads it."""
    from detectors.data import CocoDetection
    return CocoDetection(dataset.root, dataset.split, views=dataset.views, view_policy="random",
                         on_error=dataset.on_error)
