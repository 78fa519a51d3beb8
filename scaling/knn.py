"""The k-nearest-neighbours baseline: exact k-NN classification on raw pixels, with JAX.

    neighbours(train, queries, k, "l2")           # (distances, indices), nearest first
    predict(train, train_labels, queries, k=5, distance="l2", vote="majority")

Exact: every query is compared with every training example (no approximate index), so the
neighbours are those a brute-force NumPy search finds. Batched: the distances are computed on the
device under `jax.jit`, a chunk of `query_chunk` queries at a time against `train_chunk` training
examples at a time (by default the whole training set, held in device memory); a smaller
`train_chunk` streams the training set through and merges each chunk's k best into a running
top k, so memory stays bounded for any training set.

Distances: ``l2`` (Euclidean, computed as ||a||^2 - 2 a.b + ||b||^2 with a matmul), ``cosine``
(1 - cos, on unit vectors by a matmul; a zero vector is at distance 1 from everything) and ``l1``
(no matmul form: the sum of |a - b| over the features, taken `L1_BLOCK` queries at a time so that
the intermediate stays bounded).

Order: neighbours are sorted by distance, then by training index (the smaller first), so equal
distances always resolve the same way, whatever the chunk sizes.

Votes: ``majority`` counts the classes of the k neighbours; ``distance`` weighs each by
1/distance, and a neighbour at distance zero wins outright (only the zero-distance neighbours
vote, by count). Zero as computed: l2's and cosine's matmul forms can leave an exact duplicate
a rounding error away from zero, where its weight is large rather than infinite.

Tie rule, for both votes: among the classes with the top count (or weight) the one
whose best member comes first in the neighbour order above wins, i.e. the tied class whose
nearest member is closest, then (at equal distances) the one with the smaller training index.
The vote runs on the host in NumPy (it is k x queries, cheap); the search is the expensive part.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scaling import ScalingError
from scaling.rundir import mark, write_json_atomic

DISTANCES = ("l1", "l2", "cosine")
VOTES = ("majority", "distance")
L1_BLOCK = 8  # queries per L1 step: 8 x train_chunk x features floats at most in flight
L1_ELEMENTS = 2**24  # l1's default train_chunk keeps that under 64 MB of float32
TRAIN_EVAL_EXAMPLES = 10_000  # training accuracy: leave-one-out on this prefix of the train set


def check_settings(k, distance: str, vote: str = "majority", query_chunk=1, train_chunk=None):
    """One `ScalingError` for a bad setting, before any work. `k` is an int or a list of them."""
    ks = list(k) if isinstance(k, list | tuple) else [k]
    if not ks or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ks):
        raise ScalingError(f"k must be integers >= 1, got {k!r}")
    if distance not in DISTANCES:
        raise ScalingError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    if vote not in VOTES:
        raise ScalingError(f"unknown vote {vote!r}; valid: {', '.join(VOTES)}")
    for name, value in [("query_chunk", query_chunk), ("train_chunk", train_chunk)]:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ScalingError(f"{name} must be a positive integer, got {value!r}")


def _pairwise(queries, train, distance: str):
    """(Q, T) distances (squared for l2) between prepared queries and training examples."""
    highest = jax.lax.Precision.HIGHEST  # no bfloat16 passes on accelerators: exact float32
    if distance == "l2":
        dot = jnp.matmul(queries, train.T, precision=highest)
        sq = jnp.sum(queries**2, 1)[:, None] - 2 * dot + jnp.sum(train**2, 1)[None, :]
        return jnp.maximum(sq, 0.0)
    if distance == "cosine":  # both sides are unit (or zero) vectors already
        return 1.0 - jnp.matmul(queries, train.T, precision=highest)
    # l1: L1_BLOCK queries at a time, so at most L1_BLOCK x T x D floats at once.
    q, d = queries.shape
    blocks = queries.reshape(q // L1_BLOCK, L1_BLOCK, d)
    rows = jax.lax.map(lambda b: jnp.sum(jnp.abs(b[:, None, :] - train[None]), -1), blocks)
    return rows.reshape(q, train.shape[0])


def _prepare(x, distance: str):
    x = jnp.asarray(x, jnp.float32)
    if distance == "cosine":
        norm = jnp.linalg.norm(x, axis=1, keepdims=True)
        x = x / jnp.where(norm > 0, norm, 1.0)
    return x


@functools.partial(jax.jit, static_argnames=("k", "distance"))
def _chunk_top_k(queries, exclude, train, offset, valid, best_d, best_i, *, k, distance):
    """Merge one training chunk into the running best (best_d, best_i) of a query chunk.

    `offset`: the chunk's first training index; `valid`: how many of its rows are real (the
    rest pad the last chunk); `exclude`: per query, a training index to skip (-1: none).
    Sorting key: (distance, index), as the module says: the running best come from earlier
    chunks (smaller indices) and stand first, and top_k keeps the earlier of equal values.
    """
    d = _pairwise(queries, train, distance)
    index = offset + jnp.arange(train.shape[0], dtype=jnp.int32)
    masked = (jnp.arange(train.shape[0]) >= valid)[None, :] | (index[None, :] == exclude[:, None])
    d = jnp.where(masked, jnp.inf, d)
    all_d = jnp.concatenate([best_d, d], 1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(index, d.shape)], 1)
    # Within the chunk indices increase along the row; top_k is stable (lower position first on
    # equal values), so the merged order is (distance, index) throughout.
    neg, position = jax.lax.top_k(-all_d, k)
    return -neg, jnp.take_along_axis(all_i, position, 1)


def neighbours(train, queries, k: int, distance: str = "l2", *, exclude=None,
               query_chunk: int = 256, train_chunk: int | None = None):  # fmt: skip
    """The k nearest training examples of each query: (distances float32 (Q, k), indices int32
    (Q, k)), sorted by (distance, index). Rows are flattened feature vectors. `exclude`: per
    query a training index it may not take (leave-one-out), or -1. Distances are true ones
    (l2: the square root), not the squared form the search ranks by."""
    check_settings(k, distance, query_chunk=query_chunk, train_chunk=train_chunk)
    train = np.asarray(train).reshape(len(train), -1)
    queries = np.asarray(queries).reshape(len(queries), -1)
    n, q = len(train), len(queries)
    available = n - (exclude is not None)
    if k > available:
        raise ScalingError(f"k={k} exceeds the {available} training examples a query can use")
    if queries.shape[1] != train.shape[1]:
        raise ScalingError(f"queries have {queries.shape[1]} features, train {train.shape[1]}")
    exclude = np.full(q, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
    if train_chunk is None and distance == "l1":
        train_chunk = max(1, L1_ELEMENTS // (L1_BLOCK * train.shape[1]))
    train_chunk = min(train_chunk or n, n)
    # Pad both sides to whole chunks (query chunks to whole L1 blocks): one compiled shape.
    query_chunk = -(-min(query_chunk, q) // L1_BLOCK) * L1_BLOCK
    padded = _pad(train, -(-n // train_chunk) * train_chunk)
    # On the device once, chunk by chunk (slicing one device array per step would copy it).
    chunks = [_prepare(padded[o : o + train_chunk], distance) for o in range(0, n, train_chunk)]
    out_d = np.empty((q, k), np.float32)
    out_i = np.empty((q, k), np.int32)
    for start in range(0, q, query_chunk):
        stop = min(start + query_chunk, q)
        block = _prepare(_pad(queries[start:stop], query_chunk), distance)
        skip = jnp.asarray(_pad(exclude[start:stop], query_chunk, -1))
        best_d = jnp.full((query_chunk, k), jnp.inf, jnp.float32)
        best_i = jnp.full((query_chunk, k), -1, jnp.int32)
        for offset, chunk in zip(range(0, n, train_chunk), chunks, strict=True):
            best_d, best_i = _chunk_top_k(
                block, skip, chunk, np.int32(offset),
                np.int32(min(train_chunk, n - offset)), best_d, best_i, k=k, distance=distance,
            )  # fmt: skip
        out_d[start:stop] = np.asarray(best_d)[: stop - start]
        out_i[start:stop] = np.asarray(best_i)[: stop - start]
    if distance == "l2":
        out_d = np.sqrt(out_d)
    return out_d, out_i


def _pad(x: np.ndarray, rows: int, value=0) -> np.ndarray:
    if len(x) == rows:
        return x
    pad = np.full((rows - len(x), *x.shape[1:]), value, x.dtype)
    return np.concatenate([x, pad])


def vote(labels: np.ndarray, distances: np.ndarray, num_classes: int, how: str = "majority"):
    """Each query's class from its neighbours' `labels` (Q, k) and `distances` (Q, k), sorted
    nearest first. Ties: the tied class whose best member ranks first (module docstring)."""
    labels = np.asarray(labels)
    q, k = labels.shape
    if how == "majority":
        weights = np.ones((q, k))
    elif how == "distance":
        distances = np.asarray(distances, np.float64)
        zero = distances == 0
        with np.errstate(divide="ignore"):
            weights = np.where(zero.any(1, keepdims=True), zero.astype(float), 1 / distances)
    else:
        raise ScalingError(f"unknown vote {how!r}; valid: {', '.join(VOTES)}")
    rows = np.arange(q)[:, None]
    score = np.zeros((q, num_classes))
    np.add.at(score, (np.broadcast_to(rows, labels.shape), labels), weights)
    # Each class's first rank among the neighbours that vote (k when it has none).
    first = np.full((q, num_classes), k)
    ranks = np.broadcast_to(np.arange(k), labels.shape)
    np.minimum.at(first, (np.broadcast_to(rows, labels.shape), labels),
                  np.where(weights > 0, ranks, k))  # fmt: skip
    top = score == score.max(1, keepdims=True)
    return np.argmin(np.where(top, first, k + 1), 1).astype(np.int32)


def predict(train, train_labels, queries, k: int = 1, distance: str = "l2",
            vote_by: str = "majority", num_classes: int | None = None, **search):  # fmt: skip
    """The predicted class of each query (int32). `search`: `neighbours`' keywords."""
    check_settings(k, distance, vote_by)
    train_labels = np.asarray(train_labels)
    num_classes = num_classes or int(train_labels.max()) + 1
    d, i = neighbours(train, queries, k, distance, **search)
    return vote(train_labels[i], d, num_classes, vote_by)


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images as float32 rows in [0, 1]."""
    return (np.asarray(images, np.float32) / 255.0).reshape(len(images), -1)


def evaluate(
    ds, ks, distance: str, vote_by: str = "majority", *, query_chunk: int = 256,
    train_chunk: int | None = None, train_eval: int = TRAIN_EVAL_EXAMPLES, features=None,
) -> dict:  # fmt: skip
    """Test accuracy and leave-one-out training accuracy (on the first `train_eval` training
    examples: a stratified prefix) of k-NN on a `Dataset`'s raw pixels, or on `features` (a
    (train, test) pair of arrays, one row an example), for each k in `ks`, from one search with
    the largest k. Returns {k: (train_accuracy, test_accuracy)} and the search's wall time and
    query count under the keys "wall_seconds" and "queries"."""
    ks = sorted(set(ks))
    check_settings(ks, distance, vote_by, query_chunk, train_chunk)
    if features is None:
        features = pixels(ds.train_images), pixels(ds.test_images)
    train, test = (np.asarray(f, np.float32) for f in features)
    n = len(train)
    if max(ks) > n - 1:
        raise ScalingError(f"k={max(ks)} needs at least {max(ks) + 1} training examples, got {n}")
    held = min(train_eval, n)
    search = dict(query_chunk=query_chunk, train_chunk=train_chunk)
    start = time.perf_counter()
    test_d, test_i = neighbours(train, test, max(ks), distance, **search)
    own = np.arange(held, dtype=np.int32)
    train_d, train_i = neighbours(train, train[:held], max(ks), distance, exclude=own, **search)
    wall = time.perf_counter() - start
    out = {}
    for k in ks:
        test_pred = vote(ds.train_labels[test_i[:, :k]], test_d[:, :k], ds.num_classes, vote_by)
        train_pred = vote(ds.train_labels[train_i[:, :k]], train_d[:, :k], ds.num_classes,
                          vote_by)  # fmt: skip
        out[k] = (
            float(np.mean(train_pred == ds.train_labels[:held])),
            float(np.mean(test_pred == ds.test_labels)),
        )
    return out | {"wall_seconds": wall, "queries": len(test_d) + held}


def model_name(distance: str, k: int, features_of: str | None = None) -> str:
    """knn_l2_k5 on pixels; knn_l2_k5_resnet20 on a resnet20 run's features."""
    return f"knn_{distance}_k{k}" + (f"_{features_of}" if features_of else "")


def summary(ds, dataset: str, image_size: int, k: int, distance: str, vote_by: str,
            accuracies: tuple[float, float], wall_seconds: float, queries: int,
            seed: int, features_of: str | None = None) -> dict:  # fmt: skip
    """summary.json for one k: the fields trained runs write (scaling.results.SUMMARY), where
    they apply, and k, distance, vote. A k-NN classifier has no parameters, steps or FLOP
    count of a forward pass: those are 0 (on a run's features too: the probe's own cost)."""
    train_acc, test_acc = accuracies
    return dict(
        model=model_name(distance, k, features_of), dataset=dataset, params=0, flops=0, macs=0,
        activations=0, image_size=image_size, num_classes=ds.num_classes,
        train_examples=len(ds.train_labels), steps=0, train_accuracy=train_acc,
        test_accuracy=test_acc,
        # k-NN minimises no loss; NaN is not a valid summary number (nor strict JSON), so the
        # losses are the zero-one loss (error rate): an honest loss of this classifier, not a
        # cross-entropy to set beside trained models' losses.
        train_loss=1.0 - train_acc, test_loss=1.0 - test_acc,
        generalization_gap=train_acc - test_acc, examples_seen=len(ds.train_labels),
        wall_seconds=wall_seconds, images_per_second=queries / max(wall_seconds, 1e-9),
        devices=jax.device_count(), seed=seed, k=k, distance=distance, vote=vote_by,
        loss="zero-one",
    )  # fmt: skip


def write_run(directory: Path, config: dict, summary: dict):
    """A k-NN result as a run directory (config.json, summary.json), as `scaling report` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    mark(directory, "knn")
    write_json_atomic(directory / "config.json", config)
    write_json_atomic(directory / "summary.json", summary)
