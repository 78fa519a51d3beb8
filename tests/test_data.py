"""Tests for scaling.data: every source, held-out splits, nested subsets, the decode cache."""

import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaling import ScalingError, data, decode

COLOURS = {"zebra": (200, 40, 40), "apple": (40, 200, 40), "mango": (40, 40, 200)}
CLASSES = tuple(sorted(COLOURS))  # the label order load() must use
SUFFIXES = (".png", ".jpg", ".JPEG", ".Png")  # suffixes are matched case-insensitively
CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10/cifar10-jpeg.tar.gz"
CIFAR_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """No test may write decoded caches to the user's cache (or into the repository)."""
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "default-cache"))


def make_tree(root: Path, splits=("train", "test"), per_class=4) -> Path:
    """An image-folder tree of flat-colour 10x14 images: PNG, JPEG and RGBA PNG files."""
    for split in splits:
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                suffix = SUFFIXES[i % len(SUFFIXES)]
                mode = "RGBA" if suffix == ".Png" else "RGB"
                image = Image.new(mode, (10, 14), colour + (255,) * (mode == "RGBA"))
                fmt = "PNG" if suffix.lower() == ".png" else "JPEG"
                image.save(root / split / name / f"{i}{suffix}", format=fmt)
    return root


def make_archive(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="wrapped")  # a single top-level directory, as archives often have
    return archive


def assert_images(images: np.ndarray, size: int) -> None:
    assert images.dtype == np.uint8
    assert images.shape[1:] == (size, size, 3)


def assert_colours_match_labels(images, labels, class_names) -> None:
    """Each flat-colour image must carry the colour of the class its label names."""
    expected = np.array([COLOURS[class_names[label]] for label in labels])
    assert np.abs(mean_colour(images) - expected).max() < 8


def image_set(ds) -> set[bytes]:
    return {image.tobytes() for image in ds.train_images}


def mean_colour(images: np.ndarray) -> np.ndarray:
    return images.mean(axis=(1, 2))


def max_prefix_deviation(labels: np.ndarray, order: np.ndarray) -> float:
    """Largest |count of a class in a prefix - its proportional share|, over all prefixes."""
    classes, counts = np.unique(labels, return_counts=True)
    one_hot = labels[order][:, None] == classes[None, :]
    prefix = np.arange(1, len(labels) + 1)[:, None]
    return float(np.abs(one_hot.cumsum(0) - prefix * counts / len(labels)).max())


# --- digits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 32])
def test_digits_shapes_and_labels(size):
    ds = data.load("digits", size)
    assert_images(ds.train_images, size)
    assert_images(ds.test_images, size)
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
    assert set(np.unique(ds.train_labels)) == set(range(10))
    assert ds.class_names == tuple("0123456789") and ds.num_classes == 10
    assert ds.source == "digits"
    # Grey replicated to RGB, 0..16 stretched to 0..255.
    assert (ds.train_images[..., 0] == ds.train_images[..., 2]).all()
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    if size == 8:  # no resize: exactly scikit-learn's images and labels, rescaled
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.concatenate([ds.train_images, ds.test_images])[..., 0].astype(np.int64)
        labels = np.concatenate([ds.train_labels, ds.test_labels])
        expected = sorted(zip(np.round(digits.images * 255 / 16).astype(np.int64).reshape(
            len(labels), -1).tolist(), digits.target.tolist(), strict=True))  # fmt: skip
        assert sorted(zip(images.reshape(len(labels), -1).tolist(), labels.tolist(),
                          strict=True)) == expected  # fmt: skip


def test_digits_holdout_is_stratified_and_seeded():
    ds = data.load("digits", 8)
    everything = np.concatenate([ds.train_labels, ds.test_labels])
    assert abs(len(ds.test_labels) / 1797 - 0.2) < 0.005
    per_class, held = np.bincount(everything), np.bincount(ds.test_labels, minlength=10)
    assert np.abs(held - 0.2 * per_class).max() <= 1
    again, other = data.load("digits", 8), data.load("digits", 8, seed=1)
    assert np.array_equal(ds.test_images, again.test_images)
    assert np.array_equal(ds.train_images, again.train_images)
    assert not np.array_equal(ds.test_images, other.test_images)
    assert len(data.load("digits", 8, holdout_fraction=0.5).test_labels) == 899


# --- nested subsets ----------------------------------------------------------------------------


def test_nested_subset_order_is_a_stratified_permutation():
    rng = np.random.default_rng(0)
    balanced = rng.permutation(np.repeat(np.arange(10), 50))
    imbalanced = rng.permutation(np.repeat(np.arange(8), [900, 40, 17, 9, 5, 3, 2, 1]))
    for labels in (balanced, imbalanced):
        order = data.nested_subset_order(labels, seed=3)
        assert np.array_equal(np.sort(order), np.arange(len(labels)))
        assert max_prefix_deviation(labels, order) < 1  # every prefix, every class
        assert np.array_equal(order, data.nested_subset_order(labels, seed=3))
        assert not np.array_equal(order, data.nested_subset_order(labels, seed=4))


def test_training_subsets_are_nested_and_stratified():
    full = data.load("digits", 8)
    previous = set()
    for count in (10, 37, 200, 1000):
        ds = data.load("digits", 8, train_examples=count)
        assert len(ds.train_labels) == count
        share = count * np.bincount(full.train_labels) / len(full.train_labels)
        assert np.abs(np.bincount(ds.train_labels, minlength=10) - share).max() < 1
        assert np.array_equal(ds.test_images, full.test_images)  # never subsampled
        assert previous <= image_set(ds)
        previous = image_set(ds)
    half = data.load("digits", 8, data_fraction=0.5)
    assert len(half.train_labels) == round(0.5 * len(full.train_labels))
    assert image_set(data.load("digits", 8, train_examples=100)) <= image_set(half)
    # Training examples come in nested order, so a prefix is itself a stratified sample.
    assert np.array_equal(
        half.train_images[:37], data.load("digits", 8, train_examples=37).train_images
    )


@pytest.mark.parametrize(
    "source, size, settings",
    [
        ("digits", 8, dict(train_examples=0)),
        ("digits", 8, dict(train_examples=1438)),  # 1437 after the hold-out
        ("digits", 8, dict(data_fraction=0.0)),
        ("digits", 8, dict(data_fraction=1.5)),
        ("digits", 8, dict(data_fraction=1e-6)),  # rounds to no examples
        ("digits", 8, dict(data_fraction=0.5, train_examples=10)),
        ("digits", 8, dict(holdout_fraction=0.0)),
        ("digits", 8, dict(holdout_fraction=1.0)),
        ("digits", 0, {}),
        ("synthetic", 8, dict(synthetic_classes=1)),
        ("mnist", 8, {}),
        ("folder:", 8, {}),
        ("tfds:", 8, {}),
    ],
)
def test_bad_settings_raise_scaling_error(source, size, settings):
    with pytest.raises(ScalingError) as error:
        data.load(source, size, **settings)
    assert "\n" not in str(error.value)


def test_unknown_source_lists_valid_forms():
    with pytest.raises(ScalingError, match="digits, folder:PATH, tfds:NAME, synthetic"):
        data.load("cifar10", 32)


# --- folder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_archive", [False, True])
def test_folder_tree_and_archive(tmp_path, as_archive):
    tree = make_tree(tmp_path / "tree")
    path = make_archive(tree, tmp_path / "tree.tar.gz") if as_archive else tree
    ds = data.load(f"folder:{path}", 16, cache_dir=tmp_path / "cache")
    assert ds.class_names == CLASSES == ("apple", "mango", "zebra")
    assert_images(ds.train_images, 16)
    assert_images(ds.test_images, 16)
    assert len(ds.train_labels) == len(ds.test_labels) == 12
    assert np.array_equal(np.bincount(ds.test_labels), [4, 4, 4])
    assert_colours_match_labels(ds.train_images, ds.train_labels, ds.class_names)
    assert_colours_match_labels(ds.test_images, ds.test_labels, ds.class_names)


def test_folder_uses_val_split_or_carves_one(tmp_path):
    ds = data.load(f"folder:{make_tree(tmp_path / 'val', ('train', 'val'))}", 8)
    assert len(ds.train_labels) == len(ds.test_labels) == 12
    carved = data.load(f"folder:{make_tree(tmp_path / 'solo', ('train',), 5)}", 8)
    assert len(carved.train_labels) == 12 and len(carved.test_labels) == 3
    assert np.array_equal(np.bincount(carved.test_labels), [1, 1, 1])
    assert_colours_match_labels(carved.test_images, carved.test_labels, carved.class_names)


def test_folder_cache_is_hit_and_keyed_on_content(tmp_path, monkeypatch):
    tree, cache = make_tree(tmp_path / "tree"), tmp_path / "cache"
    first = data.load(f"folder:{tree}", 8, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    assert not list(cache.glob("*.tmp"))
    real_decode = decode.decode_files

    def must_not_decode(*args):
        raise AssertionError("decoded although the cache holds this folder")

    monkeypatch.setattr(decode, "decode_files", must_not_decode)
    second = data.load(f"folder:{tree}", 8, cache_dir=cache)
    assert np.array_equal(first.train_images, second.train_images)
    assert np.array_equal(first.test_labels, second.test_labels)
    assert second.class_names == first.class_names

    monkeypatch.setattr(decode, "decode_files", real_decode)
    data.load(f"folder:{tree}", 12, cache_dir=cache)  # another size: another entry
    Image.new("RGB", (10, 14), (1, 2, 3)).save(tree / "train" / "apple" / "0.png")
    data.load(f"folder:{tree}", 8, cache_dir=cache)  # changed content: another entry
    assert len(list(cache.glob("*.npz"))) == 3


class Killed(BaseException):
    """Stands in for the process dying in the middle of a cache write."""


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(Killed):
        data.load(f"folder:{make_tree(tmp_path / 'tree')}", 8, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_parallel_decode_matches_in_process(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    serial = data.load(f"folder:{tree}", 8, cache_dir=tmp_path / "serial")
    monkeypatch.setattr(decode, "CHUNK", 5)  # 24 images: several chunks, so worker processes
    parallel = data.load(f"folder:{tree}", 8, cache_dir=tmp_path / "parallel")
    assert np.array_equal(serial.train_images, parallel.train_images)
    assert np.array_equal(serial.test_images, parallel.test_images)


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "train" / "mango" / "bad.png").write_bytes(b"not an image")
    (tree / "test" / "zebra" / "worse.jpg").write_bytes(b"\xff\xd8\xff truncated")
    for _ in range(2):  # the cached result warns again
        with pytest.warns(
            UserWarning, match=r"skipped 2 image file\(s\) in .*train/mango/bad\.png"
        ):
            ds = data.load(f"folder:{tree}", 8, cache_dir=tmp_path / "cache")
        assert len(ds.train_labels) == len(ds.test_labels) == 12


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ScalingError, match=re.escape(f"{missing} does not exist")):
        data.load(f"folder:{missing}", 8)
    no_train = make_tree(tmp_path / "no-train", ("test",))
    with pytest.raises(ScalingError, match=re.escape(f"{no_train} has no train")):
        data.load(f"folder:{no_train}", 8)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(
        ScalingError, match=re.escape(f"images in folder source {tmp_path / 'empty'}")
    ):
        data.load(f"folder:{tmp_path / 'empty'}", 8)
    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / "train" / name).mkdir(parents=True)
        (broken / "train" / name / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ScalingError, match=re.escape(f"no image in {broken}/train could be")):
        data.load(f"folder:{broken}", 8)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScalingError, match="not a directory or a .tar"):
        data.load(f"folder:{tmp_path / 'notes.txt'}", 8)


def test_cache_directory_precedence(tmp_path, monkeypatch):
    assert data.cache_directory(tmp_path / "given") == tmp_path / "given"
    assert (tmp_path / "given").is_dir()
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "env"))
    assert data.cache_directory() == tmp_path / "env"
    monkeypatch.delenv("SCALING_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_directory() == tmp_path / "home" / ".cache" / "scaling"


@pytest.mark.parametrize("damage", ["cut in half", "garbage", "empty"])
def test_damaged_cache_file_is_decoded_again_with_a_warning(tmp_path, capsys, damage):
    tree, cache = make_tree(tmp_path / "tree"), tmp_path / "cache"
    first = data.load(f"folder:{tree}", 8, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    good = cache_file.read_bytes()
    damaged = {"cut in half": good[: len(good) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}
    cache_file.write_bytes(damaged[damage])
    capsys.readouterr()
    again = data.load(f"folder:{tree}", 8, cache_dir=cache)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")  # one line, naming the file
    assert f"cache file {cache_file} is unreadable" in err and "decoding it again" in err
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert again.class_names == first.class_names
    assert cache_file.read_bytes() == good  # rewritten whole (atomically: no .tmp left)
    assert [file.name for file in cache.iterdir()] == [cache_file.name]
    data.load(f"folder:{tree}", 8, cache_dir=cache)
    assert capsys.readouterr().err == ""


def test_cache_directory_must_be_a_writable_directory(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for given in (a_file, a_file / "below"):
        with pytest.raises(ScalingError, match="set SCALING_CACHE_DIR .* writable") as error:
            data.load(f"folder:{tree}", 8, cache_dir=given)
        assert "\n" not in str(error.value) and str(given) in str(error.value)
    monkeypatch.setenv("SCALING_CACHE_DIR", str(a_file))
    with pytest.raises(ScalingError, match=f"cache directory {re.escape(str(a_file))} is not a"):
        data.load(f"folder:{tree}", 8)

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes whatever the mode bits say: stand in for the refusal

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(decode.tempfile, "TemporaryFile", denied)
    with pytest.raises(ScalingError, match="locked is not writable \\(Permission denied\\)"):
        data.load(f"folder:{tree}", 8, cache_dir=locked)
    locked.chmod(0o755)
    assert not list(locked.iterdir())


def make_one_class_tree(root: Path) -> Path:
    for split in ("train", "test"):
        (root / split / "apple").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 14), COLOURS["apple"]).save(root / split / "apple" / f"{i}.png")
    return root


def test_one_class_is_refused(tmp_path, monkeypatch):
    solo = make_one_class_tree(tmp_path / "solo")
    archive = make_archive(solo, tmp_path / "solo.tar.gz")
    cache = tmp_path / "cache"
    for source, opener in [(f"folder:{solo}", data.load), (f"folder:{solo}", data.open_stream),
                           (f"folder:{archive}", data.load)]:  # fmt: skip
        message = f"data source {source} has only one class (apple); classification needs at least"
        with pytest.raises(ScalingError, match=re.escape(message)):
            opener(source, 8, cache_dir=cache)
    assert not list(cache.glob("*.npz"))  # refused before decoding
    # A second class none of whose images decode leaves one class too.
    (solo / "train" / "mango").mkdir()
    (solo / "train" / "mango" / "0.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 image"):
        with pytest.raises(ScalingError, match=r"has only one class \(apple\)"):
            data.load(f"folder:{solo}", 8, cache_dir=cache)
    # Every source: labels of a single class, whatever the class names.
    images = np.zeros((20, 8, 8, 3), np.uint8)
    one_label = ((images, np.full(20, 3, np.int32)), None, tuple("0123456789"))
    monkeypatch.setattr(data, "_load_digits", lambda size: one_label)
    with pytest.raises(ScalingError, match=r"data source digits has only one class \(3\)"):
        data.load("digits", 8)


# --- tfds --------------------------------------------------------------------------------------


def test_tfds_mock_cifar10_and_grey_mnist():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load("tfds:cifar10", 32)
        grey = data.load("tfds:mnist", 16)
    assert_images(ds.train_images, 32)
    assert_images(ds.test_images, 32)
    assert len(ds.train_labels) == len(ds.test_labels) == 24
    assert ds.num_classes == 10
    assert ds.train_labels.dtype == np.int32
    assert 0 <= ds.train_labels.min() and ds.train_labels.max() < 10
    assert_images(grey.train_images, 16)
    assert (grey.train_images[..., 0] == grey.train_images[..., 1]).all()


def test_tfds_unknown_name():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ScalingError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
        data.load("tfds:no_such_dataset_xyz", 32)


# --- streaming -------------------------------------------------------------------------------


def assert_same_examples(stream: data.Stream, ds: data.Dataset) -> None:
    """A stream holds `load`'s examples, in its order, with its labels and pixels."""
    assert stream.class_names == ds.class_names
    for split, images in (("train", ds.train_images), ("test", ds.test_images)):
        examples = getattr(stream, split)
        assert np.array_equal(examples.labels, getattr(ds, f"{split}_labels"))
        assert np.array_equal(np.stack([examples[i][0] for i in range(len(examples))]), images)


@pytest.mark.parametrize("settings", [{}, dict(data_fraction=0.3, seed=2)])
def test_folder_stream_equals_load(digits_tree, tmp_path, settings):
    assert_same_examples(
        data.open_stream(f"folder:{digits_tree}", 12, **settings),
        data.load(f"folder:{digits_tree}", 12, **settings),
    )
    carved = make_tree(tmp_path / "solo", ("train",), 5)
    assert_same_examples(
        data.open_stream(f"folder:{carved}", 8, train_examples=7),
        data.load(f"folder:{carved}", 8, train_examples=7),
    )


def test_tfds_stream_equals_load_and_caches_labels(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        stream = data.open_stream("tfds:cifar10", 16, train_examples=20)
        assert_same_examples(stream, data.load("tfds:cifar10", 16, train_examples=20))
        monkeypatch.setattr(data, "_tfds_labels_pass", None)  # a second open reads the cache
        again = data.open_stream("tfds:cifar10", 16, train_examples=20)
    assert np.array_equal(again.train_labels, stream.train_labels)


def test_stream_errors(tmp_path):
    tree = make_tree(tmp_path / "tree")
    archive = make_archive(tree, tmp_path / "tree.tar.gz")
    with pytest.raises(ScalingError, match="streaming needs folder source .* to be a directory"):
        data.open_stream(f"folder:{archive}", 8)
    with pytest.raises(ScalingError, match="streaming reads folder:DIR or tfds:NAME sources"):
        data.open_stream("digits", 8)
    broken = tree / "train" / "apple" / "0.png"
    broken.write_bytes(b"not an image")
    stream = data.open_stream(f"folder:{tree}", 8)
    position = [i for i in range(len(stream.train)) if stream.train.records[i] == 0]
    with pytest.raises(ScalingError, match=f"cannot decode image {re.escape(str(broken))}"):
        stream.train[position[0]]


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_seeded_and_learnable():
    ds = data.load("synthetic", 16, synthetic_classes=5)
    assert_images(ds.train_images, 16)
    assert ds.train_images.shape[0] == 1024 and ds.test_images.shape[0] == 256
    assert ds.num_classes == 5 and set(np.unique(ds.test_labels)) == set(range(5))
    assert np.array_equal(
        ds.train_images, data.load("synthetic", 16, synthetic_classes=5).train_images
    )
    # The class sets the mean colour: a nearest-mean classifier gets the test split right.
    means = np.stack([mean_colour(ds.train_images)[ds.train_labels == c].mean(0) for c in range(5)])
    nearest = np.argmin(((mean_colour(ds.test_images)[:, None] - means) ** 2).sum(-1), axis=1)
    assert (nearest == ds.test_labels).mean() > 0.95


# --- real CIFAR-10 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """CIFAR-10 (JPEG mirror) decoded once for this module's tests: (dataset, cache dir, cold
    seconds); the cache (180 MB, which pytest would keep for three sessions) removed after."""
    if not CIFAR.exists():
        pytest.skip(f"{CIFAR} is absent")
    cache = tmp_path_factory.mktemp("cifar-cache")  # outside the repository
    start = time.perf_counter()
    ds = data.load(f"folder:{CIFAR}", 32, cache_dir=cache)
    yield ds, cache, time.perf_counter() - start
    for file in cache.iterdir():
        file.unlink()


@pytest.mark.slow
def test_cifar10_jpeg_archive(cifar, tmp_path_factory):
    ds, cache, cold = cifar
    start = time.perf_counter()
    cached = data.load(f"folder:{CIFAR}", 32, cache_dir=cache)
    warm = time.perf_counter() - start
    print(f"CIFAR-10 decode: {cold:.1f} s cold, {warm:.1f} s from the cache")
    assert ds.class_names == CIFAR_CLASSES
    assert ds.train_images.shape == (50_000, 32, 32, 3)
    assert ds.test_images.shape == (10_000, 32, 32, 3)
    assert np.array_equal(np.bincount(ds.train_labels), [5000] * 10)
    assert np.array_equal(np.bincount(ds.test_labels), [1000] * 10)
    assert 100 < ds.train_images.mean() < 140  # CIFAR-10's mean pixel is about 121
    assert np.array_equal(ds.train_images, cached.train_images)
    assert warm < cold
    # Streamed from an extracted tree of two classes (12,000 files; the whole tree's 60,000 take
    # 4-30 s to create, as ext4 skips recently deleted inodes): the same examples and labels as
    # in memory, in the same order as in memory from that tree (training examples come in a
    # seeded stratified order, which depends on the set).
    tree = tmp_path_factory.mktemp("cifar-tree")
    two = ["train/airplane", "train/automobile", "test/airplane", "test/automobile"]
    subprocess.run(["tar", "-xzf", CIFAR, "-C", tree, *two], check=True)
    stream = data.open_stream(f"folder:{tree}", 32)
    loaded = data.load(f"folder:{tree}", 32, cache_dir=cache)
    test = np.flatnonzero(ds.test_labels < 2)
    assert np.array_equal(stream.test_labels, ds.test_labels[test])
    assert np.array_equal(loaded.test_images, ds.test_images[test])
    assert np.array_equal(stream.train_labels, loaded.train_labels)
    for i in range(0, 10_000, 197):
        assert np.array_equal(stream.train[i][0], loaded.train_images[i])
        assert np.array_equal(stream.test[i // 5][0], ds.test_images[test[i // 5]])
    shutil.rmtree(tree)


@pytest.mark.slow
def test_cifar10_as_a_real_tfds_dataset_trains_like_the_folder(cifar, tmp_path, monkeypatch):
    """CIFAR-10 written as array_record by TFDS's builder, read by name from its data directory
    with `tfds.data_source`: the same images, labels and counts as `folder:`, and a run trains
    from `tfds:NAME` on all of it. Every 25th image of each split: TFDS writes and reads about
    3,000 examples a second here, so all 60,000 would add a minute to the suite."""
    import dataclasses

    import tensorflow_datasets as tfds

    from scaling import tfds_export, train

    full = cifar[0]
    splits = ("train_images", "train_labels", "test_images", "test_labels")
    ds = dataclasses.replace(full, **{k: getattr(full, k)[::25] for k in splits})
    tfds_export.export(ds, "cifar10_folder", tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    builder = tfds.builder("cifar10_folder", data_dir=str(tmp_path / "tfds"))
    assert builder.info.features["label"].names == list(CIFAR_CLASSES)
    records = builder.as_data_source(split="train")
    assert len(records) == 2_000
    for i in range(0, 2_000, 97):
        record = records[i]  # TFDS keeps its own order; `id` is the index in the folder's
        assert np.array_equal(record["image"], ds.train_images[record["id"]])
        assert record["label"] == ds.train_labels[record["id"]]
    stream = data.open_stream("tfds:cifar10_folder", 32)
    assert np.array_equal(np.bincount(stream.train_labels), np.bincount(ds.train_labels))
    assert np.array_equal(np.bincount(stream.test_labels), np.bincount(ds.test_labels))
    from conftest import TRAIN_CONFIG

    from scaling.config import load_config

    config = load_config(f"{TRAIN_CONFIG}:model=resnet8,dataset=tfds:cifar10_folder,"
                         "image_size=32,steps=2,batch_size=64")  # fmt: skip
    config.stream = True
    summary = train.train(config, tmp_path / "run")
    assert (summary["train_examples"], summary["num_classes"]) == (2_000, 10)
    with pytest.raises(ScalingError, match="exists"):
        tfds_export.export(ds, "cifar10_folder", tmp_path / "tfds")
