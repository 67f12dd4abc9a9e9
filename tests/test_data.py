"""The data stage (pipeline_src/data/cifar.py): the three sources, the image-tree
reader, the seeded validation split and the errors on bad inputs."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_src.config import PROJECT_ROOT
from pipeline_src.data import cifar
from pipeline_src.data.cifar import (CLASSES, SAMPLE_SHA256, DataError, build_cache, load_cache,
                                     read_image_tree, split_validation, tree_sha256)

SHARED_JPEG_ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"
SHARED_JPEG_SHA256 = "58c58e3af3ec7ed2054f439f35ad3c83dc1ab019f4af6037f60612ea098c8fa1"


# ---------------------------------------------------------------- helpers
def images_params(path, sha256=None, val_size=2, split_seed=0) -> dict:
    return {"source": "images", "path": None if path is None else str(path), "sha256": sha256,
            "val_size": val_size, "split_seed": split_seed}


def write_image(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def make_tree(root: Path, per_class: int = 2, suffix: str = ".png", seed: int = 0) -> dict:
    """train/<class>/NN<suffix> and test/<class>/NN<suffix>, random 32x32 RGB pixels.
    Returns {split: (images (N,3,32,32) uint8, labels)} in (class, name) order."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(CLASSES):
            for i in range(per_class):
                array = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                write_image(root / split / cls / f"{i:02d}{suffix}", array)
                images.append(array.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, dtype=np.int64))
    return expected


def make_archive(tree: Path, out: Path, mode: str, dot_prefix: bool = False) -> Path:
    """Pack `tree` as an archive; with dot_prefix the entries are named ./train/..."""
    with tarfile.open(out, mode) as tar:
        for file in sorted(p for p in tree.rglob("*") if p.is_file()):
            rel = file.relative_to(tree).as_posix()
            tar.add(file, arcname=f"./{rel}" if dot_prefix else rel)
    return out


def build_into(tmp_path: Path, data_params: dict):
    out = tmp_path / "out"
    return build_cache(data_params, out / "cifar10.pt", out / "provenance.json", tmp_path)


def assert_build_fails(tmp_path: Path, data_params: dict, *names: str, one_line: bool = True) -> DataError:
    """build_cache raises a DataError naming each of `names` and writes nothing."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(DataError) as info:
        build_cache(data_params, out / "cifar10.pt", out / "provenance.json", tmp_path)
    message = str(info.value)
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    if one_line:  # DataError's contract: a one-line message
        assert "\n" not in message, f"not one line: {message!r}"
    assert sorted(p.name for p in out.iterdir()) == [], "a failed build left files behind"
    return info.value


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "tree"
    expected = make_tree(root)
    return root, expected


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the committed sample
@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    params = {"source": "sample", "path": None, "sha256": None, "val_size": 100, "split_seed": 0}
    cache = build_cache(params, tmp / "out" / "cifar10.pt", tmp / "out" / "provenance.json", tmp)
    return tmp, cache


def test_sample_archive_is_the_pinned_one():
    assert cifar.SAMPLE_ARCHIVE.is_file()
    assert sha256_of(cifar.SAMPLE_ARCHIVE) == SAMPLE_SHA256


def test_sample_cache_tensors(sample_build):
    _, cache = sample_build
    for x, y, n in ((cache.train_x, cache.train_y, 900), (cache.val_x, cache.val_y, 100),
                    (cache.test_x, cache.test_y, 500)):
        assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 3, 32, 32)
        assert y.dtype == torch.int64 and tuple(y.shape) == (n,)
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    train_val = torch.cat([cache.train_y, cache.val_y])
    assert torch.bincount(train_val, minlength=10).tolist() == [100] * 10
    assert torch.bincount(cache.test_y, minlength=10).tolist() == [50] * 10
    assert tuple(cache.classes) == CLASSES
    # real images, not blank ones
    assert cache.train_x.float().std() > 20


def test_sample_provenance(sample_build):
    tmp, cache = sample_build
    prov = cache.provenance
    assert prov["source"] == "sample"
    assert prov["sha256"] == SAMPLE_SHA256
    assert prov["lossy_jpeg"] is True
    assert prov["images"] == {"train_total": 1000, "train": 900, "val": 100, "test": 500}
    assert prov["val_size"] == 100 and prov["split_seed"] == 0
    assert prov["classes"] == list(CLASSES)
    written = json.loads((tmp / "out" / "provenance.json").read_text())
    assert written == prov
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["cifar10.pt", "provenance.json"]


def test_sample_cache_file_round_trips(sample_build):
    tmp, cache = sample_build
    loaded = load_cache(tmp / "out" / "cifar10.pt")
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(loaded, field), getattr(cache, field)), field
    assert loaded.provenance == cache.provenance
    assert tuple(loaded.classes) == CLASSES


def test_sample_build_is_deterministic(sample_build, tmp_path):
    _, cache = sample_build
    params = {"source": "sample", "path": None, "sha256": None, "val_size": 100, "split_seed": 0}
    again = build_into(tmp_path, params)
    assert torch.equal(again.val_x, cache.val_x) and torch.equal(again.train_y, cache.train_y)


# ---------------------------------------------------------------- per-class subsets
SUBSET = {"source": "sample", "path": None, "sha256": None, "per_class": {"train": 20, "test": 10},
          "val_size": 30, "split_seed": 0}


def test_per_class_subset_keeps_the_first_images_of_each_class(tmp_path):
    """data.per_class: the first N training and M test images of each class in the
    source's order (the sample: file names sorted within each class), the validation
    split held out of them; recorded in the provenance."""
    splits, _ = cifar.load_source({"source": "sample"}, tmp_path)
    cache = build_into(tmp_path, SUBSET)
    assert cache.provenance["images"] == {"train_total": 200, "train": 170, "val": 30, "test": 100}
    assert cache.provenance["per_class"] == {"train": 20, "test": 10}
    assert "the first 20 training and 10 test images of each class" in cache.provenance["subset"]
    for split, take, x in (("train", 20, torch.cat([cache.train_x, cache.val_x])), ("test", 10, cache.test_x)):
        images, labels = splits[split]
        first = np.concatenate([images[labels == c][:take] for c in range(10)])
        assert sorted(map(bytes, first)) == sorted(map(bytes, x.numpy())), split
    assert torch.equal(cache.test_x, torch.from_numpy(np.concatenate(
        [splits["test"][0][splits["test"][1] == c][:10] for c in range(10)])))
    smaller = build_into(tmp_path / "smaller", {**SUBSET, "per_class": {"train": 10, "test": 5}})
    assert set(map(bytes, smaller.test_x.numpy())) <= set(map(bytes, cache.test_x.numpy())), "nested"


def test_per_class_subset_beyond_a_class_is_one_line_naming_the_key(tmp_path):
    assert_build_fails(tmp_path, {**SUBSET, "per_class": {"train": 101, "test": 10}},
                       "data.per_class.train", "101", "airplane 100", str(cifar.SAMPLE_ARCHIVE))
    assert_build_fails(tmp_path, {**SUBSET, "per_class": {"train": 20, "test": 51}},
                       "data.per_class.test", "truck 50")
    assert_build_fails(tmp_path, {**SUBSET, "val_size": 200}, "data.val_size", "200 training images")


def test_a_cache_of_another_subset_is_refused(tmp_path):
    build_into(tmp_path, SUBSET)
    other = {**SUBSET, "per_class": {"train": 30, "test": 10}}
    with pytest.raises(DataError, match=r"data.per_class: \{'train': 20, 'test': 10\} in the cache"):
        load_cache(tmp_path / "out" / "cifar10.pt", {"data": other, "profile": "p"})
    with pytest.raises(DataError, match="data.per_class: None in the cache"):
        build_into(tmp_path / "all", {**SUBSET, "per_class": None, "val_size": 100})
        load_cache(tmp_path / "all" / "out" / "cifar10.pt", {"data": SUBSET, "profile": "p"})


# ---------------------------------------------------------------- validation split
def test_split_validation_partition():
    train, val = split_validation(50, 12, seed=3)
    assert len(train) == 38 and len(val) == 12
    assert train.dtype == torch.int64 and val.dtype == torch.int64
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(50))
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())


def test_split_validation_seeded():
    a = split_validation(1000, 100, seed=0)
    b = split_validation(1000, 100, seed=0)
    c = split_validation(1000, 100, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_split_validation_zero_val():
    train, val = split_validation(10, 0, seed=0)
    assert train.tolist() == list(range(10)) and val.numel() == 0


@pytest.mark.parametrize("val_size", [10, 11, 1000, -1])
def test_split_validation_too_large_raises(val_size):
    with pytest.raises(DataError, match="data.val_size"):
        split_validation(10, val_size, seed=0)


def test_build_cache_val_size_too_large(tree, tmp_path):
    root, _ = tree
    assert_build_fails(tmp_path, images_params(root, val_size=20), "data.val_size", "20")


# ---------------------------------------------------------------- image trees
def test_png_tree_is_read_losslessly(tree):
    root, expected = tree
    splits, suffixes = read_image_tree(root)
    assert suffixes == {".png"}
    for split in ("train", "test"):
        images, labels = splits[split]
        assert images.dtype == np.uint8 and images.shape == (20, 3, 32, 32)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])


def test_directory_tar_and_tar_gz_agree(tree, tmp_path):
    root, expected = tree
    tar = make_archive(root, tmp_path / "tree.tar", "w", dot_prefix=True)
    tgz = make_archive(root, tmp_path / "tree.tar.gz", "w:gz")
    caches = {}
    for name, path in (("dir", root), ("tar", tar), ("tgz", tgz)):
        out = tmp_path / f"out-{name}"
        caches[name] = build_cache(images_params(path, val_size=4, split_seed=7),
                                   out / "cifar10.pt", out / "provenance.json", tmp_path)
        assert json.loads((out / "provenance.json").read_text()) == caches[name].provenance
    ref = caches["dir"]
    for name in ("tar", "tgz"):
        for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            assert torch.equal(getattr(caches[name], field), getattr(ref, field)), (name, field)
    # PNG is lossless: the cache holds exactly the pixels written
    train_idx, val_idx = split_validation(20, 4, seed=7)
    exp_x, exp_y = (torch.from_numpy(a) for a in expected["train"])
    assert torch.equal(ref.train_x, exp_x[train_idx]) and torch.equal(ref.val_x, exp_x[val_idx])
    assert torch.equal(ref.train_y, exp_y[train_idx]) and torch.equal(ref.val_y, exp_y[val_idx])
    assert torch.equal(ref.test_x, torch.from_numpy(expected["test"][0]))
    assert torch.equal(ref.test_y, torch.from_numpy(expected["test"][1]))
    for name, path in (("dir", root), ("tar", tar), ("tgz", tgz)):
        prov = caches[name].provenance
        assert prov["source"] == "images" and prov["lossy_jpeg"] is False
        assert prov["path"] == str(path)
        assert prov["images"] == {"train_total": 20, "train": 16, "val": 4, "test": 20}
    assert caches["tar"].provenance["sha256"] == sha256_of(tar)
    assert caches["tgz"].provenance["sha256"] == sha256_of(tgz)
    assert caches["dir"].provenance["sha256"] == tree_sha256(root)


def test_tree_sha256_of_directory_tracks_content_and_names(tree, tmp_path):
    root, _ = tree
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert tree_sha256(copy) == tree_sha256(root)
    (copy / "train" / "cat" / "00.png").rename(copy / "train" / "cat" / "99.png")
    assert tree_sha256(copy) != tree_sha256(root)


def test_relative_path_resolves_against_root_and_is_recorded_as_written(tree, tmp_path):
    """The images are read from root / path, and the provenance (committed with results)
    keeps the params' relative path, not this machine's folders."""
    root, _ = tree
    relative = root.relative_to(tmp_path)
    cache = build_into(tmp_path, images_params(relative))
    assert cache.provenance["path"] == str(relative) and not Path(cache.provenance["path"]).is_absolute()
    assert cache.provenance["images"]["test"] == 20


def test_the_sample_is_recorded_from_the_project_root(tmp_path):
    cache = build_into(tmp_path, {"source": "sample", "path": None, "sha256": None, "val_size": 100, "split_seed": 0})
    assert cache.provenance["path"] == cifar.SAMPLE_SHOWN
    assert (PROJECT_ROOT / cifar.SAMPLE_SHOWN).resolve() == cifar.SAMPLE_ARCHIVE


def test_matching_checksum_is_accepted(tree, tmp_path):
    root, _ = tree
    tgz = make_archive(root, tmp_path / "tree.tar.gz", "w:gz")
    cache = build_into(tmp_path, images_params(tgz, sha256=sha256_of(tgz)))
    assert cache.provenance["sha256"] == sha256_of(tgz)


def test_non_image_files_are_ignored(tree, tmp_path):
    root, expected = tree
    (root / "README.txt").write_text("not an image")
    (root / "train" / "cat" / "notes.md").write_text("x")
    splits, _ = read_image_tree(root)
    np.testing.assert_array_equal(splits["train"][0], expected["train"][0])


def test_jpeg_tree_is_lossy(tmp_path):
    root = tmp_path / "jpegs"
    expected = make_tree(root, per_class=1, suffix=".jpg")
    cache = build_into(tmp_path, images_params(root, val_size=1))
    assert cache.provenance["lossy_jpeg"] is True
    assert "JPEG" in cache.provenance["note"]
    splits, suffixes = read_image_tree(root)
    assert suffixes == {".jpg"}
    assert splits["test"][0].shape == expected["test"][0].shape


def test_mixed_png_and_jpeg_is_lossy(tree, tmp_path):
    root, _ = tree
    rng = np.random.default_rng(1)
    write_image(root / "test" / "ship" / "extra.jpeg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    cache = build_into(tmp_path, images_params(root))
    assert cache.provenance["lossy_jpeg"] is True
    assert cache.provenance["images"]["test"] == 21


# ---------------------------------------------------------------- bad inputs
@pytest.fixture(params=["dir", "tar.gz"])
def container(request):
    """Turn a tree into the input under test: the folder itself or a .tar.gz of it."""
    def pack(root: Path) -> Path:
        if request.param == "dir":
            return root
        return make_archive(root, root.parent / "packed.tar.gz", "w:gz")
    return pack


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "cifar.tar.gz"
    assert_build_fails(tmp_path, images_params(missing), str(missing))
    with pytest.raises(DataError, match="nowhere"):
        read_image_tree(missing)


def test_data_path_required(tmp_path):
    # data.path is required for every source but `sample`
    assert_build_fails(tmp_path, images_params(None), "data.path")


def test_image_directly_under_split(tree, tmp_path, container):
    root, _ = tree
    write_image(root / "train" / "loose.png", np.zeros((32, 32, 3), np.uint8))
    path = container(root)
    assert_build_fails(tmp_path, images_params(path), str(path), "train/loose.png")


def test_wrong_top_level_folder(tree, tmp_path, container):
    root, _ = tree
    (root / "train").rename(root / "training")
    path = container(root)
    assert_build_fails(tmp_path, images_params(path), str(path), "training/airplane/00.png")


def test_extra_top_level_folder_in_archive(tree, tmp_path):
    root, _ = tree
    outer = tmp_path / "outer"
    shutil.copytree(root, outer / "cifar10")
    tgz = make_archive(outer, tmp_path / "nested.tar.gz", "w:gz")
    assert_build_fails(tmp_path, images_params(tgz), str(tgz), "cifar10/t")


def test_unknown_class_folder(tree, tmp_path, container):
    root, _ = tree
    write_image(root / "train" / "dragon" / "00.png", np.zeros((32, 32, 3), np.uint8))
    path = container(root)
    assert_build_fails(tmp_path, images_params(path), str(path), "train/dragon")


def test_corrupted_image(tree, tmp_path, container):
    root, _ = tree
    bad = root / "train" / "cat" / "bad.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    path = container(root)
    assert_build_fails(tmp_path, images_params(path), f"{path}/train/cat/bad.png", "corrupted")


def test_truncated_image(tree, tmp_path):
    root, _ = tree
    buffer = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    (root / "test" / "deer" / "cut.png").write_bytes(buffer.getvalue()[:200])
    assert_build_fails(tmp_path, images_params(root), f"{root}/test/deer/cut.png")


@pytest.mark.parametrize("size", [(33, 32), (32, 16), (64, 64)])
def test_image_not_32x32(tree, tmp_path, container, size):
    root, _ = tree
    w, h = size
    write_image(root / "test" / "dog" / "big.png", np.zeros((h, w, 3), np.uint8))
    path = container(root)
    assert_build_fails(tmp_path, images_params(path), f"{path}/test/dog/big.png", f"{w}x{h}")


def test_checksum_mismatch(tree, tmp_path, container):
    root, _ = tree
    path = container(root)
    wrong = "0" * 64
    assert_build_fails(tmp_path, images_params(path, sha256=wrong), str(path), wrong,
                       tree_sha256(path))


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_missing_a_class(tree, tmp_path, container, split):
    root, _ = tree
    shutil.rmtree(root / split / "frog")
    path = container(root)
    err = assert_build_fails(tmp_path, images_params(path), str(path), f"'{split}/'", "frog")
    assert str(err).endswith("class(es) frog")


def test_split_without_images(tree, tmp_path):
    root, _ = tree
    shutil.rmtree(root / "test")
    assert_build_fails(tmp_path, images_params(root), str(root), "test/")


def test_unreadable_archive(tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"this is not a tar archive" * 20)
    assert_build_fails(tmp_path, images_params(bogus), str(bogus), "not a readable", one_line=False)


def test_unreadable_archive_message_is_one_line(tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"this is not a tar archive" * 20)
    assert_build_fails(tmp_path, images_params(bogus), str(bogus), one_line=True)


# ---------------------------------------------------------------- the shared JPEG copy
def test_shared_jpeg_archive(tmp_path):
    if not SHARED_JPEG_ARCHIVE.is_file():
        reason = f"{SHARED_JPEG_ARCHIVE} not present"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    cache = build_into(tmp_path, images_params(SHARED_JPEG_ARCHIVE, sha256=SHARED_JPEG_SHA256,
                                               val_size=5000))
    assert tuple(cache.train_x.shape) == (45000, 3, 32, 32)
    assert tuple(cache.val_x.shape) == (5000, 3, 32, 32)
    assert tuple(cache.test_x.shape) == (10000, 3, 32, 32)
    assert cache.train_x.dtype == torch.uint8 and cache.train_y.dtype == torch.int64
    train_val = torch.cat([cache.train_y, cache.val_y])
    assert torch.bincount(train_val, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(cache.test_y, minlength=10).tolist() == [1000] * 10
    prov = cache.provenance
    assert prov["source"] == "images" and prov["sha256"] == SHARED_JPEG_SHA256
    assert prov["lossy_jpeg"] is True
    assert prov["images"] == {"train_total": 50000, "train": 45000, "val": 5000, "test": 10000}


# ---------------------------------------------------------------- torchvision source
class FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10: no download, known pixels."""
    calls: list = []
    sizes = {True: 30, False: 20}

    def __init__(self, root, train=True, download=False, **kwargs):
        FakeCIFAR10.calls.append((root, train, download))
        n = self.sizes[train]
        rng = np.random.default_rng(1 if train else 2)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]


@pytest.fixture()
def fake_torchvision(monkeypatch):
    import torchvision

    FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    return FakeCIFAR10


def torchvision_params(path, val_size=5) -> dict:
    return {"source": "torchvision", "path": str(path), "sha256": None, "val_size": val_size,
            "split_seed": 0}


def test_torchvision_source(tmp_path, fake_torchvision):
    root = tmp_path / "data" / "cifar10"
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"batch bytes")
    # a relative data.path resolves against the project root
    cache = build_into(tmp_path, torchvision_params("data/cifar10"))
    assert [(r, t, d) for r, t, d in fake_torchvision.calls] == [(str(root), True, True),
                                                                  (str(root), False, True)]
    train = FakeCIFAR10(str(root), train=True)
    test = FakeCIFAR10(str(root), train=False)
    train_x = torch.from_numpy(train.data).permute(0, 3, 1, 2)
    train_y = torch.tensor(train.targets, dtype=torch.int64)
    train_idx, val_idx = split_validation(30, 5, seed=0)
    assert cache.train_x.dtype == torch.uint8 and tuple(cache.train_x.shape) == (25, 3, 32, 32)
    assert torch.equal(cache.train_x, train_x[train_idx]) and torch.equal(cache.val_x, train_x[val_idx])
    assert torch.equal(cache.train_y, train_y[train_idx]) and torch.equal(cache.val_y, train_y[val_idx])
    assert cache.train_y.dtype == torch.int64
    assert torch.equal(cache.test_x, torch.from_numpy(test.data).permute(0, 3, 1, 2))
    assert cache.test_y.tolist() == test.targets
    prov = cache.provenance
    assert prov["source"] == "torchvision" and prov["lossy_jpeg"] is False
    assert "lossless" in prov["note"]
    assert prov["sha256"] == tree_sha256(batches)
    assert prov["images"] == {"train_total": 30, "train": 25, "val": 5, "test": 20}
    loaded = load_cache(tmp_path / "out" / "cifar10.pt")
    assert torch.equal(loaded.test_x, cache.test_x)


def test_torchvision_source_hashes_the_archive(tmp_path, fake_torchvision):
    root = tmp_path / "tv"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    archive.write_bytes(b"pretend archive")
    cache = build_into(tmp_path, torchvision_params(root))
    assert cache.provenance["sha256"] == sha256_of(archive)


def test_torchvision_failure_becomes_data_error(tmp_path, monkeypatch):
    import torchvision

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Dataset not found or corrupted")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Broken)
    root = tmp_path / "offline"
    err = assert_build_fails(tmp_path, torchvision_params(root), str(root),
                             "Dataset not found or corrupted")
    assert "data.source: images" in str(err)


# ---------------------------------------------------------------- stale caches
def run_params(data_params: dict, profile: str = "smoke") -> dict:
    """What load_cache reads of a run's params: the profile's name and its data block."""
    return {"profile": profile, "data": data_params}


def test_cache_records_the_data_params_it_was_built_from(sample_build):
    tmp, cache = sample_build
    params = {"source": "sample", "path": None, "sha256": None, "val_size": 100, "split_seed": 0}
    assert cache.provenance["data_params"] == params
    assert cache.provenance["params_fingerprint"] == cifar.data_fingerprint(params)
    assert cache.provenance["source_bytes"] == cifar.SAMPLE_ARCHIVE.stat().st_size
    loaded = load_cache(tmp / "out" / "cifar10.pt", run_params(params))
    assert torch.equal(loaded.train_y, cache.train_y)


@pytest.mark.parametrize("key, value", [("val_size", 50), ("split_seed", 1), ("source", "images"),
                                        ("sha256", "0" * 64)])
def test_cache_of_other_data_params_is_refused(sample_build, key, value):
    tmp, _ = sample_build
    params = {"source": "sample", "path": None, "sha256": None, "val_size": 100, "split_seed": 0, key: value}
    path = tmp / "out" / "cifar10.pt"
    with pytest.raises(DataError) as info:
        load_cache(path, run_params(params))
    message = str(info.value)
    assert message.startswith(f"{path}: built from other data params than profile 'smoke'")
    assert f"data.{key}: " in message
    assert message.endswith("rebuild it with `python -m pipeline_src data --profile smoke`")
    assert "\n" not in message


def test_cache_without_a_fingerprint_is_refused(sample_build, tmp_path):
    tmp, _ = sample_build
    old = torch.load(tmp / "out" / "cifar10.pt", weights_only=False)
    old["provenance"] = {k: v for k, v in old["provenance"].items()
                         if k not in ("params_fingerprint", "data_params")}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(DataError, match=r"old\.pt: a cache built before .* --profile paper`$"):
        load_cache(tmp_path / "old.pt", run_params(old["provenance"], "paper"))


def test_missing_or_unreadable_cache_names_the_rebuild_command(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.pt: no data cache; build it with "
                                        r"`python -m pipeline_src data --profile smoke`"):
        load_cache(tmp_path / "nothing.pt", run_params({}))
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 half a file")
    with pytest.raises(DataError, match=r"torn\.pt: not a readable data cache"):
        load_cache(tmp_path / "torn.pt", run_params({}))


def test_failed_build_removes_the_previous_cache(tree, tmp_path):
    params = images_params(make_archive(tree[0], tmp_path / "cifar.tar.gz", "w:gz"))
    build_into(tmp_path, params)
    out = tmp_path / "out"
    assert (out / "cifar10.pt").is_file()
    (tmp_path / "cifar.tar.gz").write_bytes(b"not an archive any more")   # the same path, now bad
    err = assert_build_fails(tmp_path, params, "cifar.tar.gz", "the previous cache was removed",
                             str(out / "cifar10.pt"))
    assert "not a readable" in str(err)
    # A later stage finds no cache instead of the old one.
    with pytest.raises(DataError, match="no data cache"):
        load_cache(out / "cifar10.pt", run_params(params))


def test_replaced_source_archive_is_refused(tree, tmp_path):
    archive = make_archive(tree[0], tmp_path / "cifar.tar.gz", "w:gz")
    params = images_params(archive)
    build_into(tmp_path, params)
    make_tree(tmp_path / "other", per_class=3, seed=1)
    make_archive(tmp_path / "other", archive, "w:gz")                 # replaced, data stage not rerun
    with pytest.raises(DataError, match=r"its source .*cifar\.tar\.gz has changed since the cache was built"):
        load_cache(tmp_path / "out" / "cifar10.pt", run_params(params))
