"""Precompute: run a frozen teacher once over every (image, view) and write its outputs to the store.

    python -m precompute --help                       # the command line (make cache)

Modules:
    config.py       ``PrecomputeConfig``: every option of a run, with the help its flag shows
    fields.py       the one definition of every teacher field (``extract_fields``), LD regions, the
                    --fields grammar (``resolve_fields``: method names ask train.methods' registry)
    teacher.py      ``load_teacher``: this project's, torchvision and mmdetection checkpoints, frozen
    plan.py         task order (image-major, views minor), shard ranges, batches of one padded shape
    pipeline.py     the run: loader -> forward -> writer thread, ranks, resume, artefacts (each made
                    by its method class, train.methods), finalize
"""
from importlib import import_module

# Imported on first use (PEP 562), so that `python -m precompute --help` does not import torch.
_EXPORTS = {
    "extract_fields": "precompute.fields", "ld_regions": "precompute.fields",
    "resolve_fields": "precompute.fields", "Teacher": "precompute.teacher", "load_teacher": "precompute.teacher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'precompute' has no attribute {name!r}")
