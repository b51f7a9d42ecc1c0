"""Where a rank's computed samples go: its writer thread, or its writer processes.

Either way each sample goes through ``CacheWriter.put(position, sample)`` (store/writer.py), the
one piece of code that routes a sample to its shard, encodes and writes it, and commits the shard
(after the lock-owner check, store/lock.py) when its last sample arrives. A sink moves samples
off the main thread, which feeds the accelerator, and counts views, shards and bytes into the
rank's ``RankStats`` (precompute/pipeline.py) and its progress bar:

- ``ThreadSink``: one writer thread; encoding runs in the store's encode pool.
- ``ProcessSink`` (``--writer-procs N``): N writer processes, each owning whole shards, so that
  the encoding and the store's Python work do not share the main thread's GIL.

Both take ``put(positions, samples, event)`` (``event``: a CUDA event after which the samples'
host copies are complete), then ``finish()``, or ``abort()`` on an error.
"""
from __future__ import annotations

import os
import queue
import threading
import time

import torch

from store import load_manifest, open_writer


def put_samples(writer, positions: list[int], samples: list[dict]) -> list[int]:
    """Hand samples to their shards (``CacheWriter.put``); the bytes of each shard this commits."""
    receipts = [writer.put(position, sample) for position, sample in zip(positions, samples)]
    return [sum(f["nbytes"] for f in receipt["files"].values()) for receipt in receipts if receipt is not None]


def check_all_committed(writer) -> None:
    unfinished = writer.unfinished_shards()
    if unfinished:
        raise RuntimeError(f"shards {unfinished} did not receive all their samples")


class ThreadSink:
    """The writer thread: samples of the rank's pending shards -> ``CacheWriter.put`` -> commits."""

    _STOP = object()

    def __init__(self, writer, bar, stats, queue_size: int) -> None:
        self.writer, self.bar, self.stats = writer, bar, stats
        self.pending = {task.index for task in writer.pending_shards()}
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="precompute-writer", daemon=True)
        self.started = time.perf_counter()

    def start(self) -> None:
        self.thread.start()

    def put(self, positions: list[int], samples: list[dict], event) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put((positions, samples, event), timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.queue.put(self._STOP)
        self.thread.join()
        self._raise_if_failed()
        check_all_committed(self.writer)

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self.queue.put_nowait(self._STOP)
        except queue.Full:
            pass
        self.thread.join(timeout=60)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the writer thread failed: {self.error!r}") from self.error

    def _loop(self) -> None:
        shard_size = self.writer.manifest.shard_size
        try:
            while True:
                item = self.queue.get()
                if item is self._STOP or self.error is not None:
                    return
                positions, samples, event = item
                if event is not None:
                    event.synchronize()
                # a committed shard's views are recomputed only to batch as before: passed over
                kept = [(p, s) for p, s in zip(positions, samples) if p // shard_size in self.pending]
                for nbytes in put_samples(self.writer, [p for p, _ in kept], [s for _, s in kept]):
                    self.stats.shards += 1
                    self.stats.bytes += nbytes
                self.stats.views += len(positions)
                elapsed = max(time.perf_counter() - self.started, 1e-9)
                self.bar.set_postfix_str(f"{self.stats.bytes / elapsed / 1e6:.1f} MB/s written", refresh=False)
                self.bar.update(len(positions))
        except BaseException as error:  # handed to the main thread
            self.error = error


class ProcessSink:
    """Writer processes instead of the writer thread: process k owns every k-th pending shard, encodes
    and commits it. Samples travel as torch tensors in shared memory (no pickled copies of the maps).
    Spreads the encoding (and the store's Python work, which holds a GIL) over CPU cores, so that
    the main thread, which feeds the accelerator, does not share its GIL with it."""

    def __init__(self, url: str, rank: int, world_size: int, pending, shard_size: int, procs: int, bar,
                 stats, queue_size: int, encode_threads: int, run_id: str | None) -> None:
        import torch.multiprocessing as tmp
        context = tmp.get_context("spawn")
        procs = min(procs, len(pending))
        self.shard_size, self.bar, self.stats = shard_size, bar, stats
        self.owner = {task.index: i % procs for i, task in enumerate(pending)}
        self.inboxes = [context.Queue(maxsize=queue_size) for _ in range(procs)]
        self.outbox = context.Queue()
        self.procs = []
        for k in range(procs):
            shards = sorted(task.index for task in pending if self.owner[task.index] == k)
            self.procs.append(context.Process(
                target=_writer_process, name=f"precompute-writer{k}", daemon=True,
                args=(url, rank, world_size, shards, encode_threads, self.inboxes[k], self.outbox,
                      run_id, os.getpid())))
        self.done = 0
        self.started = time.perf_counter()

    def start(self) -> None:
        for proc in self.procs:
            proc.start()

    def put(self, positions: list[int], samples: list[dict], event) -> None:
        if event is not None:
            event.synchronize()  # the host copies are complete
        routed: dict[int, tuple[list, list]] = {}
        for position, sample in zip(positions, samples):
            if position // self.shard_size not in self.owner:
                self.bar.update(1)           # a committed shard's view, recomputed only to batch as before
                continue
            sample = {k: v.clone() if v.is_pinned() else v for k, v in sample.items()}  # pinned memory is not shareable
            entry = routed.setdefault(self.owner[position // self.shard_size], ([], []))
            entry[0].append(position)
            entry[1].append(sample)
        for k, item in routed.items():
            while True:
                self._poll()
                try:
                    self.inboxes[k].put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
        self._poll()

    def finish(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        while self.done < len(self.procs):
            self._poll(block=True)
        for proc in self.procs:
            proc.join()

    def abort(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=30)

    def _poll(self, block: bool = False) -> None:
        while True:
            try:
                message = self.outbox.get(timeout=0.5) if block else self.outbox.get_nowait()
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"writer process(es) {dead} died (exit codes "
                                       f"{[p.exitcode for p in self.procs]})")
                if block:
                    continue
                return
            kind = message[0]
            if kind == "error":
                raise RuntimeError(f"a writer process failed: {message[1]}")
            if kind == "views":
                self.stats.views += message[1]
                self.bar.update(message[1])
            elif kind == "commit":
                self.stats.shards += 1
                self.stats.bytes += message[1]
                elapsed = max(time.perf_counter() - self.started, 1e-9)
                self.bar.set_postfix_str(f"{self.stats.bytes / elapsed / 1e6:.1f} MB/s written", refresh=False)
            elif kind == "done":
                self.done += 1
            if block:
                return


def _writer_process(url: str, rank: int, world_size: int, shards: list[int], encode_threads: int, inbox,
                    outbox, run_id: str | None, parent: int) -> None:
    """One writer process: commits the shards it owns as their samples arrive (see ProcessSink)."""
    import traceback

    die_with_parent(parent)
    torch.set_num_threads(1)
    writer = open_writer(url, load_manifest(url), rank=rank, world_size=world_size, shards=shards,
                         encode_threads=encode_threads, run_id=run_id)
    try:
        while True:
            item = inbox.get()
            if item is None:
                break
            positions, samples = item
            for nbytes in put_samples(writer, positions, samples):
                outbox.put(("commit", nbytes))
            outbox.put(("views", len(positions)))
        check_all_committed(writer)
        outbox.put(("done",))
    except BaseException as error:
        outbox.put(("error", f"{error!r}\n{traceback.format_exc()}"))
        raise
    finally:
        writer.close(finalize=False)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), so that no rank or writer
    outlives a killed run; where that is unavailable the lock check before each commit still
    stops it (store/lock.py)."""
    import ctypes
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)           # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                  # the parent died before prctl took effect
        os._exit(1)
