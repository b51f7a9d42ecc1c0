"""The precompute run: teacher once over every (image, view), fields into the store, resumable.

One process (or rank) does, for the shards it owns that are not committed yet:

    loader workers ──► main thread: teacher forward, extract_fields ──► queue ──► writer thread
    (decode, view,       (accelerator; outputs cast to float32 and        (CacheWriter.put: encoding
     collate)             copied to pinned host memory, async)             in the store's encode pool;
                                                                           commit = atomic files)

so the accelerator does not wait on decoding, compression or I/O (the writer thread, or with
``writer_procs`` writer processes: precompute/sinks.py). Several processes (torchrun
ranks, or ``num_procs`` spawned CPU workers) own disjoint shards (rank r: shards r, r + world, ...).
The manifest is declared once before any shard is written (rank 0, with the calibration samples
that fit the KLT codecs) and finalized once after every rank has finished. A rerun of the same
command skips committed shards; a cache declared for another teacher, dataset, views, fields,
codecs or layout is refused.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from detectors.data import IMAGE_HASH, CocoDetection, image_hash_digest, image_hash_table
from detectors.image_scan import scan_images
from detectors.runtime import dist_env, resolve_amp, resolve_device
from detectors.views import ViewSpec, collate, parse_view_list
from precompute.config import PrecomputeConfig
from precompute.fields import (TeacherOutputs, artifact_configs, artifacts_for, cache_options, extract_fields,
                              resolve_fields)
from precompute.plan import (TaskOrder, ViewBatches, calibration_positions, padded_shape_fn, plan_batches,
                             plan_windows)
from precompute.sinks import ProcessSink, ThreadSink, die_with_parent
from precompute.teacher import Teacher, as_recorded, load_teacher, neck_head_meta, neck_head_state
from store import (FIELDS, Manifest, ManifestMismatch, expand_fields, finalize, fsutil, load_manifest, open_cache,
                   open_writer, parse_codec_spec)
from store.lock import CacheLock, read_lock
from store.schema import IMAGE_HASHES_ARTIFACT, INHERIT_ARTIFACT, ROI_HEAD_ARTIFACT
from train.methods import ArtifactInputs, method_sources, register_method_sources
from train.partial_teacher import roi_head_artifact


@dataclass
class RankStats:
    rank: int
    views: int = 0            # views computed and written by this rank in this run
    skipped_shards: int = 0   # shards found committed (resume) among this rank's shards
    shards: int = 0           # shards committed by this rank in this run
    bytes: int = 0            # bytes of the committed shard files
    seconds: float = 0.0

    @property
    def views_per_s(self) -> float:
        return self.views / self.seconds if self.seconds else 0.0


class Run:
    """What every rank of one precompute run shares: config, data, teacher, fields, declaration."""

    def __init__(self, config: PrecomputeConfig, rank: int = 0, local_rank: int = 0) -> None:
        self.config = config
        self.views: list[ViewSpec] = parse_view_list(config.views, seed=config.seed)
        self.dataset = CocoDetection(config.data, config.split, views=self.views, view_policy="all",
                                     on_error=config.on_error)
        # Every image is read, hashed and decoded once before the cache is declared: the bad ones
        # (on_error="skip") are left out of the task order and named in the declaration, and every
        # image's hash is recorded (the declaration holds the table's digest, the cache the table) and
        # checked again when the image is loaded for its views.
        self.scan = scan_images(self.dataset, workers=config.workers, progress=config.progress and rank == 0)
        self.dataset.exclude(self.scan.bad)
        self.dataset.expect_image_hashes(self.scan.hashes)
        self.order = TaskOrder(len(self.dataset.image_ids), len(self.views))
        self.device = resolve_device(config.device, local_rank, config.cudnn_benchmark)
        self.amp_dtype = resolve_amp(config.amp, self.device)
        self.teacher: Teacher = load_teacher(config.teacher, config.ckpt, self.dataset.num_classes, config.source,
                                             self.device, category_ids=self.dataset.label_to_cat_id)
        # what the teacher gives (head.ctr: FCOS only; fpn.p2, head.rpn and its RoI head: a two-stage teacher)
        self.outputs = TeacherOutputs.probe(self.teacher.model)
        self.fields = resolve_fields(config.fields, self.outputs)
        # The configs of the methods with artefacts (the teacher's family, --set), and the artefacts
        # (name -> the method class that makes it) that they make
        self.method_configs = artifact_configs(config.fields, self.teacher.model.config.family, config.overrides)
        self.artifact_makers = artifacts_for(config.fields, self.method_configs)
        # declared: the cache is complete only with the hash table (and a two-stage teacher's RoI head)
        self.artifacts = [*self.artifact_makers, IMAGE_HASHES_ARTIFACT,
                          *([ROI_HEAD_ARTIFACT] if self.outputs.two_stage else [])]
        # The fpn default was chosen by dense students' AP (BENCHMARKS.md, rate-distortion); a two-stage
        # teacher's RoI head reads its maps too and is not measured yet, so its fpn keeps 1 % RMSE.
        defaults = {"fpn": TWO_STAGE_FPN_CODEC} if self.outputs.two_stage else {}
        self.codecs = field_codecs(self.fields, {**defaults, **config.codecs})
        self.rank = rank
        self.run_id: str | None = None    # the writer run holding the cache's lock (store/lock.py)

    # ------------------------------------------------------------------ declaration
    def declared(self) -> dict[str, Any]:
        """The cache this run writes; a resumed run must find exactly this in the manifest."""
        return dict(teacher=self.teacher.manifest_entry(self.config.amp if self.amp_dtype else "fp32"),
                    dataset=dict(self.dataset.fingerprint(), split=self.config.split),
                    views=[v.to_dict() for v in self.views], fields=self.fields,
                    options=cache_options(self.fields, self.config.ld_vlr_rule))

    def extra(self) -> dict[str, Any]:
        # The teacher's own metrics (when its checkpoint records them) travel with the cache, so
        # sweep reports can place the students against it.
        n = max(1, len(self.scan.hashes) + len(self.scan.bad))
        return dict(precompute=dict(codecs=self.codecs, fields_spec=self.config.fields,
                                    views_spec=self.config.views, seed=self.config.seed,
                                    on_error=self.config.on_error,
                                    # why each image named in dataset.skipped_image_ids was left out
                                    skipped_images={str(i): why for i, why in sorted(self.dataset.excluded.items())},
                                    image_scan_ms_per_image=dict(read_hash=round(1e3 * self.scan.seconds_read_hash / n, 3),
                                                                 decode=round(1e3 * self.scan.seconds_decode / n, 3))),
                    teacher_metrics=self.teacher.metrics)

    def image_hashes_artifact(self) -> tuple[dict, dict]:
        """The arrays and meta of the ``IMAGE_HASHES_ARTIFACT`` (its digest is in the declaration)."""
        ids, digests = image_hash_table(self.dataset.image_hashes)
        return ({"image_ids": ids, "digests": digests},
                {"algorithm": IMAGE_HASH, "digest": image_hash_digest(ids, digests)})

    def check_existing(self, manifest: Manifest) -> None:
        """Refuse to add to a cache declared differently (not mixed): first difference named."""
        declared = dict(self.declared(), backend=self.config.format, shard_size=self.config.shard_size,
                        num_samples=self.order.num_samples)
        declared["teacher"] = as_recorded(declared["teacher"], manifest["teacher"])
        # the codec specs chosen (the declaration holds the codecs fitted from them)
        diff = manifest.declaration_difference(declared, recorded={"precompute.codecs": self.codecs})
        if diff:
            raise ManifestMismatch(
                f"{self.config.cache} already holds a cache declared differently ({diff}). A cache is "
                f"never mixed: write to a new --cache location, or rerun with the original options to "
                f"resume it.")

    # ------------------------------------------------------------------ manifest
    def prepare_manifest(self) -> Manifest:
        """Load and check the existing manifest (resume), or declare the cache (rank 0 only)."""
        existing = load_manifest(self.config.cache)
        if existing is not None:
            self.check_existing(existing)
            return existing
        calibration = self.calibration_samples() if self.calibrated_fields() else None
        declared = self.declared()
        manifest = Manifest.create(teacher=declared["teacher"], dataset=declared["dataset"], views=declared["views"],
                                   fields={name: self.codecs[name] for name in self.fields},
                                   backend=self.config.format, shard_size=self.config.shard_size,
                                   num_samples=self.order.num_samples, calibration=calibration, extra=self.extra(),
                                   options=declared["options"], artifacts=[INHERIT_ARTIFACT, *self.artifacts])
        open_writer(self.config.cache, manifest, shards=[], run_id=self.run_id,               # writes manifest.json
                    discard_foreign=self.config.discard_foreign_shards).close(finalize=False)
        return load_manifest(self.config.cache)

    def calibrated_fields(self) -> list[str]:
        """The fields with a lossy codec: calibration views fit the KLT codecs among them, and the
        manifest records every one's measured error on those views."""
        return [name for name, spec in self.codecs.items() if not parse_codec_spec(spec).preset.lossless]

    def calibration_samples(self) -> list[dict[str, torch.Tensor]]:
        """Teacher fields of a few views spread over the task order (see ``calibrated_fields``)."""
        positions = calibration_positions(self.order.num_samples, self.config.calibration)
        shape_of = padded_shape_fn(self.dataset, self.order)
        samples = []
        for batch_positions in plan_batches(positions, shape_of, self.config.batch_size):
            batch = collate([self.dataset.load(*self.order.task(p)) for p in batch_positions])
            samples += extract_fields(self.teacher.model, batch, self.calibrated_fields(), amp_dtype=self.amp_dtype,
                                      ld_vlr_rule=self.config.ld_vlr_rule,
                                      output_device="cpu")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies to host memory were asynchronous
        return samples


TWO_STAGE_FPN_CODEC = "klt:0.01"


def field_codecs(fields: list[str], overrides: dict[str, str]) -> dict[str, str]:
    """Codec spec per field (canonical, ``store.parse_codec_spec``): the schema default, or the most
    specific override (name > prefix > group). Integer fields (region indices, meta) always keep
    their exact default codec. A bad field name or spec is refused here, before any view is computed.
    """
    canonical = {}
    for key, spec in overrides.items():
        expand_fields([key])  # unknown names are an error
        canonical[key] = str(parse_codec_spec(spec, field=key))
    chosen = {}
    for name in fields:
        spec = FIELDS[name]
        codec = spec.default_codec
        if spec.kind == "float":
            matches = [key for key in canonical if name == key or name.startswith(key + ".")]
            if matches:
                codec = canonical[max(matches, key=len)]
        chosen[name] = codec
    return chosen


def encode_threads_for(config: PrecomputeConfig, device: torch.device, ranks_on_host: int) -> int:
    """Encoding threads of one rank. Auto: on a GPU, the CPU cores of this rank that the loader
    workers and the main thread leave (encoding, mostly the KLT transform and Zstd, is what the
    host has to keep up with); on a CPU, 2 (the forward already uses every core: the threads only
    let encoding interleave with it)."""
    if config.encode_threads >= 0:
        return config.encode_threads
    if device.type == "cuda":
        cores = (os.cpu_count() or 2) // max(1, ranks_on_host)
        return max(2, cores - config.workers - 1)
    return 2


# ---------------------------------------------------------------------------------------------
# one rank's shards


def run_rank(run: Run, manifest: Manifest, rank: int, world_size: int) -> RankStats:
    """Compute and commit the pending shards this rank owns; does not finalize."""
    config, order = run.config, run.order
    start = time.perf_counter()
    ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", config.num_procs if config.num_procs > 1 else 1))
    writer = open_writer(config.cache, manifest, rank=rank, world_size=world_size,
                         encode_threads=encode_threads_for(config, run.device, ranks_on_host), run_id=run.run_id,
                         discard_foreign=config.discard_foreign_shards)
    stats = RankStats(rank)
    try:
        pending = writer.pending_shards()
        stats.skipped_shards = len(writer.owned) - len(pending)
        shard_size = manifest.shard_size
        owned = [writer.task(index) for index in writer.owned]
        pending_set = {task.index for task in pending}
        batches = plan_windows([list(task.positions) for task in owned], padded_shape_fn(run.dataset, order),
                               config.batch_size, config.window,
                               keep=[task.index in pending_set for task in owned])
        total_views = sum(len(b) for b in batches)
        use_cuda = run.device.type == "cuda"
        loader = torch.utils.data.DataLoader(   # the images' bytes are checked against the scan's hashes
            ViewBatches(run.dataset, order, batches, image_bytes="image.encoded" in run.fields),
            batch_size=None, shuffle=False, num_workers=config.workers, pin_memory=use_cuda,
            prefetch_factor=4 if config.workers else None, persistent_workers=False)
        bar = tqdm(total=total_views, unit="view", desc=f"rank {rank}" if world_size > 1 else "precompute",
                   position=rank if world_size > 1 else None, disable=not config.progress or not total_views,
                   dynamic_ncols=True, smoothing=0.1)
        if config.writer_procs > 0 and pending:
            sink = ProcessSink(config.cache, rank, world_size, pending, shard_size, config.writer_procs, bar, stats,
                               config.queue_size, encode_threads_for(config, run.device, ranks_on_host), run.run_id)
        else:
            sink = ThreadSink(writer, bar, stats, config.queue_size)
        sink.start()
        try:
            for planned in loader:
                samples = extract_fields(run.teacher.model, planned.batch, run.fields, amp_dtype=run.amp_dtype,
                                         ld_vlr_rule=config.ld_vlr_rule,
                                         output_device="cpu")
                if planned.image_bytes is not None:
                    for sample, blob in zip(samples, planned.image_bytes):
                        sample["image.encoded"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                event = None
                if use_cuda:
                    event = torch.cuda.Event()
                    event.record()
                sink.put(planned.positions, samples, event)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        finally:
            bar.close()
    finally:
        writer.close(finalize=False)
    stats.seconds = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------------------------
# artefacts, finalization, the whole run


def write_artifacts(run: Run, manifest: Manifest) -> list[str]:
    """Store the per-cache artefacts that are missing: the image hash table, the teacher's neck+head
    weights, a two-stage teacher's RoI head, and the methods' artefacts, each made by its method's
    ``make_artifact``."""
    existing = set(open_cache(run.config.cache, allow_incomplete=True).artifacts())
    writer = open_writer(run.config.cache, manifest, shards=[], run_id=run.run_id)
    written = []
    try:
        if IMAGE_HASHES_ARTIFACT not in existing:   # the per-image table behind the declared digest
            writer.put_artifact(IMAGE_HASHES_ARTIFACT, *run.image_hashes_artifact())
            written.append(IMAGE_HASHES_ARTIFACT)
        if INHERIT_ARTIFACT not in existing:
            writer.put_artifact(INHERIT_ARTIFACT, neck_head_state(run.teacher.model), neck_head_meta(run.teacher.model))
            written.append(INHERIT_ARTIFACT)
        if ROI_HEAD_ARTIFACT in run.artifacts and ROI_HEAD_ARTIFACT not in existing:
            writer.put_artifact(ROI_HEAD_ARTIFACT, *roi_head_artifact(run.teacher.model))
            written.append(ROI_HEAD_ARTIFACT)
        config = run.config
        for name, method in run.artifact_makers.items():
            if name in existing:
                continue
            inputs = ArtifactInputs(teacher_model=run.teacher.model, dataset=run.dataset,
                                    config=run.method_configs[method.NAME], device=run.device, seed=config.seed,
                                    workers=config.workers, progress=config.progress)
            start = time.perf_counter()
            arrays, meta = method.make_artifact(name, inputs)
            meta = {**meta, "seconds": round(time.perf_counter() - start, 3)}  # part of the cache's cost
            writer.put_artifact(name, arrays, meta)
            written.append(name)
    finally:
        writer.close(finalize=False)
    return written


def _spawned_rank(config_dict: dict, rank: int, world_size: int, threads: int, results, run_id: str,
                  parent: int, methods: dict[str, str]) -> None:
    die_with_parent(parent)
    torch.set_num_threads(threads)
    register_method_sources(methods)   # --fields may name a method the parent registered
    config = PrecomputeConfig(**config_dict)
    run = Run(config, rank)
    run.run_id = run_id
    manifest = load_manifest(config.cache)
    run.check_existing(manifest)
    stats = run_rank(run, manifest, rank, world_size)
    _report_rank(stats, world_size)
    results.put(asdict(stats))


def _report_rank(stats: RankStats, world_size: int) -> None:
    if world_size > 1:
        print(f"rank {stats.rank}: {stats.views} views in {stats.seconds:.1f} s ({stats.views_per_s:.1f} views/s), "
              f"{stats.shards} shards ({stats.bytes / 1e6:.1f} MB) written, {stats.skipped_shards} already there",
              file=sys.stderr, flush=True)


def run_precompute(config: PrecomputeConfig) -> dict[str, Any]:
    """The whole run on this process, under torchrun, or as ``num_procs`` spawned CPU ranks."""
    rank, world, local_rank = dist_env()
    distributed = world > 1
    if distributed and config.num_procs > 1:
        raise ValueError("--num-procs spawns ranks itself; do not combine it with torchrun")
    if config.num_procs > 1 and resolve_device(config.device, 0).type != "cpu":
        raise ValueError("--num-procs is for CPU runs; use torchrun --nproc-per-node N for several GPUs")
    start = time.perf_counter()
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=config.dist_timeout))
    lock = None
    try:
        run = Run(config, rank, local_rank)
        if rank == 0:
            lock = CacheLock.acquire(config.cache)   # one writer run per cache; refused if another is live
            run.run_id = lock.run_id
            manifest = run.prepare_manifest()
        if distributed:
            dist.barrier()  # the manifest and the lock exist
        if rank != 0:
            run.run_id = (read_lock(*fsutil.resolve(config.cache)) or {}).get("run_id")
            manifest = load_manifest(config.cache)
            run.check_existing(manifest)
        if manifest["complete"]:
            if rank == 0:
                print(f"{config.cache}: already complete ({manifest.num_samples} views); nothing to do",
                      file=sys.stderr)
            return dict(complete=True, views=0, seconds=time.perf_counter() - start, artifacts=[])
        if config.num_procs > 1:
            stats = _run_spawned(config, manifest, run.run_id)
        else:
            stats = [run_rank(run, manifest, rank, world)]
            _report_rank(stats[0], world)
        if distributed:
            dist.barrier()  # every rank has closed its writer
            # Leave the group before rank 0 goes on alone: an artefact maker may compute the teacher's
            # loss (MasKD stage 1), whose normalisers are averaged over ranks when a process group exists.
            dist.destroy_process_group()
            distributed = False
        if rank != 0:
            return dict(complete=False, views=stats[0].views, seconds=time.perf_counter() - start, artifacts=[])
        written = write_artifacts(run, manifest)
        final = finalize(config.cache)
        seconds = time.perf_counter() - start
        views = sum(s.views for s in stats)
        total = sum(stored for stored, _ in final["totals"]["fields"].values())
        print(f"{config.cache}: complete — {final.num_samples} views in {final.num_shards} shards, "
              f"{total / 1e6:.1f} MB; this run computed {views} views in {seconds:.1f} s"
              f"{' (rank 0)' if world > 1 else ''}; artefacts written: {', '.join(written) or 'none'}. "
              f"See: python -m store inspect {config.cache}", file=sys.stderr)
        return dict(complete=True, views=views, seconds=seconds, artifacts=written, stats=[asdict(s) for s in stats])
    finally:
        if distributed:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def _run_spawned(config: PrecomputeConfig, manifest: Manifest, run_id: str) -> list[RankStats]:
    """``num_procs`` CPU processes, each a rank; returns after all exited (an error names the rank)."""
    import multiprocessing as mp
    context = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // config.num_procs)
    results = context.SimpleQueue()
    procs = [context.Process(target=_spawned_rank, args=(asdict(config), r, config.num_procs, threads, results,
                                                         run_id, os.getpid(), method_sources()),
                             name=f"precompute-rank{r}") for r in range(config.num_procs)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"precompute rank(s) failed (rank, exit code): {failed}; committed shards are kept, "
                           "rerun the same command to finish")
    stats = []
    while not results.empty():
        stats.append(RankStats(**{k: v for k, v in results.get().items()}))
    return sorted(stats, key=lambda s: s.rank)
