"""The synthetic COCO-format set: determinism, validity, the command line."""
import json

import pytest
from pycocotools.coco import COCO

from detectors.data import CocoDetection
from detectors.synth import CLASS_NAMES, SynthConfig, generate, main

CONFIG = SynthConfig(size=96, max_side=60)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    a = _files(generate(tmp_path / "a", num_train=6, num_val=3, config=CONFIG, seed=1, progress=False))
    b = _files(generate(tmp_path / "b", num_train=6, num_val=3, config=CONFIG, seed=1, progress=False))
    c = _files(generate(tmp_path / "c", num_train=6, num_val=3, config=CONFIG, seed=2, progress=False))
    assert "annotations/instances_train2017.json" in a and len(a) == 2 + 6 + 3
    assert a == b
    assert a["annotations/instances_train2017.json"] != c["annotations/instances_train2017.json"]
    assert a["train2017/000000000001.jpg"] != c["train2017/000000000001.jpg"]


def test_generated_set_is_valid_coco(tmp_path):
    root = generate(tmp_path, num_train=30, num_val=5, config=CONFIG, seed=0, progress=False)
    coco = COCO(str(root / "annotations" / "instances_train2017.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    assert len(coco.getImgIds()) == 30 and len(coco.getAnnIds()) > 30
    sides = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        sides.append(max(w, h))
    assert min(sides) < 16 and max(sides) > 40  # small and large objects
    assert all(min(i["height"], i["width"]) == 96 for i in coco.imgs.values())
    val = CocoDetection(root, "val2017", on_error="raise")
    assert val.num_classes == len(CLASS_NAMES) and len(val) == 5
    assert set(val.image_ids).isdisjoint(coco.getImgIds())  # ids never collide across splits


def test_cli_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--out" in help_text and "circle" in help_text and "Deterministic" in help_text
    main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64", "--seed", "3", "--quiet"])
    dataset = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    assert len(dataset["images"]) == 1 and dataset["info"]["seed"] == 3
    with pytest.raises(SystemExit):  # an object larger than the image is refused, not clamped
        main(["--out", str(tmp_path), "--size", "64", "--max-side", "80"])
    assert "max_side <= size" in capsys.readouterr().err
