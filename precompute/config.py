"""What a precompute run is told: :class:`PrecomputeConfig`, the one description of ``python -m precompute``'s options.

Each field that is an option carries its help and ``--help`` group in its metadata
(``train.options`` builds the parser from them); ``queue_size`` and ``dist_timeout`` are for
library callers only. Nothing here imports torch at import time, so that ``python -m precompute
--help`` stays fast; building a config checks its ``overrides`` (``--set``: hyperparameters of the
methods ``fields`` names, with which their artefacts are made) through the method registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from store import BACKENDS
from store.schema import LD_VLR_RULES

# The --help sections, in order.
TEACHER, DATA, CACHE, METHODS, THROUGHPUT, OTHER = (
    "teacher", "data and views", "cache", "methods (their artefacts)", "throughput", "other")
OPTION_GROUPS = (TEACHER, DATA, CACHE, METHODS, THROUGHPUT, OTHER)

# The names of detectors.runtime.AMP_DTYPES, spelled here so that --help imports no torch
# (tests/test_config_values.py checks that they agree).
AMP_CHOICES = ("none", "bf16", "fp16")
CHECKPOINT_SOURCES = ("auto", "project", "torchvision", "mmdet")   # precompute.teacher.load_teacher's layouts


@dataclass
class PrecomputeConfig:
    """Everything a precompute run is told (the CLI's options, ``python -m precompute --help``)."""

    ckpt: str = field(metadata={"group": TEACHER, "help": "teacher checkpoint file (required)", "required": False})
    data: str = field(metadata={"group": DATA, "help": "COCO-layout root: annotations/instances_SPLIT.json, SPLIT/"})
    cache: str = field(metadata={"group": CACHE, "help": "cache directory or fsspec URL"})
    teacher: str = field(default="auto", metadata={
        "group": TEACHER, "help": "architecture: a zoo name (gfl-r101, retina-r50, gfl-small), a depth (r101: family "
                                  "from the checkpoint) or 'auto' (from the checkpoint)"})
    source: str = field(default="auto", metadata={
        "group": TEACHER, "choices": CHECKPOINT_SOURCES, "help": "checkpoint layout",
        "default_text": "auto: from its keys"})
    split: str = field(default="train2017", metadata={"group": DATA, "help": "the split to cache"})
    on_error: str = field(default="skip", metadata={
        "group": DATA, "choices": ("skip", "raise"),
        "help": "a corrupt or missing image: skip (left out and counted, its id and the reason in the cache "
                "manifest, so the trainer leaves it out too) or raise (refuse the split)"})
    format: str = field(default="zarr", metadata={"group": CACHE, "choices": BACKENDS, "help": "store backend"})
    views: str = field(default="default", metadata={"group": DATA, "help": "views cached per image (see below)"})
    fields: str = field(default="all", metadata={
        "group": CACHE, "help": "all | method names and field presets (python -m train.methods lists them) | "
                                "groups/prefixes/fields"})
    codecs: dict[str, str] = field(default_factory=dict, metadata={
        "group": CACHE, "flag": "--codec", "metavar": "FIELD=SPEC",
        "help": "codec of a field group, prefix or field, e.g. fpn=klt:0.04 (repeatable; see below)"})
    ld_vlr_rule: str = field(default="official", metadata={
        "group": CACHE, "choices": LD_VLR_RULES,
        "help": "which 'DIoU' picks LD's VLR rows: official (overlap / anchor area - rho^2/c^2, as the official LD "
                "code computed it) or diou (the true DIoU); recorded in the manifest"})
    shard_size: int = field(default=64, metadata={"group": CACHE, "help": "views per shard"})
    batch_size: int = field(default=8, metadata={
        "group": THROUGHPUT, "help": "views per teacher forward (one padded shape)"})
    window: int = field(default=4, metadata={"group": THROUGHPUT, "help": "shards whose views are batched together"})
    device: str = field(default="auto", metadata={
        "group": THROUGHPUT, "help": "auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU)",
        "default_text": "auto: cuda if available"})
    amp: str = field(default="none", metadata={
        "group": THROUGHPUT, "choices": AMP_CHOICES,
        "help": "autocast dtype of the teacher forward; outputs are cast to float32"})
    cudnn_benchmark: bool = field(default=False, metadata={
        "group": THROUGHPUT, "help": "let cuDNN time its kernels for each new input shape (see python -m train --help)"})
    workers: int = field(default=2, metadata={"group": THROUGHPUT, "help": "data loader processes per rank"})
    encode_threads: int = field(default=-1, metadata={
        "group": THROUGHPUT, "help": "encoding threads per rank; -1: auto (GPU: the rank's spare CPU cores, CPU: 2)"})
    writer_procs: int = field(default=0, metadata={
        "group": THROUGHPUT, "help": "encode and write in N processes instead of a thread (spreads encoding over CPU "
                                     "cores; for GPU hosts whose encoding cannot keep up with the teacher)"})
    queue_size: int = 4                  # batches between the forward and the writer thread
    calibration: int = field(default=16, metadata={"group": THROUGHPUT, "help": "views that fit the KLT codecs"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "group": METHODS, "flag": "--set",
        "help": "hyperparameter of a method --fields names, repeatable, as python -m train --set takes it "
                "(python -m train.methods lists them): what its per-cache artefacts are made with"})
    num_procs: int = field(default=1, metadata={
        "group": THROUGHPUT, "help": "CPU only: run N processes, each owning every N-th shard"})
    seed: int = field(default=0, metadata={"group": OTHER, "help": "multi-scale view sampling and the methods' artefacts"})
    dist_timeout: float = 24 * 3600.0    # seconds a rank waits for the others at a barrier
    progress: bool = field(default=True, metadata={"group": OTHER, "help": "no tqdm bars"})
    discard_foreign_shards: bool = field(default=False, metadata={
        "group": OTHER, "help": "delete shards whose receipts this cache cannot adopt (damaged, or written under "
                                "another declaration, e.g. after manifest.json was lost) and compute them again; "
                                "without it such a cache is refused, naming the shards"})

    def __post_init__(self) -> None:
        if self.format not in BACKENDS:
            raise ValueError(f"format must be one of {BACKENDS}, got {self.format!r}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.ld_vlr_rule not in LD_VLR_RULES:
            raise ValueError(f"ld_vlr_rule must be one of {LD_VLR_RULES}, got {self.ld_vlr_rule!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.encode_threads < -1:
            raise ValueError(f"encode_threads must be >= 0 or -1 (auto), got {self.encode_threads}")
        for name in ("shard_size", "batch_size", "window", "queue_size", "calibration"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "num_procs", "writer_procs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # The methods' hyperparameters, checked by the registry (imports torch: not at --help) and
        # qualified ("stage1_iters" -> "maskd.stage1_iters").
        from precompute.fields import methods_of
        from train.methods import check_overrides, split_overrides
        methods = methods_of(self.fields)
        check_overrides(methods, dict(self.overrides))
        self.overrides = {f"{name}.{key}": value for name, part in split_overrides(methods, dict(self.overrides)).items()
                          for key, value in part.items()}
