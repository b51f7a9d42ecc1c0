"""``verify`` (checks every byte of a cache) and ``inspect`` (what a cache holds, and how big)."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from . import fsutil
from .backends import make_backend
from .errors import CacheError, CorruptShardError
from .integrity import blob_checksum
from .layout import (MANIFEST, SHARDS, artifact_record_name, key_index, read_artifacts, read_receipt, read_receipts,
                     receipt_indices, receipt_name, shard_summary)
from .manifest import Manifest, read_manifest
from .schema import group_of
from .writer import totals


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"verify {self.url}: {'OK' if self.ok else 'FAILED'} — {self.shards} shards, "
                 f"{self.samples} samples, {_size(self.bytes_checked)} checked"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _shards(fs, root, manifest: Manifest) -> tuple[dict[int, dict], dict[int, dict]]:
    """(summaries by index, receipts already read): from the manifest once complete, else the receipts."""
    if manifest["complete"]:
        return {int(s["index"]): s for s in manifest["shards"]}, {}
    receipts = read_receipts(fs, root, manifest.declaration_id)
    return {i: shard_summary(r) for i, r in receipts.items()}, receipts


def verify(url: str, decode: bool = False) -> VerifyReport:
    """Check everything a reader relies on: the sealed manifest, that the cache is finalized with
    every declared shard and artefact, every receipt (sealed, of this declaration, the one the
    manifest lists), every file's size and sha256, the index against the receipts, duplicate keys,
    the artefacts and their records; with ``decode`` also every blob's checksum and codec."""
    report = VerifyReport(str(url))
    fs, root = fsutil.resolve(url)
    try:
        manifest = read_manifest(fs, root)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    if manifest is None:
        report.problems.append(f"{url}: no {MANIFEST}")
        return report
    declaration = manifest.declaration_id
    receipts: dict[int, dict] = {}
    if manifest["complete"]:
        listed = {int(s["index"]): s for s in manifest["shards"]}
        indices = sorted(set(listed) | set(receipt_indices(fs, root)))
    else:
        report.problems.append("incomplete: the manifest is not finalized (an interrupted precompute: rerun it, "
                               "or python -m store finalize after a multi-rank run)")
        listed, indices = {}, receipt_indices(fs, root)
    for index in indices:
        try:
            receipt = read_receipt(fs, root, index, declaration)
        except CacheError as e:
            report.problems.append(str(e))
            continue
        if manifest["complete"] and receipt["checksum"] != listed.get(index, {}).get("receipt"):
            report.problems.append(f"shard {index}: receipt {receipt_name(index)} is not the one the "
                                   "manifest lists")
            continue
        receipts[index] = receipt
    expected = manifest.num_shards
    if expected is not None:
        for index in range(expected):
            if index not in listed and index not in receipts and not manifest["complete"]:
                report.problems.append(f"shard {index}: not committed (no receipt; interrupted precompute?)")
        for index in set(listed) | set(receipts):
            if index >= expected:
                report.problems.append(f"shard {index}: beyond the {expected} declared shards")
    for name in fsutil.list_names(fs, fsutil.join(root, SHARDS)):
        if fsutil.TMP_MARK in name:
            report.warnings.append(f"{fsutil.join(SHARDS, name)}: leftover of an interrupted writer (a resumed "
                                   "writer removes it)")

    backend = make_backend(manifest.backend, fs, root, str(url))
    for index in sorted(receipts):
        receipt = receipts[index]
        report.shards += 1
        report.samples += receipt["num_samples"]
        bad_files = False
        for rel, info in receipt["files"].items():
            path = fsutil.join(root, rel)
            try:
                digest, size = fsutil.sha256_file(fs, path)
            except FileNotFoundError:
                report.problems.append(f"shard {index}: {rel} is missing")
                bad_files = True
                continue
            report.bytes_checked += size
            if size != info["nbytes"]:
                report.problems.append(f"shard {index}: {rel} has {size} bytes, the receipt says {info['nbytes']} "
                                       "(truncated or replaced)")
                bad_files = True
            elif digest != info["sha256"]:
                report.problems.append(f"shard {index}: {rel} sha256 mismatch (corrupt bytes)")
                bad_files = True
        if decode and not bad_files:
            for group, layout in receipt["groups"].items():
                try:
                    for row, blobs in backend.stream(receipt, group, layout["fields"]):
                        image_id, view_index = receipt["keys"][row]
                        for col, name in enumerate(layout["fields"]):
                            if blob_checksum(image_id, view_index, name, blobs[name]) != layout["crc32c"][row][col]:
                                raise CorruptShardError(f"field {name}, sample {receipt['keys'][row]}: "
                                                        "blob checksum mismatch")
                            try:
                                manifest.codec(name).decode(blobs[name])
                            except CacheError as e:
                                raise CorruptShardError(f"field {name}, sample {receipt['keys'][row]}: {e}") from None
                except CacheError as e:
                    report.problems.append(f"shard {index}: {layout['path']}: {e}")
    keys = _keys(fs, root, manifest, receipts, report)
    if keys is not None:
        seen: dict[tuple, int] = {}
        for image_id, view_index, shard in zip(keys["image_id"].tolist(), keys["view_index"].tolist(),
                                               keys["shard"].tolist()):
            if (image_id, view_index) in seen:
                report.problems.append(f"shard {shard}: sample (image_id={image_id}, view={view_index}) "
                                       f"also in shard {seen[(image_id, view_index)]}")
            seen[(image_id, view_index)] = shard
            if not 0 <= view_index < len(manifest["views"]):
                report.problems.append(f"shard {shard}: sample (image_id={image_id}, view={view_index}) has a "
                                       f"view index outside the {len(manifest['views'])} declared views")
    _verify_artifacts(fs, root, manifest, report)
    return report


def _verify_artifacts(fs, root, manifest: Manifest, report: VerifyReport) -> None:
    """Each artefact's bytes against its sha256, its record against the manifest's copy, and
    every declared artefact present."""
    try:
        records = read_artifacts(fs, root)
    except CacheError as e:
        report.problems.append(str(e))
        records = None
    artifacts = manifest["artifacts"] if manifest["complete"] else (records or {})
    for name in manifest["declared_artifacts"]:
        if name not in artifacts:
            report.problems.append(f"incomplete: artefact {name} is declared but was not written (an interrupted "
                                   "MasKD stage 1?); rerun the precompute command")
    if manifest["complete"] and records is not None and records != artifacts:
        differ = sorted(n for n in set(records) | set(artifacts) if records.get(n) != artifacts.get(n))
        report.problems.append(f"artefact record(s) {', '.join(artifact_record_name(n) for n in differ)} differ "
                               "from the manifest's copy")
    for name, info in artifacts.items():
        try:
            digest, size = fsutil.sha256_file(fs, fsutil.join(root, info["path"]))
        except FileNotFoundError:
            report.problems.append(f"artifact {name}: {info['path']} is missing")
            continue
        report.bytes_checked += size
        if size != info["nbytes"] or digest != info["sha256"]:
            report.problems.append(f"artifact {name}: {info['path']} sha256 mismatch (corrupt bytes)")


def _keys(fs, root, manifest: Manifest, receipts: dict, report: VerifyReport):
    """The (image_id, view_index, shard, row) table: index.npy once complete (checked against the
    receipts), else from the receipts."""
    from_receipts = key_index([receipts[i] for i in sorted(receipts)])
    if not manifest["complete"]:
        return from_receipts
    info = manifest["index"]
    try:
        data = fs.cat_file(fsutil.join(root, info["path"]))
    except FileNotFoundError:
        report.problems.append(f"{info['path']} is missing")
        return None
    report.bytes_checked += len(data)
    if fsutil.sha256_bytes(data) != info["sha256"]:
        report.problems.append(f"{info['path']} sha256 mismatch (corrupt bytes)")
        return None
    keys = np.load(io.BytesIO(data), allow_pickle=False)
    if len(receipts) == len(manifest["shards"]) and not np.array_equal(keys, from_receipts):
        report.problems.append(f"{info['path']} does not match the shard receipts")
    return keys


# ------------------------------------------------------------------------------------------ inspect
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary(url: str) -> dict:
    """Machine-readable contents of ``inspect``."""
    fs, root = fsutil.resolve(url)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise CacheError(f"{url}: no {MANIFEST}")
    shards, receipts = _shards(fs, root, manifest)
    sums = manifest["totals"] if manifest["complete"] else totals(receipts.values())
    per_group: dict[str, list[int]] = {}
    for name, (stored, raw) in sums["fields"].items():
        entry = per_group.setdefault(group_of(name), [0, 0])
        entry[0] += stored
        entry[1] += raw
    per_field = sums["fields"]
    per_view = {v: (stored, raw) for v, (_, stored, raw) in sums["views"].items()}
    samples_per_view = {v: count for v, (count, _, _) in sums["views"].items()}
    files_bytes = sum(info["nbytes"] for summary in shards.values() for info in summary["files"].values())
    declared = manifest.num_samples
    fields = {}
    for name, entry in manifest["fields"].items():
        codec = manifest.codec(name)
        fields[name] = dict(codec=repr(codec), spec=entry.get("spec"), lossless=entry["lossless"],
                            error_bound=entry["error_bound"], measured_error=entry.get("measured_error"),
                            stored=per_field.get(name, [0, 0])[0], raw=per_field.get(name, [0, 0])[1])
    return dict(
        url=str(url), backend=manifest.backend, complete=manifest["complete"],
        format_version=manifest["format_version"],
        teacher=manifest["teacher"], dataset=manifest["dataset"], views=manifest["views"],
        options=manifest["options"], declared_artifacts=manifest["declared_artifacts"],
        shard_size=manifest.shard_size, num_samples_declared=declared, shards_declared=manifest.num_shards,
        shards_committed=len(shards), samples_committed=sum(s["num_samples"] for s in shards.values()),
        samples_per_view=samples_per_view,
        groups={g: dict(stored=s, raw=r) for g, (s, r) in per_group.items()},
        per_view={v: dict(stored=s, raw=r) for v, (s, r) in per_view.items()},
        fields=fields, files_bytes=files_bytes, versions=manifest["versions"], created=manifest["created"],
        artifacts=manifest["artifacts"] if manifest["complete"] else read_artifacts(fs, root),
        extra=manifest["extra"])


def _measured(error: dict | None) -> str:
    if not error:
        return "-"
    return f"{error['worst']:.3g} of {error['maps']}; {error['mean']:.3g}"


def _ratio(stored: int, raw: int) -> str:
    return f"{stored / raw:.3f}x" if raw else "-"


def inspect_text(url: str) -> str:
    s = summary(url)
    n = max(1, s["samples_committed"])
    out = [f"cache      {s['url']}",
           f"backend    {s['backend']}   format v{s['format_version']}   created {s['created']}   "
           f"complete: {'yes' if s['complete'] else 'NO'}",
           f"teacher    {json.dumps(s['teacher'], sort_keys=True)}",
           f"dataset    {json.dumps(s['dataset'], sort_keys=True)}",
           f"options    {json.dumps(s['options'], sort_keys=True)}   artefacts declared: "
           f"{', '.join(s['declared_artifacts']) or 'none'}",
           "views"]
    out += [f"  {i}: {json.dumps(v, sort_keys=True)}   samples: {s['samples_per_view'].get(str(i), 0)}"
            for i, v in enumerate(s["views"])]
    declared = "open-ended" if s["num_samples_declared"] is None else f"{s['num_samples_declared']} declared"
    shards = "?" if s["shards_declared"] is None else s["shards_declared"]
    out.append(f"samples    {s['samples_committed']} committed ({declared}), shards {s['shards_committed']}/{shards}, "
               f"shard_size {s['shard_size']}")
    out.append("")
    out.append(f"{'field':22s} {'stored':>11s} {'raw fp16':>11s} {'ratio':>8s}  lossless  {'bound':26s}  "
               f"{'measured':20s}  {'spec':16s}  codec")
    for name, f in s["fields"].items():
        bound = f["error_bound"]
        text = bound["kind"] if bound["kind"] == "exact" else f"{bound['kind']}<={bound['value']:.3g}"
        out.append(f"{name:22s} {_size(f['stored']):>11s} {_size(f['raw']):>11s} {_ratio(f['stored'], f['raw']):>8s}  "
                   f"{'yes' if f['lossless'] else 'no':8s}  {text:26s}  {_measured(f['measured_error']):20s}  "
                   f"{f['spec'] or '-':16s}  {f['codec']}")
    out.append("measured: the bound's measure on the calibration views (worst of N; mean), recorded at declaration")
    out.append("")
    def row(label, stored, raw, per_sample=True):
        text = f"{label:10s} {_size(stored):>11s} {_size(raw):>11s} {_ratio(stored, raw):>8s}"
        return text + (f" {_size(stored / n):>11s}" if per_sample else "")

    out.append(f"{'group':10s} {'stored':>11s} {'raw fp16':>11s} {'ratio':>8s} {'per sample':>11s}")
    total = [0, 0]
    for group, g in s["groups"].items():
        total[0] += g["stored"]
        total[1] += g["raw"]
        out.append(row(group, g["stored"], g["raw"]))
    out.append(row("total", *total))
    out.append(f"{'files':10s} {_size(s['files_bytes']):>11s}   (blobs plus zarr index / tar headers)")
    out.append("")
    out.append(f"{'view':10s} {'stored':>11s} {'raw fp16':>11s} {'ratio':>8s}")
    for view, v in s["per_view"].items():
        out.append(row(view, v["stored"], v["raw"], per_sample=False))
    if s["artifacts"]:
        out.append("")
        out.append("artifacts")
        out += [f"  {k}: {_size(a['nbytes'])} {json.dumps(a.get('arrays', {}))[:100]}"
                for k, a in s["artifacts"].items()]
    out.append("")
    out.append("versions   " + "  ".join(f"{k}={v}" for k, v in s["versions"].items()))
    if s["extra"]:
        out.append(f"extra      {json.dumps(s['extra'], sort_keys=True)[:200]}")
    return "\n".join(out)
