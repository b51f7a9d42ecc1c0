"""detectors.runtime: torchrun's environment, the device and the autocast dtype of a run."""
import pytest
import torch

from detectors.runtime import AMP_DTYPES, dist_env, resolve_amp, resolve_device


def test_dist_env_defaults_and_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert dist_env() == (3, 4, 3)   # LOCAL_RANK defaults to the rank
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == (3, 4, 1)


def test_resolve_device_cpu():
    assert resolve_device("cpu", 0) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", 0) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda", 0)


def test_cudnn_benchmark_is_off_unless_asked(monkeypatch):
    """Detection batches are padded to their images' aspect ratios: cuDNN's per-shape kernel timing
    stays off on a CUDA device unless --cudnn-benchmark asks for it (no GPU here: CUDA's calls faked)."""
    from precompute.config import PrecomputeConfig
    from train.config import TrainConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert resolve_device("cuda", 3) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert torch.backends.cudnn.benchmark is False
    resolve_device("cuda:0", 0, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is True
    assert TrainConfig.__dataclass_fields__["cudnn_benchmark"].default is False
    assert PrecomputeConfig.__dataclass_fields__["cudnn_benchmark"].default is False


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None           # bf16 only on a CUDA device
    assert resolve_amp("none", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of auto, none, bf16, fp16"):
        resolve_amp("fp32", cpu)
    assert set(AMP_DTYPES) == {"none", "bf16", "fp16"}
