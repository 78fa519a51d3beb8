"""Decoding images into arrays, and the cache of decoded arrays.

Image-folder trees and their archives (``train/<class>/*.png``, ``test/<class>/...``) are decoded
once per (content, size) into ``cache_directory()`` ($SCALING_CACHE_DIR, default
~/.cache/scaling), in worker processes for large sources; TFDS label passes are cached there too.
A cache file that cannot be read is decoded again, with one warning. `scaling.data` builds its
datasets and streams on these.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import itertools
import multiprocessing
import os
import pathlib
import tarfile
import tempfile
import warnings

import numpy as np
from PIL import Image

from scaling import ScalingError
from scaling.rundir import atomic_file, first_line, warn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TEST_SPLITS = ("test", "val", "validation")
CACHE_VERSION = 1  # bump when the decoded arrays or their layout change
CHUNK = 1024  # images per decode task; smaller sources are decoded in-process

Split = tuple[np.ndarray, np.ndarray]  # (images, labels)
Splits = tuple[Split, Split | None, tuple[str, ...]]  # (train, test or None, class names)


def folder_records(location: str, size: int):
    """((read, labels) of train, of test or None, class names) of an image-folder directory."""
    path = pathlib.Path(location).expanduser()
    if not path.is_dir():
        raise ScalingError(f"streaming needs folder source {location} to be a directory")
    files = _image_files(path)
    splits, class_names = _folder_layout(files, location)
    label_of = {class_name: label for label, class_name in enumerate(class_names)}

    def records(entries):
        paths = [files[name] for _, name in entries]
        labels = np.array([label_of[class_name] for class_name, _ in entries], np.int32)
        return functools.partial(_read_file, paths, size), labels

    test = records(splits["test"]) if "test" in splits else None
    return records(splits["train"]), test, class_names


def _read_file(paths: list[pathlib.Path], size: int, record: int) -> np.ndarray:
    try:
        with Image.open(paths[record]) as image:
            return square_rgb(image, size)
    except Exception as error:  # PIL raises OSError, SyntaxError, zlib.error... for a bad file
        raise ScalingError(f"cannot decode image {paths[record]}: {error}") from error


def check_classes(source: str, class_names, labels: np.ndarray | None = None) -> None:
    """Refuse a source with fewer than two classes (of `class_names`, or of those that `labels`,
    the training labels, hold): a classifier of one class is always right, so its run would
    report a test accuracy of 1.0 and mean nothing. Checked on the names before any decoding,
    and on the labels after it (a class whose every image failed to decode is not there)."""
    present = class_names if labels is None else [class_names[i] for i in np.unique(labels)]
    if len(present) < 2:
        only = ", ".join(map(str, present)) or "none"
        raise ScalingError(
            f"data source {source} has only one class ({only}); classification needs at least two"
        )


def cache_directory(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache_dir`, else $SCALING_CACHE_DIR, else ~/.cache/scaling; created if missing.

    A path that is a file, or a directory this process cannot write, is refused here, before any
    decoding, rather than after it when the cache is written. Writing is tried (a file created
    and removed), since permission bits do not tell: root ignores them, read-only mounts do not
    show in them."""
    default = pathlib.Path.home() / ".cache" / "scaling"
    path = pathlib.Path(cache_dir or os.environ.get("SCALING_CACHE_DIR") or default).expanduser()
    remedy = "set SCALING_CACHE_DIR (or cache_dir) to a writable directory"
    if path.exists() and not path.is_dir():
        raise ScalingError(f"cache directory {path} is not a directory; {remedy}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-test"):
            pass
    except OSError as error:
        reason = error.strerror or first_line(error)
        message = f"cache directory {path} is not writable ({reason}); {remedy}"
        raise ScalingError(message) from error
    return path


def square_rgb(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 array of shape (size, size, 3), resized only when needed."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def load_folder(location: str, size: int, cache_dir) -> Splits:
    """Decode (or fetch from the cache) an image-folder tree or archive."""
    path = pathlib.Path(location).expanduser()
    if not path.exists():
        raise ScalingError(f"folder source {location} does not exist")
    if path.is_dir():
        files = _image_files(path)
        content = "".join(f"{name}\0{sha256(file.read_bytes())}\n" for name, file in files.items())
        content_digest = sha256(content.encode())
    elif path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        files = None  # read only on a cache miss
        with path.open("rb") as file:
            content_digest = hashlib.file_digest(file, "sha256").hexdigest()
    else:
        raise ScalingError(
            f"folder source {location} is not a directory or a .tar/.tar.gz/.tgz file"
        )

    key = sha256(f"v{CACHE_VERSION}\0{size}\0{content_digest}".encode())[:20]
    cache_file = cache_directory(cache_dir) / f"{path.name.split('.')[0]}-{size}px-{key}.npz"
    arrays = read_cache(cache_file, ("train_images", "train_labels", "class_names", "skipped"))
    if arrays is None:
        arrays = _decode_tree(_archive_files(path) if files is None else files, location, size)
        save_atomic(cache_file, arrays)

    if arrays["skipped"]:
        warnings.warn(
            f"skipped {int(arrays['skipped'])} image file(s) in {location} that failed to decode; "
            f"first: {arrays['first_skipped']}",
            stacklevel=3,
        )
    train = arrays["train_images"], arrays["train_labels"]
    test = (arrays["test_images"], arrays["test_labels"]) if "test_images" in arrays else None
    return train, test, tuple(map(str, arrays["class_names"]))


def _image_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """{relative path: file} of the images under a directory, sorted."""
    return {
        file.relative_to(path).as_posix(): file
        for file in sorted(path.rglob("*"))
        if file.name.lower().endswith(IMAGE_SUFFIXES) and file.is_file()
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _archive_files(path: pathlib.Path) -> dict[str, bytes]:
    """{member name: bytes} for the image files in a tar archive, read in one sequential pass."""
    try:
        with tarfile.open(path) as archive:
            return {
                member.name: archive.extractfile(member).read()
                for member in archive
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES)
            }
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ScalingError(f"cannot read archive {path}: {error}") from error


def _decode_tree(
    files: dict[str, bytes | pathlib.Path], location: str, size: int
) -> dict[str, np.ndarray]:
    """Decode {relative path: bytes or file} of an image-folder tree into the cached arrays."""
    splits, class_names = _folder_layout(files, location)
    label_of = {class_name: label for label, class_name in enumerate(class_names)}
    entries = [(split, class_name, name) for split, es in splits.items() for class_name, name in es]
    images, decoded = decode_files([files[name] for _, _, name in entries], size)
    split_of = np.array([split for split, _, _ in entries])
    labels = np.array([label_of[class_name] for _, class_name, _ in entries], np.int32)
    failed = [name for (_, _, name), ok in zip(entries, decoded, strict=True) if not ok]
    if not decoded[split_of == "train"].any():
        raise ScalingError(f"no image in {location}/train could be decoded (first: {failed[0]})")
    arrays = {"class_names": np.array(class_names), "skipped": np.array(len(failed))}
    arrays["first_skipped"] = np.array(failed[0] if failed else "")
    for split in splits:
        keep = (split_of == split) & decoded
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
    return arrays


def _folder_layout(names, location: str) -> tuple[dict[str, list], list[str]]:
    """({split: [(class name, file name)]}, class names) of an image-folder tree's file names:
    ``train``, and a test split if one of `TEST_SPLITS` is there (stored as ``test``)."""
    if not names:
        raise ScalingError(f"no .jpg/.jpeg/.png images in folder source {location}")
    parts = {name: pathlib.PurePosixPath(name).parts for name in sorted(names)}
    tops = {name_parts[0] for name_parts in parts.values()}
    if "train" not in tops and len(tops) == 1:  # archives often wrap the tree in one directory
        parts = {name: name_parts[1:] for name, name_parts in parts.items()}
    by_split: dict[str, list[tuple[str, str]]] = {}
    for name, name_parts in parts.items():
        if len(name_parts) >= 3:  # split/class/.../file
            by_split.setdefault(name_parts[0], []).append((name_parts[1], name))
    if "train" not in by_split:
        raise ScalingError(f"folder source {location} has no train/<class>/ images")
    class_names = sorted({class_name for class_name, _ in by_split["train"]})
    check_classes(f"folder:{location}", class_names)
    test_split = next((split for split in TEST_SPLITS if split in by_split), None)
    splits = {"train": by_split["train"]} | ({"test": by_split[test_split]} if test_split else {})
    for split, entries in splits.items():
        unknown = {class_name for class_name, _ in entries} - set(class_names)
        if unknown:
            raise ScalingError(f"{location}: {split} classes {sorted(unknown)} are not in train")
    return splits, class_names


def decode_files(files: list[bytes | pathlib.Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode images in parallel chunks; returns (images, decoded-ok mask)."""
    chunks = [files[start : start + CHUNK] for start in range(0, len(files), CHUNK)]
    if len(chunks) == 1:  # starting worker processes costs more than a single chunk
        results = [_decode_chunk(chunks[0], size)]
    else:
        # spawn, not fork: forking a process that runs JAX's threads can deadlock.
        context = multiprocessing.get_context("spawn")
        workers = min(len(chunks), os.cpu_count() or 1)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_decode_chunk, chunks, itertools.repeat(size)))
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def _decode_chunk(files: list[bytes | pathlib.Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((len(files), size, size, 3), np.uint8)
    decoded = np.zeros(len(files), bool)
    for i, file in enumerate(files):
        # Broken files raise anything from OSError to SyntaxError or zlib.error; skip them all.
        with contextlib.suppress(Exception):
            with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as image:
                images[i] = square_rgb(image, size)
            decoded[i] = True
    return images, decoded


def read_cache(path: pathlib.Path, needed: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file; None if it is absent or unreadable. A damaged file (cut short
    by a full disk or an interrupted copy, overwritten) is decoded again and replaced, with one
    warning, rather than failing every run that reads it."""
    if not path.exists():
        return None
    try:
        with np.load(path) as cached:
            arrays = {name: cached[name] for name in cached.files}
        missing = [name for name in needed if name not in arrays]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
    # np.load raises BadZipFile, EOFError, ValueError (no npz at all), OSError...
    except Exception as error:
        warn(f"cache file {path} is unreadable ({first_line(error)}); decoding it again")
        return None
    return arrays


def save_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that no reader ever sees half of it (`rundir.atomic_file`)."""
    with atomic_file(path, "wb") as file:
        np.savez(file, **arrays)
