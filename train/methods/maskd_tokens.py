"""MasKD stage 1: learn the receptive tokens of a frozen teacher, once per cache.

Huang et al., "Masked Distillation with Receptive Tokens" (ICLR 2023); official code
hunto/MasKD @b5af34f (``mmdetection/maskd.py``, ``mmdetection/maskd_hook.py``,
``mmdetection/configs/maskd/*``). Precompute runs it as the maker of MasKD's cache artefact
(``MasKD.make_artifact``), an online run before the student's first step (``MasKD.prepare``).
Stage 2 (the distillation loss, ``train/methods/maskd.py``) rebuilds this module from the
artefact with :func:`load_receptive_tokens`.

Per FPN level l (P3..P7, or P2..P6 for Faster R-CNN), with the teacher's features F (N, C, H, W):

- T tokens (T, C), init N(0, 0.01); masks M = σ(tokens · F) -> (N, T, H, W), one per token.
- Token weights p = softmax over tokens of the prob head conv3×3 (C→C) → global avg pool →
  conv1×1 (C→T) of F -> (N, T); one head per level (not shared), convs with bias, weights
  N(0, √(2 / fan_out)), biases 0 (the official ``init_weights``).
- Masked features Σ_t p_t (M_t ⊙ F) replace F at the input of the frozen teacher head.
- Loss = the teacher's own detection loss on the masked features + Σ_levels Dice diversity,
  Dice(M) = mean over images and ordered token pairs i ≠ j of 2⟨M_i, M_j⟩ / (‖M_i‖² + ‖M_j‖²)
  (sums over the whole map, ε = 1e-12 added to each squared norm; weight 1 per level).
  For Faster R-CNN the detection loss is RPN + RoI (``FasterRCNN.forward_features``): the RPN
  runs on the masked maps, its proposals (no gradient) are sampled and the RoI head pools the
  masked P2..P5, as ``FasterRCNN.forward`` does after its neck.
- 2000 iterations, lr cosine per iteration to 1e-6 (no warm-up: the configs delete the base's),
  official batch 16 (8 GPUs × 2). Optimiser: RetinaNet and FCOS Adam lr 0.01 with L2 weight decay
  1e-3 (``retinanet_r101_fpn_2x_coco.py``, ``fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco.py``);
  Faster R-CNN SGD lr 0.1, momentum 0.9, weight decay 1e-4 (``faster_rcnn_r101_fpn_2x_coco.py`` sets
  only ``lr=0.1`` on its base's ``configs/_base_/schedules/schedule_2x.py`` SGD).
- The teacher gets no gradient and is in training mode with its BatchNorms in eval, as the
  official hook sets it (``maskd_hook.py`` ``_fix_weights`` / ``before_train_iter``): BN uses and
  keeps its running statistics, and Faster R-CNN draws its training proposal counts (2000 per
  level before NMS, 1000 after: mmdetection's ``rpn_proposal``). Faster R-CNN's anchor and RoI
  sampling draws from torch's RNG, forked and seeded with ``seed``: the tokens are a function of
  the seed and the caller's RNG does not move.
- Faster R-CNN's detection loss is one over the whole batch, not the mean of per-GPU losses of 2
  images: the same whenever every image fills its 256 anchor and 512 RoI samples (its normalisers
  count the samples).
- The official Faster R-CNN stage-1 config builds an R50 and loads the R101 teacher's checkpoint into
  it non-strictly (``train/methods/maskd.py`` states it); here the tokens are learnt on the teacher itself.

Stored once per cache (precompute does this):

    result = learn_receptive_tokens(teacher, dataset, device="cuda")
    writer.put_artifact(MASKD_ARTIFACT, result["state"], result["meta"])
    ...
    tokens = load_receptive_tokens(cache.artifact(MASKD_ARTIFACT))    # stage 2, frozen
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from detectors.detector import BaseDetector
from detectors.views import Batch, collate

MASKD_ARTIFACT = "maskd_tokens"
NUM_TOKENS = 6
TOKEN_INIT_STD = 0.01
DICE_EPS = 1e-12
OPTIMIZERS = ("adam", "sgd")
SGD_MOMENTUM = 0.9  # mmdetection's configs/_base_/schedules/schedule_2x.py (the Faster R-CNN stage 1)
# Final losses in the meta are averaged over this many last iterations (fewer if iters is smaller).
FINAL_LOSS_WINDOW = 20


def dice_diversity(masks: Tensor, eps: float = DICE_EPS) -> Tensor:
    """Mean Dice coefficient between different tokens' masks: (N, T, H, W) -> scalar.

    Mean over images and ordered pairs i ≠ j of 2⟨M_i, M_j⟩ / (‖M_i‖² + ε + ‖M_j‖² + ε), sums over
    all positions. Low when the tokens attend to different places.
    """
    n, num_tokens = masks.shape[:2]
    if num_tokens < 2:
        raise ValueError(f"Dice diversity needs at least 2 tokens, got {num_tokens}")
    flat = masks.reshape(n, num_tokens, -1)  # (N, T, HW)
    inner = flat @ flat.transpose(1, 2)  # (N, T, T) ⟨M_i, M_j⟩
    squared_norms = inner.diagonal(dim1=1, dim2=2) + eps  # (N, T)
    dice = 2 * inner / (squared_norms[:, :, None] + squared_norms[:, None, :])  # (N, T, T)
    off_diagonal = ~torch.eye(num_tokens, dtype=torch.bool, device=masks.device)  # (T, T)
    return dice[:, off_diagonal].mean()


class LevelTokens(nn.Module):
    """The receptive tokens and token-weight (prob) head of one FPN level."""

    def __init__(self, channels: int, num_tokens: int = NUM_TOKENS) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, channels).normal_(0, TOKEN_INIT_STD))  # (T, C)
        self.prob_head = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, num_tokens, kernel_size=1),
        )
        for module in self.prob_head.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)

    def masks(self, features: Tensor) -> Tensor:
        """Features (N, C, H, W) -> masks (N, T, H, W) = σ(token_t · F) in (0, 1)."""
        return torch.einsum("tc,nchw->nthw", self.tokens, features).sigmoid()

    def weights(self, features: Tensor) -> Tensor:
        """Features (N, C, H, W) -> token weights p (N, T), a softmax over tokens."""
        return self.prob_head(features).flatten(1).softmax(dim=1)  # (N, T, 1, 1) -> (N, T)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Features (N, C, H, W) -> masked features Σ_t p_t (M_t ⊙ F) (N, C, H, W) and masks (N, T, H, W)."""
        masks = self.masks(features)  # (N, T, H, W)
        weights = self.weights(features)  # (N, T)
        # Σ_t p_t (M_t ⊙ F) = F ⊙ Σ_t p_t M_t: one (N, 1, H, W) map instead of (N, T, C, H, W).
        combined = (weights[:, :, None, None] * masks).sum(dim=1, keepdim=True)  # (N, 1, H, W)
        return features * combined, masks


class ReceptiveTokens(nn.Module):
    """MasKD receptive tokens for every FPN level (P3..P7, or Faster R-CNN's P2..P6): ``levels[l]`` is a
    :class:`LevelTokens`.

    State dict keys: ``levels.{l}.tokens`` (T, C) and ``levels.{l}.prob_head.{0,2}.{weight,bias}``.
    """

    def __init__(self, channels: int = 256, num_levels: int = 5, num_tokens: int = NUM_TOKENS) -> None:
        super().__init__()
        if num_tokens < 2:
            raise ValueError(f"MasKD needs at least 2 tokens per level, got {num_tokens}")
        self.channels, self.num_levels, self.num_tokens = channels, num_levels, num_tokens
        self.levels = nn.ModuleList([LevelTokens(channels, num_tokens) for _ in range(num_levels)])

    def masks(self, features: Tensor, level: int) -> Tensor:
        """Level ``level``'s features (N, C, H, W) -> masks (N, T, H, W) in (0, 1)."""
        return self.levels[level].masks(features)

    def weights(self, features: Tensor, level: int) -> Tensor:
        """Level ``level``'s features (N, C, H, W) -> token weights p (N, T), summing to 1."""
        return self.levels[level].weights(features)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level features (N, C, H_l, W_l) -> per level masked features and masks (N, T, H_l, W_l)."""
        if len(features) != self.num_levels:
            raise ValueError(f"receptive tokens built for {self.num_levels} levels got {len(features)}")
        outputs = [level(f) for level, f in zip(self.levels, features)]
        return [masked for masked, _ in outputs], [masks for _, masks in outputs]


def load_receptive_tokens(arrays: dict[str, Any]) -> ReceptiveTokens:
    """Rebuild :class:`ReceptiveTokens` from its state dict (``Cache.artifact(MASKD_ARTIFACT)``'s
    numpy arrays, or ``learn_receptive_tokens(...)["state"]``). Levels, tokens and channels come
    from the shapes. Returned in eval mode with frozen parameters (stage 2 does not train them).
    """
    if "state" in arrays and isinstance(arrays["state"], dict):  # the whole learn_receptive_tokens result
        arrays = arrays["state"]
    state = {key: torch.as_tensor(value) for key, value in arrays.items()}
    token_keys = sorted((k for k in state if k.startswith("levels.") and k.endswith(".tokens")),
                        key=lambda k: int(k.split(".")[1]))
    if not token_keys:
        raise ValueError(f"no receptive tokens (levels.<l>.tokens) among the keys {sorted(state)}")
    num_tokens, channels = state[token_keys[0]].shape
    module = ReceptiveTokens(channels=int(channels), num_levels=len(token_keys), num_tokens=int(num_tokens))
    module.load_state_dict(state, strict=True)
    module.eval().requires_grad_(False)
    return module


def stage1_losses(model: BaseDetector, tokens: ReceptiveTokens, batch: Batch) -> dict[str, Tensor]:
    """The stage-1 loss terms on one batch: ``detection`` (the frozen teacher's loss on the masked
    features, summed over its terms) and ``diversity`` (Dice, summed over levels).

    Gradients reach ``tokens`` only; the caller freezes the teacher (see :func:`learn_receptive_tokens`).
    """
    with torch.no_grad():
        features = list(model.backbone(batch.images).values())  # P3..P7 (P2..P6), each (N, C, H_l, W_l)
    masked, masks = tokens(features)
    losses = model.forward_features(masked, batch.image_sizes, batch.targets).losses
    detection = torch.stack(list(losses.values())).sum()
    diversity = torch.stack([dice_diversity(level_masks) for level_masks in masks]).sum()
    return {"detection": detection, "diversity": diversity}


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """Stage 1's optimiser: ``"adam"`` (L2 weight decay, as mmcv's Adam) or ``"sgd"`` (momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"MasKD stage-1 optimizer must be one of {OPTIMIZERS}, got {name!r}")


def cosine_lr(iteration: int, iters: int, lr: float, min_lr: float) -> float:
    """mmcv's per-iteration CosineAnnealing: min_lr + (lr − min_lr)(1 + cos(π·iteration/iters))/2."""
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * iteration / iters))


class _SeededDraws(torch.utils.data.Sampler):
    """Shuffled ``(index, sample_seed)`` pairs, every epoch, from one generator seeded with ``seed``.

    Drawn in the main process, so the order and each sample's seed do not depend on the loader's
    worker count (see :class:`_SeededSamples`).
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.length, generator=self.generator)  # (length,)
        sample_seeds = torch.randint(2 ** 62, (self.length,), generator=self.generator)  # (length,)
        return iter(zip(order.tolist(), sample_seeds.tolist()))


class _SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` with the global RNGs (torch, numpy, random) seeded with the sample's seed and
    restored afterwards.

    A dataset that draws from the global RNG (``CocoDetection(view_policy="random")`` draws each
    image's view with ``torch.randint``) would otherwise draw from the caller's unseeded state with
    ``num_workers=0``, and from per-worker streams, which depend on the worker count, otherwise.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: tuple[int, int]) -> Any:
        index, sample_seed = draw
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed % 2 ** 32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _endless_batches(dataset_or_loader: torch.utils.data.Dataset | Iterable[Batch], batch_size: int,
                     num_workers: int, seed: int) -> Iterator[Batch]:
    """Batches forever: a Dataset of Samples is shuffled and collated, bit-identically for a ``seed``
    whatever ``num_workers`` (each sample's random draws are seeded from ``seed``, see
    :class:`_SeededSamples`; the caller's global RNGs are neither read nor moved); an iterable of
    Batches (a DataLoader, a list) is iterated again each time it runs out."""
    if isinstance(dataset_or_loader, torch.utils.data.Dataset) and not isinstance(
            dataset_or_loader, torch.utils.data.IterableDataset):
        if len(dataset_or_loader) == 0:
            raise ValueError("the dataset is empty")
        # The loader's own generator only seeds its workers (which then draw nothing): without it the
        # loader would take their base seed from the global RNG.
        batches = torch.utils.data.DataLoader(_SeededSamples(dataset_or_loader), batch_size=batch_size,
                                              sampler=_SeededDraws(len(dataset_or_loader), seed),
                                              collate_fn=collate, num_workers=num_workers,
                                              generator=torch.Generator().manual_seed(seed),
                                              drop_last=len(dataset_or_loader) >= batch_size)
    else:
        batches = dataset_or_loader
    for epoch in itertools.count():
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"no batches in {type(dataset_or_loader).__name__} (epoch {epoch})")


def learn_receptive_tokens(model: BaseDetector, dataset_or_loader: torch.utils.data.Dataset | Iterable[Batch],
                           iters: int = 2000, lr: float = 0.01, weight_decay: float = 1e-3,
                           batch_size: int = 16, device: torch.device | str | None = None,
                           progress: bool = True, seed: int = 0, *, num_tokens: int = NUM_TOKENS,
                           min_lr: float = 1e-6, num_workers: int = 0, optimizer: str = "adam",
                           tokens: ReceptiveTokens | None = None) -> dict[str, dict]:
    """MasKD stage 1 with the teacher ``model`` frozen; returns ``{"state": ..., "meta": ...}``.

    Args:
        model: the teacher detector (dense or Faster R-CNN); moved to ``device`` (default: where it
            is). Left as it was: its parameters, buffers, ``requires_grad`` flags and train/eval mode
            are restored.
        dataset_or_loader: a Dataset of ``Sample`` (e.g. ``CocoDetection``: shuffled with ``seed``,
            batches of ``batch_size``, ``num_workers`` loader processes), or an iterable of
            ``Batch`` (a DataLoader with ``collate``, a list), restarted whenever it runs out.
        iters, lr, weight_decay, min_lr, optimizer: ``optimizer`` ("adam", or "sgd" with momentum 0.9)
            with L2 weight decay, lr cosine from ``lr`` to ``min_lr`` over ``iters`` iterations (the
            official 2000, Adam 0.01 and 1e-3 for the dense families, SGD 0.1 and 1e-4 for Faster R-CNN, 1e-6).
        batch_size: images per iteration for a Dataset (official: 16 in total over 8 GPUs).
        seed: token and prob-head initialisation, the shuffling order, each sample's random draws
            (its view) and Faster R-CNN's sampling: the tokens are bit-identical for a seed whatever
            ``num_workers``.
        tokens: start from these tokens instead of a fresh initialisation (trained in place).

    Returns:
        ``state``: the tokens' state dict (CPU tensors), for ``writer.put_artifact(MASKD_ARTIFACT,
        state, meta)`` and :func:`load_receptive_tokens`; ``meta``: JSON-ready settings (num_tokens,
        channels, num_levels, iters, optimizer, lr, images_seen, ...) and the losses of the first iteration
        and the mean over the last ``FINAL_LOSS_WINDOW`` iterations (``initial_*`` and ``final_*``:
        detection, diversity).

    Raises FloatingPointError on a non-finite loss.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    channels, num_levels = model.config.fpn_channels, len(model.strides)
    if tokens is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            tokens = ReceptiveTokens(channels, num_levels, num_tokens)
    elif (tokens.channels, tokens.num_levels) != (channels, num_levels):
        raise ValueError(f"tokens for {tokens.num_levels} levels of {tokens.channels} channels do not fit a "
                         f"teacher with {num_levels} levels of {channels} channels")
    tokens = tokens.to(device).train().requires_grad_(True)
    token_optimizer = make_optimizer(optimizer, tokens.parameters(), lr, weight_decay)

    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    # The official hook: training mode (Faster R-CNN's training proposal counts), BN in eval (uses
    # and keeps its running statistics).
    model.to(device).train().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
    history: list[tuple[float, float]] = []  # (detection, diversity) per iteration
    images_seen = 0
    try:
        batches = _endless_batches(dataset_or_loader, batch_size, num_workers, seed)
        # Faster R-CNN samples anchors and RoIs from torch's RNG: a fork of it, seeded.
        with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
              tqdm(total=iters, desc="maskd tokens", disable=not progress) as bar):
            torch.manual_seed(seed)
            for iteration, batch in zip(range(iters), batches):
                for group in token_optimizer.param_groups:
                    group["lr"] = cosine_lr(iteration, iters, lr, min_lr)
                losses = stage1_losses(model, tokens, batch.to(device))
                loss = losses["detection"] + losses["diversity"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite MasKD stage-1 loss at iteration {iteration}: "
                                             + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
                token_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                token_optimizer.step()
                history.append((losses["detection"].item(), losses["diversity"].item()))
                images_seen += len(batch.image_sizes)
                bar.update(1)
                bar.set_postfix(det=f"{history[-1][0]:.3f}", div=f"{history[-1][1]:.3f}")
    finally:
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)

    window = history[-FINAL_LOSS_WINDOW:]
    meta = dict(method="maskd", stage=1, num_tokens=tokens.num_tokens, channels=channels, num_levels=num_levels,
                iters=iters, optimizer=optimizer, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                images_seen=images_seen, seed=seed,
                initial_detection_loss=history[0][0], initial_diversity_loss=history[0][1],
                final_detection_loss=sum(d for d, _ in window) / len(window),
                final_diversity_loss=sum(v for _, v in window) / len(window))
    state = {key: value.detach().cpu().clone() for key, value in tokens.state_dict().items()}
    return {"state": state, "meta": meta}
