"""The image scan: read, hash and decode every image of a ``CocoDetection`` once, before a cache
is written, under the dataset's bad-input policy (detectors/data.py).

``scan_images`` finds the bad images (missing, unreadable, corrupt or of another size than the
annotation says) and every good image's ``image_file_hash``; precompute declares both in the cache
(``CocoDetection.exclude`` leaves the bad ones out, ``expect_image_hashes`` checks the rest on
every load), so a trainer excludes exactly those and refuses changed pixels.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from detectors.data import CocoDetection, DataError, image_file_hash


@dataclass
class ImageScan:
    """What ``scan_images`` found: every good image's hash, and every bad image with the reason."""

    hashes: dict[int, bytes]   # image id -> image_file_hash of the file's bytes
    bad: dict[int, str]        # image id -> the DataError message (file, image id, what is wrong)
    seconds_read_hash: float = 0.0   # summed over images (in the workers): reading + hashing
    seconds_decode: float = 0.0      # summed over images: decoding + the size check


class _ScanItems(torch.utils.data.Dataset):
    """Item i: (image id, hash or None, error message or None, read+hash seconds, decode seconds)."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.infos = [dataset.image_info(i) for i in range(len(dataset.image_ids))]

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, i: int):
        info = self.infos[i]
        start = time.perf_counter()
        try:
            data = CocoDetection.read_image_file(info)
            digest = image_file_hash(data)
            hashed = time.perf_counter()
            CocoDetection.decode_image_file(info, data)
        except DataError as err:  # returned, not raised: a worker's exception would carry its traceback
            return info.image_id, None, str(err), time.perf_counter() - start, 0.0
        return info.image_id, digest, None, hashed - start, time.perf_counter() - hashed


def scan_images(dataset: CocoDetection, workers: int = 0, progress: bool = False) -> ImageScan:
    """Read, hash and decode every image of ``dataset`` once (in ``workers`` loader processes).

    Follows ``dataset.on_error``: ``"raise"`` raises the first bad image's DataError (one line,
    naming the file and image id); ``"skip"`` returns the bad images in ``ImageScan.bad`` with one
    warning that lists a few. The dataset is not changed (see ``CocoDetection.exclude``).
    """
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(_ScanItems(dataset), batch_size=None, shuffle=False,
                                         num_workers=workers)
    scan = ImageScan({}, {})
    for image_id, digest, error, read_seconds, decode_seconds in tqdm(
            loader, total=len(dataset.image_ids), desc="scan images", unit="img", disable=not progress):
        scan.seconds_read_hash += read_seconds
        scan.seconds_decode += decode_seconds
        if error is not None:
            if dataset.on_error == "raise":
                raise DataError(error)
            scan.bad[int(image_id)] = error
        else:
            scan.hashes[int(image_id)] = bytes(digest)
    if scan.bad:
        shown = "".join(f"\n  {why}" for why in list(scan.bad.values())[:5])
        more = f"\n  ... and {len(scan.bad) - 5} more" if len(scan.bad) > 5 else ""
        warnings.warn(f"{dataset.image_dir}: {len(scan.bad)} bad image(s) left out (on_error='skip'; "
                      f"on_error='raise' refuses them):{shown}{more}", stacklevel=2)
    return scan
