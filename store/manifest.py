"""The cache manifest: what a cache holds and how, in one JSON file (``CACHE/manifest.json``).

    {
      "format": "detkd-teacher-cache", "format_version": 1,
      "backend": "zarr" | "wds",
      "teacher": {"arch": "gfl-r101", "checkpoint_sha256": "...", ...},
      "dataset": {"annotation_sha256": "...", "num_images": 118287, ...},
      "views": [{"flip": false, "short": 800, "max_size": 1333}, ...],
      "fields": {"fpn.p3": {"codec": {numcodecs config}, "lossless": false, "error_bound": {...},
                            "spec": "klt:0.04",          # as given (store.codecs.parse_codec_spec), canonical
                            "measured_error": {"worst": ..., "mean": ..., "allowed": ..., "maps": 16}}, ...},
                            # the declared bound's measure on the calibration maps (the fit's own maps)
      "options": {"ld_vlr_rule": "official", ...},   # what else decides the stored values (field rules)
      "declared_artifacts": ["teacher_neck_head", ...],   # the cache is complete only once these exist
      "num_samples": 236574 | null, "shard_size": 64,
      "versions": {"python": ..., "numpy": ..., "zarr": ..., ...}, "created": "...",
      "extra": {...},                           # free-form, not compared
      "complete": false | true,                 # the rest is filled by finalize() (store/writer.py):
      "shards": [{"index", "start", "num_samples", "files": {path: {"nbytes", "sha256"}}, "committed",
                  "receipt": its checksum}],
      "index": {"path": "index.npy", "nbytes", "sha256"},   # (image_id, view_index, shard, row) per sample
      "totals": {"fields": {name: [stored, raw_fp16]}, "views": {view: [samples, stored, raw_fp16]}},
      "artifacts": {name: {"path", "sha256", "nbytes", "arrays", "meta", "checksum"}},
      "checksum": sha256 of the rest (store/integrity.py)
    }

Per-blob offsets stay in each shard's receipt (``shards/NNNNNN.json``), read when a shard is
first touched, so the manifest stays small (about 1 KiB per shard) however large the cache.

The *declaration* (format, backend, teacher, dataset, views, fields, options, declared_artifacts,
num_samples, shard_size)
is fixed when the cache is created: a resumed writer must declare the same
(``Manifest.check_same_declaration``, or ``Manifest.declaration_difference`` for a writer that
states its settings rather than a new manifest), and a trainer that opens the cache states what it
expects (``Manifest.check``); a difference is refused with a ``ManifestMismatch`` that names the key.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform

from . import fsutil
from .backends import BACKENDS
from .blob import FieldCodec
from .codecs import CodecSpec, calibration_error, codec_from_config, make_codec, parse_codec_spec
from .errors import CacheError, ManifestMismatch
from .integrity import declaration_id, seal, unseal
from .layout import MANIFEST
from .schema import FIELDS, KEY_FIELDS, expand_fields, field_spec

FORMAT = "detkd-teacher-cache"
FORMAT_VERSION = 2          # 2: sealed manifest, receipts and artefact records; declaration ids; blob checksums
DECLARATION_KEYS = ("format", "format_version", "backend", "teacher", "dataset", "views", "fields",
                    "options", "declared_artifacts", "num_samples", "shard_size")
EXPECT_KEYS = ("teacher", "dataset", "views", "fields", "options")
_LIBRARIES = ("numpy", "torch", "zarr", "numcodecs", "webdataset", "fsspec")


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _plain(value):
    """ViewSpec-like objects (with to_dict) and tuples to JSON-ready values."""
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} chars)"


def first_difference(path: str, actual, expected, partial: bool = False) -> str | None:
    """Dotted path and values of the first difference, or None. ``partial``: keys absent from
    ``expected`` are not compared (the caller declares only what it cares about)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = list(expected) if partial else sorted(set(expected) | set(actual))
        for key in keys:
            sub = f"{path}.{key}"
            if key not in actual:
                return f"{sub}: the cache has no such key (expected {_short(expected[key])})"
            if key not in expected:
                return f"{sub}: the cache has {_short(actual[key])}, not declared by the caller"
            diff = first_difference(sub, actual[key], expected[key], partial)
            if diff:
                return diff
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{path}: the cache has {len(actual)} entries, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            diff = first_difference(f"{path}[{i}]", a, e, partial)
            if diff:
                return diff
        return None
    if actual != expected:
        return f"{path}: the cache has {_short(actual)}, expected {_short(expected)}"
    return None


class Manifest:
    def __init__(self, data: dict, where: str = "manifest"):
        if data.get("format") != FORMAT:
            raise CacheError(f"{where}: not a teacher cache manifest (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{where}: format_version {data.get('format_version')} is not supported "
                             f"(this store reads {FORMAT_VERSION}); recompute the cache with this version")
        missing = [k for k in DECLARATION_KEYS if k not in data]
        if missing:
            raise CacheError(f"{where}: missing keys {missing}")
        if data["backend"] not in BACKENDS:
            raise CacheError(f"{where}: backend {data['backend']!r} is not one of {BACKENDS}")
        for name in data["fields"]:
            field_spec(name)
        self.data = data
        self._codecs: dict[str, FieldCodec] = {}

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, *, teacher: dict, dataset: dict, views, fields, backend: str = "zarr",
               shard_size: int = 64, num_samples: int | None = None, calibration=None,
               options: dict | None = None, artifacts=(), extra: dict | None = None) -> "Manifest":
        """Declare a cache.

        teacher: at least ``arch`` and ``checkpoint_sha256`` (``store.sha256_file(path)``).
        dataset: a fingerprint, e.g. ``{"annotation_sha256": ..., "num_images": ...}``.
        views: list of view specs (dicts, or objects with ``to_dict()``).
        fields: field/group names (default codec of each, from store/schema.py), or a dict
            name -> codec (a spec such as ``"klt:0.04"``, a CodecSpec, a numcodecs config, or a codec).
        calibration: samples (dicts of field -> array) to fit the ``klt`` codecs on; every field
            found in them also records its codec's measured error on them (``measured_error``).
        options: whatever else decides the stored values (e.g. the rule that picks LD's VLR rows);
            part of the declaration, so a resumed writer or a trainer expecting other options is refused.
        artifacts: names of the per-cache artefacts the writer will store; finalization refuses
            a cache that lacks one (an interrupted MasKD stage 1 leaves the cache incomplete).
        """
        teacher, dataset, views = _plain(teacher), _plain(dataset), _plain(list(views))
        for key in ("arch", "checkpoint_sha256"):
            if key not in teacher:
                raise CacheError(f"teacher needs {key!r}; got keys {sorted(teacher)}")
        if not isinstance(dataset, dict) or not dataset:
            raise CacheError("dataset must be a non-empty fingerprint dict")
        if not views:
            raise CacheError("a cache needs at least one view spec")
        if backend not in BACKENDS:
            raise CacheError(f"backend {backend!r} is not one of {BACKENDS}")
        if int(shard_size) < 1:
            raise CacheError(f"shard_size must be >= 1, got {shard_size}")
        if not isinstance(fields, dict):
            fields = {name: FIELDS[name].default_codec for name in expand_fields(fields)}
        else:
            chosen = {}
            for key, spec in fields.items():
                for name in expand_fields([key]):
                    # a codec given for a group or prefix applies to its float fields; integer
                    # fields (region.index, meta.*) keep their exact default
                    exact = FIELDS[name].kind != "float"
                    chosen[name] = FIELDS[name].default_codec if exact and key != name else spec
            fields = chosen
        for name in KEY_FIELDS:
            fields.setdefault(name, FIELDS[name].default_codec)
        entries = {}
        for name in [n for n in FIELDS if n in fields]:
            maps = None
            if calibration is not None:
                maps = [sample[name] for sample in calibration if name in sample]
                maps = [m.detach().cpu().numpy() if hasattr(m, "detach") else m for m in maps] or None
            spec = fields[name]
            if isinstance(spec, str):
                spec = parse_codec_spec(spec, field=name)              # its errors name the field
            try:
                codec = make_codec(spec, calibration=maps)
            except CacheError as e:
                raise CacheError(f"field {name}: {e}") from None
            if FIELDS[name].kind != "float" and codec.error_bound()["kind"] != "exact":
                raise CacheError(f"field {name} holds {FIELDS[name].dtype} values and needs an exact codec "
                                 f"(raw or stored), not {codec!r}")
            entries[name] = dict(codec=codec.get_config(), lossless=bool(codec.lossless),
                                 error_bound=codec.error_bound())
            if isinstance(spec, CodecSpec):
                entries[name]["spec"] = str(spec)
            if maps:
                entries[name]["measured_error"] = calibration_error(codec, maps)
        data = dict(format=FORMAT, format_version=FORMAT_VERSION, backend=backend, teacher=teacher,
                    dataset=dataset, views=views, fields=entries, options=_plain(options or {}),
                    declared_artifacts=sorted(set(artifacts)),
                    num_samples=None if num_samples is None else int(num_samples), shard_size=int(shard_size),
                    versions=library_versions(),
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    extra=_plain(extra or {}), complete=False, shards=None, index=None, totals=None,
                    artifacts={})
        return cls(data)

    # ------------------------------------------------------------------ access
    def __getitem__(self, key):
        return self.data[key]

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def fields(self) -> list[str]:
        return list(self.data["fields"])

    @property
    def groups(self) -> list[str]:
        out = []
        for name in self.fields:
            group = field_spec(name).group
            if group not in out:
                out.append(group)
        return out

    @property
    def shard_size(self) -> int:
        return self.data["shard_size"]

    @property
    def num_samples(self) -> int | None:
        return self.data["num_samples"]

    @property
    def num_shards(self) -> int | None:
        n = self.num_samples
        return None if n is None else -(-n // self.shard_size)

    def codec(self, name: str) -> FieldCodec:
        if name not in self._codecs:
            if name not in self.data["fields"]:
                raise CacheError(f"field {name!r} is not in this cache (fields: {', '.join(self.fields)})")
            self._codecs[name] = codec_from_config(self.data["fields"][name]["codec"])
        return self._codecs[name]

    def declaration(self) -> dict:
        return {k: self.data[k] for k in DECLARATION_KEYS}

    @property
    def declaration_id(self) -> str:
        """What every receipt records: shards written under another declaration are never adopted."""
        return declaration_id(self.declaration())

    def to_json(self) -> str:
        return json.dumps(seal(self.data), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text, where: str = "manifest") -> "Manifest":
        try:
            version = json.loads(text).get("format_version")
        except (ValueError, AttributeError):
            version = FORMAT_VERSION                  # unseal names the damage
        if version != FORMAT_VERSION:
            raise CacheError(f"{where}: format_version {version} is not supported (this store reads "
                             f"{FORMAT_VERSION}); recompute the cache with this version")
        data = unseal(text, where)
        data.pop("checksum")
        return cls(data, where)

    # ------------------------------------------------------------------ checks
    def check_same_declaration(self, other: "Manifest", where: str) -> None:
        diff = first_difference("manifest", other.declaration(), self.declaration())   # other: the one there
        if diff:
            hint = ("Write to a new location, or resume with the manifest that is there: "
                    "store.load_manifest(url), checked with manifest.check(expect)")
            if ".codec." in diff:
                hint += " (a codec fitted again, e.g. a KLT basis, is never bit-identical)"
            raise ManifestMismatch(f"{where}: the writer declares a different cache than the one there: {diff}. "
                                   f"{hint}.")

    def declaration_difference(self, declared: dict, recorded: dict | None = None) -> str | None:
        """The first way this cache differs from the settings a resumed writer states, or None.

        declared: any keys of DECLARATION_KEYS, each compared whole, except that fields are
            compared by name (their codecs are fitted: a KLT basis is never bit-identical).
        recorded: dotted paths into ``extra`` -> the value the writer recorded there (e.g. the
            codec specs it chose, ``{"precompute.codecs": {...}}``), compared after the declaration.
        """
        unknown = sorted(set(declared) - set(DECLARATION_KEYS))
        if unknown:
            raise CacheError(f"unknown declaration keys {unknown}; allowed: {list(DECLARATION_KEYS)}")
        checks = []
        for key in [k for k in DECLARATION_KEYS if k in declared]:
            have, want = self.data[key], _plain(declared[key])
            if key == "fields":
                have, want = sorted(have), sorted(want)
            if key == "dataset":
                # the skipped images first: they also change the image count and the hash digest
                checks.append(("dataset.skipped_image_ids", have.get("skipped_image_ids", []),
                               want.get("skipped_image_ids", [])))
            checks.append((key, have, want))
        for path, want in (recorded or {}).items():
            have = self.data["extra"]
            for part in path.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            checks.append((f"extra.{path}", have, _plain(want)))
        for path, have, want in checks:
            diff = first_difference(path, have, want)
            if diff:
                return diff
        return None

    def check(self, expect: dict | None, where: str = "cache") -> None:
        """Refuse the cache unless it matches what the caller declares.

        expect keys (all optional): teacher (dict, compared key by key), dataset (dict, key by
        key), views (list, compared exactly), fields (names or groups the caller needs).
        """
        if not expect:
            return
        unknown = sorted(set(expect) - set(EXPECT_KEYS))
        if unknown:
            raise CacheError(f"unknown expect keys {unknown}; allowed: {list(EXPECT_KEYS)}")
        for key in ("teacher", "dataset", "options"):
            if expect.get(key) is not None:
                value = _plain(expect[key])
                if not isinstance(value, dict):
                    raise CacheError(f"expect[{key!r}] must be a dict, got {type(value).__name__}")
                diff = first_difference(key, self.data[key], value, partial=True)
                if diff:
                    raise ManifestMismatch(f"{where} was written for a different {key}: {diff}")
        if expect.get("views") is not None:
            diff = first_difference("views", self.data["views"], _plain(list(expect["views"])))
            if diff:
                raise ManifestMismatch(f"{where} holds different views: {diff}")
        if expect.get("fields") is not None:
            needed = expand_fields(expect["fields"])
            lacking = [n for n in needed if n not in self.data["fields"]]
            if lacking:
                raise ManifestMismatch(f"{where} lacks fields the caller needs: {', '.join(lacking)} "
                                       f"(the cache has {', '.join(self.fields)})")


def read_manifest(fs, root: str) -> Manifest | None:
    """The manifest of the cache at ``root`` on ``fs``, or None if there is none yet."""
    path = fsutil.join(root, MANIFEST)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, where=path)
