"""Shared fixtures: the real COCO-format sets in ../shared/data; the store suites' backend and cache URL.

They are absent on a fresh user's machine (tests skip with the reason) but required in CI.
"""
import os
import uuid
from pathlib import Path

import pytest
import torch

from store import BACKENDS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_set(name: str) -> Path:
    root = SHARED_DATA / name
    if not root.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared data set {root} is missing")
        pytest.skip(f"{root} is absent (shared data sets live beside the checkout)")
    return root


@pytest.fixture(scope="session")
def tiny_coco() -> Path:
    """50 train2017 + 50 val2017 COCO images with official annotations."""
    return _shared_set("tiny_coco")


@pytest.fixture(scope="session")
def coco128() -> Path:
    """128 COCO train2017 images with official annotations."""
    return _shared_set("coco128")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every store backend."""
    return request.param


@pytest.fixture(params=["memory", "local"])
def url(request, tmp_path):
    """A fresh cache location in memory (fsspec memory://) or on the local disk."""
    return f"memory://cache-{uuid.uuid4().hex}" if request.param == "memory" else str(tmp_path / "cache")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: its tensors are tiny, and on a shared 2-core machine two
    OpenMP threads wait on each other for seconds per convolution (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
