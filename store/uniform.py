"""The ``uniform`` codec: one uniform scalar quantiser per field of a sample, with an encoder-checked
relative RMSE bound, for fields no channel transform fits (LD's region rows, ``(R, K)``).

Every value is quantised with one step ``step = sqrt(12) * target_rel_rmse * rms(x)``: for steps
small against the spread of x the error is uniform on (-step/2, step/2), so its RMS is
``target_rel_rmse * rms(x)``. Coarse steps break that approximation (values near zero all become
zero), so the encoder measures the exact relative RMSE and tightens the step until it is under
``max_rel_rmse``, as the KLT codec does. The integers are zigzag-mapped, bit-shuffled and
Zstd-coded.
"""
from __future__ import annotations

import math

import numpy as np

from .blob import FieldCodec, compress_part, decompress_part
from .errors import CacheError


class UniformCodec(FieldCodec):
    """x ~ step * rint(x / step), ``||x^ - x|| / ||x|| <= max_rel_rmse`` for every blob."""

    codec_id = "detkd.uniform"

    def __init__(self, max_rel_rmse=0.01, target_rel_rmse=None, clevel=5):
        self.max_rel_rmse = float(max_rel_rmse)
        self.target_rel_rmse = float(target_rel_rmse if target_rel_rmse is not None else 0.8 * self.max_rel_rmse)
        if not 0 < self.target_rel_rmse <= self.max_rel_rmse < 1:
            raise CacheError(f"UniformCodec needs 0 < target_rel_rmse <= max_rel_rmse < 1, got "
                             f"{self.target_rel_rmse} and {self.max_rel_rmse}")
        self.clevel = int(clevel)

    def get_config(self):
        return dict(id=self.codec_id, max_rel_rmse=self.max_rel_rmse, target_rel_rmse=self.target_rel_rmse,
                    clevel=self.clevel)

    def error_bound(self) -> dict:
        return dict(kind="rel_rmse", value=self.max_rel_rmse,
                    note="||x^-x||_2 / ||x||_2 over one field of one sample, checked by the encoder")

    def _encode(self, arr):
        x = np.asarray(arr, dtype=np.float32).reshape(-1)
        energy = float(np.vdot(x, x))
        if not math.isfinite(energy):
            raise CacheError("uniform codec: input has non-finite values (or overflows)")
        if energy == 0:                                                    # all zeros (or empty)
            return dict(dtype="float32", zero=True), []
        step = math.sqrt(12.0) * self.target_rel_rmse * math.sqrt(energy / x.size)
        for _ in range(40):
            q = np.rint(x * np.float32(1 / step))
            err = x - q * np.float32(step)
            rel = math.sqrt(float(np.vdot(err, err)) / energy)
            if rel <= self.max_rel_rmse * 0.995:                          # margin for float32 sums
                break
            step *= 0.9 * self.max_rel_rmse / rel
        else:
            raise CacheError(f"uniform codec could not reach rel RMSE {self.max_rel_rmse} (got {rel:.4g})")
        zigzag = np.where(q < 0, -2 * q - 1, 2 * q)                        # 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
        top = float(zigzag.max(initial=0))
        if top >= 2 ** 31:
            raise CacheError("uniform codec: value range too large for the step size")
        qdtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
        return (dict(dtype="float32", step=step, qdtype=np.dtype(qdtype).str),
                [compress_part(zigzag.astype(qdtype), "zstd", self.clevel, "bit")])

    def _decode(self, header, parts):
        if header.get("zero"):
            return np.zeros(header["shape"], np.float32)
        count = int(np.prod(header["shape"], dtype=np.int64))
        codes = decompress_part(parts[0], np.dtype(header["qdtype"]), count, "zstd").astype(np.int64)
        q = np.where(codes & 1, -(codes + 1) // 2, codes // 2)
        return (q.astype(np.float32) * np.float32(header["step"])).reshape(header["shape"])
