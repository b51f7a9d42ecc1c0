"""Manifest and schema: declarations, refusals that name the differing key, field vocabulary."""
import uuid

import numpy as np
import pytest

from store import (FIELDS, CacheError, Manifest, ManifestMismatch, SchemaError, expand_fields, group_of,
                   load_manifest, open_cache, open_writer)
from store.schema import validate_sample
from store.synthetic import make_sample

VIEWS = [{"flip": False, "short": 96, "max_size": 160}, {"flip": True, "short": 96, "max_size": 160}]
TEACHER = {"arch": "gfl-small", "checkpoint_sha256": "ab" * 32}
DATASET = {"annotation_sha256": "cd" * 32, "num_images": 4}


class View:                                   # stands in for detectors.views.ViewSpec
    def __init__(self, flip):
        self.flip = flip

    def to_dict(self):
        return {"flip": self.flip, "short": 96, "max_size": 160}


def make(fields=("fpn", "region", "meta"), **kw):
    items = [make_sample(i, v, fields=["fpn", "region", "meta"]) for i in range(4) for v in range(2)]
    args = dict(teacher=TEACHER, dataset=DATASET, views=[View(False), View(True)],
                fields=fields if isinstance(fields, dict) else list(fields),
                calibration=items[:2], num_samples=len(items), shard_size=4)
    args.update(kw)
    return Manifest.create(**args), items


@pytest.fixture(scope="module")
def cache_url():
    url = f"memory://manifest-{uuid.uuid4().hex}"
    m, items = make()
    with open_writer(url, m) as writer:
        for item in items:
            writer.write(item)
    return url


def test_vocabulary_is_grouped_by_prefix():
    assert expand_fields(["fpn"]) == [f"fpn.p{i}" for i in range(3, 8)]
    assert expand_fields(["head.cls"]) == [f"head.cls.p{i}" for i in range(3, 8)]
    assert expand_fields(["region.cls", "meta.image_id"]) == ["region.cls", "meta.image_id"]
    assert {group_of(n) for n in FIELDS} == {"fpn", "head", "region", "meta", "image", "backbone"}
    with pytest.raises(SchemaError, match="'fpn.p9' is not a field"):
        expand_fields(["fpn.p9"])


def test_create_records_codecs_bounds_and_versions():
    m, _ = make()
    assert m.fields[:2] == ["fpn.p3", "fpn.p4"] and "meta.image_id" in m.fields
    entry = m["fields"]["fpn.p3"]
    assert entry["codec"]["id"] == "detkd.klt" and not entry["lossless"]
    assert entry["error_bound"] == {"kind": "rel_rmse", "value": 0.25, "note": entry["error_bound"]["note"]}
    assert m["fields"]["region.index"]["error_bound"]["kind"] == "exact"       # int fields stay exact
    assert m["views"][1] == {"flip": True, "short": 96, "max_size": 160}
    assert {"python", "numpy", "zarr", "numcodecs", "webdataset", "fsspec", "torch"} <= set(m["versions"])
    again = Manifest.from_json(m.to_json())
    assert again.declaration() == m.declaration()


def test_create_refuses_bad_declarations():
    with pytest.raises(CacheError, match="checkpoint_sha256"):
        make(teacher={"arch": "x"})
    with pytest.raises(CacheError, match="needs an exact codec"):
        make(fields={"region.index": "fp16"})
    with pytest.raises(CacheError, match="field fpn.p3: codec 'klt:0.25': needs calibration"):
        make(calibration=None)
    with pytest.raises(CacheError, match="backend"):
        make(backend="hdf5")


@pytest.mark.parametrize("expect,message", [
    (dict(teacher={"checkpoint_sha256": "ef" * 32}), r"teacher\.checkpoint_sha256: the cache has 'abab"),
    (dict(teacher={"arch": "gfl-r101"}), r"teacher\.arch: the cache has 'gfl-small', expected 'gfl-r101'"),
    (dict(dataset={"num_images": 5}), r"dataset\.num_images: the cache has 4, expected 5"),
    (dict(dataset={"split": "val2017"}), r"dataset\.split: the cache has no such key"),
    (dict(views=[View(False)]), r"views: the cache has 2 entries, expected 1"),
    (dict(views=[View(False), View(False)]), r"views\[1\]\.flip: the cache has true, expected false"),
    (dict(fields=["fpn", "head.cls"]), r"lacks fields the caller needs: head\.cls\.p3, "),
])
def test_mismatch_is_refused_naming_the_key(cache_url, expect, message):
    with pytest.raises(ManifestMismatch, match=message):
        open_cache(cache_url, expect=expect)


def test_matching_expectation_opens(cache_url):
    cache = open_cache(cache_url, expect=dict(teacher=TEACHER, dataset=DATASET, views=[View(False), View(True)],
                                              fields=["fpn", "region.cls", "meta"]))
    assert len(cache) == 8


def test_unknown_expect_key_is_rejected(cache_url):
    with pytest.raises(CacheError, match="unknown expect keys \\['teacher_sha'\\]"):
        open_cache(cache_url, expect={"teacher_sha": "x"})


def test_resume_with_a_different_declaration_is_refused(cache_url):
    other, _ = make(teacher={"arch": "gfl-small", "checkpoint_sha256": "00" * 32})
    with pytest.raises(ManifestMismatch, match=r"manifest\.teacher\.checkpoint_sha256"):
        open_writer(cache_url, other)
    other, _ = make(shard_size=8)
    with pytest.raises(ManifestMismatch, match=r"manifest\.shard_size: the cache has 4, expected 8"):
        open_writer(cache_url, other)
    other, _ = make(fields={"fpn": "int8", "region": "fp16", "meta": "raw"})
    with pytest.raises(ManifestMismatch, match=r"manifest\.fields\.fpn\.p3\.codec"):
        open_writer(cache_url, other)


def test_declaration_difference_names_the_first_setting_that_differs():
    m, _ = make(dataset=dict(DATASET, skipped_image_ids=[7]), extra={"precompute": {"codecs": {"fpn.p3": "klt"}}})
    same = dict(teacher=TEACHER, dataset=dict(DATASET, skipped_image_ids=[7]), views=[View(False), View(True)],
                fields=list(reversed(m.fields)), shard_size=4, num_samples=8)     # fields: names, any order
    assert m.declaration_difference(same, recorded={"precompute.codecs": {"fpn.p3": "klt"}}) is None
    other = dict(same, dataset=dict(DATASET, num_images=5, skipped_image_ids=[7, 8]))
    assert m.declaration_difference(other) == "dataset.skipped_image_ids: the cache has 1 entries, expected 2"
    assert m.declaration_difference(dict(same, shard_size=8)) == "shard_size: the cache has 4, expected 8"
    assert (m.declaration_difference(same, recorded={"precompute.codecs": {"fpn.p3": "int8"}}) ==
            "extra.precompute.codecs.fpn.p3: the cache has 'klt', expected 'int8'")
    with pytest.raises(CacheError, match=r"unknown declaration keys \['codecs'\]"):
        m.declaration_difference(dict(same, codecs={}))


def test_reader_refuses_unknown_fields_and_keys(cache_url):
    cache = open_cache(cache_url)
    with pytest.raises(CacheError, match="has no field\\(s\\) head.box.p3"):
        cache.get(0, 0, fields=["head.box.p3"])
    with pytest.raises(CacheError, match="no sample \\(image_id=99, view=0\\)"):
        cache.get(99, 0)
    with pytest.raises(CacheError, match="decode must be one of"):
        cache.get(0, 0, decode="fp8")


def test_validate_sample_checks_shape_symbols():
    sample = make_sample(1, 0)
    validate_sample(sample, list(sample))
    bad = dict(sample, **{"fpn.p4": sample["fpn.p4"][:8]})                  # C differs across levels
    with pytest.raises(SchemaError, match="C=8"):
        validate_sample(bad, list(sample))
    bad = dict(sample, **{"meta.level_hw": sample["meta.level_hw"] + 1})
    with pytest.raises(SchemaError, match="meta.level_hw\\[0\\]"):
        validate_sample(bad, list(sample))
    bad = dict(sample, **{"region.cls": sample["region.cls"][:-1]})         # R differs within region
    with pytest.raises(SchemaError, match="region.cls has R="):
        validate_sample(bad, list(sample))
    bad = dict(sample, **{"region.index": sample["region.index"].astype(np.float32)})
    with pytest.raises(SchemaError, match="must be integer"):
        validate_sample(bad, list(sample))


def test_resume_reuses_the_manifest_there(cache_url):
    items = [make_sample(i, v, fields=["fpn", "region", "meta"]) for i in range(4) for v in range(2)]
    nudged = [{k: (v * 1.0001 if k.startswith("fpn") else v) for k, v in s.items()} for s in items[:2]]
    refit, _ = make(calibration=nudged)                  # a basis fitted again is never bit-identical
    with pytest.raises(ManifestMismatch, match="fitted again"):
        open_writer(cache_url, refit)
    there = load_manifest(cache_url)
    there.check(dict(teacher=TEACHER, dataset=DATASET, fields=["fpn", "region"]))
    assert open_writer(cache_url, there).pending_shards() == []
    assert load_manifest(f"memory://nothing-{uuid.uuid4().hex}") is None
