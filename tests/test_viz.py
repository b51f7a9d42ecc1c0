"""The pictures (train/viz.py): every picture is written as a real, non-blank PNG; missing inputs skip
one picture with the reason; a bad image id is an error that names it.

One tiny synthetic set, a random gfl-small teacher, a full cache and an LD-only cache built with
precompute's own API, and a two-iteration ICD student run (its last.pt holds the decoder, its
student.pt is the student whose detections are drawn). A random frcnn-small (two-stage) teacher's
cache of "all" (P2..P6 and the RPN maps) for the FRS and MasKD pictures on such a cache.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import build_detector, save_checkpoint
from detectors.data import CocoDetection
from detectors.synth import SynthConfig, generate
from detectors.views import ViewSpec
from precompute.config import PrecomputeConfig
from precompute.pipeline import run_precompute
from store import open_cache
from train.config import TrainConfig
from train.methods.frs import FRS
from train.methods.maskd import MasKD
from train.methods.maskd_tokens import load_receptive_tokens
from train.sources import adopt_cache_images
from train.trainer import StudentTrainer
from train.viz import Painter, draw, level_map_to_pixels, level_title, load_view, main, picture_names

VIEWS = "64:96,64:96:flip"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; two OpenMP threads on a shared 2-core machine only wait
    try:
        root = tmp_path_factory.mktemp("viz")
        generate(root / "data", 4, 1, SynthConfig(size=64, max_side=48), seed=3, progress=False)
        torch.manual_seed(0)
        save_checkpoint(root / "teacher.pt", build_detector("gfl-small", num_classes=8))
        common = dict(ckpt=str(root / "teacher.pt"), data=str(root / "data"), views=VIEWS, device="cpu",
                      shard_size=4, batch_size=4, workers=0, calibration=4, progress=False)
        run_precompute(PrecomputeConfig(cache=str(root / "cache"),
                                        overrides={"maskd.stage1_iters": 1, "maskd.stage1_batch_size": 2}, **common))
        run_precompute(PrecomputeConfig(cache=str(root / "cache_ld"), fields="ld", **common))
        StudentTrainer(TrainConfig(data=str(root / "data"), out=str(root / "icd_run"), method="icd",
                                   student="gfl-nano", cache=str(root / "cache"), batch_size=2, workers=0,
                                   eval=False, tensorboard=False, progress=False, warmup_iters=1, epochs=1,
                                   max_iters=2)).train()
        yield root
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frcnn_world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("viz_frcnn")
        generate(root / "data", 4, 1, SynthConfig(size=64, max_side=48), seed=3, progress=False)
        torch.manual_seed(0)
        save_checkpoint(root / "teacher.pt", build_detector("frcnn-small", num_classes=8))
        run_precompute(PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"),
                                        cache=str(root / "cache"), views=VIEWS, device="cpu", shard_size=4,
                                        batch_size=4, workers=0, calibration=4, progress=False, fields="all",
                                        overrides={"maskd.stage1_iters": 1, "maskd.stage1_batch_size": 2}))
        yield root
    finally:
        torch.set_num_threads(threads)


def painter_and_view(root: Path, out: Path, picture: str, image_id: int, **options):
    """The Painter of ``root``'s cache and one view (view 0) loaded with ``picture``'s fields, as ``draw`` does."""
    cache = open_cache(str(root / "cache"))
    dataset = CocoDetection(root / "data", "train2017", views=[ViewSpec.from_dict(v) for v in cache.views],
                            view_policy="all")
    adopt_cache_images(dataset, cache, where="test")
    painter = Painter(dataset, cache, out, pictures=[picture], options=options, log=lambda message: None)
    return painter, load_view(dataset, cache, image_id, 0, painter.methods[picture].PICTURE_FIELDS)


def sigmoid_max(cache_dir: Path, image_id: int, prefix: str, levels: tuple[str, ...]) -> list[np.ndarray]:
    """max over the channels of σ(cached logits) per level, read from the cache directly (numpy)."""
    cache = open_cache(str(cache_dir))
    names = [f"{prefix}.{level}" for level in levels]
    fields = cache.dequantize(cache.get(image_id, 0, fields=names), device="cpu")
    return [(1 / (1 + np.exp(-fields[name].double().numpy()))).max(axis=0) for name in names]


def assert_picture(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= 200, image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 0, f"{path} is blank"
    colours = np.unique(pixels.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
    assert len(colours) > 50, f"{path} has almost no content ({len(colours)} colours)"


def test_every_picture_is_drawn_for_each_image(world, tmp_path):
    messages = []
    paths = draw(world / "data", world / "cache", tmp_path, num_images=2, view=1,
                 student_ckpt=world / "icd_run" / "student.pt", icd_run=world / "icd_run", log=messages.append)
    assert messages == []
    assert len(paths) == 2 * len(picture_names())
    assert {p.name.rsplit("_", 1)[1] for p in paths} == {f"{picture}.png" for picture in picture_names()}
    assert all("_view1_" in p.name for p in paths)
    for path in paths:
        assert_picture(path)


def test_missing_inputs_skip_their_picture_with_the_reason(world, tmp_path, capsys):
    # The LD-only cache has region rows but no fpn / head groups, and no student is given.
    paths = main(["--data", str(world / "data"), "--cache", str(world / "cache_ld"), "--out", str(tmp_path),
                  "--image-ids", "1", "--what", "all"])
    assert [p.name for p in paths] == ["1_view0_ld.png"]
    assert_picture(paths[0])
    printed = capsys.readouterr().out
    assert "skipped frs" in printed and "no head.cls" in printed
    assert "skipped maskd" in printed and "skipped icd" in printed and "no fpn" in printed
    assert "skipped detections" in printed and "head.box" in printed
    assert str(paths[0]) in printed


def test_untrained_icd_decoder_and_no_student(world, tmp_path):
    messages = []
    paths = draw(world / "data", world / "cache", tmp_path, image_ids=[2], what="icd,detections",
                 log=messages.append)
    assert [p.name for p in paths] == ["2_view0_icd.png"]
    assert_picture(paths[0])
    assert len(messages) == 2
    assert "untrained decoder" in messages[0] and "--student-ckpt" in messages[1]


def test_a_bad_image_id_is_an_error_naming_it(world, tmp_path):
    with pytest.raises(ValueError, match=r"image id 999999 is not in .*instances_train2017\.json"):
        draw(world / "data", world / "cache", tmp_path, image_ids=[1, 999999])
    with pytest.raises(SystemExit, match="image id 999999"):
        main(["--data", str(world / "data"), "--cache", str(world / "cache"), "--out", str(tmp_path),
              "--image-ids", "999999"])
    with pytest.raises(ValueError, match="--view 5: the cache has 2 views"):
        draw(world / "data", world / "cache", tmp_path, view=5)
    with pytest.raises(ValueError, match="unknown picture"):
        draw(world / "data", world / "cache", tmp_path, what="frs,heatmap")
    assert not any(tmp_path.iterdir())


def test_help_explains_the_pictures(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--icd-run", "--student-ckpt", "untrained", "richness", "VLR", *picture_names()):
        assert word in text


def test_level_cells_are_drawn_around_their_anchor_centres():
    # A 2x3 map of stride 32 over a 64x80 view: cell (i, j) is centred at pixel (32·j, 32·i); pixels past the
    # last centre's half-cell take the last row / column.
    grid = np.arange(6).reshape(2, 3)
    pixels = level_map_to_pixels(grid, 32, (64, 80))
    assert pixels.shape == (64, 80)
    assert pixels[:16, 0].tolist() == [0] * 16 and pixels[16:, 0].tolist() == [3] * 48
    assert pixels[0, :16].tolist() == [0] * 16 and pixels[0, 16:48].tolist() == [1] * 32
    assert pixels[0, 48:].tolist() == [2] * 32


def test_two_stage_cache_draws_frs_and_maskd_and_says_why_not_the_others(frcnn_world, tmp_path, capsys):
    paths = main(["--data", str(frcnn_world / "data"), "--cache", str(frcnn_world / "cache"), "--out", str(tmp_path),
                  "--image-ids", "1"])
    assert [p.name for p in paths] == ["1_view0_frs.png", "1_view0_maskd.png"]
    for path in paths:
        assert_picture(path)
    printed = capsys.readouterr().out
    assert "skipped icd" in printed and "two-stage 'frcnn'" in printed
    assert "skipped ld for image 1, view 0 (64:96): a two-stage teacher's cache has no region." in printed
    assert "skipped detections for image 1, view 0 (64:96): a two-stage teacher's cache has no head.box, " \
           "head.cls" in printed


def test_frs_picture_maps_are_max_sigmoid_of_the_cached_rpn_objectness(frcnn_world, world, tmp_path):
    painter, view = painter_and_view(frcnn_world, tmp_path, "frs", 1)
    maps, source = FRS.picture_maps(painter, view)
    assert source == "head.rpn.obj" and view.levels == ("p2", "p3", "p4", "p5", "p6")
    assert view.strides == (4, 8, 16, 32, 64) and view.image_hw == (64, 66)   # padded to 64×96
    assert [m.shape for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)] == view.level_hw
    for got, expected in zip(maps, sigmoid_max(frcnn_world / "cache", 1, "head.rpn.obj", view.levels)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert level_title(0, view) == "P2 (stride 4, 16×24)" and level_title(4, view) == "P6 (stride 64, 1×2)"
    # A dense cache: the class logits over P3..P7.
    painter, view = painter_and_view(world, tmp_path, "frs", 1)
    maps, source = FRS.picture_maps(painter, view)
    assert source == "head.cls" and view.strides == (8, 16, 32, 64, 128)
    for got, expected in zip(maps, sigmoid_max(world / "cache", 1, "head.cls", view.levels)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert level_title(0, view) == "P3 (stride 8, 8×12)"


def test_maskd_level_follows_the_cache_pyramid(frcnn_world, world, tmp_path):
    paths = main(["--data", str(frcnn_world / "data"), "--cache", str(frcnn_world / "cache"), "--out", str(tmp_path),
                  "--image-ids", "2", "--what", "maskd", "--maskd-level", "p2"])
    assert [p.name for p in paths] == ["2_view0_maskd.png"]
    assert_picture(paths[0])
    # p2 is the tokens' first level (P2..P6) and its masks are drawn over the P2 map.
    painter, view = painter_and_view(frcnn_world, tmp_path, "maskd", 2, maskd_level="p2")
    calls = []

    class Recorder:
        def __init__(self, tokens):
            self.tokens = tokens

        def masks(self, features, level):
            calls.append((tuple(features.shape), level))
            return self.tokens.masks(features, level)

        def weights(self, features, level):
            return self.tokens.weights(features, level)

    painter.state["maskd"] = Recorder(load_receptive_tokens(painter.cache.artifact("maskd_tokens")))
    MasKD.draw_picture(painter, view)
    assert calls == [((1, 128, 16, 24), 0)]
    with pytest.raises(ValueError, match=r"--maskd-level p7: the cache's teacher is a two-stage detector with the "
                                         r"levels p2, p3, p4, p5, p6"):
        draw(frcnn_world / "data", frcnn_world / "cache", tmp_path / "p7", what="maskd", maskd_level="p7")
    with pytest.raises(SystemExit, match=r"--maskd-level p2: the cache's teacher is a dense detector with the "
                                         r"levels p3, p4, p5, p6, p7"):
        main(["--data", str(world / "data"), "--cache", str(world / "cache"), "--out", str(tmp_path / "dense"),
              "--what", "maskd", "--maskd-level", "p2"])
    assert not (tmp_path / "p7").exists() and not (tmp_path / "dense").exists()
