"""Issue #10, "the cache never lies": bad input is detected and named, and the cache declares it.

- non-finite box coordinates are dropped (counted like zero-size boxes), never trained on;
- a value of the wrong JSON type names the file, the image or annotation id and the field;
- precompute follows the bad-image policy (skip and declare, or raise), and a trainer leaves out
  exactly the images the cache left out;
- every image's bytes are hashed in precompute (a table in the cache, its digest in the
  declaration) and checked when the trainer loads the image: a changed image is a one-line error;
- a bad image during training follows the policy; a failed checkpoint save names the path and
  leaves no temporary file.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import build_detector, save_checkpoint
from detectors.data import (CocoDetection, DataError, ImageChangedError, image_file_hash, image_hash_digest,
                            image_hash_table)
from detectors.image_scan import scan_images
from detectors.synth import SynthConfig, generate
from detectors.views import ViewSpec
from store import ManifestMismatch, open_cache
from store.schema import IMAGE_HASHES_ARTIFACT
from train.student_data import StudentBatches, make_loader

VIEWS = "64:96,64:96:flip"
NUM_TRAIN = 6


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---------------------------------------------------------------------------------------------- annotations
def _write_set(root: Path, images: list[dict], annotations: list[dict], raw_json: str | None = None) -> Path:
    """A COCO-layout split 'train2017' under root with categories 3 and 7 (labels 0 and 1)."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    for entry in images:
        h, w = (entry["height"], entry["width"]) if isinstance(entry["height"], int) else (40, 60)
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "train2017" / entry["file_name"])
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}
    (root / "annotations" / "instances_train2017.json").write_text(raw_json or json.dumps(dataset))
    return root


def _image(image_id: int, h=40, w=60) -> dict:
    return {"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": h, "width": w}


def _ann(ann_id, image_id, bbox, category_id=3) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}


def test_non_finite_box_coordinates_are_dropped_and_counted(tmp_path):
    annotations = [_ann(1, 1, [math.nan, 2, 5, 5]), _ann(2, 1, [1, 2, math.inf, 5]), _ann(3, 1, [1, 2, 5, -math.inf]),
                   _ann(4, 1, [1, 2, 3, 4], category_id=7)]
    root = _write_set(tmp_path, [_image(1)], annotations)   # json.dumps writes NaN / Infinity literals
    with pytest.warns(UserWarning, match=r"non-finite or zero-size boxes dropped: 3"):
        dataset = CocoDetection(root, views=(ViewSpec(False, 40, 60),), on_error="raise")
    report = dataset.report
    assert (report.degenerate_boxes, report.clipped_boxes, report.outside_boxes) == (3, 0, 0)
    sample = dataset.load(0, 0)
    assert torch.isfinite(sample.boxes_xyxy).all()
    torch.testing.assert_close(sample.boxes_xyxy, torch.tensor([[1.0, 2.0, 4.0, 6.0]]))


@pytest.mark.parametrize("case", ["bbox string", "height string", "category id string", "image id string",
                                  "category id float string"])
def test_a_value_of_the_wrong_json_type_names_file_entry_and_field(tmp_path, case):
    images, annotations, pattern = {
        "bbox string": ([_image(1)], [_ann(5, 1, [1, "abc", 5, 5])],
                        r"instances_train2017\.json: annotation 5 \(image id 1\) has bbox\[1\] = 'abc'"),
        "height string": ([_image(1, h="tall")], [],
                          r"instances_train2017\.json: image 1 has height 'tall' \(str\), not a positive integer"),
        "category id string": ([_image(1)], [_ann(9, 1, [1, 1, 5, 5], category_id="7")],
                               r"instances_train2017\.json: annotation 9 \(image id 1\) has category_id '7', a "
                               r"string: category ids are JSON integers \(the categories define 7\)"),
        "image id string": ([_image(1)], [_ann(9, "1", [1, 1, 5, 5])],
                            r"annotation 9 \(image id '1'\) has image_id '1' \(str\), not an integer"),
        "category id float string": ([_image(1)], [_ann(9, 1, [1, 1, 5, 5], category_id="x")],
                                     r"annotation 9 \(image id 1\) has category_id 'x' \(str\), not an integer"),
    }[case]
    root = _write_set(tmp_path, images, annotations)
    with pytest.raises(DataError, match=pattern) as caught:
        CocoDetection(root)
    assert "could not convert" not in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- hashes
def test_scan_hashes_every_image_and_follows_the_policy(tmp_path):
    root = _write_set(tmp_path, [_image(1), _image(2), _image(3)], [_ann(1, 2, [1, 1, 5, 5])])
    bad = root / "train2017" / "000001.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    strict = CocoDetection(root, on_error="raise")
    with pytest.raises(DataError, match=r"^cannot decode image file .*000001\.jpg \(image id 1\)"):
        scan_images(strict)
    lenient = CocoDetection(root, on_error="skip")
    with pytest.warns(UserWarning, match=r"1 bad image\(s\) left out .*\n.*000001\.jpg"):
        scan = scan_images(lenient, workers=1)
    assert set(scan.hashes) == {2, 3} and set(scan.bad) == {1} and "000001.jpg" in scan.bad[1]
    assert scan.hashes[2] == image_file_hash((root / "train2017" / "000002.jpg").read_bytes())
    lenient.exclude(scan.bad)
    lenient.expect_image_hashes(scan.hashes)
    assert lenient.image_ids == [2, 3] and len(lenient) == 2 and lenient.report.corrupt_images == 1
    fingerprint = lenient.fingerprint()
    assert fingerprint["num_images"] == 2 and fingerprint["skipped_image_ids"] == [1]
    assert fingerprint["image_hashes"] == "sha256:" + image_hash_digest(*image_hash_table(scan.hashes))

    # Mirrored pixels: same size, decodable, different bytes -> always an error naming the image, even under skip.
    path = root / "train2017" / "000003.jpg"
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=50)
    with pytest.raises(ImageChangedError, match=r"^image file .*000003\.jpg \(image id 3\) has changed since"):
        lenient.load(1, 0)
    assert lenient.load(0, 0).image_id == 2


def test_a_bad_image_in_a_training_batch_follows_the_policy_in_one_line(tmp_path):
    root = _write_set(tmp_path, [_image(1), _image(2)], [])
    bad = root / "train2017" / "000001.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    strict = CocoDetection(root, views=(ViewSpec(False, 40, 60),), view_policy="all", on_error="raise")
    item = next(iter(make_loader(strict, [[(0, 0), (1, 0)]], None, workers=1, seed=0, epoch=0)))
    assert item.batch is None and "\n" not in item.error
    assert item.error.startswith("cannot decode image file") and "(image id 1)" in item.error
    lenient = CocoDetection(root, views=(ViewSpec(False, 40, 60),), view_policy="all", on_error="skip")
    with pytest.warns(UserWarning, match="skipping bad image"):
        item = StudentBatches(lenient, [[(0, 0), (1, 0)]])[0]
    assert item.error is None and item.batch.image_ids == [2, 2]   # replaced by the next good image
    assert len(item.replaced) == 1 and "image id 1" in item.replaced[0]


# ---------------------------------------------------------------------------------------------- precompute + train
def _precompute(root: Path, name: str, **options) -> str:
    from precompute.config import PrecomputeConfig
    from precompute.pipeline import run_precompute
    config = PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"), cache=str(root / name),
                              views=VIEWS, fields="frs", device="cpu", shard_size=4, batch_size=4, workers=0,
                              calibration=4, progress=False, **options)
    run_precompute(config)
    return str(root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic set whose second training image is truncated, a teacher, and a cache (skip policy)."""
    root = tmp_path_factory.mktemp("faults")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(root / "data", NUM_TRAIN, 2, SynthConfig(size=64, max_side=48), seed=3, progress=False)
        torch.manual_seed(0)
        save_checkpoint(root / "teacher.pt", build_detector("gfl-small", num_classes=8))
        dataset = CocoDetection(root / "data", "train2017")
        bad = dataset.image_info(1)
        bad.path.write_bytes(bad.path.read_bytes()[:300])
        with pytest.warns(UserWarning, match=rf"1 bad image\(s\) left out.*\n.*{bad.file_name}"):
            cache = _precompute(root, "cache")
        return {"root": root, "data": str(root / "data"), "cache": cache, "bad": bad, "ids": dataset.image_ids}
    finally:
        torch.set_num_threads(threads)


def test_precompute_skips_a_corrupt_image_and_declares_it(world):
    cache = open_cache(world["cache"])
    declared = cache.manifest["dataset"]
    bad = world["bad"]
    assert declared["skipped_image_ids"] == [bad.image_id]
    assert declared["num_images"] == NUM_TRAIN - 1 and cache.manifest.num_samples == 2 * (NUM_TRAIN - 1)
    reason = cache.manifest["extra"]["precompute"]["skipped_images"][str(bad.image_id)]
    assert bad.file_name in reason and f"image id {bad.image_id}" in reason
    assert sorted({image_id for image_id, _ in cache.keys()}) == sorted(set(world["ids"]) - {bad.image_id})
    # the image hash table: every cached image, its digest declared
    table = cache.artifact(IMAGE_HASHES_ARTIFACT)
    assert table["image_ids"].tolist() == sorted(set(world["ids"]) - {bad.image_id})
    assert declared["image_hashes"] == "sha256:" + image_hash_digest(table["image_ids"], table["digests"])
    for image_id, digest in zip(table["image_ids"].tolist(), table["digests"]):
        path = Path(world["data"]) / "train2017" / f"{image_id:012d}.jpg"
        assert bytes(digest) == image_file_hash(path.read_bytes())


def test_precompute_raise_policy_refuses_in_one_line(world, tmp_path, capsys):
    from precompute.__main__ import main
    code = main(["--ckpt", str(world["root"] / "teacher.pt"), "--data", world["data"], "--cache", str(tmp_path / "c"),
                 "--views", VIEWS, "--fields", "frs", "--device", "cpu", "--workers", "0",
                 "--no-progress", "--on-error", "raise"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("error: cannot decode image file") and f"(image id {world['bad'].image_id})" in err
    assert not (tmp_path / "c" / "manifest.json").exists()


def _trainer_config(world, out, **options):
    from train.config import TrainConfig
    values = dict(data=world["data"], cache=world["cache"], out=str(out), method="frs", student="gfl-nano",
                  batch_size=2, workers=0, eval=False, tensorboard=False, progress=False, warmup_iters=1, max_iters=2)
    values.update(options)
    return TrainConfig(**values)


def test_the_trainer_leaves_out_exactly_the_cached_skips_and_trains(world, tmp_path):
    from train.trainer import StudentTrainer
    trainer = StudentTrainer(_trainer_config(world, tmp_path))
    assert world["bad"].image_id not in trainer.train_set.image_ids
    assert len(trainer.train_set.image_ids) == NUM_TRAIN - 1 and trainer.train_set.image_hashes is not None
    assert "skipped by precompute" in trainer.train_set.excluded[world["bad"].image_id]
    results = trainer.train()
    assert results["iterations"] == 2 and results["images_replaced"] == []


def test_the_trainer_refuses_data_that_leaves_out_other_images(world, tmp_path):
    from train.trainer import StudentTrainer
    data = tmp_path / "data"
    _copy_tree(Path(world["data"]), data)
    (data / "train2017" / f"{world['ids'][3]:012d}.jpg").unlink()
    with pytest.warns(UserWarning, match="file missing"), \
            pytest.raises(ManifestMismatch, match=rf"was built from 1 image\(s\) that this copy .* leaves out "
                                                  rf"\(image id {world['ids'][3]}: image file .* does not exist\)"):
        StudentTrainer(_trainer_config(world, tmp_path / "out", data=str(data)))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_changed_image_stops_training_with_a_one_line_error(world, tmp_path, workers):
    from train.trainer import StudentTrainer
    data = tmp_path / "data"
    _copy_tree(Path(world["data"]), data)
    changed = data / "train2017" / f"{world['ids'][0]:012d}.jpg"
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)   # mirrored pixels
    trainer = StudentTrainer(_trainer_config(world, tmp_path / "out", data=str(data), workers=workers,
                                             max_iters=0, epochs=1))
    with pytest.raises(DataError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"image file {changed} (image id {world['ids'][0]}) has changed since")


def test_a_failed_checkpoint_save_names_the_path_and_leaves_no_temporary_file(world, tmp_path, monkeypatch):
    import detectors.zoo
    from train.trainer import StudentTrainer
    trainer = StudentTrainer(_trainer_config(world, tmp_path))
    path = tmp_path / "last.pt"

    def disk_full(obj, target):
        Path(target).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(detectors.zoo.torch, "save", disk_full)
    with pytest.raises(OSError, match=rf"cannot save the checkpoint {path}: No space left on device") as caught:
        trainer.save(path)
    assert caught.value.errno == 28
    assert not path.exists() and not (tmp_path / "last.pt.tmp").exists()


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil
    shutil.copytree(src, dst)


def test_a_resumed_precompute_that_finds_other_bad_images_is_refused(world, tmp_path):
    from precompute.config import PrecomputeConfig
    from precompute.pipeline import run_precompute
    data = tmp_path / "data"
    _copy_tree(Path(world["data"]), data)
    other = data / "train2017" / f"{world['ids'][4]:012d}.jpg"
    other.write_bytes(other.read_bytes()[:300])
    config = PrecomputeConfig(ckpt=str(world["root"] / "teacher.pt"), data=str(data), cache=world["cache"],
                              views=VIEWS, fields="frs", device="cpu", shard_size=4, batch_size=4, workers=0,
                              calibration=4, progress=False)
    with pytest.warns(UserWarning, match=r"2 bad image\(s\) left out"), \
            pytest.raises(ManifestMismatch, match=r"declared differently \(dataset\.skipped_image_ids: the cache has "
                                                  r"1 entries, expected 2\)"):
        run_precompute(config)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_corrupt_image_met_during_training_follows_the_policy(world, tmp_path, on_error):
    """The online teacher (no cache to declare the bad image): the loader meets it during the epoch."""
    from train.trainer import StudentTrainer
    trainer = StudentTrainer(_trainer_config(world, tmp_path, cache=None, teacher=str(world["root"] / "teacher.pt"),
                                             views=VIEWS, method="none", on_error=on_error, workers=1,
                                             max_iters=0, epochs=1))
    bad = world["bad"]
    if on_error == "raise":
        with pytest.raises(DataError) as caught:
            trainer.train()
        assert "\n" not in str(caught.value)
        assert str(caught.value).startswith(f"cannot decode image file {bad.path} (image id {bad.image_id})")
    else:
        results = trainer.train()
        assert results["images_replaced"] == [f"image id {bad.image_id} ({bad.path})"]
