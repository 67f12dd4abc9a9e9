"""The data stage: CIFAR-10 from one of three sources into one cache of uint8
tensors (N, 3, 32, 32), int64 labels, class names and provenance.

Sources (`data.source`):
  torchvision  the original CIFAR-10 python batches, downloaded when absent;
  images       a folder or a .tar/.tar.gz archive laid out as
               train/<class>/*.{png,jpg} and test/<class>/*, read in place
               (an archive is streamed, never extracted to disk);
  sample       the small real sample committed with the code.

`data.per_class` ({train: N, test: M}, null = every image) keeps the first N training
and the first M test images of each class, in the source's order (torchvision: the
order of the original batches; images and sample: file names sorted within each
class), and leaves the images in that order; the validation split (`data.val_size`)
is then held out of those N x 10 training images. Nested: the subset with N = 500 is
part of the one with N = 1,000.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import StageError
from ..io import save_json, save_torch, sha256_file
from ..paths import RunLayout

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SAMPLE_ARCHIVE = Path(__file__).resolve().parent / "sample" / "cifar10-sample.tar.gz"
# sha256 of the committed sample, checked on every load of the `sample` source.
SAMPLE_SHA256 = "43b5ef97964e6616ed51ba15165f757851f85b2f4b44bc69b09a03afd30c4024"


class DataError(StageError, ValueError):
    """Bad data input; the one-line message names the file and what was expected."""

    def __init__(self, message: str):
        # Errors of other libraries quoted in the message can span lines.
        super().__init__("; ".join(line.strip() for line in str(message).splitlines() if line.strip()))


@dataclass
class CifarSplits:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    provenance: dict


# ---------------------------------------------------------------- image trees
def _entry_split_class(rel: PurePosixPath, where: str) -> tuple[str, str] | None:
    """(split, class) of an image entry; None for entries that are not images."""
    if rel.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    parts = rel.parts
    if len(parts) != 3 or parts[0] not in SPLITS:
        raise DataError(f"{where}: expected train/<class>/<image> or test/<class>/<image>, "
                        f"found '{rel}'")
    if parts[1] not in CLASSES:
        raise DataError(f"{where}: '{parts[0]}/{parts[1]}' is not a CIFAR-10 class folder "
                        f"(expected one of {', '.join(CLASSES)})")
    return parts[0], parts[1]


def _iter_archive(path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                if member.isfile():
                    rel = PurePosixPath(member.name.lstrip("./"))
                    yield rel, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{path}: not a readable .tar/.tar.gz archive ({err})") from None


def _iter_directory(path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        yield PurePosixPath(file.relative_to(path).as_posix()), file.read_bytes()


def _decode(blob: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            if img.size != (32, 32):
                raise DataError(f"{where}: expected a 32x32 image, found {img.size[0]}x{img.size[1]}")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{where}: corrupted or unreadable image ({err})") from None


def read_image_tree(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], set[str]]:
    """({split: (images uint8 (N,3,32,32), labels int64)}, image suffixes seen),
    files in (class, name) order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (expected a folder or .tar/.tar.gz of "
                        f"train/<class>/*.jpg|png and test/<class>/*)")
    entries = _iter_directory(path) if path.is_dir() else _iter_archive(path)
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}
    suffixes: set[str] = set()
    for rel, blob in entries:
        split_class = _entry_split_class(rel, str(path))
        if split_class is None:
            continue
        split, cls = split_class
        suffixes.add(rel.suffix.lower())
        found[split].append((cls, rel.name, _decode(blob, f"{path}/{rel}")))
    for split in SPLITS:
        if not found[split]:
            raise DataError(f"{path}: no images under '{split}/<class>/' (expected train/ and test/ "
                            f"with one folder per CIFAR-10 class)")
        missing = sorted(set(CLASSES) - {cls for cls, _, _ in found[split]})
        if missing:
            raise DataError(f"{path}: '{split}/' has no images of class(es) {', '.join(missing)}")
    result = {}
    for split, items in found.items():
        items.sort(key=lambda item: (CLASSES.index(item[0]), item[1]))
        images = np.stack([img for _, _, img in items]).transpose(0, 3, 1, 2)
        labels = np.array([CLASSES.index(cls) for cls, _, _ in items], dtype=np.int64)
        result[split] = (np.ascontiguousarray(images), labels)
    return result, suffixes


def tree_sha256(path: Path) -> str:
    """sha256 of an archive file, or of a folder's sorted (path, sha256) listing."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- sources
def _load_images(path: Path, expected_sha256: str | None, source: str, shown: str) -> tuple[dict, dict]:
    """The images of an archive or folder; `shown` is its path as the provenance records it."""
    if not path.exists():
        raise DataError(f"{path}: not found (data.path of source '{source}')")
    digest = tree_sha256(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DataError(f"{path}: sha256 {digest} does not match the expected {expected_sha256}")
    splits, suffixes = read_image_tree(path)
    lossy = bool(suffixes & {".jpg", ".jpeg"})
    provenance = {
        "source": source,
        "path": shown,
        "sha256": digest,
        "lossy_jpeg": lossy,
        "note": ("JPEG images: a lossy copy of CIFAR-10, accuracies run below those on the "
                 "original (about 1-2 points for the quality-75 copy)") if lossy
                else "lossless images",
    }
    return splits, provenance


def _load_torchvision(root: Path, shown: str) -> tuple[dict, dict]:
    # Lazy: torchvision takes 2.9 s to import on two cores (measured, after torch), and only
    # this source needs it; every stage that loads the cache imports this module.
    import torchvision

    splits = {}
    for split in SPLITS:
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
        except Exception as err:  # download or integrity failures of torchvision
            raise DataError(f"{root}: torchvision could not load CIFAR-10 ({err}); without internet "
                            f"use data.source: images with a local copy") from None
        splits[split] = (np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)),
                         np.asarray(ds.targets, dtype=np.int64))
    archive = root / "cifar-10-python.tar.gz"
    batches = root / "cifar-10-batches-py"
    provenance = {
        "source": "torchvision",
        "path": shown,
        "sha256": sha256_file(archive) if archive.is_file() else tree_sha256(batches),
        "lossy_jpeg": False,
        "note": "original CIFAR-10 python batches (lossless)",
    }
    return splits, provenance


# The committed sample as the provenance names it: from the project root.
SAMPLE_SHOWN = "pipeline_src/data/sample/cifar10-sample.tar.gz"


def source_path(data_params: dict, root: Path) -> Path | None:
    """Where the data source is on this machine: the committed sample, or `data.path`
    (`~` expanded, relative to the project root)."""
    if data_params["source"] == "sample":
        return SAMPLE_ARCHIVE
    if data_params["path"] is None:
        return None
    path = Path(os.path.expanduser(data_params["path"]))
    return path if path.is_absolute() else root / path


def load_source(data_params: dict, root: Path) -> tuple[dict, dict]:
    """The splits and the provenance of the source. The provenance records the path as the
    params write it (the sample's from the project root), never this machine's resolved
    path: a committed provenance file must not carry a machine's folders."""
    source = data_params["source"]
    if source == "sample":
        return _load_images(SAMPLE_ARCHIVE, SAMPLE_SHA256, "sample", SAMPLE_SHOWN)
    path = source_path(data_params, root)
    if path is None:
        raise DataError(f"data.path: required for source '{source}'")
    if source == "images":
        return _load_images(path, data_params["sha256"], "images", data_params["path"])
    return _load_torchvision(path, data_params["path"])


# ---------------------------------------------------------------- cache
def first_per_class(labels: torch.Tensor, take: int, key: str, where: str) -> torch.Tensor:
    """Indices of the first `take` images of each class, in the split's order; a class
    holding fewer is a DataError naming `key` and the source."""
    counts = torch.bincount(labels, minlength=len(CLASSES))
    short = [f"{CLASSES[c]} {int(counts[c])}" for c in range(len(CLASSES)) if counts[c] < take]
    if short:
        raise DataError(f"{key}: {take} images of each class asked for, but {where} holds fewer "
                        f"({', '.join(short)})")
    # The position of each image among the images of its class, in the split's order.
    position = torch.empty_like(labels)
    for c in range(len(CLASSES)):
        members = torch.nonzero(labels == c).flatten()
        position[members] = torch.arange(len(members))
    return torch.nonzero(position < take).flatten()


def subset_text(per_class: dict | None) -> str:
    """How `data.per_class` chose the images, for provenance and table notes."""
    if not per_class:
        return "every image of the source"
    return (f"the first {per_class['train']:,} training and {per_class['test']:,} test images of each "
            f"class, in the source's order")


def data_record(provenance: dict) -> dict:
    """What every metrics file says of its data: the source, whether it is lossy, the
    split sizes and the per-class subset."""
    record = {key: provenance[key] for key in ("source", "sha256", "lossy_jpeg", "note")}
    return {**record, "images": provenance.get("images"), "per_class": provenance.get("per_class")}


def split_validation(n_train: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): a seeded random hold-out of `val_size` training images."""
    if not 0 <= val_size < n_train:
        raise DataError(f"data.val_size: {val_size} must be below the {n_train} training images")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def data_fingerprint(data_params: dict) -> str:
    """sha256 of the `data` params block (every key, canonical JSON): what a cache was
    built from. With the source's sha256 in the provenance it names the cache's input."""
    return hashlib.sha256(json.dumps(data_params, sort_keys=True, default=str).encode()).hexdigest()


def rebuild_command(profile: str | None) -> str:
    return f"python -m pipeline_src data --profile {profile or '<profile>'}"


def _remove_stale(*paths: Path) -> list[str]:
    removed = []
    for path in paths:
        if path.is_file():
            path.unlink()
            removed.append(str(path))
    return removed


def build_cache(data_params: dict, cache_path: Path, provenance_path: Path, root: Path) -> CifarSplits:
    """Read the source, split it, and write the cache and its provenance (with the params
    fingerprint that `load_cache` checks). A build that fails removes the previous cache and
    provenance: no later stage can take the data of an earlier build for this one's."""
    try:
        return _build_cache(data_params, cache_path, provenance_path, root)
    except BaseException as err:
        removed = _remove_stale(Path(cache_path), Path(provenance_path))
        if removed and isinstance(err, DataError):
            raise DataError(f"{err}; the previous cache was removed ({', '.join(removed)})") from None
        raise


def _build_cache(data_params: dict, cache_path: Path, provenance_path: Path, root: Path) -> CifarSplits:
    splits, provenance = load_source(data_params, root)
    train_x, train_y = (torch.from_numpy(a) for a in splits["train"])
    test_x, test_y = (torch.from_numpy(a) for a in splits["test"])
    per_class = data_params.get("per_class")
    where = source_path(data_params, root)   # named in errors as this machine has it
    if per_class:
        keep = first_per_class(train_y, per_class["train"], "data.per_class.train",
                               f"the training split of {where}")
        train_x, train_y = train_x[keep], train_y[keep]
        keep = first_per_class(test_y, per_class["test"], "data.per_class.test",
                               f"the test split of {where}")
        test_x, test_y = test_x[keep], test_y[keep]
    train_idx, val_idx = split_validation(len(train_y), data_params["val_size"], data_params["split_seed"])
    provenance.update({
        "images": {"train_total": len(train_y), "train": len(train_idx), "val": len(val_idx),
                   "test": len(test_y)},
        "per_class": dict(per_class) if per_class else None,
        "subset": subset_text(per_class),
        "val_size": data_params["val_size"],
        "split_seed": data_params["split_seed"],
        "classes": list(CLASSES),
        "data_params": dict(data_params),
        "params_fingerprint": data_fingerprint(data_params),
    })
    source = source_path(data_params, root)
    if source is not None and source.is_file():
        provenance["source_bytes"] = source.stat().st_size
    cache = CifarSplits(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                        test_x, test_y, CLASSES, provenance)
    save_torch(cache.__dict__, cache_path)
    save_json(provenance, provenance_path)
    return cache


def load_cache(path: str | Path, params: dict | None = None) -> CifarSplits:
    """The data cache. With the run's `params` (every stage passes them), a cache that was
    not built from these `data` params, or whose source archive has changed size since,
    is refused with a DataError naming the file and the command that rebuilds it."""
    path = Path(path)
    profile = params.get("profile") if params else None
    if not path.is_file():
        raise DataError(f"{path}: no data cache; build it with `{rebuild_command(profile)}`")
    try:
        cache = CifarSplits(**torch.load(path, weights_only=False))
    except Exception as err:  # truncated or foreign file
        raise DataError(f"{path}: not a readable data cache ({err}); rebuild it with "
                        f"`{rebuild_command(profile)}`") from None
    if params is not None:
        check_cache_matches(cache.provenance, params["data"], path, profile, _project_root(path, params))
    return cache


def _project_root(cache_path: Path, params: dict) -> Path:
    """The project a data cache belongs to: every stage reads it at root / layout.data_cache
    (the working directory for a caller with only the `data` params)."""
    if "run" not in params:
        return Path.cwd()
    layout = Path(RunLayout.of(params).data_cache).parts
    parts = cache_path.parts
    if len(parts) > len(layout) and parts[-len(layout):] == layout:
        return Path(*parts[:-len(layout)])
    return Path.cwd()


def check_cache_matches(provenance: dict, data_params: dict, path: Path, profile: str | None,
                        root: Path | None = None) -> None:
    rebuild = f"rebuild it with `{rebuild_command(profile)}`"
    recorded = provenance.get("params_fingerprint")
    if recorded is None:
        raise DataError(f"{path}: a cache built before data params were fingerprinted; {rebuild}")
    if recorded != data_fingerprint(data_params):
        built = provenance.get("data_params", {})
        differ = [f"data.{key}: {built.get(key)!r} in the cache, {data_params.get(key)!r} in the params"
                  for key in sorted(set(built) | set(data_params)) if built.get(key) != data_params.get(key)]
        detail = f" ({'; '.join(differ)})" if differ else ""
        raise DataError(f"{path}: built from other data params than profile "
                        f"'{profile or '?'}' sets{detail}; {rebuild}")
    source = source_path(data_params, root or Path.cwd())
    if ("source_bytes" in provenance and source is not None and source.is_file()
            and source.stat().st_size != provenance["source_bytes"]):
        raise DataError(f"{path}: its source {source} has changed since the cache was built "
                        f"({source.stat().st_size} bytes, {provenance['source_bytes']} then); {rebuild}")
