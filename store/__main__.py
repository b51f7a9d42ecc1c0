"""Command line of the teacher-output cache: ``python -m store {inspect,verify,finalize} CACHE``."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Inspect and check a teacher-output cache (written by `python -m precompute`).

A cache is a directory or fsspec URL (file://, memory://, s3://, gs://) holding:
  manifest.json             teacher, dataset fingerprint, views, fields and codecs, versions,
                            and (once complete) every shard's receipt
  shards/NNNNNN.json        a shard's receipt: sample keys, blob offsets, file sizes and sha256
  shards/NNNNNN.zarr/       zarr v3 backend: one uint8 array per field group (fpn, head, region,
                            meta, backbone, image), sharding codec
  shards/NNNNNN-GROUP.tar   WebDataset backend: one tar per field group
  artifacts/NAME.npz        stored once per cache (MasKD tokens, teacher weights, image hashes)
  writer.lock               while a precompute run writes the cache: its run id, pid, host, start

manifest.json, receipts and artefact records are sealed with the sha256 of their content; every
receipt records the declaration it was written under and a crc32c per blob (store/integrity.py).
"""

EPILOG = """\
examples:
  python -m store inspect runs/cache            manifest, sample counts, bytes and ratios
  python -m store inspect runs/cache --json     the same as JSON
  python -m store verify runs/cache             the manifest, every receipt, the size and sha256 of every
                                                file, the index, the artefacts; exit 1 on any problem
                                                (an unfinalized cache is a problem: it is incomplete)
  python -m store verify runs/cache --decode    also every blob's checksum and codec
  python -m store finalize runs/cache           fold receipts into manifest.json (after a
                                                multi-rank precompute whose ranks all finished)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m store", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="print the manifest, sample counts, bytes per group and view, codecs, "
                                       "compression ratio against raw fp16")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p = sub.add_parser("verify", help="check the sealed manifest, that the cache is finalized, every receipt, every "
                                      "file's size and sha256, the index, duplicate samples, the artefacts; exit "
                                      "status 1 on any problem")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--decode", action="store_true", help="also decode every blob (slower; checks the codecs)")
    p = sub.add_parser("finalize", help="fold shard receipts into manifest.json and mark the cache complete")
    p.add_argument("cache", help="cache directory or fsspec URL")
    args = parser.parse_args(argv)

    from .errors import CacheError

    try:
        if args.command == "inspect":
            from .report import inspect_text, summary
            print(json.dumps(summary(args.cache), indent=1) if args.json else inspect_text(args.cache))
            return 0
        if args.command == "verify":
            from .report import verify
            report = verify(args.cache, decode=args.decode)
            print(report.text())
            return 0 if report.ok else 1
        if args.command == "finalize":
            from .writer import finalize
            finalize(args.cache)
            print(f"{args.cache}: complete")
            return 0
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
