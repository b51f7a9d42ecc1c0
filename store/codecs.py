"""Field codecs: numcodecs ``Codec`` subclasses, registered so that ``numcodecs.get_codec(config)``
rebuilds any of them from the config stored in a cache manifest.

Every codec turns one field of one sample (a numpy array of any shape) into a self-describing
*blob* (framing, checksum and Blosc/Zstd compression: store/blob.py), and back; only the
transforms are written here and, for the KLT family, in store/klt.py.

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

Decoding to compact form (``decode_compact``) returns what should travel to the accelerator
(``Affine``: uint8 + scales; ``KLTCoeffs``: uint16 zigzag codes of the coefficients; fp16 arrays)
and ``dequantize`` turns it into a float tensor there (the KLT basis is sent once per device).

Relative RMSE is measured against the field's own norm, ||x^-x||_2 / ||x||_2 = RMSE / RMS(x).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numcodecs
import numpy as np

from .blob import FieldCodec, compress_part, decompress_part
from .errors import CacheError, CorruptShardError
from .klt import KLTCodec, KLTCoeffs, dequantize_klt
from .tensors import as_device_tensor
from .uniform import UniformCodec


# ---------------------------------------------------------------------------------------------
# compact (device-side dequantisation) forms; the KLT family's, KLTCoeffs, is in store/klt.py
@dataclass
class Affine:
    """x = q * scale + offset along ``axis`` (int8 per-channel affine). Arrays are numpy arrays or
    torch tensors (the torch datasets hand over tensors, which cross loader processes in shared memory)."""
    q: object              # uint8, the field's shape
    scale: object          # float32 (C,)
    offset: object         # float32 (C,)
    axis: int = 0


def dequantize(value, device=None, dtype=None, codec=None):
    """Turn a decoded field (numpy array, tensor, Affine or KLTCoeffs) into a float tensor on
    ``device``. Compact payloads cross to the device as they are and are expanded there.
    ``codec``: the field's KLTCodec, for KLTCoeffs that came through a loader worker."""
    import torch

    dtype = dtype or torch.float32
    if isinstance(value, Affine):
        q = as_device_tensor(value.q, device)
        view = [1] * q.dim()
        view[value.axis] = -1
        scale = as_device_tensor(value.scale, device).view(view)
        offset = as_device_tensor(value.offset, device).view(view)
        return q.to(dtype) * scale.to(dtype) + offset.to(dtype)
    if isinstance(value, KLTCoeffs):
        return dequantize_klt(value, device, dtype, codec)
    return as_device_tensor(value, device).to(dtype)


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


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to each torch tensor in it, also those inside Affine / KLTCoeffs
    (a KLT basis and mean stay: they are the codec's, copied to a device once). For ``pin_memory``:
    a DataLoader pins the tensors it sees, not those inside these dataclasses, and a copy from
    pageable memory runs several times slower (BENCHMARKS.md, "On an H200")."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (Affine, KLTCoeffs)):
        return dataclasses.replace(value, **{f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)
                                             if isinstance(getattr(value, f.name), torch.Tensor)})
    return value


# ---------------------------------------------------------------------------------------------
# codecs (the KLT family: store/klt.py)
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
        return dict(dtype=dtype), [compress_part(stored, self.cname, self.clevel, self.shuffle)]

    def _stored(self, header, parts):
        count = int(np.prod(header["shape"], dtype=np.int64))
        if header["dtype"] == "bfloat16":
            return decompress_part(parts[0], np.uint16, count, self.cname).reshape(header["shape"])
        return decompress_part(parts[0], np.dtype(header["dtype"]), count, self.cname).reshape(header["shape"])

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
                 compress_part(q, self.cname, self.clevel, self.shuffle)])

    def _parts(self, header, parts):
        shape = header["shape"] or [1]
        count = int(np.prod(shape, dtype=np.int64))
        offset = np.frombuffer(parts[0], np.float32).copy()
        scale = np.frombuffer(parts[1], np.float32).copy()
        q = decompress_part(parts[2], np.uint8, count, self.cname).reshape(shape)
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
                [compress_part(np.packbits(mask.reshape(-1)), "zstd", self.clevel, "none"),
                 compress_part(values, "zstd", self.clevel, "byte")])

    def _dense(self, header, parts, dtype):
        count = int(np.prod(header["shape"], dtype=np.int64))
        bits = decompress_part(parts[0], np.uint8, (count + 7) // 8, "zstd")
        mask = np.unpackbits(bits, count=count).astype(bool)
        values = decompress_part(parts[1], np.float16, header["kept"], "zstd")
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


for _cls in (LosslessCodec, Int8AffineCodec, KLTCodec, SparseScoreCodec, UniformCodec):
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
    "uniform": Preset(lambda _, **kw: UniformCodec(**kw), _KLT_PARAMS, "max_rel_rmse", False, False,
                      "one uniform step per field, rel RMSE <= VALUE (uniform:0.04; region rows)"),
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
