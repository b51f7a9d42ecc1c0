"""Decoded payloads as torch tensors on a device, for the codecs' ``dequantize``.

torch has little uint16 / uint32 support, so unsigned codes cross as int16 / int32 of the same
bits and the dequantisation masks them back. torch is imported on first use (the store reads and
writes without it).
"""
from __future__ import annotations

import numpy as np


def as_device_tensor(value, device):
    """A numpy array or tensor on ``device``, uint16 / uint32 reinterpreted as int16 / int32."""
    import torch

    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:
            value = value.view(np.int16)
        elif value.dtype == np.uint32:
            value = value.view(np.int32)
        value = torch.from_numpy(np.asarray(value, order="C"))
    elif value.dtype == torch.uint16:
        value = value.view(torch.int16)
    elif value.dtype == torch.uint32:
        value = value.view(torch.int32)
    return torch.as_tensor(value).to(device, non_blocking=True)
