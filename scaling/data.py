"""Image-classification data sets as in-memory uint8 arrays, for scaling studies.

`load(source, image_size)` returns a `Dataset` whose images are RGB uint8 of shape
(N, image_size, image_size, 3). Sources:

- ``digits``: scikit-learn's bundled 8x8 digits, grey replicated to RGB and resized.
- ``folder:PATH``: an image-folder tree ``PATH/<split>/<class>/*.{jpg,jpeg,png}``, or a
  ``.tar``/``.tar.gz``/``.tgz`` archive holding one (possibly under a single top-level directory;
  members are read straight from the archive, never extracted). Splits: ``train``, and ``test``,
  else ``val``, else ``validation``. Classes are the sorted class directories of ``train``.
  Decoded arrays are cached in `cache_directory()` under a key hashed from the content (the
  archive's bytes, or every image's relative path and bytes), the image size and a format
  version; cache files are written atomically.
- ``tfds:NAME``: a TensorFlow Datasets builder read through its random-access data source (no
  TensorFlow needed; the data must already be prepared in array_record format).
- ``synthetic``: seeded random images whose class sets the mean colour, for throughput tests.

Every image is resized bilinearly to image_size x image_size (no aspect-preserving crop).

A source without a test split gets a stratified ``holdout_fraction`` of its training examples,
drawn with ``seed``. Training subsets (``train_examples`` or ``data_fraction``) are prefixes of
`nested_subset_order`, so for one seed a smaller subset is contained in every larger one and
each class is within one example of its proportional share. The training arrays come in that
order, so any prefix of them is a stratified sample too. The test split is never subsampled.

`open_stream` gives the same examples, in the same order, without decoding them up front: a
`Stream` of `Examples` splits with random access (what grain reads), for ``folder:DIR``
directories and ``tfds:NAME`` sources larger than host memory.

Folder sources are decoded by worker processes started with "spawn" (forking a process in which
JAX runs threads can deadlock), so a script calling `load` on one needs the usual
``if __name__ == "__main__":`` guard.

Bad input raises `ScalingError`: an unknown source, a bad size or fraction, a missing path, a
path without a ``train`` split or without images, an unknown or unprepared TFDS name, a source
whose training examples hold only one class, a cache directory that is not a writable
directory. Image files that fail to decode are skipped with one warning giving their number and
the first of them; if no training image decodes, that is a `ScalingError` too. A cache file that
cannot be read (cut short, damaged) is decoded again and rewritten, with one warning line.
"""

from __future__ import annotations

import dataclasses
import heapq
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from scaling import ScalingError
from scaling.decode import (
    CACHE_VERSION,
    Split,
    Splits,
    cache_directory,
    check_classes,
    folder_records,
    load_folder,
    read_cache,
    save_atomic,
    sha256,
    square_rgb,
)

SOURCES = "digits, folder:PATH, tfds:NAME, synthetic"
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST = 1024, 256
DIGITS_CSV = "datasets/data/digits.csv.gz"  # in scikit-learn's package


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields cannot be compared or hashed
class Dataset:
    """A loaded source: images already at the requested size, labels index class_names."""

    source: str
    train_images: np.ndarray  # uint8 (N, S, S, 3), in nested-subset order
    train_labels: np.ndarray  # int32 (N,)
    test_images: np.ndarray  # uint8 (M, S, S, 3)
    test_labels: np.ndarray  # int32 (M,)
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> Examples:
        return Examples(self.train_images.__getitem__, np.arange(len(self.train_labels)),
                        self.train_labels)  # fmt: skip

    @property
    def test(self) -> Examples:
        return Examples(self.test_images.__getitem__, np.arange(len(self.test_labels)),
                        self.test_labels)  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One split with random access, the form grain reads: item i is (uint8 image, label)."""

    read: Callable[[int], np.ndarray]  # record number -> image (S, S, 3)
    records: np.ndarray  # the record number of each example, in order
    labels: np.ndarray  # int32, one per example

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.int32]:
        return self.read(int(self.records[i])), self.labels[i]


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    """A source read from disk as training goes, for data larger than host memory: the same
    examples, in the same order, as `load` gives, decoded on demand (see `open_stream`)."""

    source: str
    train: Examples
    test: Examples
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels


def load(
    source: str,
    image_size: int,
    *,
    train_examples: int | None = None,
    data_fraction: float = 1.0,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    synthetic_classes: int = 10,
) -> Dataset:
    """Load `source` at `image_size` pixels, carve a test split if needed, subsample train."""
    _check_settings(image_size, train_examples, data_fraction, holdout_fraction)

    kind, _, argument = source.partition(":")
    if source == "digits":
        train, test, class_names = _load_digits(image_size)
    elif kind == "folder" and argument:
        train, test, class_names = load_folder(argument, image_size, cache_dir)
    elif kind == "tfds" and argument:
        train, test, class_names = _load_tfds(argument, image_size)
    elif source == "synthetic":
        train, test, class_names = _load_synthetic(image_size, synthetic_classes, seed)
    else:
        raise ScalingError(f"unknown data source {source!r}; valid forms: {SOURCES}")
    check_classes(source, class_names, train[1])
    keep, held = _choose(
        train[1], test is None, train_examples, data_fraction, holdout_fraction, seed
    )
    if held is not None:
        test = train[0][held], train[1][held]
    return Dataset(source, train[0][keep], train[1][keep], *test, class_names)


def open_stream(
    source: str,
    image_size: int,
    *,
    train_examples: int | None = None,
    data_fraction: float = 1.0,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Stream:
    """`load`'s examples without decoding them up front: a ``folder:DIR`` directory (not an
    archive) or a ``tfds:NAME`` data source. Only labels are read at once; a TFDS split's labels
    take one pass over its records, cached like folder arrays. An image that fails to decode
    raises `ScalingError` naming it when it is read."""
    _check_settings(image_size, train_examples, data_fraction, holdout_fraction)
    kind, _, argument = source.partition(":")
    if kind == "folder" and argument:
        (read_train, train_labels), test, class_names = folder_records(argument, image_size)
    elif kind == "tfds" and argument:
        (read_train, train_labels), test, class_names = _tfds_records(
            argument, image_size, cache_dir
        )
    else:
        raise ScalingError(f"streaming reads folder:DIR or tfds:NAME sources, not {source!r}")
    check_classes(source, class_names, train_labels)
    keep, held = _choose(
        train_labels, test is None, train_examples, data_fraction, holdout_fraction, seed
    )
    if held is not None:
        test_split = Examples(read_train, held, train_labels[held])
    else:
        test_split = Examples(test[0], np.arange(len(test[1])), test[1])
    train_split = Examples(read_train, keep, train_labels[keep])
    return Stream(source, train_split, test_split, tuple(class_names))


def _tfds_records(name: str, size: int, cache_dir):
    """((read, labels) of train, of test or None, class names) of a TFDS data source."""
    train, test, class_names = _tfds_sources(name)

    def records(source):
        read = lambda record: _tfds_image(source[record], size)  # noqa: E731
        return read, _tfds_labels(source, cache_dir)

    return records(train), test and records(test), class_names


def _tfds_labels(source, cache_dir) -> np.ndarray:
    """Every label of a TFDS data source: one pass over its records (on threads), then cached
    under a key of the source's files and length."""

    info = source.dataset_info  # full_name holds the name, config and version
    identity = (CACHE_VERSION, info.full_name, info.data_dir, source.split, len(source))
    key = sha256(repr(identity).encode())[:20]
    cache_file = cache_directory(cache_dir) / f"tfds-labels-{key}.npz"
    if (cached := read_cache(cache_file, ("labels",))) is not None:
        return cached["labels"]
    labels = _tfds_labels_pass(source)
    save_atomic(cache_file, {"labels": labels})
    return labels


def _tfds_labels_pass(source) -> np.ndarray:
    import grain

    labels = grain.MapDataset.source(source).map(lambda example: example["label"])
    threads = grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1))
    return np.fromiter(labels.to_iter_dataset(threads), np.int32, len(source))


def _check_settings(image_size, train_examples, data_fraction, holdout_fraction) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ScalingError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0 < holdout_fraction < 1:
        raise ScalingError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    if not 0 < data_fraction <= 1:
        raise ScalingError(f"data_fraction must be in (0, 1], got {data_fraction!r}")
    if train_examples is not None and data_fraction != 1:
        raise ScalingError("give train_examples or data_fraction, not both")
    if train_examples is not None and train_examples < 1:
        raise ScalingError(f"train_examples must be at least 1, got {train_examples!r}")


def _choose(labels, carve, train_examples, data_fraction, holdout_fraction, seed):
    """(training subset in nested-subset order, carved test split or None), as indices into the
    source's training examples, whose labels are `labels`."""
    kept, held = _carve(labels, holdout_fraction, seed) if carve else (np.arange(len(labels)), None)
    available = len(kept)
    count = train_examples if train_examples is not None else round(data_fraction * available)
    if count > available:
        raise ScalingError(f"train_examples={count} exceeds the {available} training examples")
    if count < 1:
        raise ScalingError(f"data_fraction={data_fraction} keeps none of {available} examples")
    return kept[nested_subset_order(labels[kept], seed)[:count]], held


def nested_subset_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of range(len(labels)) whose every prefix is a stratified subset.

    Each class is within one example of its proportional share in every prefix, even for
    imbalanced classes (a fixed per-example priority, such as (i + 0.5) / n_class, can miss by
    several). The k-th example of a class (of n, among N) must enter after position
    floor((k - 1) N / n) and by position ceil(k N / n); earliest-deadline-first meets every such
    window, ties broken by a seeded random value. Within a class the order is a seeded shuffle.
    """
    labels = np.asarray(labels)
    total = len(labels)
    rng = np.random.default_rng(seed)
    release = np.empty(total, np.int64)
    deadline = np.empty(total, np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        rank = np.arange(1, len(members) + 1)
        release[members] = (rank - 1) * total // len(members) + 1
        deadline[members] = -(-rank * total // len(members))
    priority = zip(deadline.tolist(), rng.random(total).tolist(), range(total), strict=True)
    jobs = sorted(zip(release.tolist(), priority, strict=True))
    order, ready, next_job = [], [], 0
    for position in range(1, total + 1):
        while next_job < total and jobs[next_job][0] <= position:
            heapq.heappush(ready, jobs[next_job][1])
            next_job += 1
        order.append(heapq.heappop(ready)[-1])
    return np.asarray(order, dtype=np.int64)


def _carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) that split off a stratified `fraction` (rounded up) as the test
    split: the tail of `nested_subset_order`, so each class is within one example of its share
    on both sides. Every class needs two examples, and each side one per class, as for
    scikit-learn's `train_test_split` (whose import cost every training process on digits 2 s).
    """
    classes, counts = np.unique(labels, return_counts=True)
    held_count = math.ceil(round(fraction * len(labels), 6))  # 0.2 * 1797 = 359.4 -> 360
    problem = None
    if counts.min() < 2:
        problem = f"class {classes[counts.argmin()]} has a single example"
    elif min(held_count, len(labels) - held_count) < len(classes):
        problem = f"each side needs one example of each of the {len(classes)} classes"
    if problem:
        raise ScalingError(f"cannot hold out a stratified {fraction:g} of train: {problem}")
    order = nested_subset_order(labels, seed)
    return np.sort(order[:-held_count]), np.sort(order[-held_count:])


def _load_digits(size: int) -> Splits:
    """scikit-learn's digits (1,797 8x8 images of 0-16), read from the CSV file scikit-learn
    ships (64 pixels and the label a row), as `sklearn.datasets.load_digits` reads it, but
    without importing scikit-learn: 2 s of every training process's start."""
    table = np.loadtxt(Path(importlib.util.find_spec("sklearn").origin).parent / DIGITS_CSV,
                       delimiter=",")  # fmt: skip
    grey = np.round(table[:, :-1].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    images = np.stack([square_rgb(Image.fromarray(image), size) for image in grey])
    return (images, table[:, -1].astype(np.int32)), None, tuple(map(str, range(10)))


def _load_synthetic(size: int, classes: int, seed: int) -> Splits:
    if not isinstance(classes, int) or not 2 <= classes <= _SYNTHETIC_TEST:
        raise ScalingError(
            f"synthetic_classes must be an integer in [2, {_SYNTHETIC_TEST}], got {classes!r}"
        )
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 128, (classes, 3), dtype=np.uint8)

    def split(count: int) -> Split:
        labels = rng.permutation(np.arange(count) % classes).astype(np.int32)
        # Both terms are below 128, so the uint8 sum cannot overflow.
        noise = rng.integers(0, 128, (count, size, size, 3), dtype=np.uint8)
        return noise + colours[labels][:, None, None, :], labels

    return split(_SYNTHETIC_TRAIN), split(_SYNTHETIC_TEST), tuple(map(str, range(classes)))


def _load_tfds(name: str, size: int) -> Splits:
    train, test, class_names = _tfds_sources(name)
    return _read_tfds_split(train, size), test and _read_tfds_split(test, size), class_names


def _tfds_sources(name: str):
    """(train data source, test data source or None, class names) of a prepared TFDS dataset."""
    import tensorflow_datasets as tfds  # lazy: slow to import, and only this source needs it

    try:  # $TFDS_DATA_DIR as it is now, not as it was when TFDS was imported
        builder = tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR"))
    except Exception as error:  # tfds uses DatasetNotFoundError, AssertionError, ValueError...
        reason = str(error).splitlines()[0]
        raise ScalingError(
            f"unknown tfds dataset {name!r} ({reason}); see tfds.list_builders()"
        ) from error
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()):
        raise ScalingError(f"tfds dataset {name!r} has no 'image' and 'label' features")
    # info.splits is empty under tfds.testing.mock_data, which serves any split name.
    splits = set(builder.info.splits) or {"train", "test"}
    test_split = next((split for split in ("test", "validation") if split in splits), None)
    class_names = tuple(features["label"].names)
    check_classes(f"tfds:{name}", class_names)
    train = _tfds_source(builder, "train")
    test = _tfds_source(builder, test_split) if test_split else None
    return train, test, class_names


def _tfds_source(builder, split: str):
    try:
        return builder.as_data_source(split=split)
    except Exception as error:  # unprepared data surfaces as NotImplementedError or KeyError
        raise ScalingError(
            f"tfds dataset {builder.name!r} split {split!r} is not readable in {builder.data_dir}; "
            f"prepare it with `tfds build {builder.name} --file_format=array_record` ({error})"
        ) from error


def _tfds_image(example, size: int) -> np.ndarray:
    image = example["image"]
    return square_rgb(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), size)


def _read_tfds_split(source, size: int) -> Split:
    images = np.empty((len(source), size, size, 3), np.uint8)
    labels = np.empty(len(source), np.int32)
    for i, example in enumerate(source):
        images[i], labels[i] = _tfds_image(example, size), example["label"]
    return images, labels
