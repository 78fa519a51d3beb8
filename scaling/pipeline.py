"""The input pipeline: which examples make each global batch, read on host threads (grain) or
gathered on the devices, sharded along the batch; evaluation batches; pixel statistics.

Batch order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

import functools
import os

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scaling import data, ops


def pixel_statistics(ds, sample=10_000):
    """Per-channel mean and std of the training images, for normalisation inside the step: all
    of them in memory; for a stream the first `sample` (a stratified subset, by the order of
    `data.nested_subset_order`), so that it costs one pass of decoding, not an epoch."""
    if isinstance(ds, data.Dataset):
        pixels = ds.train_images.reshape(-1, ds.train_images.shape[-1]).astype(np.float64)
        mean, std = pixels.mean(0), pixels.std(0)
    else:
        first = grain.MapDataset.range(min(sample, len(ds.train))).map(lambda i: ds.train[i][0])
        count, sums, squares = 0, 0.0, 0.0  # every host reads the same images: they agree
        for images in read_ahead(first, 512).batch(256):
            pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
            count += len(pixels)
            sums = sums + pixels.sum(0)
            squares = squares + np.square(pixels).sum(0)
        mean = sums / count
        std = np.sqrt(squares / count - mean**2)
    return mean.astype(np.float32), std.astype(np.float32) + 1e-3


def batch_indices(step, num_examples, batch_size, seed):
    """Example indices of global batch `step`: a fresh permutation each epoch, a pure function
    of (seed, step), so a resumed run sees exactly the batches it would have seen."""
    epoch, i = divmod(step, num_examples // batch_size)
    return epoch_order(num_examples, seed, epoch)[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=2)  # computed once per epoch, not once per step
def epoch_order(num_examples, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def evaluate(eval_step, state, examples, count, *, batch_size, sharding):
    """Mean loss and accuracy over the first `count` of `examples` (a `data.Examples` split);
    the last batch is padded and masked."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in eval_batches(examples, count, batch_size):
        out = eval_step(state, *to_global(batch, sharding))
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)
    return totals["loss"] / totals["count"], totals["correct"] / totals["count"]


def host_slice(indices):
    """This host's contiguous share of a global batch (all of it on a single host)."""
    return np.array_split(indices, jax.process_count())[jax.process_index()]


def to_global(arrays, sharding):
    """Global arrays sharded along the batch from each host's share (multi-controller JAX)."""
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


# Reading runs ahead of the step on host threads (grain): decoding (PIL) and copying release
# the GIL. Bounded, because a batch of large images is large.
READ_THREADS = min(16, os.cpu_count() or 1)


def read_ahead(dataset, buffer):
    """`dataset`'s elements in order, computed up to `buffer` ahead on `READ_THREADS` threads."""
    options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=buffer)
    return dataset.to_iter_dataset(options)


def train_batches(ds, start, end, batch_size, seed):
    """This host's share of global training batches start..end-1, as uint8 images and labels.
    In memory a batch is one gather; a `data.Stream` decodes example by example on the threads.
    Augmentation runs later, on the devices, in the step."""
    n, local = len(ds.train_labels), batch_size // jax.process_count()

    @functools.lru_cache(maxsize=4 * READ_THREADS)  # a stream asks once per example
    def indices(step):
        return host_slice(batch_indices(step, n, batch_size, seed))

    if isinstance(ds, data.Stream):
        positions = grain.MapDataset.range(start * local, end * local)
        examples = positions.map(lambda p: ds.train[indices(p // local)[p % local]])
        return read_ahead(examples, 2 * local).batch(local)

    def gather(step):
        return ds.train_images[indices(step)], ds.train_labels[indices(step)]

    return read_ahead(grain.MapDataset.range(start, end).map(gather), 2)


def global_batches(ds, start, end, batch_size, seed, sharding, on_device):
    """Global training batches start..end-1, sharded along the batch, as the step takes them:
    gathered on the devices (`device_batches`) or read by this host (`train_batches`).
    `scaling bench` times this."""
    if on_device:
        return device_batches(ds, start, end, batch_size, seed, sharding)
    batches = train_batches(ds, start, end, batch_size, seed)
    return (to_global(batch, sharding) for batch in batches)


def data_on_device(setting, ds) -> bool:
    """Whether the training set is held on the devices (`device_batches`): `setting` when given
    (config.data_on_device); else on accelerators when it is in memory and takes under a quarter
    of a device's memory, and never on CPU, whose device memory is the host's."""
    if isinstance(ds, data.Stream):
        return False
    if setting is not None:
        return setting
    if ops.backend() == "cpu":
        return False
    memory = jax.local_devices()[0].memory_stats() or {}
    return ds.train_images.nbytes < memory.get("bytes_limit", 0) / 4


def device_batches(ds, start, end, batch_size, seed, sharding):
    """Global training batches start..end-1 gathered on the devices, each from a copy of the
    training set it holds: per step only the batch's indices leave the host. The same batches
    as `train_batches`."""
    replicated = NamedSharding(sharding.mesh, P())
    images, labels = to_global((ds.train_images, ds.train_labels), replicated)
    take = jax.jit(lambda x, y, i: (x[i], y[i]), out_shardings=sharding)
    for step in range(start, end):
        indices = batch_indices(step, len(ds.train_labels), batch_size, seed)
        yield take(images, labels, indices.astype(np.int32))


def eval_batches(examples, count, batch_size):
    """This host's share of (images, labels, mask) batches over the first `count` examples."""
    local = batch_size // jax.process_count()
    image_shape, offsets = examples[0][0].shape, host_slice(np.arange(batch_size))

    def example(p):
        position = p // local * batch_size + offsets[p % local]
        if position >= count:  # padding: masked out
            return np.zeros(image_shape, np.uint8), np.int32(0), np.float32(0)
        image, label = examples[position]
        return image, np.int32(label), np.float32(1)

    positions = grain.MapDataset.range(-(-count // batch_size) * local)
    return read_ahead(positions.map(example), 2 * local).batch(local)
