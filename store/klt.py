"""The KLT codec family: ``klt``, ``klt-dpcm`` and ``klt-dct`` (store/codecs.py's presets).

KLT (transform coding across channels): a per-level orthonormal basis U (C x C, eigenvectors of
the channel covariance of calibration maps, sorted by variance) and mean mu are fitted once and
stored in the codec config. A map x (C, H, W) becomes coefficients Y = U^T (x - mu); every
coefficient is quantised with one step size ``step = sqrt(12) * target_rel_rmse * rms(x)`` (the
MSE-optimal equal-distortion choice; low-variance components quantise to zero and cost almost
nothing), zigzag-mapped to unsigned ints, bit-shuffled and Zstd-coded. Because U is orthonormal
the reconstruction error equals the coefficient quantisation error, so the encoder measures the
exact relative RMSE and tightens the step if it would exceed ``max_rel_rmse``.

The spatial variants code each plane of quantised coefficients further: ``dpcm`` predicts it from
its decoded neighbours (lossless on the integers), ``dct`` quantises its 2-D DCT (see ``KLTCodec``).

Decoding to compact form gives ``KLTCoeffs``, the zigzag codes of the coefficients (uint8 when they
fit, as they do at loose bounds, else uint16), which travel to the accelerator as they are;
``dequantize_klt`` expands them there (the basis is sent once per device).
"""
from __future__ import annotations

import base64
import functools
import math
from dataclasses import dataclass

import numpy as np

from .blob import FieldCodec, compress_part, decompress_part
from .errors import CacheError, CorruptShardError
from .tensors import as_device_tensor


@dataclass
class KLTCoeffs:
    """x = basis[:, components] @ (unzigzag(codes) * step) + mean, reshaped to ``shape``.

    ``basis`` and ``mean`` are the codec's (shared by every sample of the field); they are left out
    when the object is pickled (loader worker -> main process), and ``Cache.dequantize`` or
    ``dequantize(value, codec=...)`` supplies them again."""
    codes: object            # uint8 / uint16 / uint32 zigzag codes (k, H*W): 0, 1, 2, 3, ... = 0, -1, 1, -2, ...
    components: object       # int64 (k,) indices into the basis columns
    step: float
    shape: tuple
    basis: np.ndarray | None = None    # float32 (C, C)
    mean: np.ndarray | None = None     # float32 (C,)

    def __getstate__(self):
        return dict(self.__dict__, basis=None, mean=None)

    @property
    def q(self) -> np.ndarray:
        """The signed quantised coefficients, decoded on the CPU (``dequantize`` does it on the device)."""
        return _unzigzag(np.asarray(self.codes))


_DEVICE_BASES: dict = {}   # (id(basis), device) -> (basis, its tensor, the mean's tensor): sent once per device


def dequantize_klt(value: KLTCoeffs, device, dtype, codec=None):
    """``value`` as a ``dtype`` tensor (its ``shape``) on ``device``, expanded there.
    ``codec``: the field's KLTCodec, for KLTCoeffs that came through a loader worker."""
    import torch

    basis_np = value.basis if value.basis is not None else getattr(codec, "basis", None)
    mean_np = value.mean if value.mean is not None else getattr(codec, "mean", None)
    if basis_np is None:
        raise CacheError("KLTCoeffs without its basis (it came through a loader worker): "
                         "use Cache.dequantize(sample) or dequantize(value, codec=cache.manifest.codec(field))")
    key = (id(basis_np), str(device))
    cached = _DEVICE_BASES.get(key)
    if cached is None or cached[0] is not basis_np:
        cached = (basis_np, as_device_tensor(basis_np, device), as_device_tensor(mean_np, device))
        _DEVICE_BASES[key] = cached
    _, basis, mean = cached
    hw = int(np.prod(value.shape[1:]))
    if len(value.components) == 0:
        flat = mean[:, None].expand(-1, hw)
    else:
        codes = as_device_tensor(value.codes, device)
        wide = codes.to(torch.int64)
        if codes.dtype in (torch.int16, torch.int32):                      # back to the unsigned code
            wide &= 0xFFFF if codes.dtype == torch.int16 else 0xFFFFFFFF
        q = (wide >> 1) ^ -(wide & 1)                                    # (k, HW) signed
        coeff = q.to(torch.float32) * value.step
        components = as_device_tensor(value.components, device)
        flat = torch.addmm(mean[:, None], basis[:, components], coeff)  # (C, HW)
    return flat.reshape(value.shape).to(dtype)


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode()


def _from_b64(value, shape=None) -> np.ndarray:
    if isinstance(value, str):
        arr = np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    else:
        arr = np.asarray(value, dtype=np.float32)
    return arr.reshape(shape) if shape is not None else arr


class KLTCodec(FieldCodec):
    """Transform coding across channels with a fitted orthonormal basis (see module docstring).

    ``spatial`` decides what happens to each plane of quantised coefficients in space:
    ``none`` stores them as they are; ``dpcm`` stores each plane's residual against a prediction
    from its already-decoded neighbours (none, left, up or the floor of their average, whichever is
    cheapest for that plane), which is lossless on the integers, so the error is exactly KLT's; ``dct``
    quantises the planes' orthonormal 2-D DCT instead of the planes (3-D transform coding; the error
    still equals the quantisation error, so the encoder's check stays exact)."""

    codec_id = "detkd.klt"
    SPATIAL = ("none", "dpcm", "dct")
    _PREDICTORS = ("none", "left", "up", "average")     # dpcm's per-plane choices (2 bits each)

    def __init__(self, mean, basis, max_rel_rmse=0.01, target_rel_rmse=None, clevel=5, variance=None,
                 spatial="none"):
        self.mean = _from_b64(mean)
        channels = self.mean.size
        self.basis = _from_b64(basis, (channels, channels))
        self.variance = None if variance is None else _from_b64(variance)
        self.max_rel_rmse = float(max_rel_rmse)
        self.target_rel_rmse = float(target_rel_rmse if target_rel_rmse is not None else 0.8 * self.max_rel_rmse)
        if not 0 < self.target_rel_rmse <= self.max_rel_rmse < 1:
            raise CacheError(f"KLTCodec needs 0 < target_rel_rmse <= max_rel_rmse < 1, got "
                             f"{self.target_rel_rmse} and {self.max_rel_rmse}")
        if spatial not in self.SPATIAL:
            raise CacheError(f"KLTCodec spatial must be one of {self.SPATIAL}, got {spatial!r}")
        self.spatial = spatial
        self.clevel = int(clevel)
        self._projected_mean = (self.basis.T.astype(np.float64) @ self.mean).astype(np.float32)   # U^T mean

    @classmethod
    def fit(cls, maps, max_pixels: int = 262_144, seed: int = 0, **kwargs) -> "KLTCodec":
        """Fit mean and basis on calibration maps, each (C, H, W) (or (C, N)) of one level."""
        rng = np.random.default_rng(seed)
        columns = [np.asarray(m, dtype=np.float32).reshape(np.shape(m)[0], -1) for m in maps]
        if not columns:
            raise CacheError("KLTCodec.fit needs at least one calibration map")
        x = np.concatenate(columns, axis=1)                                 # (C, N)
        if x.shape[1] > max_pixels:
            x = x[:, rng.choice(x.shape[1], max_pixels, replace=False)]
        x = x.astype(np.float64)
        mean = x.mean(axis=1)
        centred = x - mean[:, None]
        cov = centred @ centred.T / max(1, x.shape[1] - 1)                # (C, C)
        variance, basis = np.linalg.eigh(cov)
        order = np.argsort(variance)[::-1]
        return cls(mean=mean.astype(np.float32), basis=basis[:, order].astype(np.float32),
                   variance=np.maximum(variance[order], 0).astype(np.float32), **kwargs)

    def get_config(self):
        cfg = dict(id=self.codec_id, mean=_b64(self.mean), basis=_b64(self.basis),
                   max_rel_rmse=self.max_rel_rmse, target_rel_rmse=self.target_rel_rmse, clevel=self.clevel)
        if self.variance is not None:
            cfg["variance"] = _b64(self.variance)
        if self.spatial != "none":          # configs written before the option decode as they did
            cfg["spatial"] = self.spatial
        return cfg

    def error_bound(self) -> dict:
        return dict(kind="rel_rmse", value=self.max_rel_rmse,
                    note="||x^-x||_2 / ||x||_2 over one field of one sample, checked by the encoder")

    def energy_in(self, k: int) -> float | None:
        """Fraction of calibration variance in the first k components (for ``inspect``)."""
        if self.variance is None or self.variance.sum() == 0:
            return None
        return float(self.variance[:k].sum() / self.variance.sum())

    def _encode(self, arr):
        channels = self.mean.size
        if arr.ndim < 1 or arr.shape[0] != channels:
            raise CacheError(f"KLT codec was fitted on {channels} channels; got shape {tuple(arr.shape)}")
        if self.spatial != "none" and arr.ndim != 3:
            raise CacheError(f"KLT codec with spatial={self.spatial} needs (C, H, W) maps; got shape {tuple(arr.shape)}")
        x = np.asarray(arr, dtype=np.float32).reshape(channels, -1)       # (C, HW)
        flat = x.reshape(-1)
        energy = float(np.vdot(flat, flat))
        if not math.isfinite(energy):
            raise CacheError("KLT codec: input has non-finite values (or overflows)")
        if energy == 0:                                                    # all zeros (or empty)
            return dict(dtype="float32", zero=True), []
        rms = math.sqrt(energy / x.size)
        coeff = self.basis.T @ x                                           # (C, HW) = U^T (x - mean)
        coeff -= self._projected_mean[:, None]
        if self.spatial == "dct":                                          # orthonormal: same error in both domains
            coeff = _dct2(coeff.reshape(arr.shape), inverse=False).reshape(channels, -1)
        step = math.sqrt(12.0) * self.target_rel_rmse * rms
        for _ in range(20):                       # the first try nearly always lands under the bound
            scaled = coeff * np.float32(1 / step)
            q = np.rint(scaled)                                            # (C, HW) float32 integers
            scaled -= q                                                    # quantisation error / step
            err = scaled.reshape(-1)
            rel = step * math.sqrt(float(np.vdot(err, err)) / energy)
            if rel <= self.max_rel_rmse * 0.995:  # margin for float32 sums
                break
            step *= 0.9 * self.max_rel_rmse / rel
        else:
            raise CacheError(f"KLT codec could not reach rel RMSE {self.max_rel_rmse} (got {rel:.4g})")
        used = np.flatnonzero(q.any(axis=1))                               # components not all zero
        if len(used) < channels:
            q = q[used]
        parts = []
        if self.spatial == "dpcm":                # 2 bits per plane: its predictor
            q, predictors = _predict_planes(q.reshape(len(used), *arr.shape[1:]))
            q = q.reshape(len(used), -1)
            parts.append(np.packbits(np.unpackbits(predictors[:, None], axis=1)[:, -2:].reshape(-1)).tobytes())
        zigzag = _zigzag(q)
        top = float(zigzag.max(initial=0))
        if top >= 2 ** 24:
            raise CacheError("KLT codec: coefficient range too large for the step size")
        qdtype = np.uint16 if top < 65536 else np.uint32
        payload = compress_part(zigzag.astype(qdtype), "zstd", self.clevel, "bit")
        used_mask = np.zeros(channels, dtype=bool)
        used_mask[used] = True
        return (dict(dtype="float32", step=step, components=np.packbits(used_mask).tobytes().hex(),
                     qdtype=np.dtype(qdtype).str), [payload, *parts])

    def _codes(self, header, parts):
        """Zigzag codes (k, HW) of the quantised coefficients and the component indices they belong to."""
        mask = np.unpackbits(np.frombuffer(bytes.fromhex(header["components"]), np.uint8), count=self.mean.size)
        components = np.flatnonzero(mask).astype(np.int64)
        hw = int(np.prod(header["shape"][1:], dtype=np.int64))
        codes = decompress_part(parts[0], np.dtype(header["qdtype"]), len(components) * hw, "zstd")
        codes = codes.reshape(len(components), hw)
        if self.spatial == "dpcm":                                        # residuals -> coefficients
            if len(parts) != 2 or len(parts[1]) != (2 * len(components) + 7) // 8:
                raise CorruptShardError("KLT blob: its predictors do not match its components")
            bits = np.unpackbits(np.frombuffer(parts[1], np.uint8), count=2 * len(components)).reshape(-1, 2)
            predictors = 2 * bits[:, 0] + bits[:, 1]
            planes = _unzigzag(codes).reshape(len(components), *header["shape"][1:])
            codes = _zigzag(_unpredict_planes(planes, predictors).reshape(len(components), hw))
            codes = codes.astype(np.uint16 if codes.max(initial=0) < 65536 else np.uint32)
        return codes, components

    def _coeffs(self, header, parts):
        """Coefficients (k, HW) in float32, already multiplied by the step."""
        codes, components = self._codes(header, parts)
        step = np.float32(header["step"])
        if codes.dtype == np.uint16:                                       # one table lookup per value
            coeff = (_ZIGZAG16 * step).astype(np.float32)[codes]
        else:
            coeff = _unzigzag(codes).astype(np.float32) * step
        if self.spatial == "dct":
            coeff = _dct2(coeff.reshape(len(components), *header["shape"][1:]), inverse=True)
            coeff = coeff.reshape(len(components), -1)
        return coeff, components

    def _decode(self, header, parts):
        if header.get("zero"):
            return np.zeros(header["shape"], np.float32)
        coeff, components = self._coeffs(header, parts)                  # (k, HW), times step
        out = self.basis[:, components] @ coeff                           # (C, HW)
        out += self.mean[:, None]
        return out.reshape(header["shape"])

    def decode_compact(self, buf):
        header, parts = self._unpack(buf)
        if header.get("zero"):
            return np.zeros(header["shape"], np.float32)
        if self.spatial == "dct":       # the inverse DCT runs here: what travels is the map in fp16
            out = self._decode(header, parts)
            return out.astype(np.float16) if np.abs(out).max(initial=0) < 65504 else out
        codes, components = self._codes(header, parts)
        if codes.dtype != np.uint8 and codes.max(initial=0) < 256:
            # Loose bounds keep codes small (under 50 at the default 0.25): one byte each halves what
            # a loader holds, pins and copies to the device, which expands them there.
            codes = codes.astype(np.uint8)
        return KLTCoeffs(codes=codes, components=components, step=float(header["step"]),
                         shape=tuple(header["shape"]), basis=self.basis, mean=self.mean)


def _zigzag(q: np.ndarray) -> np.ndarray:
    """Signed integers (any dtype) -> 0, 1, 2, 3, ... for 0, -1, 1, -2, ... (same dtype)."""
    z = np.abs(q)
    z *= 2
    z -= q < 0                                                             # (not signbit: rint gives -0.0)
    return z


def _unzigzag(codes: np.ndarray) -> np.ndarray:
    z = codes.astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def _neighbours(planes: np.ndarray) -> list[np.ndarray]:
    """The predictions of KLTCodec._PREDICTORS for integer planes (k, H, W), from the left and
    upper neighbours (zero outside the plane)."""
    left = np.zeros_like(planes)
    left[:, :, 1:] = planes[:, :, :-1]
    up = np.zeros_like(planes)
    up[:, 1:, :] = planes[:, :-1, :]
    return [np.zeros_like(planes), left, up, np.floor((left + up) / 2)]


def _predict_planes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residuals (k, H, W) of each integer plane against its cheapest predictor, and the choices (k,) uint8.

    Cost: sum of log2(1 + |residual|), a proxy of the bits an entropy coder spends."""
    residuals = np.stack([q - prediction for prediction in _neighbours(q)])     # (P, k, H, W)
    cost = np.log2(1 + np.abs(residuals)).sum(axis=(2, 3))                     # (P, k)
    choice = cost.argmin(axis=0)
    return np.take_along_axis(residuals, choice[None, :, None, None], axis=0)[0], choice.astype(np.uint8)


def _unpredict_planes(residuals: np.ndarray, predictors: np.ndarray) -> np.ndarray:
    """Inverse of ``_predict_planes`` on int64 residuals: left and up are undone by running sums;
    the average needs both neighbours decoded first, so it runs along the anti-diagonals."""
    q = residuals.copy()
    rows = predictors == 1
    q[rows] = np.cumsum(q[rows], axis=2)
    rows = predictors == 2
    q[rows] = np.cumsum(q[rows], axis=1)
    rows = np.flatnonzero(predictors == 3)
    if len(rows):
        _, h, w = q.shape
        padded = np.zeros((len(rows), h + 1, w + 1), np.int64)    # a zero row above, a zero column left
        for diagonal in range(h + w - 1):
            i = np.arange(max(0, diagonal - w + 1), min(h - 1, diagonal) + 1)
            j = diagonal - i
            padded[:, i + 1, j + 1] = q[rows][:, i, j] + (padded[:, i + 1, j] + padded[:, i, j + 1]) // 2
        q[rows] = padded[:, 1:, 1:]
    return q


@functools.lru_cache(maxsize=64)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): rows are the basis functions."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.astype(np.float32)


def _dct2(planes: np.ndarray, inverse: bool) -> np.ndarray:
    """Orthonormal 2-D DCT-II (or its inverse) of planes (k, H, W)."""
    dh, dw = _dct_matrix(planes.shape[1]), _dct_matrix(planes.shape[2])
    if inverse:
        return np.ascontiguousarray(dh.T @ planes @ dw, dtype=np.float32)      # (k, H, W)
    return np.ascontiguousarray(dh @ planes @ dw.T, dtype=np.float32)


_ZIGZAG16 = _unzigzag(np.arange(65536))   # uint16 code -> signed value
