"""The resume state of a student run (``out/last.pt``) and the checkpoint files a run writes.

``last.pt`` is a detector checkpoint of the student (``detectors.save_checkpoint``) whose
``extra["train_state"]`` holds the rest of the run: the format tag, the config keys a resumption
must repeat, the trainer's own state (distiller parts, optimisers, schedulers, AMP scaler, data
position, history) and the Python, NumPy, torch and CUDA RNG states, so that a resumed run reaches
exactly the weights of an uninterrupted one.

    write_checkpoint(path, student, train_state=run_state(config.to_dict(), iteration=..., ...))
    weights, state = read_run_state(path, config.to_dict(), manifest_id)   # refuses another config
    ...                                                                     # the trainer's own parts
    set_rng_state(state["rng"])
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors import save_checkpoint
from detectors.detector import Detector

STATE_FORMAT = "detkd-student-train/1"

# Options that may change between a run and its resumption: they do not change the weights' trajectory.
RESUME_FREE_KEYS = ("out", "on_error", "workers", "prefetch_batches", "eval", "eval_every", "eval_batch_size",
                    "ckpt_every", "stop_after", "resume", "log_every", "tensorboard", "progress", "device")


def run_state(config: dict[str, Any], **state: Any) -> dict[str, Any]:
    """The run state to save: the format, the config keys a resumption must repeat (``config``: the
    TrainConfig as a dict), the trainer's ``state`` and the RNG states as they are now."""
    return {"format": STATE_FORMAT, "config": _resume_bound(config), **state, "rng": rng_state()}


def read_run_state(path: Path, config: dict[str, Any], manifest_id: str | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The student's weights and the run state saved in ``path``. Raises ValueError for a file that
    is not a student training checkpoint, or for a run configured otherwise than ``config`` (every
    key outside RESUME_FREE_KEYS) or that read another cache (``manifest_id``), naming each difference."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("extra", {}).get("train_state")
    if state is None or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a student training checkpoint ({STATE_FORMAT})")
    differ = [f"{k}: checkpoint {state['config'].get(k)!r}, now {v!r}" for k, v in _resume_bound(config).items()
              if json.dumps(state["config"].get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
    if state["cache_manifest_id"] != manifest_id:
        differ.append(f"cache manifest id: checkpoint {state['cache_manifest_id']}, now {manifest_id}")
    if differ:
        raise ValueError(f"cannot resume {path}: the run was configured differently (" + "; ".join(differ)
                         + "). Resume with the same options, or write to a new --out")
    return checkpoint["state_dict"], state


def write_checkpoint(path: Path, model: Detector, **extra: Any) -> None:
    """``save_checkpoint``, whose failure (e.g. a full disk) names the path and leaves no temporary file."""
    temporary = Path(path).with_name(Path(path).name + ".tmp")   # save_checkpoint's temporary name
    try:
        save_checkpoint(path, model, **extra)
    except (OSError, RuntimeError) as error:   # torch.save reports a failed write as a RuntimeError
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
        message = f"cannot save the checkpoint {path}: {reason} (the previous {Path(path).name}, if any, is intact)"
        if isinstance(error, OSError):
            raise OSError(error.errno, message) from None
        raise RuntimeError(message) from None


def rng_state() -> dict:
    """The Python, NumPy, torch (and, once initialised, CUDA) RNG states, as tensors and plain values
    that ``torch.load(weights_only=True)`` reads back."""
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` saved."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_bound(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys a resumption must repeat."""
    return {k: v for k, v in config.items() if k not in RESUME_FREE_KEYS}


def _as_tuple(value):
    """Python's RNG state back from its saved form (tuples saved as lists)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
