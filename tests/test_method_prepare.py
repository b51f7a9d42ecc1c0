"""What a method takes from the run before the student's first step: ``prepare`` (MasKD's tokens,
ICD's dataset statistics) and ``warm_up`` (ICD's teacher side trained alone)."""
from types import SimpleNamespace

import pytest
import torch

from detectors.data import CocoDetection
from detectors.detector import valid_level_sizes
from detectors.synth import SynthConfig, generate
from train.methods import ICD, DatasetStats, MasKD, RunResources, build_method, schedule_warnings

C, K = 16, 8
SIZE = (64, 96)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    generate(root, 6, 2, SynthConfig(size=64, max_side=48), seed=3, progress=False)
    return CocoDetection(root, "train2017")


def _teacher_batch(n: int, seed: int):
    """n images of SIZE: random teacher maps on their whole (valid) region, 2 boxes each."""
    generator = torch.Generator().manual_seed(seed)
    sizes = valid_level_sizes(SIZE)
    fpn = [torch.randn(n, C, h, w, generator=generator) for h, w in sizes]
    valid = [torch.ones(n, 1, h, w, dtype=torch.bool) for h, w in sizes]
    teacher = SimpleNamespace(fpn=fpn, valid=valid, valid_sizes=[sizes] * n)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]]),
                "labels": torch.tensor([1, 5])} for _ in range(n)]
    return SimpleNamespace(targets=targets, image_sizes=[SIZE] * n), teacher


def test_icd_prepare_reads_the_runs_dataset_statistics(dataset):
    method = build_method("icd", "gfl", num_classes=dataset.num_classes, student_channels=C, teacher_channels=C,
                          run=RunResources(dataset=dataset))
    expected = DatasetStats.from_dataset(dataset)
    assert torch.equal(method.stats.class_freq, expected.class_freq)
    assert torch.equal(method.stats.size_mean, expected.size_mean)
    # Without a run: the official fallback for datasets other than COCO.
    uniform = build_method("icd", "gfl", num_classes=K, student_channels=C, teacher_channels=C)
    assert torch.equal(uniform.stats.class_freq, DatasetStats.uniform(K).class_freq)


def test_a_prepare_step_that_draws_random_numbers_does_not_change_the_methods_initial_weights(dataset, monkeypatch):
    def drawing_prepare(cls, config, run):
        torch.rand(1000)  # as MasKD's stage 1 does
        return DatasetStats.from_dataset(run.dataset)

    torch.manual_seed(0)
    plain = build_method("icd", "gfl", num_classes=dataset.num_classes, student_channels=C, teacher_channels=C,
                         prepared={"icd": DatasetStats.from_dataset(dataset)})
    monkeypatch.setattr(ICD, "prepare", classmethod(drawing_prepare))
    torch.manual_seed(0)
    prepared = build_method("icd", "gfl", num_classes=dataset.num_classes, student_channels=C, teacher_channels=C,
                            run=RunResources(dataset=dataset))
    for (name, a), b in zip(plain.state_dict().items(), prepared.state_dict().values()):
        assert torch.equal(a, b), name


def test_maskd_prepare_names_what_it_lacks():
    with pytest.raises(ValueError, match="receptive tokens"):
        build_method("maskd", "gfl", student_channels=C, teacher_channels=C, run=RunResources())
    asked = []

    def artifact(name, why):
        asked.append(name)
        raise FileNotFoundError(f"{name}: {why}")

    with pytest.raises(FileNotFoundError, match="maskd_tokens: MasKD reads"):
        build_method("maskd", "gfl", student_channels=C, teacher_channels=C, run=RunResources(artifact=artifact))
    assert asked == [MasKD.ARTIFACTS[0]]


def test_icd_warm_up_trains_only_the_teacher_side_on_the_batches_it_asks_for():
    torch.manual_seed(0)
    method = build_method("icd", "gfl", {"icd.pretrain_batches": 30, "icd.lr": 1e-3}, num_classes=K,
                          student_channels=C, teacher_channels=C)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    batch, teacher = _teacher_batch(2, seed=1)

    def aux_loss():
        torch.manual_seed(5)
        with torch.no_grad():
            cls, box, _, _ = method.auxiliary_task(teacher, method.make_queries(batch.targets, batch.image_sizes))
        return float(cls.mean() + box.mean())

    start = aux_loss()
    asked = []

    def teacher_batches(count, what):
        asked.append((count, what))
        for _ in range(count):
            yield batch, teacher

    report = method.warm_up(teacher_batches)
    assert asked == [(30, "ICD teacher side")]
    assert set(report) == {"icd_aux_cls", "icd_aux_box"}
    assert aux_loss() < 0.8 * start  # the same batch 30 times: the teacher side fits it
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("query_encoder.", "decoder.", "aux_head.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    # The official default: no warm-up, nothing asked.
    official = build_method("icd", "gfl", num_classes=K, student_channels=C, teacher_channels=C)
    assert official.config.pretrain_batches == 0 and official.warm_up(teacher_batches) is None
    assert len(asked) == 1


def test_a_short_icd_run_is_advised_to_warm_the_teacher_side_up():
    notes = [text for text in schedule_warnings(build_method("icd+frs", "gfl"), 900) if "pretrain_batches" in text]
    assert len(notes) == 1 and "--set icd.pretrain_batches=3000" in notes[0]
    warmed = build_method("icd", "gfl", {"icd.pretrain_batches": 3000})
    assert not [text for text in schedule_warnings(warmed, 900) if "pretrain_batches" in text]
    assert not [text for text in schedule_warnings(build_method("icd", "gfl"), 90_000) if "pretrain_batches" in text]
