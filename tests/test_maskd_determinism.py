"""MasKD stage 1 is a function of its seed alone: the loader's worker count and the caller's global
RNG state do not change the receptive tokens (GitHub issue #10, "The cache never lies").

Before the fix, ``CocoDetection(view_policy="random")`` drew each image's view from the global torch
RNG: in the main process with ``workers=0`` (unseeded, so two identical precompute runs cached
different tokens) and in each worker, seeded per worker, with ``workers>=1`` (so 1 and 2 workers
differed too).
"""
import torch

from detectors import build_detector
from detectors.data import CocoDetection
from detectors.synth import SynthConfig, generate
from detectors.views import ViewSpec
from train.methods.maskd_tokens import learn_receptive_tokens

SEED = 5


def test_stage1_tokens_are_bit_identical_for_a_seed_whatever_the_workers(tmp_path):
    root = generate(tmp_path / "data", num_train=6, num_val=0, seed=0, progress=False,
                    config=SynthConfig(size=64, max_side=40, max_objects=3))
    # Two views, so that which view each image gets matters (as with precompute's default views).
    views = (ViewSpec(short=64, max_size=96), ViewSpec(short=48, max_size=96, flip=True))
    dataset = CocoDetection(root, "train2017", views=views, view_policy="random")
    torch.manual_seed(0)
    model = build_detector("gfl-nano", num_classes=dataset.num_classes)

    runs = {}
    for caller_seed, workers in ((1, 0), (2, 0), (3, 1), (4, 2)):
        torch.manual_seed(caller_seed)  # whatever data loading before stage 1 left in the global RNG
        before = torch.get_rng_state()
        runs[caller_seed, workers] = learn_receptive_tokens(model, dataset, iters=4, batch_size=2, progress=False,
                                                            seed=SEED, num_workers=workers)
        assert torch.equal(torch.get_rng_state(), before), f"stage 1 moved the global RNG (workers={workers})"

    reference = runs[1, 0]
    assert reference["meta"]["images_seen"] == 8
    for key, state in runs.items():
        assert state["meta"]["initial_detection_loss"] == reference["meta"]["initial_detection_loss"], key
        for name, value in reference["state"].items():
            assert torch.equal(state["state"][name], value), (key, name)

    other_seed = learn_receptive_tokens(model, dataset, iters=4, batch_size=2, progress=False, seed=SEED + 1)
    assert not torch.equal(other_seed["state"]["levels.0.tokens"], reference["state"]["levels.0.tokens"])
