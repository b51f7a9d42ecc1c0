"""MasKD stage 1 (train/methods/maskd_tokens.py) and the ``Detector.forward_features`` hook it uses."""
import copy

import numpy as np
import pytest
import torch

from detectors import build_detector
from detectors.zoo import MODELS
from detectors.data import CocoDetection
from detectors.synth import SynthConfig, generate
from detectors.views import Batch, ViewSpec
from store import Manifest, open_cache, open_writer
from store.synthetic import make_sample
from train.methods.maskd_tokens import (MASKD_ARTIFACT, ReceptiveTokens, cosine_lr, dice_diversity,
                                        learn_receptive_tokens, load_receptive_tokens, stage1_losses)

CHANNELS = MODELS["gfl-nano"].fpn_channels  # fpn_channels of the nano models


def fixed_batch() -> Batch:
    """Two hand-made images (one smaller than the batch) with three boxes, 64×96 padded."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    images[1, :, 60:, 70:] = 0
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [50.0, 5.0, 90.0, 30.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[5.0, 8.0, 30.0, 40.0]]), "labels": torch.tensor([1])}]
    return Batch(images=images, image_sizes=[(64, 96), (60, 70)], targets=targets, image_ids=[1, 2],
                 view_indices=[0, 0], views=[ViewSpec(), ViewSpec()], orig_sizes=[(64, 96), (60, 70)])


def level_features(num_levels: int = 2, channels: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, channels, 6 // (l + 1), 5, generator=generator) for l in range(num_levels)]


# ---------------------------------------------------------------------- the module
def test_masks_shape_range_and_formula():
    torch.manual_seed(0)
    tokens = ReceptiveTokens(channels=8, num_levels=2, num_tokens=6)
    for level, features in enumerate(level_features()):
        masks = tokens.masks(features, level)
        n, _, h, w = features.shape
        assert masks.shape == (n, 6, h, w)
        assert bool(((masks > 0) & (masks < 1)).all())
        token_weights = tokens.levels[level].tokens  # (T, C)
        for t in range(6):
            expected = torch.sigmoid((token_weights[t][None, :, None, None] * features).sum(1))  # (N, H, W)
            torch.testing.assert_close(masks[:, t], expected)


def test_init_matches_official():
    torch.manual_seed(0)
    level = ReceptiveTokens(channels=256, num_levels=1).levels[0]
    assert level.tokens.shape == (6, 256)
    assert abs(level.tokens.std().item() - 0.01) < 0.001
    conv3, pool, conv1 = level.prob_head
    assert (conv3.in_channels, conv3.out_channels, conv3.kernel_size) == (256, 256, (3, 3))
    assert isinstance(pool, torch.nn.AdaptiveAvgPool2d)
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (256, 6, (1, 1))
    assert abs(conv3.weight.std().item() - (2 / (9 * 256)) ** 0.5) < 0.002  # fan-out init
    assert not conv3.bias.any() and not conv1.bias.any()


def test_token_weights_sum_to_one():
    torch.manual_seed(0)
    tokens = ReceptiveTokens(channels=8, num_levels=2)
    for level, features in enumerate(level_features()):
        p = tokens.weights(features, level)
        assert p.shape == (3, 6)
        assert bool((p > 0).all())
        torch.testing.assert_close(p.sum(1), torch.ones(3))


def test_masked_features_are_the_weighted_sum_of_masked_maps():
    torch.manual_seed(0)
    tokens = ReceptiveTokens(channels=8, num_levels=2)
    features = level_features()
    masked, masks = tokens(features)
    for level, f in enumerate(features):
        m, p = tokens.masks(f, level), tokens.weights(f, level)
        expected = sum(p[:, t, None, None, None] * (m[:, t, None] * f) for t in range(6))  # Σ_t p_t (M_t ⊙ F)
        torch.testing.assert_close(masked[level], expected)
        torch.testing.assert_close(masks[level], m)


def test_dice_diversity_hand_computed():
    # Three tokens on a 1×2 map: M1 = [1, 0], M2 = [1, 1], M3 = [0, 1].
    # Dice(1,2) = 2·1 / (1 + 2) = 2/3, Dice(1,3) = 0, Dice(2,3) = 2/3; mean over pairs = 4/9.
    masks = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).view(1, 3, 1, 2)
    assert dice_diversity(masks).item() == pytest.approx(4 / 9)
    # Identical masks give 1, disjoint masks 0; the batch is averaged over.
    same = torch.tensor([[0.5, 0.2], [0.5, 0.2]]).view(1, 2, 1, 2)
    disjoint = torch.tensor([[0.7, 0.0], [0.0, 0.3]]).view(1, 2, 1, 2)
    assert dice_diversity(same).item() == pytest.approx(1.0)
    assert dice_diversity(disjoint).item() == 0.0
    assert dice_diversity(torch.cat([same, disjoint])).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        dice_diversity(masks[:, :1])


def test_cosine_schedule_ends_at_min_lr():
    assert cosine_lr(0, 2000, 0.01, 1e-6) == pytest.approx(0.01)
    assert cosine_lr(1000, 2000, 0.01, 1e-6) == pytest.approx((0.01 + 1e-6) / 2)
    assert cosine_lr(2000, 2000, 0.01, 1e-6) == pytest.approx(1e-6)


# ---------------------------------------------------------------------- the Detector hook
@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano"])
def test_forward_features_is_forward_after_the_neck(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3).eval()
    batch = fixed_batch()
    with torch.no_grad():
        out = model(batch.images, batch.image_sizes, batch.targets)
        again = model.forward_features(out.features, batch.image_sizes, batch.targets)
    for a, b in zip(out.cls_logits + out.box_outputs + out.anchors, again.cls_logits + again.box_outputs + again.anchors):
        assert torch.equal(a, b)
    assert out.losses.keys() == again.losses.keys()
    for key in out.losses:
        assert torch.equal(out.losses[key], again.losses[key])
    for a, b in zip(out.assignment, again.assignment):
        assert torch.equal(a["matched_gt"], b["matched_gt"])
    with pytest.raises(ValueError, match="levels"):
        model.forward_features(out.features[:4], batch.image_sizes)
    with pytest.raises(ValueError, match="needs level maps"):
        model.forward_features([f[..., :2, :2] for f in out.features], batch.image_sizes)


# ---------------------------------------------------------------------- learning
def test_detection_loss_reaches_every_level_of_the_tokens():
    torch.manual_seed(0)
    model = build_detector("retina-nano", num_classes=3).eval().requires_grad_(False)
    tokens = ReceptiveTokens(CHANNELS)
    losses = stage1_losses(model, tokens, fixed_batch())
    assert losses["diversity"].item() == pytest.approx(5.0, abs=0.05)  # masks ≈ 0.5 at init: Dice ≈ 1 per level
    losses["detection"].backward()
    for level in tokens.levels:
        assert level.tokens.grad.abs().sum() > 0 and level.prob_head[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["gfl-nano", "retina-nano"])
def test_learning_lowers_the_loss_and_leaves_the_teacher_alone(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3).train()
    model.head.requires_grad_(False)  # an odd mix of flags, to check that they come back as they were
    flags = [p.requires_grad for p in model.parameters()]
    before = copy.deepcopy(model.state_dict())  # parameters and BN buffers
    batch = fixed_batch()
    start = ReceptiveTokens(CHANNELS)
    initial = copy.deepcopy(start)

    result = learn_receptive_tokens(model, [batch], iters=6, progress=False, tokens=start)

    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    learned = load_receptive_tokens(result["state"])
    with torch.no_grad():
        loss_before = sum(stage1_losses(model, initial, batch).values())
        loss_after = sum(stage1_losses(model, learned, batch).values())
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)  # Dice starts near 5 (1 per level)
    meta = result["meta"]
    assert (meta["num_tokens"], meta["channels"], meta["num_levels"], meta["iters"]) == (6, CHANNELS, 5, 6)
    assert meta["images_seen"] == 12
    assert meta["final_diversity_loss"] < meta["initial_diversity_loss"]


def test_learning_is_seeded_and_reads_a_dataset(tmp_path):
    root = generate(tmp_path / "data", num_train=3, num_val=0, seed=0, progress=False,
                    config=SynthConfig(size=64, max_side=40, max_objects=3))
    dataset = CocoDetection(root, "train2017", views=(ViewSpec(short=64, max_size=96),))
    torch.manual_seed(0)
    model = build_detector("gfl-nano", num_classes=dataset.num_classes)
    runs = [learn_receptive_tokens(model, dataset, iters=2, batch_size=2, progress=False, seed=3) for _ in range(2)]
    assert runs[0]["meta"]["images_seen"] == 4  # drop_last: one batch of 2 per pass over 3 images
    for key, value in runs[0]["state"].items():
        assert torch.equal(value, runs[1]["state"][key]), key


# ---------------------------------------------------------------------- the cache artifact
def test_round_trip_through_a_cache_artifact_gives_identical_masks(tmp_path):
    torch.manual_seed(0)
    tokens = ReceptiveTokens(channels=8, num_levels=2, num_tokens=6)
    for parameter in tokens.parameters():  # not the init values: something learned
        parameter.data.add_(torch.randn_like(parameter))
    state = {key: value.detach().clone() for key, value in tokens.state_dict().items()}
    url = str(tmp_path / "cache")
    manifest = Manifest.create(teacher={"arch": "gfl-nano", "checkpoint_sha256": "ab" * 32},
                               dataset={"num_images": 1}, views=[ViewSpec().to_dict()], fields=["meta"],
                               num_samples=1, shard_size=1)
    with open_writer(url, manifest) as writer:
        writer.write(make_sample(1, 0, fields=["meta"]))
        writer.put_artifact(MASKD_ARTIFACT, state, {"num_tokens": 6, "channels": 8})
    cache = open_cache(url)
    arrays = cache.artifact(MASKD_ARTIFACT)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    assert cache.artifacts()[MASKD_ARTIFACT]["meta"] == {"num_tokens": 6, "channels": 8}

    for loaded in (load_receptive_tokens(arrays), load_receptive_tokens({"state": state, "meta": {}})):
        assert (loaded.channels, loaded.num_levels, loaded.num_tokens) == (8, 2, 6)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        for level, features in enumerate(level_features()):
            assert torch.equal(loaded.masks(features, level), tokens.masks(features, level))
            assert torch.equal(loaded.weights(features, level), tokens.weights(features, level))


def test_load_rejects_arrays_without_tokens():
    with pytest.raises(ValueError, match="no receptive tokens"):
        load_receptive_tokens({"p3": np.zeros((6, 2), np.float32)})
