"""Field codecs: numcodecs ``Codec`` subclasses, registered so that ``numcodecs.get_codec(config)``
rebuilds any of them from the config stored in a cache manifest.

Every codec turns one field of one sample (a numpy array of any shape) into a self-describing
*blob*, and back:

    blob = b"DKB1" | crc32 (4 bytes, little endian, over everything after it)
                   | header length (4 bytes) | header (JSON: codec id, shape, dtype, part sizes,
                   | per-blob parameters such as scales) | parts (compressed payloads)

so a blob decodes without knowing the shape in advance, and a flipped byte anywhere in it raises
``CorruptShardError``. Compression itself is numcodecs' Blosc (Zstd inside, byte or bit shuffle);
only the transforms are written here.

    preset   codec                 lossless  declared error bound (``codec.error_bound()``)
    raw      LosslessCodec()       yes       exact
    fp16     LosslessCodec(fp16)   fp16 in   |x^-x| <= 2**-11 |x| (+2**-25) for fp32 input
    bf16     LosslessCodec(bf16)   bf16 in   |x^-x| <= 2**-8 |x| for fp32 input
    stored   LosslessCodec(none)   yes       exact; no compression (image bytes)
    int8     Int8AffineCodec       no        |x^-x| <= (max_c - min_c) / 510 per channel c
    klt      KLTCodec (fitted)     no        ||x^-x||_2 / ||x||_2 <= max_rel_rmse (0.01), per field
                                             of a sample; checked by the encoder
    klt-dpcm KLTCodec(dpcm)        no        as klt (decodes to exactly klt's values, in fewer bytes)
    klt-dct  KLTCodec(dct)         no        as klt
    sparse   SparseScoreCodec      no        |sigmoid(x^) - sigmoid(x)| <= max(floor/2, 1.2e-4)

A field's codec is given as a spec, ``NAME[:VALUE][,KEY=VALUE...]`` (``parse_codec_spec``): VALUE
sets the preset's main parameter, its error bound (``klt:0.04``, ``sparse:0.001``); KEY=VALUE the
others (``klt:0.04,clevel=9``). ``PRESETS`` lists each name's parameters and the values they take.

KLT (transform coding across channels): a per-level orthonormal basis U (C x C, eigenvectors of
the channel covariance of calibration maps, sorted by variance) and mean mu are fitted once and
stored in the codec config. A map x (C, H, W) becomes coefficients Y = U^T (x - mu); every
coefficient is quantised with one step size ``step = sqrt(12) * target_rel_rmse * rms(x)`` (the
MSE-optimal equal-distortion choice; low-variance components quantise to zero and cost almost
nothing), zigzag-mapped to unsigned ints, bit-shuffled and Zstd-coded. Because U is orthonormal
the reconstruction error equals the coefficient quantisation error, so the encoder measures the
exact relative RMSE and tightens the step if it would exceed ``max_rel_rmse``.

Decoding to compact form (``decode_compact``) returns what should travel to the accelerator
(``Affine``: uint8 + scales; ``KLTCoeffs``: uint16 zigzag codes of the coefficients; fp16 arrays)
and ``dequantize`` turns it into a float tensor there (the KLT basis is sent once per device).

Relative RMSE is measured against the field's own norm, ||x^-x||_2 / ||x||_2 = RMSE / RMS(x).
"""
from __future__ import annotations

import base64
import functools
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numcodecs
import numpy as np
from numcodecs.abc import Codec

from .errors import CacheError, CorruptShardError

MAGIC = b"DKB1"
_PREFIX = struct.Struct("<4sII")  # magic, crc32, header length


# ---------------------------------------------------------------------------------------------
# blob framing
def pack_blob(header: dict, parts: list) -> bytes:
    parts = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
    header = dict(header, parts=[len(p) for p in parts])
    head = json.dumps(header, separators=(",", ":")).encode()
    crc = zlib.crc32(head)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([_PREFIX.pack(MAGIC, crc, len(head)), head, *parts])


def unpack_blob(blob, where: str = "blob") -> tuple[dict, list[memoryview]]:
    view = memoryview(blob).cast("B")
    if len(view) < _PREFIX.size:
        raise CorruptShardError(f"{where}: truncated ({len(view)} bytes)")
    magic, crc, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptShardError(f"{where}: bad magic {bytes(magic)!r} (not a store blob, or corrupt)")
    body = view[_PREFIX.size:]
    if zlib.crc32(body) != crc:
        raise CorruptShardError(f"{where}: checksum mismatch (corrupt bytes)")
    try:
        header = json.loads(bytes(body[:hlen]))
    except ValueError as e:
        raise CorruptShardError(f"{where}: unreadable header ({e})") from None
    parts, pos = [], hlen
    for n in header["parts"]:
        parts.append(body[pos:pos + n])
        pos += n
    if pos != len(body):
        raise CorruptShardError(f"{where}: {len(body) - pos} trailing bytes")
    return header, parts


# ---------------------------------------------------------------------------------------------
# compact (device-side dequantisation) forms
@dataclass
class Affine:
    """x = q * scale + offset along ``axis`` (int8 per-channel affine). Arrays are numpy arrays or
    torch tensors (the torch datasets hand over tensors, which cross loader processes in shared memory)."""
    q: object              # uint8, the field's shape
    scale: object          # float32 (C,)
    offset: object         # float32 (C,)
    axis: int = 0


@dataclass
class KLTCoeffs:
    """x = basis[:, components] @ (unzigzag(codes) * step) + mean, reshaped to ``shape``.

    ``basis`` and ``mean`` are the codec's (shared by every sample of the field); they are left out
    when the object is pickled (loader worker -> main process), and ``Cache.dequantize`` or
    ``dequantize(value, codec=...)`` supplies them again."""
    codes: object            # uint16 (or uint32) zigzag codes (k, H*W): 0, 1, 2, 3, ... = 0, -1, 1, -2, ...
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


_DEVICE_CACHE: dict = {}


def _as_tensor(value, device):
    import torch

    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:                      # torch has little uint16 support: reinterpret
            value = value.view(np.int16)
        elif value.dtype == np.uint32:
            value = value.view(np.int32)
        value = torch.from_numpy(np.asarray(value, order="C"))
    elif value.dtype == torch.uint16:
        value = value.view(torch.int16)
    elif value.dtype == torch.uint32:
        value = value.view(torch.int32)
    return torch.as_tensor(value).to(device, non_blocking=True)


def dequantize(value, device=None, dtype=None, codec=None):
    """Turn a decoded field (numpy array, tensor, Affine or KLTCoeffs) into a float tensor on
    ``device``. Compact payloads cross to the device as they are and are expanded there.
    ``codec``: the field's KLTCodec, for KLTCoeffs that came through a loader worker."""
    import torch

    dtype = dtype or torch.float32
    if isinstance(value, Affine):
        q = _as_tensor(value.q, device)
        view = [1] * q.dim()
        view[value.axis] = -1
        scale = _as_tensor(value.scale, device).view(view)
        offset = _as_tensor(value.offset, device).view(view)
        return q.to(dtype) * scale.to(dtype) + offset.to(dtype)
    if isinstance(value, KLTCoeffs):
        basis_np = value.basis if value.basis is not None else getattr(codec, "basis", None)
        mean_np = value.mean if value.mean is not None else getattr(codec, "mean", None)
        if basis_np is None:
            raise CacheError("KLTCoeffs without its basis (it came through a loader worker): "
                             "use Cache.dequantize(sample) or dequantize(value, codec=cache.manifest.codec(field))")
        key = (id(basis_np), str(device))
        cached = _DEVICE_CACHE.get(key)
        if cached is None or cached[0] is not basis_np:
            cached = (basis_np, _as_tensor(basis_np, device), _as_tensor(mean_np, device))
            _DEVICE_CACHE[key] = cached
        _, basis, mean = cached
        hw = int(np.prod(value.shape[1:]))
        if len(value.components) == 0:
            flat = mean[:, None].expand(-1, hw)
        else:
            codes = _as_tensor(value.codes, device)
            wide = codes.to(torch.int64)
            wide &= 0xFFFF if codes.dtype == torch.int16 else 0xFFFFFFFF    # back to the unsigned code
            q = (wide >> 1) ^ -(wide & 1)                                    # (k, HW) signed
            coeff = q.to(torch.float32) * value.step
            components = _as_tensor(value.components, device)
            flat = torch.addmm(mean[:, None], basis[:, components], coeff)  # (C, HW)
        return flat.reshape(value.shape).to(dtype)
    return _as_tensor(value, device).to(dtype)


def to_torch(value):
    """numpy payloads (also inside Affine / KLTCoeffs) as torch tensors, sharing memory."""
    import dataclasses

    import torch

    if isinstance(value, np.ndarray):
        if value.dtype in (np.uint16, np.uint32):
            return torch.from_numpy(value.view(np.int16 if value.dtype == np.uint16 else np.int32)).view(
                torch.uint16 if value.dtype == np.uint16 else torch.uint32)
        return torch.from_numpy(np.asarray(value, order="C"))
    if isinstance(value, Affine):
        return dataclasses.replace(value, q=to_torch(value.q), scale=to_torch(value.scale),
                                   offset=to_torch(value.offset))
    if isinstance(value, KLTCoeffs):
        return dataclasses.replace(value, codes=to_torch(value.codes), components=to_torch(value.components))
    return value


# ---------------------------------------------------------------------------------------------
# codecs
class FieldCodec(Codec):
    """Base: frames ``_encode``'s parts into a blob; subclasses set ``lossless`` and ``error_bound``."""

    codec_id = None
    lossless = False

    def error_bound(self) -> dict:
        raise NotImplementedError

    def encode(self, buf) -> bytes:
        arr = np.asarray(buf)
        header, parts = self._encode(arr)
        return pack_blob(dict(header, codec=self.codec_id, shape=list(arr.shape)), parts)

    def decode(self, buf, out=None):
        header, parts = self._unpack(buf)
        arr = self._decode(header, parts)
        if out is not None:
            np.copyto(np.asarray(out).reshape(arr.shape), arr)
            return out
        return arr

    def decode_compact(self, buf):
        """Decode into the form that should travel to the accelerator (see ``dequantize``)."""
        return self.decode(buf)

    def _unpack(self, buf):
        header, parts = unpack_blob(buf)
        if header.get("codec") != self.codec_id:
            raise CorruptShardError(f"blob was written by codec {header.get('codec')!r}, not {self.codec_id!r}")
        return header, parts

    def _encode(self, arr: np.ndarray) -> tuple[dict, list]:
        raise NotImplementedError

    def _decode(self, header: dict, parts: list) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        cfg = {k: v for k, v in self.get_config().items() if k != "id" and not (isinstance(v, str) and len(v) > 40)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"


def _blosc(cname: str, clevel: int, shuffle: str) -> Codec:
    mode = {"none": numcodecs.Blosc.NOSHUFFLE, "byte": numcodecs.Blosc.SHUFFLE,
            "bit": numcodecs.Blosc.BITSHUFFLE}[shuffle]
    return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=mode)


def _compress(arr: np.ndarray, cname: str, clevel: int, shuffle: str):
    if arr.size == 0:
        return b""
    if cname == "none":
        return np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    return _blosc(cname, clevel, shuffle).encode(np.ascontiguousarray(arr))


def _decompress(part, dtype, count: int, cname: str) -> np.ndarray:
    """Decompress into a new writable array of ``count`` values."""
    out = np.empty(count, dtype=dtype)
    if count == 0:
        if len(part):
            raise CorruptShardError(f"payload has {len(part)} bytes for an empty array")
        return out
    if cname == "none":
        if len(part) != out.nbytes:
            raise CorruptShardError(f"payload has {len(part)} bytes, header says {out.nbytes}")
        out.view(np.uint8)[:] = np.frombuffer(part, np.uint8)
        return out
    if len(part) < 16:
        raise CorruptShardError(f"Blosc payload of {len(part)} bytes is truncated")
    nbytes, _, cbytes = struct.unpack_from("<III", part, 4)   # Blosc header: nbytes, blocksize, cbytes
    if cbytes != len(part):
        raise CorruptShardError(f"Blosc payload is {len(part)} bytes, its header says {cbytes}")
    if nbytes != out.nbytes:
        raise CorruptShardError(f"payload decompresses to {nbytes} bytes, header says {out.nbytes}")
    numcodecs.Blosc().decode(part, out=out)   # Blosc frames carry their own settings
    return out


def _float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)           # round to nearest even
    return ((bits + rounding) >> 16).astype(np.uint16)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class LosslessCodec(FieldCodec):
    """Optional cast (float16 / bfloat16), then Blosc with Zstd (or LZ4) and byte shuffle.

    ``dtype=None`` keeps the input dtype and is exact. ``float16``/``bfloat16`` are exact for
    input already in that dtype and round fp32 input to nearest (bound in ``error_bound``).
    """

    codec_id = "detkd.lossless"
    _DTYPES = (None, "float16", "bfloat16")

    def __init__(self, dtype=None, cname="zstd", clevel=3, shuffle="byte"):
        if dtype not in self._DTYPES:
            raise CacheError(f"LosslessCodec dtype must be one of {self._DTYPES}, got {dtype!r}")
        if cname not in ("zstd", "lz4", "lz4hc", "blosclz", "zlib", "none"):
            raise CacheError(f"LosslessCodec cname {cname!r} is not a Blosc compressor or 'none'")
        self.dtype, self.cname, self.clevel, self.shuffle = dtype, cname, int(clevel), shuffle
        self.lossless = dtype is None

    def get_config(self):
        return dict(id=self.codec_id, dtype=self.dtype, cname=self.cname, clevel=self.clevel, shuffle=self.shuffle)

    def error_bound(self) -> dict:
        if self.dtype is None:
            return dict(kind="exact")
        if self.dtype == "float16":
            return dict(kind="elementwise_rel", value=2.0 ** -11, abs_floor=2.0 ** -25, exact_for="float16",
                        note="fp32 input rounded to nearest fp16; |x| > 65504 is refused")
        return dict(kind="elementwise_rel", value=2.0 ** -8, abs_floor=1e-38, exact_for="bfloat16",
                    note="fp32 input rounded to nearest bf16")

    def _encode(self, arr):
        stored = arr
        if self.dtype == "float16" and arr.dtype != np.float16:
            with np.errstate(over="ignore"):
                stored = arr.astype(np.float16)
            if stored.size and not np.isfinite(stored).all():
                raise CacheError(f"float16 codec: input has non-finite values or |x| > 65504 (max |x| = "
                                 f"{np.abs(arr).max():.4g}), which overflows fp16; use bf16 or raw")
        elif self.dtype == "bfloat16":
            stored = _float32_to_bf16_bits(arr)
        dtype = "bfloat16" if self.dtype == "bfloat16" else stored.dtype.str
        return dict(dtype=dtype), [_compress(stored, self.cname, self.clevel, self.shuffle)]

    def _stored(self, header, parts):
        count = int(np.prod(header["shape"], dtype=np.int64))
        if header["dtype"] == "bfloat16":
            return _decompress(parts[0], np.uint16, count, self.cname).reshape(header["shape"])
        return _decompress(parts[0], np.dtype(header["dtype"]), count, self.cname).reshape(header["shape"])

    def _decode(self, header, parts):
        stored = self._stored(header, parts)
        if header["dtype"] == "bfloat16":
            return _bf16_bits_to_float32(stored)
        return stored

    def decode_compact(self, buf):
        header, parts = self._unpack(buf)
        stored = self._stored(header, parts)
        if header["dtype"] == "bfloat16":
            import torch
            return torch.from_numpy(stored.view(np.int16).copy()).view(torch.bfloat16)
        return stored


class Int8AffineCodec(FieldCodec):
    """Per-channel (``axis``) affine quantisation to uint8: q = round((x - min_c) / scale_c),
    scale_c = (max_c - min_c) / 255; then Blosc/Zstd. Worst-case error scale_c / 2."""

    codec_id = "detkd.int8_affine"

    def __init__(self, axis=0, cname="zstd", clevel=3, shuffle="bit"):
        self.axis, self.cname, self.clevel, self.shuffle = int(axis), cname, int(clevel), shuffle

    def get_config(self):
        return dict(id=self.codec_id, axis=self.axis, cname=self.cname, clevel=self.clevel, shuffle=self.shuffle)

    def error_bound(self) -> dict:
        return dict(kind="channel_range", value=1.0 / 510, axis=self.axis,
                    note="|x^-x| <= (max_c - min_c)/510 for every channel c along axis, plus fp32 rounding")

    def _encode(self, arr):
        x = np.asarray(arr, dtype=np.float32)
        if x.size and not np.isfinite(x).all():
            raise CacheError("int8 codec: input has non-finite values")
        if x.ndim == 0:
            x = x.reshape(1)
        axis = self.axis if x.ndim > 1 else 0
        other = tuple(i for i in range(x.ndim) if i != axis)
        if x.size:
            lo = x.min(axis=other, keepdims=True)
            hi = x.max(axis=other, keepdims=True)
        else:
            lo = hi = np.zeros([x.shape[i] if i == axis else 1 for i in range(x.ndim)], np.float32)
        scale = (hi - lo) / np.float32(255)
        scale[scale == 0] = 1
        q = np.rint((x - lo) / scale)
        np.clip(q, 0, 255, out=q)
        q = q.astype(np.uint8)
        return (dict(dtype="float32", axis=axis),
                [lo.astype(np.float32).tobytes(), scale.astype(np.float32).tobytes(),
                 _compress(q, self.cname, self.clevel, self.shuffle)])

    def _parts(self, header, parts):
        shape = header["shape"] or [1]
        count = int(np.prod(shape, dtype=np.int64))
        offset = np.frombuffer(parts[0], np.float32).copy()
        scale = np.frombuffer(parts[1], np.float32).copy()
        q = _decompress(parts[2], np.uint8, count, self.cname).reshape(shape)
        return q, scale, offset, header["axis"]

    def _decode(self, header, parts):
        q, scale, offset, axis = self._parts(header, parts)
        view = [1] * q.ndim
        view[axis] = -1
        out = q.astype(np.float32) * scale.reshape(view) + offset.reshape(view)
        return out.reshape(header["shape"])

    def decode_compact(self, buf):
        header, parts = self._unpack(buf)
        q, scale, offset, axis = self._parts(header, parts)
        return Affine(q=q.reshape(header["shape"]) if header["shape"] else q, scale=scale, offset=offset, axis=axis)


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
        payload = _compress(zigzag.astype(qdtype), "zstd", self.clevel, "bit")
        used_mask = np.zeros(channels, dtype=bool)
        used_mask[used] = True
        return (dict(dtype="float32", step=step, components=np.packbits(used_mask).tobytes().hex(),
                     qdtype=np.dtype(qdtype).str), [payload, *parts])

    def _codes(self, header, parts):
        """Zigzag codes (k, HW) of the quantised coefficients and the component indices they belong to."""
        mask = np.unpackbits(np.frombuffer(bytes.fromhex(header["components"]), np.uint8), count=self.mean.size)
        components = np.flatnonzero(mask).astype(np.int64)
        hw = int(np.prod(header["shape"][1:], dtype=np.int64))
        codes = _decompress(parts[0], np.dtype(header["qdtype"]), len(components) * hw, "zstd")
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


class SparseScoreCodec(FieldCodec):
    """Class logits stored sparsely: entries with sigmoid(x) < ``floor`` are dropped (a bitmask
    records the rest, kept as fp16 logits); dropped entries decode to logit(floor / 2)."""

    codec_id = "detkd.sparse_score"

    def __init__(self, floor=0.01, clevel=3):
        if not 0 < floor < 1:
            raise CacheError(f"SparseScoreCodec floor must be a probability in (0, 1), got {floor}")
        self.floor, self.clevel = float(floor), int(clevel)
        self._threshold = np.float32(math.log(self.floor / (1 - self.floor)))
        self._fill = np.float32(math.log(self.floor / 2 / (1 - self.floor / 2)))

    def get_config(self):
        return dict(id=self.codec_id, floor=self.floor, clevel=self.clevel)

    def error_bound(self) -> dict:
        return dict(kind="abs_prob", value=max(self.floor / 2, 1.2e-4), activation="sigmoid",
                    note=f"probabilities under {self.floor} are dropped and read back as {self.floor / 2}; "
                         "kept logits are fp16")

    def _encode(self, arr):
        x = np.asarray(arr, dtype=np.float32)
        if x.size and not np.isfinite(x).all():
            raise CacheError("sparse codec: input has non-finite values")
        if x.size and np.abs(x).max() > 65504:
            raise CacheError("sparse codec: logits overflow fp16")
        mask = x >= self._threshold
        values = x[mask].astype(np.float16)
        return (dict(dtype="float32", kept=int(values.size)),
                [_compress(np.packbits(mask.reshape(-1)), "zstd", self.clevel, "none"),
                 _compress(values, "zstd", self.clevel, "byte")])

    def _dense(self, header, parts, dtype):
        count = int(np.prod(header["shape"], dtype=np.int64))
        bits = _decompress(parts[0], np.uint8, (count + 7) // 8, "zstd")
        mask = np.unpackbits(bits, count=count).astype(bool)
        values = _decompress(parts[1], np.float16, header["kept"], "zstd")
        if int(mask.sum()) != values.size:
            raise CorruptShardError("sparse blob: mask and values disagree")
        out = np.full(count, self._fill, dtype=dtype)
        out[mask] = values
        return out.reshape(header["shape"])

    def _decode(self, header, parts):
        return self._dense(header, parts, np.float32)

    def decode_compact(self, buf):
        header, parts = self._unpack(buf)
        return self._dense(header, parts, np.float16)


for _cls in (LosslessCodec, Int8AffineCodec, KLTCodec, SparseScoreCodec):
    numcodecs.register_codec(_cls)


# ---------------------------------------------------------------------------------------------
# codec specs: NAME[:VALUE][,KEY=VALUE...], e.g. "fp16", "klt:0.04", "klt-dpcm:0.12,clevel=9"
@dataclass(frozen=True)
class Param:
    """A parameter a codec spec may set: its type and the values it accepts (``expected`` says which)."""
    kind: type
    accepts: Callable[[float], bool]
    expected: str


@dataclass(frozen=True)
class Preset:
    """A named codec: how it is built and which parameters its spec may set."""
    build: Callable[..., FieldCodec]      # build(calibration, **params)
    params: dict[str, Param]
    main: str | None                      # the parameter that NAME:VALUE sets (the error bound, where there is one)
    lossless: bool                        # exact for any input
    fitted: bool                          # needs calibration maps of the field
    summary: str                          # one line for --help


_REL_RMSE = Param(float, lambda v: 0 < v < 1, "a relative RMSE in (0, 1), e.g. 0.04")
_CLEVEL = Param(int, lambda v: 0 <= v <= 9, "a Zstd level from 0 to 9")
_KLT_PARAMS = {"max_rel_rmse": _REL_RMSE, "target_rel_rmse": _REL_RMSE, "clevel": _CLEVEL}


def _klt(spatial: str) -> Callable[..., FieldCodec]:
    def build(calibration, **params):
        if calibration is None:
            raise CacheError("needs calibration maps to fit its basis (pass calibration=...)")
        return KLTCodec.fit(calibration, spatial=spatial, **params)
    return build


PRESETS = {
    "raw": Preset(lambda _, **kw: LosslessCodec(**kw), {"clevel": _CLEVEL}, None, True, False,
                  "lossless, Zstd"),
    "fp16": Preset(lambda _, **kw: LosslessCodec(dtype="float16", **kw), {"clevel": _CLEVEL}, None, False, False,
                   "fp16 (exact for fp16 input), Zstd"),
    "bf16": Preset(lambda _, **kw: LosslessCodec(dtype="bfloat16", **kw), {"clevel": _CLEVEL}, None, False, False,
                   "bf16, Zstd"),
    "stored": Preset(lambda _, **kw: LosslessCodec(cname="none", **kw), {}, None, True, False,
                     "lossless, uncompressed (image bytes)"),
    "int8": Preset(lambda _, **kw: Int8AffineCodec(**kw), {"clevel": _CLEVEL}, None, False, False,
                   "per-channel affine uint8, |err| <= channel range / 510"),
    "sparse": Preset(lambda _, **kw: SparseScoreCodec(**kw),
                     {"floor": Param(float, lambda v: 0 < v < 1, "a probability in (0, 1), e.g. 0.01"),
                      "clevel": _CLEVEL}, "floor", False, False,
                     "class logits: scores under FLOOR dropped (sparse:0.01)"),
    "klt": Preset(_klt("none"), _KLT_PARAMS, "max_rel_rmse", False, True,
                  "fitted channel transform, rel RMSE <= VALUE (klt:0.01)"),
    "klt-dpcm": Preset(_klt("dpcm"), _KLT_PARAMS, "max_rel_rmse", False, True,
                       "klt + spatial prediction of its coefficient planes"),
    "klt-dct": Preset(_klt("dct"), _KLT_PARAMS, "max_rel_rmse", False, True,
                      "klt + 2-D DCT of its coefficient planes"),
}


@dataclass(frozen=True)
class CodecSpec:
    """A preset and the parameters given to it; ``str()`` is its canonical spelling."""
    name: str
    params: tuple[tuple[str, float], ...] = ()      # (key, value), in the preset's order

    @property
    def preset(self) -> Preset:
        return PRESETS[self.name]

    def __str__(self) -> str:
        given = dict(self.params)
        items = [_number(given.pop(self.preset.main))] if self.preset.main in given else []
        items += [f"{key}={_number(value)}" for key, value in given.items()]
        return f"{self.name}:{','.join(items)}" if items else self.name

    def build(self, calibration=None) -> FieldCodec:
        return self.preset.build(calibration, **dict(self.params))


def _number(value) -> str:
    return repr(value) if isinstance(value, int) else f"{value:g}"


def parse_codec_spec(text: str, field: str | None = None) -> CodecSpec:
    """``NAME[:VALUE][,KEY=VALUE...]`` (or ``NAME:KEY=VALUE,...``) -> CodecSpec; VALUE sets the
    preset's main parameter (its error bound). Errors are one line naming the field and the spec."""
    where = f"codec {text!r}" + (f" for field {field}" if field else "")
    name, _, rest = str(text).strip().partition(":")
    if name not in PRESETS:
        raise CacheError(f"{where}: unknown codec {name!r}; codecs: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    given: dict[str, float] = {}
    for position, item in enumerate(rest.split(",") if rest else []):
        key, eq, value = item.partition("=")
        if not eq:
            if position or preset.main is None:
                takes = f"takes KEY=VALUE parameters ({', '.join(preset.params) or 'none'})" if preset.main is None \
                    else f"takes one VALUE ({preset.main}), first; the rest as KEY=VALUE"
                raise CacheError(f"{where}: {item!r} has no '='; {name} {takes}")
            key, value = preset.main, item
        key, value = key.strip(), value.strip()
        if key not in preset.params:
            raise CacheError(f"{where}: {name} has no parameter {key!r}; it takes: {', '.join(preset.params) or 'none'}")
        if key in given:
            raise CacheError(f"{where}: {key} given twice")
        param = preset.params[key]
        try:
            number = param.kind(value)
        except ValueError:
            number = None
        if number is None or not param.accepts(number):
            raise CacheError(f"{where}: {key} must be {param.expected}, got {value!r}")
        given[key] = number
    ordered = tuple((key, given[key]) for key in preset.params if key in given)
    if {"max_rel_rmse", "target_rel_rmse"} <= set(given) and given["target_rel_rmse"] > given["max_rel_rmse"]:
        raise CacheError(f"{where}: target_rel_rmse must not exceed max_rel_rmse")
    return CodecSpec(name, ordered)


def make_codec(spec, calibration=None) -> FieldCodec:
    """A codec from a spec (``"fp16"``, ``"klt:0.04"``, a CodecSpec), a numcodecs config dict, or a codec.

    Fitted codecs (``klt``, ``klt-dpcm``, ``klt-dct``) need ``calibration``: a list of (C, H, W)
    maps of the field to fit the basis on.
    """
    if isinstance(spec, FieldCodec):
        return spec
    if isinstance(spec, dict):
        return codec_from_config(spec)
    if not isinstance(spec, CodecSpec):
        spec = parse_codec_spec(spec)
    try:
        return spec.build(calibration)
    except CacheError as e:
        raise CacheError(f"codec {str(spec)!r}: {e}") from None


def codec_from_config(config: dict) -> FieldCodec:
    if "id" not in config:
        raise CacheError(f"a codec config needs 'id' (a numcodecs config): {config}")
    codec = numcodecs.get_codec(dict(config))
    if not isinstance(codec, FieldCodec):
        raise CacheError(f"codec {config.get('id')!r} is not a store field codec")
    return codec


def measure_error(bound: dict, x, x_hat) -> tuple[float, float]:
    """(measured, allowed) for a codec's declared ``error_bound`` on one array; measured <= allowed
    when the codec keeps its promise."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64).reshape(x.shape)
    kind = bound["kind"]
    if kind == "exact":
        return float(np.abs(x_hat - x).max(initial=0.0)), 0.0
    if kind == "elementwise_rel":
        excess = np.abs(x_hat - x) - (bound["value"] * np.abs(x) + bound["abs_floor"])
        return float(excess.max(initial=-np.inf)), 0.0
    if kind == "channel_range":
        axis = bound.get("axis", 0) if x.ndim > 1 else 0
        other = tuple(i for i in range(x.ndim) if i != axis)
        span = x.max(axis=other, keepdims=True) - x.min(axis=other, keepdims=True)
        allowed = bound["value"] * span + 1e-6 * np.abs(x).max(axis=other, keepdims=True) + 1e-30
        return float((np.abs(x_hat - x) / allowed).max(initial=0.0)), 1.0
    if kind == "rel_rmse":
        norm = np.linalg.norm(x)
        return (float(np.linalg.norm(x_hat - x) / norm) if norm else 0.0), bound["value"] * (1 + 1e-4)
    if kind == "abs_prob":
        p, p_hat = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(-x_hat))
        return float(np.abs(p_hat - p).max(initial=0.0)), bound["value"]
    raise CacheError(f"unknown error bound kind {kind!r}")


def calibration_error(codec: FieldCodec, maps) -> dict:
    """The codec's declared error measure (``measure_error``) over maps it round-trips: the worst
    and mean value, what its bound allows, and how many maps (recorded per field in the manifest)."""
    measured, allowed = [], 0.0
    for x in maps:
        value, allowed = measure_error(codec.error_bound(), x, codec.decode(codec.encode(x)))
        measured.append(value)
    return dict(worst=float(f"{max(measured):.4g}"), mean=float(f"{sum(measured) / len(measured):.4g}"),
                allowed=float(f"{allowed:.4g}"), maps=len(measured))
