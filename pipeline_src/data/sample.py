"""Cut the committed CIFAR-10 sample out of a full image archive.

The sample is real CIFAR-10 (the first `per_class` files of each class in
name order, so the cut is reproducible) and is written as a .tar.gz whose
bytes depend only on its content (sorted entries, zero mtimes), so that its
sha256 can be pinned in `cifar.SAMPLE_SHA256`.
"""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path, PurePosixPath

from ..io import atomic_path, sha256_file
from .cifar import CLASSES, IMAGE_SUFFIXES, SPLITS


def cut_sample(source: Path, out: Path, train_per_class: int = 100, test_per_class: int = 50) -> str:
    quota = {"train": train_per_class, "test": test_per_class}
    chosen: dict[str, bytes] = {}
    with tarfile.open(source, mode="r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for split in SPLITS:
            for cls in CLASSES:
                names = sorted(m.name for m in members
                               if PurePosixPath(m.name.lstrip("./")).parts[:2] == (split, cls)
                               and PurePosixPath(m.name).suffix.lower() in IMAGE_SUFFIXES)
                if len(names) < quota[split]:
                    raise ValueError(f"{source}: only {len(names)} images in {split}/{cls}")
                for name in names[:quota[split]]:
                    chosen[name.lstrip("./")] = tar.extractfile(name).read()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(chosen):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(chosen[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(chosen[name]))
    return sha256_file(out)
