"""Codecs: exact round trips, declared error bounds on random and FPN-like data, configs, corruption,
the spec grammar (``klt:0.04``), and the lower-rate KLT variants through both backends."""
import numcodecs
import numpy as np
import pytest
import torch

from store import (BACKENDS, Affine, CacheError, CorruptShardError, Int8AffineCodec, KLTCodec, KLTCoeffs,
                   LosslessCodec, Manifest, SparseScoreCodec, dequantize, make_codec, measure_error, open_cache,
                   open_writer, parse_codec_spec)
from store.synthetic import StructuredFPN

RNG = np.random.default_rng(0)
RANDOM = RNG.standard_normal((32, 24, 40)).astype(np.float32) * 3 + 1
FPN = StructuredFPN(channels=64, rank=12, seed=1)
STRUCTURED_FIT = [FPN.level(0, 30, 40, np.random.default_rng(i)) for i in range(4)]
STRUCTURED = FPN.level(0, 36, 52, np.random.default_rng(99))
LOSSY = ["fp16", "bf16", "int8", "sparse"]
FITTED = ["klt", "klt-dpcm", "klt-dct"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int8, np.uint8, np.int32])
@pytest.mark.parametrize("preset", ["raw", "stored"])
def test_lossless_is_exact_for_every_dtype(preset, dtype):
    x = (RNG.standard_normal((7, 5, 3)) * 100).astype(dtype)
    codec = make_codec(preset)
    y = codec.decode(codec.encode(x))
    assert codec.lossless and codec.error_bound()["kind"] == "exact"
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("preset,dtype", [("fp16", np.float16), ("bf16", None)])
def test_cast_codecs_are_exact_on_their_own_dtype(preset, dtype):
    codec = make_codec(preset)
    if dtype is None:   # values representable in bf16: fp32 with the low 16 bits zero
        x = (RANDOM.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    else:
        x = RANDOM.astype(dtype)
    np.testing.assert_array_equal(codec.decode(codec.encode(x)).astype(np.float32), x.astype(np.float32))


@pytest.mark.parametrize("data", ["random", "structured"])
@pytest.mark.parametrize("preset", LOSSY + FITTED + ["klt-dpcm:0.12", "klt-dct:0.12", "sparse:0.05"])
def test_lossy_codecs_keep_their_declared_bound(preset, data):
    x = RANDOM if data == "random" else STRUCTURED
    fit = [RANDOM * 0.9] if data == "random" else STRUCTURED_FIT
    codec = make_codec(preset, calibration=fit)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape
    measured, allowed = measure_error(codec.error_bound(), x, y)
    assert measured <= allowed, (preset, data, measured, allowed)
    assert not np.array_equal(y, x)          # lossy in fact


def test_klt_meets_bound_on_data_it_was_not_fitted_on_and_compresses_structure():
    codec = KLTCodec.fit(STRUCTURED_FIT, max_rel_rmse=0.01)
    for seed in range(3):
        x = FPN.level(0, 20 + seed * 7, 33, np.random.default_rng(1000 + seed)) * (1 + seed)   # other sizes and scales
        blob = codec.encode(x)
        rel = np.linalg.norm(codec.decode(blob) - x) / np.linalg.norm(x)
        assert rel <= 0.01
        assert len(blob) < 0.35 * x.size * 2            # well under fp16 on low-rank smooth data
    # a basis fitted on unrelated data still keeps the bound (only the size suffers)
    foreign = KLTCodec.fit([RANDOM[:, :, :20].repeat(2, axis=0)], max_rel_rmse=0.005)
    rel = np.linalg.norm(foreign.decode(foreign.encode(STRUCTURED)) - STRUCTURED) / np.linalg.norm(STRUCTURED)
    assert rel <= 0.005


def test_klt_refuses_wrong_channel_count():
    codec = KLTCodec.fit(STRUCTURED_FIT)
    with pytest.raises(CacheError, match="64 channels"):
        codec.encode(RANDOM)


def test_int8_bound_is_per_channel():
    x = RANDOM.copy()
    x[3] *= 1000                                         # one wide channel must not hurt the others
    codec = Int8AffineCodec()
    y = codec.decode(codec.encode(x))
    span = x.reshape(32, -1).max(1) - x.reshape(32, -1).min(1)
    err = np.abs(y - x).reshape(32, -1).max(1)
    assert np.all(err <= span / 510 * (1 + 1e-5))
    assert err[0] < 0.05


def test_sparse_scores_drop_below_floor_and_keep_the_rest():
    logits = RNG.standard_normal((80, 10, 12)).astype(np.float32) * 2 - 6     # mostly background
    codec = SparseScoreCodec(floor=0.01)
    blob = codec.encode(logits)
    y = codec.decode(blob)
    p, q = 1 / (1 + np.exp(-logits)), 1 / (1 + np.exp(-y))
    kept = p >= 0.01
    assert np.all(np.abs(q - p)[~kept] <= 0.005)
    np.testing.assert_allclose(y[kept], logits[kept].astype(np.float16).astype(np.float32))
    assert len(blob) < 0.3 * logits.size * 2


@pytest.mark.parametrize("preset", ["raw", "fp16", "bf16", "stored", "int8", "sparse", *FITTED])
def test_config_round_trips_through_numcodecs(preset):
    codec = make_codec(preset, calibration=STRUCTURED_FIT)
    again = numcodecs.get_codec(codec.get_config())
    assert type(again) is type(codec) and again.get_config() == codec.get_config()
    blob = codec.encode(STRUCTURED)
    np.testing.assert_array_equal(again.decode(blob), codec.decode(blob))


@pytest.mark.parametrize("preset", ["raw", "fp16", "int8", "sparse", *FITTED])
def test_any_flipped_byte_is_detected(preset):
    codec = make_codec(preset, calibration=STRUCTURED_FIT)
    blob = bytearray(codec.encode(STRUCTURED))
    for position in (5, 20, len(blob) // 2, len(blob) - 1):
        broken = bytearray(blob)
        broken[position] ^= 0x10
        with pytest.raises(CorruptShardError):
            codec.decode(bytes(broken))
    with pytest.raises(CorruptShardError):
        codec.decode(bytes(blob[: len(blob) - 3]))


@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (1, 1, 1)])
@pytest.mark.parametrize("preset", ["raw", "fp16", "int8", "sparse"])
def test_edge_shapes(preset, shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    codec = make_codec(preset)
    assert codec.decode(codec.encode(x)).shape == x.shape


def test_constant_and_zero_maps():
    klt = make_codec("klt", calibration=[RANDOM[:8]])
    for x in (np.zeros((8, 4, 4), np.float32), np.full((8, 4, 4), 2.5, np.float32)):
        np.testing.assert_allclose(make_codec("int8").decode(make_codec("int8").encode(x)), x, atol=1e-6)
        y = klt.decode(klt.encode(x))
        assert np.linalg.norm(y - x) <= 0.01 * np.linalg.norm(x)
        if not x.any():
            assert not y.any()


def test_compact_forms_dequantize_to_the_same_values():
    for preset, kind in (("int8", Affine), ("klt", KLTCoeffs), ("klt-dpcm", KLTCoeffs), ("klt-dct", np.ndarray),
                         ("fp16", np.ndarray), ("sparse", np.ndarray)):
        codec = make_codec(preset, calibration=STRUCTURED_FIT)
        blob = codec.encode(STRUCTURED)
        compact = codec.decode_compact(blob)
        assert isinstance(compact, kind)
        payload = compact.q if kind is Affine else compact.codes if kind is KLTCoeffs else compact
        assert payload.dtype.itemsize <= 2                  # what crosses to the device is small
        dense = dequantize(compact, device="cpu")
        assert dense.dtype == torch.float32
        tolerance = 2 ** -10 if preset == "klt-dct" else 1e-4     # klt-dct's compact form is the map in fp16
        np.testing.assert_allclose(dense.numpy(), codec.decode(blob), rtol=tolerance, atol=tolerance)
    bf16 = make_codec("bf16")
    assert bf16.decode_compact(bf16.encode(RANDOM)).dtype == torch.bfloat16


@pytest.mark.parametrize("bound, narrow", [(0.25, True), (0.002, False)])
def test_klt_compact_codes_take_one_byte_when_they_fit(bound, narrow):
    """A loose bound's codes cross as uint8 (half the bytes to pin and copy), a tight one's as uint16;
    either expands to the full decode, on the CPU and after the loader's uint -> int reinterpretation."""
    from store.codecs import to_torch
    codec = make_codec(f"klt:{bound}", calibration=STRUCTURED_FIT)
    blob = codec.encode(STRUCTURED)
    compact = codec.decode_compact(blob)
    assert compact.codes.dtype == (np.uint8 if narrow else np.uint16)
    assert narrow == (int(compact.codes.max()) < 256)
    for value in (compact, to_torch(compact)):
        np.testing.assert_allclose(dequantize(value, device="cpu").numpy(), codec.decode(blob), rtol=1e-5, atol=1e-5)


def test_pinning_reaches_the_arrays_inside_compact_forms(monkeypatch):
    """The loader pins teacher payloads (DataLoader(pin_memory=True) -> StudentItem.pin_memory): every
    tensor of an Affine or KLTCoeffs goes through pin_memory too, not only the dict's top level
    (a pageable int8 / KLT payload crossed to an H200 at a fifth of the pinned rate), and the pinned
    payload dequantises to the same values."""
    from store.codecs import to_torch
    from train.student_data import StudentItem, _pin

    pinned = []

    def fake_pin(tensor):                      # no CUDA here: record what would be pinned
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    payload = {}
    for preset in ("int8", "klt", "fp16"):
        codec = make_codec(preset, calibration=STRUCTURED_FIT)
        payload[preset] = to_torch(codec.decode_compact(codec.encode(STRUCTURED)))
    out = _pin(payload)
    inner = [out["int8"].q, out["int8"].scale, out["int8"].offset, out["klt"].codes, out["klt"].components,
             out["fp16"]]
    assert len(pinned) == len(inner) and all(any(t is p for p in pinned) for t in inner)
    assert out["klt"].basis is payload["klt"].basis            # the codec's basis is copied once, not per view
    for preset in payload:
        torch.testing.assert_close(dequantize(out[preset], device="cpu"), dequantize(payload[preset], device="cpu"),
                                   rtol=0, atol=0)
    item = StudentItem(batch=None, teacher=[payload])           # a failed batch is handed on as it is
    assert item.pin_memory() is item and item.teacher[0] is payload


def test_unrepresentable_input_is_refused():
    with pytest.raises(CacheError, match="overflows fp16"):
        make_codec("fp16").encode(np.array([1e6], np.float32))
    with pytest.raises(CacheError, match="non-finite"):
        make_codec("int8").encode(np.array([np.nan], np.float32))
    with pytest.raises(CacheError, match="calibration"):
        make_codec("klt")
    with pytest.raises(CacheError, match="unknown codec"):
        make_codec("jpeg")
    with pytest.raises(CacheError):
        LosslessCodec(dtype="float8")


# ---------------------------------------------------------------------------------------------
# codec specs: NAME[:VALUE][,KEY=VALUE...]
@pytest.mark.parametrize("text,canonical", [
    ("klt", "klt"), ("klt:0.04", "klt:0.04"), (" klt:0.040 ", "klt:0.04"), ("klt:clevel=9", "klt:clevel=9"),
    ("klt-dpcm:0.12,clevel=7", "klt-dpcm:0.12,clevel=7"), ("klt:target_rel_rmse=0.003", "klt:target_rel_rmse=0.003"),
    ("sparse:0.001", "sparse:0.001"), ("int8:clevel=5", "int8:clevel=5"), ("fp16", "fp16")])
def test_spec_grammar_canonical_spelling_round_trips(text, canonical):
    spec = parse_codec_spec(text)
    assert str(spec) == canonical and parse_codec_spec(str(spec)) == spec


def test_spec_parameters_reach_the_codec():
    assert make_codec("klt:0.04", calibration=STRUCTURED_FIT).error_bound()["value"] == 0.04
    assert make_codec("klt-dct:0.12", calibration=STRUCTURED_FIT).spatial == "dct"
    assert make_codec("sparse:0.001").floor == 0.001
    assert make_codec("int8:clevel=7").clevel == 7


@pytest.mark.parametrize("text,message", [
    ("jpeg", "unknown codec 'jpeg'; codecs: raw"), ("klt:abc", "max_rel_rmse must be a relative RMSE"),
    ("klt:1.5", "max_rel_rmse must be"), ("klt:0", "max_rel_rmse must be"), ("klt:0.04,0.05", "has no '='"),
    ("int8:3", "int8 takes KEY=VALUE parameters (clevel)"), ("klt:foo=1", "klt has no parameter 'foo'"),
    ("klt:0.04,max_rel_rmse=0.05", "max_rel_rmse given twice"), ("raw:clevel=1.5", "clevel must be a Zstd level"),
    ("klt:0.02,target_rel_rmse=0.03", "target_rel_rmse must not exceed")])
def test_bad_specs_are_one_line_errors_naming_field_and_spec(text, message):
    with pytest.raises(CacheError) as error:
        parse_codec_spec(text, field="fpn.p3")
    text_of_error = str(error.value)
    assert message in text_of_error and "\n" not in text_of_error
    assert text_of_error.startswith(f"codec {text!r} for field fpn.p3: ")


# ---------------------------------------------------------------------------------------------
# lower-rate KLT variants: spatial prediction (dpcm) and spatial DCT of the coefficient planes
@pytest.mark.parametrize("bound", [0.01, 0.04, 0.12])
def test_spatial_variants_keep_the_bound_and_store_less_than_klt_on_smooth_maps(bound):
    sizes = {}
    for name in FITTED:
        codec = make_codec(f"{name}:{bound}", calibration=STRUCTURED_FIT)
        for seed in range(3):
            x = FPN.level(0, 17 + 9 * seed, 29 + seed, np.random.default_rng(200 + seed))   # odd sizes too
            blob = codec.encode(x)
            rel = np.linalg.norm(codec.decode(blob) - x) / np.linalg.norm(x)
            assert rel <= bound, (name, bound, rel)
            sizes[name] = sizes.get(name, 0) + len(blob)
    assert sizes["klt-dpcm"] < sizes["klt"] and sizes["klt-dct"] < sizes["klt"], sizes


def test_dpcm_decodes_to_exactly_the_klt_coefficients():
    """Prediction is lossless on the quantised integers: same coefficients, same map as klt."""
    klt = make_codec("klt:0.04", calibration=STRUCTURED_FIT)
    config = {key: value for key, value in klt.get_config().items() if key != "id"}
    dpcm = KLTCodec(**config, spatial="dpcm")
    np.testing.assert_array_equal(dpcm.decode(dpcm.encode(STRUCTURED)), klt.decode(klt.encode(STRUCTURED)))
    a, b = klt.decode_compact(klt.encode(STRUCTURED)), dpcm.decode_compact(dpcm.encode(STRUCTURED))
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_variants_round_trip_through_each_backend(tmp_path, backend):
    samples = [{"fpn.p3": FPN.level(0, 12 + i, 20, np.random.default_rng(300 + i)),
                "fpn.p4": FPN.level(1, 6, 10, np.random.default_rng(400 + i)),
                "meta.image_id": np.int64(i), "meta.view_index": np.int32(0)} for i in range(4)]
    manifest = Manifest.create(teacher={"arch": "test", "checkpoint_sha256": "0" * 64}, dataset={"test": True},
                               views=[{"flip": False}], fields={"fpn.p3": "klt-dpcm:0.04", "fpn.p4": "klt-dct:0.12"},
                               calibration=samples[:2], backend=backend, shard_size=2, num_samples=len(samples))
    entry = manifest["fields"]["fpn.p3"]
    assert entry["spec"] == "klt-dpcm:0.04" and manifest["fields"]["fpn.p4"]["spec"] == "klt-dct:0.12"
    assert entry["codec"]["spatial"] == "dpcm" and entry["error_bound"]["value"] == 0.04
    assert entry["measured_error"]["maps"] == 2 and 0 < entry["measured_error"]["worst"] <= 0.04
    url = str(tmp_path / backend)
    with open_writer(url, manifest) as writer:
        for sample in samples:
            writer.write(sample)
    cache = open_cache(url)
    for sample in samples:
        got = cache.get(int(sample["meta.image_id"]), 0, fields=["fpn.p3", "fpn.p4"])
        for name, bound in (("fpn.p3", 0.04), ("fpn.p4", 0.12)):
            x = sample[name]
            assert np.linalg.norm(got[name] - x) / np.linalg.norm(x) <= bound
        compact = cache.dequantize(cache.get(int(sample["meta.image_id"]), 0, fields=["fpn.p3"], decode="compact"))
        np.testing.assert_allclose(compact["fpn.p3"].numpy(), got["fpn.p3"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# uniform: one scalar step per field, for LD's region rows (R, K)
@pytest.mark.parametrize("bound", [0.01, 0.04, 0.1, 0.25])
@pytest.mark.parametrize("shape", [(40, 68), (3, 80), (1,), (0, 68)])
def test_uniform_keeps_its_bound_and_shrinks_with_it(bound, shape):
    rows = (RNG.standard_normal(shape) * 3 - 5).astype(np.float32)     # logit-like: offset, spread
    codec = make_codec(f"uniform:{bound}")
    blob = codec.encode(rows)
    back = codec.decode(blob)
    assert back.shape == rows.shape and back.dtype == np.float32
    if rows.size:
        measured, allowed = measure_error(codec.error_bound(), rows, back)
        assert measured <= allowed, (measured, allowed)
        if rows.size > 100:
            assert measured > bound / 2                     # a real step, not near-lossless
    if shape == (40, 68):
        assert len(blob) < len(make_codec("uniform:0.005").encode(rows))


def test_uniform_step_by_hand_and_zero_rows():
    codec = make_codec("uniform:0.5,target_rel_rmse=0.5")
    x = np.array([[4.0, -4.0, 1.0, 0.0]], np.float32)
    step = np.sqrt(12) * 0.5 * np.sqrt(33 / 4)       # rms 2.87 -> step 4.97; q = 1, -1, 0, 0; rel RMSE 0.30
    np.testing.assert_allclose(codec.decode(codec.encode(x)), [[step, -step, 0, 0]], rtol=1e-6)
    zeros = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(zeros)), zeros)
    with pytest.raises(CacheError, match="non-finite"):
        codec.encode(np.array([np.inf], np.float32))
    assert str(parse_codec_spec("uniform:0.04,clevel=3")) == "uniform:0.04,clevel=3"
