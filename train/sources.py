"""Where a training batch's teacher fields come from: the cache, or a teacher run in process.

Both sources hand the trainer the same thing: for each image of a student ``Batch``, a dict of
float32 / integer tensors on the training device in the store's field vocabulary
(``fpn.p3`` (C, h_3, w_3), ``head.cls.p3``, ``region.cls`` (R, K), ...), restricted to the fields
the method reads. ``collate_teacher`` turns those dicts into a ``TeacherBatch``; the method never
learns which source produced them.

    source = CachedTeacher(url, fields, expect=dict(dataset=..., views=...))   # the normal path
    source = OnlineTeacher(teacher_model, fields)                               # --teacher CKPT

(a student run gets its source from ``train.teacher_source.open_teacher(...).fields_source(method)``,
after the checks against its data and student)

    payload = source.prefetch(image_id, view_index)   # in a loader worker: compact, still quantised
    payloads = source.prefetch_many(keys)             # a batch's views in one read (what the loader does)
    samples = source.fetch(batch, payloads, device)   # main process: dequantised on the device

``prefetch`` is what a loader worker does per image (the cached source decompresses the shard
blobs into their compact form: uint8 + scales, int16 KLT coefficients, fp16), so only compact
bytes cross to the main process and the device; ``fetch`` expands them there. The online source
does nothing in the worker and runs ``precompute.fields.extract_fields`` on the batch instead:
the same function precompute used to fill the cache, so the two sources cannot disagree on what
a field means.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import warnings

import torch
from torch import Tensor

from detectors.data import IMAGE_HASH, CocoDetection, image_hash_digest
from detectors.detector import Detector
from detectors.views import Batch
from precompute.fields import extract_fields
from store import Cache, CacheError, Manifest, ManifestMismatch, expand_fields, open_cache
from store.codecs import to_torch
from store.schema import DEFAULT_VLR_RULE, IMAGE_HASHES_ARTIFACT, LD_VLR_RULE_OPTION

KEY = "__key__"
NBYTES = "__nbytes__"
_OPENING = threading.Lock()      # CachedTeacher.cache: one thread of a process opens the cache


def field_names(groups: Iterable[str]) -> list[str]:
    """Store field names (schema order within each item) for groups, prefixes or names."""
    return expand_fields(list(groups)) if groups else []


def manifest_id(manifest: Manifest) -> str:
    """sha256 of the manifest's canonical JSON: names exactly which cache a run trained from."""
    text = json.dumps(manifest.data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def adopt_cache_images(dataset: CocoDetection, cache: Cache, where: str) -> None:
    """Make ``dataset`` the image set ``cache`` was built from, before its fingerprint is compared.

    Leaves out exactly the images precompute skipped (the declaration's
    ``dataset.skipped_image_ids``; the reasons are in ``extra.precompute.skipped_images``), refusing
    with an explanation when this copy of the data leaves out others (e.g. a file missing here);
    and makes every later ``dataset.load`` check the image's bytes against the cache's hash table
    (artefact ``image_hashes``, itself checked against the declared digest), so a changed image is an
    error naming it. A cache written before image hashes were recorded is read with a warning.
    """
    declared = cache.manifest["dataset"]
    reasons = cache.manifest["extra"].get("precompute", {}).get("skipped_images", {})
    skipped = [int(i) for i in declared.get("skipped_image_ids", [])]
    dataset.exclude({i: f"skipped by precompute: {reasons.get(str(i), 'no reason recorded')}" for i in skipped})
    here_only = sorted(set(dataset.excluded) - set(skipped))
    if here_only:
        shown = "; ".join(f"image id {i}: {dataset.excluded[i]}" for i in here_only[:3])
        raise ManifestMismatch(
            f"{where} was built from {len(here_only)} image(s) that this copy of {dataset.image_dir} leaves out "
            f"({shown}{' ...' if len(here_only) > 3 else ''}): train on the data the cache was built from, or "
            f"rebuild the cache")
    hashes = declared.get("image_hashes")
    if hashes is None:
        warnings.warn(f"{where} records no image hashes (written by an older precompute): the training images "
                      f"are not checked against the ones the teacher saw", stacklevel=2)
        return
    algorithm, _, digest = str(hashes).partition(":")
    if algorithm != IMAGE_HASH:
        raise CacheError(f"{where}: image hashes are {algorithm!r}; this trainer checks {IMAGE_HASH!r}")
    table = cache.artifact(IMAGE_HASHES_ARTIFACT)   # its sha256 is checked against the manifest
    ids, digests = table["image_ids"], table["digests"]
    if image_hash_digest(ids, digests) != digest:
        raise CacheError(f"{where}: artefact {IMAGE_HASHES_ARTIFACT!r} does not match the declared "
                         f"dataset.image_hashes digest (the cache is inconsistent; rebuild it)")
    dataset.expect_image_hashes({int(i): bytes(d) for i, d in zip(ids.tolist(), digests)})


class CachedTeacher:
    """Teacher fields read from a cache (store/), one sample per (image_id, view_index).

    Args:
        url: the cache (directory or fsspec URL).
        fields: field names, groups or prefixes to read; only those groups' files are touched.
        expect: what the cache must match (``Manifest.check``: dataset, views, fields, teacher);
            a mismatch raises ``store.ManifestMismatch`` naming the first difference.
    """

    def __init__(self, url: str, fields: Sequence[str], expect: dict | None = None,
                 cache: Cache | None = None) -> None:
        self.url = str(url)
        self.fields = field_names(fields)
        self.bytes_read = 0   # stored bytes of the samples fetched so far (the loader's reads, counted here)
        expect = dict(expect or {})
        if self.fields:
            expect["fields"] = self.fields
        self._cache = cache
        if cache is None:
            self._cache = open_cache(self.url, expect=expect or None)
        elif expect:
            cache.manifest.check(expect, where=self.url)
        self._cache_pid = os.getpid()

    @property
    def cache(self) -> Cache:
        # A loader worker opens its own (checked in the parent), a forked one too: an HTTP or object-store
        # filesystem's event loop does not survive a fork. Its read-ahead threads (train.student_data)
        # ask at once: one opens it.
        if self._cache is None or self._cache_pid != os.getpid():
            with _OPENING:
                if self._cache is None or self._cache_pid != os.getpid():
                    self._cache, self._cache_pid = open_cache(self.url), os.getpid()
        return self._cache

    @property
    def manifest_id(self) -> str:
        return manifest_id(self.cache.manifest)

    def artifact(self, name: str, why: str) -> dict:
        """A per-cache artefact (MasKD tokens, teacher neck and head), or a CacheError saying why it is needed."""
        try:
            return self.cache.artifact(name)
        except CacheError as error:
            raise CacheError(f"{error}; {why}") from None

    def prefetch(self, image_id: int, view_index: int) -> dict[str, Any]:
        """One view's fields in compact form (tensors, ``Affine``, ``KLTCoeffs``), for a loader worker."""
        sample = self.cache.get(int(image_id), int(view_index), fields=self.fields, decode="compact")
        return _payload(sample)

    def prefetch_many(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """``[prefetch(i, v) for i, v in keys]``: a batch's views read with one ``Cache.get_many``."""
        samples = self.cache.get_many([(int(i), int(v)) for i, v in keys], fields=self.fields, decode="compact")
        return [_payload(sample) for sample in samples]

    def fetch(self, batch: Batch, payloads: Sequence[dict] | None, device: torch.device | str) -> list[dict[str, Tensor]]:
        """Per image of ``batch``: the dequantised fields on ``device`` (reads them now without ``payloads``)."""
        if payloads is None:
            payloads = self.prefetch_many(list(zip(batch.image_ids, batch.view_indices)))
        if len(payloads) != len(batch.image_ids):
            raise ValueError(f"{len(payloads)} teacher samples for a batch of {len(batch.image_ids)} images")
        samples = []
        for payload, image_id, view_index in zip(payloads, batch.image_ids, batch.view_indices):
            key = tuple(int(k) for k in payload[KEY])
            if key != (int(image_id), int(view_index)):
                raise ValueError(f"teacher sample {key} paired with student image (image_id={image_id}, "
                                 f"view={view_index}): the loader zipped the wrong samples")
            self.bytes_read += payload.get(NBYTES, 0)
            decoded = self.cache.dequantize({k: v for k, v in payload.items() if k not in (KEY, NBYTES)},
                                            device=device)
            samples.append(decoded)
        return samples

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None  # each loader worker opens its own
        return state


def _payload(sample: dict) -> dict[str, Any]:
    return {name: (value if name in (KEY, NBYTES) else to_torch(value)) for name, value in sample.items()
            if name in (KEY, NBYTES) or not name.startswith("__")}


class OnlineTeacher:
    """Teacher fields computed on the fly by a frozen teacher with precompute's own ``extract_fields``.

    Args:
        model: the teacher (``precompute.teacher.load_teacher(...).model``: eval mode, frozen), on
            the training device.
        fields: field names, groups or prefixes; the returned dicts hold exactly these.
        amp_dtype: autocast dtype of the teacher forward (outputs are float32 either way).
        options: the field rules a cache would declare (``DistillationMethod.cache_options``, e.g.
            LD's VLR rule), so that the online fields equal that cache's.
    """

    def __init__(self, model: Detector, fields: Sequence[str], amp_dtype: torch.dtype | None = None,
                 options: dict | None = None) -> None:
        self.model = model
        self.fields = field_names(fields)
        self.amp_dtype = amp_dtype
        self.ld_vlr_rule = (options or {}).get(LD_VLR_RULE_OPTION, DEFAULT_VLR_RULE)

    def prefetch(self, image_id: int, view_index: int) -> None:
        return None

    def prefetch_many(self, keys: Sequence[tuple[int, int]]) -> list[None]:
        return [None] * len(keys)

    def fetch(self, batch: Batch, payloads: Sequence[dict | None] | None,
              device: torch.device | str) -> list[dict[str, Tensor]]:
        if not self.fields:
            return [{} for _ in batch.image_ids]
        samples = extract_fields(self.model, batch, self.fields, amp_dtype=self.amp_dtype, output_device=device,
                                 ld_vlr_rule=self.ld_vlr_rule)
        wanted = set(self.fields)
        return [{name: value for name, value in sample.items() if name in wanted} for sample in samples]

    def __getstate__(self) -> dict:
        # Loader workers never run the teacher (prefetch is a no-op): do not copy it into them.
        return dict(self.__dict__, model=None)
