"""Teacher training end to end on the real COCO-format sets: a few iterations, then COCO eval."""
import json

import pytest
import torch

from detectors import load_checkpoint
from train.teacher import parse_args, train_teacher


@pytest.mark.parametrize("model,dataset,val_split", [
    ("gfl-nano", "tiny_coco", "val2017"),
    ("retina-nano", "coco128", "train2017"),
])
def test_teacher_trains_and_evaluates_on_real_coco(model, dataset, val_split, tmp_path, request):
    root = request.getfixturevalue(dataset)
    out = tmp_path / "run"
    args = parse_args(["--model", model, "--data", str(root), "--out", str(out), "--val-split", val_split,
                       "--epochs", "1", "--max-iters", "3", "--batch-size", "2", "--short", "128",
                       "--max-size", "192", "--workers", "0", "--warmup-iters", "2", "--no-progress"])
    result = train_teacher(args)

    assert result["iterations"] == 3
    metrics = json.loads((out / "metrics.json").read_text())["final"]
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("AP", "AP50", "AP75"))
    model_loaded, extra = load_checkpoint(out / "last.pt")
    assert extra["iteration"] == 3
    assert model_loaded.config.num_classes == 80
    # The checkpoint holds the trained weights, not a fresh initialisation.
    fresh = type(model_loaded)(model_loaded.config)
    assert any(not torch.equal(a, b) for a, b in zip(model_loaded.state_dict().values(), fresh.state_dict().values()))
