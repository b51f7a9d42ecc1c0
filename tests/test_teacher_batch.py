"""collate_teacher: per-image teacher samples -> a TeacherBatch laid out like the student batch."""
import numpy as np
import pytest
import torch

from detectors.detector import valid_level_sizes
from store.schema import LEVELS, REGION_POSITIVE, REGION_VLR
from train.teacher_batch import TeacherBatch, collate_teacher


BATCH_LEVEL_SIZES = valid_level_sizes((64, 96))  # the student batch is padded to the largest image


def dense_sample(image_size, channels=3, image_id=0, seed=0, groups=("fpn", "head.cls")):
    generator = torch.Generator().manual_seed(seed)
    sample = {"meta.image_id": np.int64(image_id), "meta.view_index": np.int32(0),
              "meta.valid_hw": np.asarray(image_size, np.int32)}
    for level, (h, w) in zip(LEVELS, valid_level_sizes(image_size)):
        for group in groups:
            sample[f"{group}.{level}"] = torch.randn(channels, h, w, generator=generator).numpy().astype(np.float16)
    return sample


def test_dense_maps_are_placed_top_left_with_zeros_elsewhere():
    sizes = [(64, 96), (33, 50)]
    samples = [dense_sample(size, image_id=i, seed=i) for i, size in enumerate(sizes)]
    batch = collate_teacher(samples, BATCH_LEVEL_SIZES, "cpu")
    assert isinstance(batch, TeacherBatch)
    assert batch.box is None and batch.region is None
    assert batch.image_ids == [0, 1]
    for level, name in enumerate(LEVELS):
        assert batch.fpn[level].shape == (2, 3, *BATCH_LEVEL_SIZES[level])
        assert batch.fpn[level].dtype == torch.float32
        for index, (sample, size) in enumerate(zip(samples, sizes)):
            h, w = valid_level_sizes(size)[level]
            assert batch.valid_sizes[index][level] == (h, w)
            expected = torch.from_numpy(sample[f"fpn.{name}"].astype(np.float32))
            assert torch.equal(batch.fpn[level][index, :, :h, :w], expected)
            assert torch.equal(batch.cls[level][index, :, :h, :w],
                               torch.from_numpy(sample[f"head.cls.{name}"].astype(np.float32)))
            outside = torch.ones(BATCH_LEVEL_SIZES[level], dtype=torch.bool)
            outside[:h, :w] = False
            assert not batch.fpn[level][index][:, outside].any()
            assert batch.valid[level].dtype == torch.bool
            assert batch.valid[level][index, 0, :h, :w].all() and not batch.valid[level][index, 0][outside].any()


def test_valid_region_sources_agree_and_mismatch_is_an_error():
    size = (40, 70)
    sample = dense_sample(size)
    from_meta = collate_teacher([sample], BATCH_LEVEL_SIZES, "cpu")
    from_arg = collate_teacher([sample], BATCH_LEVEL_SIZES, "cpu", image_sizes=[size])
    no_meta = {k: v for k, v in sample.items() if not k.startswith("meta.")}
    from_maps = collate_teacher([no_meta], BATCH_LEVEL_SIZES, "cpu")
    level_hw = dict(no_meta, **{"meta.level_hw": np.asarray(valid_level_sizes(size), np.int32)})
    from_level_hw = collate_teacher([level_hw], BATCH_LEVEL_SIZES, "cpu")
    for other in (from_arg, from_maps, from_level_hw):
        assert other.valid_sizes == from_meta.valid_sizes
        assert all(torch.equal(a, b) for a, b in zip(other.valid, from_meta.valid))
    with pytest.raises(ValueError, match="disagree on the view"):
        collate_teacher([sample], BATCH_LEVEL_SIZES, "cpu", image_sizes=[(32, 32)])
    with pytest.raises(ValueError, match="larger than the batch"):
        collate_teacher([dense_sample((64, 96))], valid_level_sizes((32, 32)), "cpu")


def test_fcos_centerness_is_collated_like_the_other_dense_maps():
    sizes = [(64, 96), (33, 50)]
    samples = [dense_sample(size, image_id=i, seed=i, groups=("head.cls", "head.box")) for i, size in enumerate(sizes)]
    for i, (sample, size) in enumerate(zip(samples, sizes)):
        sample.update(dense_sample(size, channels=1, seed=10 + i, groups=("head.ctr",)))
    batch = collate_teacher(samples, BATCH_LEVEL_SIZES, "cpu")
    assert batch.fpn is None and batch.cls is not None and batch.box is not None
    for level, name in enumerate(LEVELS):
        assert batch.ctr[level].shape == (2, 1, *BATCH_LEVEL_SIZES[level])
        for index, (sample, size) in enumerate(zip(samples, sizes)):
            h, w = valid_level_sizes(size)[level]
            assert torch.equal(batch.ctr[level][index, :, :h, :w],
                               torch.from_numpy(sample[f"head.ctr.{name}"].astype(np.float32)))
            outside = torch.ones(BATCH_LEVEL_SIZES[level], dtype=torch.bool)
            outside[:h, :w] = False
            assert not batch.ctr[level][index][:, outside].any()
    assert collate_teacher([dense_sample((64, 96))], BATCH_LEVEL_SIZES, "cpu").ctr is None  # other families
    with pytest.raises(ValueError, match="'head.ctr'"):
        collate_teacher([samples[0], dense_sample((64, 96), groups=("head.cls", "head.box"))], BATCH_LEVEL_SIZES, "cpu")


def test_groups_must_be_complete_and_consistent():
    full = dense_sample((64, 96))
    missing_level = {k: v for k, v in full.items() if k != "fpn.p7"}
    with pytest.raises(ValueError, match="'fpn'"):
        collate_teacher([missing_level], BATCH_LEVEL_SIZES, "cpu")
    only_cls = dense_sample((64, 96), groups=("head.cls",), seed=1)
    with pytest.raises(ValueError, match="'fpn'"):
        collate_teacher([full, only_cls], BATCH_LEVEL_SIZES, "cpu")


def region_sample(rows, num_classes=2, box_channels=8, image_size=(64, 96), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"meta.valid_hw": np.asarray(image_size, np.int32),
            "region.level": np.asarray([r[0] for r in rows], np.int8).reshape(-1),
            "region.index": np.asarray([r[1] for r in rows], np.int32).reshape(-1),
            "region.kind": np.asarray([r[2] for r in rows], np.int8).reshape(-1),
            "region.gt": np.zeros(len(rows), np.int32),
            "region.iou": np.linspace(0.1, 0.5, len(rows)).astype(np.float32),
            "region.cls": torch.randn(len(rows), num_classes, generator=generator).numpy(),
            "region.box_dist": torch.randn(len(rows), box_channels, generator=generator).numpy().astype(np.float16)}


def test_region_rows_are_concatenated_with_a_batch_index():
    first = region_sample([(0, 5, REGION_POSITIVE), (1, 2, REGION_VLR)])
    empty = region_sample([], image_size=(40, 70), seed=1)
    third = region_sample([(4, 0, REGION_POSITIVE)], seed=2)
    batch = collate_teacher([first, empty, third], BATCH_LEVEL_SIZES, "cpu")
    assert batch.fpn is None and batch.cls is None and batch.box is None
    region = batch.region
    assert region["batch_index"].tolist() == [0, 0, 2]
    assert region["level"].tolist() == [0, 1, 4] and region["level"].dtype == torch.long
    assert region["index"].tolist() == [5, 2, 0] and region["kind"].tolist() == [1, 2, 1]
    assert region["cls"].shape == (3, 2) and region["box_dist"].shape == (3, 8)
    assert region["box_dist"].dtype == torch.float32
    assert torch.equal(region["cls"][2], torch.from_numpy(third["region.cls"][0]))
    assert batch.valid_sizes[1] == valid_level_sizes((40, 70))


def test_read_only_arrays_are_accepted():
    sample = dense_sample((64, 96))
    for value in sample.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    batch = collate_teacher([sample], BATCH_LEVEL_SIZES, "cpu")
    assert batch.fpn[0].shape[0] == 1
