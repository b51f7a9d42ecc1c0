"""What checking each training image against its recorded sha256 costs, against what loading it costs.

The trainer checks every image it loads against the hash precompute recorded (a changed image
is refused, naming it). The check runs in the data loader, on the bytes it reads anyway; this
prints, per image of a real COCO set, the time of the sha256, of decoding the file, and of the
whole ``CocoDetection.load`` of an 800x1333 view with and without the check, in one run.

    python -m bench.bench_image_hash [--data ../shared/data/coco128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from PIL import Image

from detectors.data import CocoDetection, image_file_hash
from detectors.views import ViewSpec


def per_image_ms(fn, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/coco128")
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    view = ViewSpec(short=800, max_size=1333)
    plain = CocoDetection(args.data, args.split, views=(view,), view_policy="all")
    files = [plain.image_info(i).path.read_bytes() for i in range(len(plain.image_ids))]
    checked = CocoDetection(args.data, args.split, views=(view,), view_policy="all")
    checked.expect_image_hashes({image_id: image_file_hash(data) for image_id, data in zip(checked.image_ids, files)})
    indices = range(len(plain.image_ids))
    hash_ms = per_image_ms(image_file_hash, files, args.repeats)
    decode_ms = per_image_ms(lambda data: Image.open(io.BytesIO(data)).convert("RGB"), files, args.repeats)
    load_ms = per_image_ms(lambda i: plain.load(i, 0), indices, args.repeats)
    checked_ms = per_image_ms(lambda i: checked.load(i, 0), indices, args.repeats)
    size = sum(map(len, files)) / len(files) / 1e3
    print(f"{len(files)} images of {args.data} ({size:.0f} kB per file on average), best of {args.repeats}:")
    print(f"  sha256 of the file          {hash_ms:7.2f} ms per image")
    print(f"  decode (PIL, RGB)           {decode_ms:7.2f} ms per image  ({hash_ms / decode_ms:.1%} for the hash)")
    print(f"  load of an 800x1333 view    {load_ms:7.2f} ms per image")
    print(f"  the same with the check     {checked_ms:7.2f} ms per image  (ratio {checked_ms / load_ms:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
