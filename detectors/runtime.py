"""What precompute and train both need at run time: this process's rank, its device, its autocast dtype.

    rank, world_size, local_rank = dist_env()          # torchrun's environment, (0, 1, 0) without it
    device = resolve_device("auto", local_rank)        # cuda (the local rank's GPU) if available, else cpu
    amp_dtype = resolve_amp("auto", device)            # for Detector.forward(..., amp_dtype=amp_dtype)
"""
from __future__ import annotations

import os

import torch

# --amp names -> autocast dtype (None: float32 throughout).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def resolve_device(name: str, local_rank: int, cudnn_benchmark: bool = False) -> torch.device:
    """The device for ``--device NAME`` (auto | cpu | cuda | cuda:N); plain ``cuda`` is the local rank's GPU.

    Selects a CUDA device as the current one. ``cudnn_benchmark``: cuDNN times its kernels for every
    new input shape. Off by default, as in detectron2 and mmdetection: detection batches are padded
    to their images' aspect ratios, so most batches are new shapes, and timing every conv again for
    each costs more than the faster kernels save.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available here (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return device


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp NAME`` on ``device``: a key of ``AMP_DTYPES``, or ``auto``
    (bf16 on a CUDA device that supports it, else none); fp16 is refused off CUDA."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if name not in AMP_DTYPES:
        raise ValueError(f"amp must be one of auto, {', '.join(AMP_DTYPES)}; got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (bf16 works on CPU)")
    return AMP_DTYPES[name]
