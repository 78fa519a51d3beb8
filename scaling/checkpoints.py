"""Orbax checkpoints that are never deleted on doubt, and never restored when damaged.

Each checkpoint carries a fingerprint of the state it holds (per array: a position-weighted sum
of its bits, modulo 2**32), in orbax's step metadata. Restoring takes the newest checkpoint that
is complete (orbax wrote its step metadata), fits the state this run builds, reads without error
and matches its fingerprint. A checkpoint that fails one of these is not deleted: it is renamed
`STEP.incomplete` or `STEP.damaged` (orbax ignores such names, and a later save at that step
does not collide with it), one line says so, and the previous one is tried. A checkpoint that
reads well but does not fit (another model, another number of classes) stops the run with one
line naming the difference, and nothing is renamed or deleted. Entries orbax does not take for
steps (`notes.txt`, `8.damaged`) are left alone.
"""

import contextlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scaling import ScalingError
from scaling.rundir import first_line, warn

METADATA = "_CHECKPOINT_METADATA"  # orbax writes it when it commits a step


def manager(directory: Path, *, keep: int | None, every: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every)
    with quiet_orbax():  # it reads every step's metadata, and logs each damaged one
        return ocp.CheckpointManager(
            Path(directory).absolute(),
            options=options,
            item_handlers=ocp.StandardCheckpointHandler(),  # so it can read metadata first
        )


@jax.jit
def fingerprint(state):
    """One uint32 per array of `state`: sum_i bits_i * (2 i + 1) mod 2**32. Any change to one
    element changes it (an odd factor is invertible modulo 2**32); several changes cancel with
    odds of about 2**-32. Integer sums are exact, so the value does not depend on the device
    or the order of the reduction."""

    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        x = x.reshape(-1)
        if x.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize == 2:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        else:
            bits = x.astype(jnp.uint32)
        odd = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
        return jnp.sum(bits * odd, dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(state)]


def save(checkpoints: ocp.CheckpointManager, step: int, state, *, force: bool):
    """Save `state` at `step` if the manager's interval (or `force`) says so, with its
    fingerprint."""
    if not (force or checkpoints.should_save(step)):
        return
    prints = [int(v) for v in jax.device_get(fingerprint(state))]
    checkpoints.save(
        step,
        args=ocp.args.StandardSave(state),
        force=force,
        custom_metadata={"fingerprint": prints},
    )


def restore_latest(checkpoints: ocp.CheckpointManager, state):
    """The newest sound checkpoint, restored into the structure of `state` (or `state` itself
    when there is none)."""
    for step in sorted(checkpoints.all_steps(), reverse=True):
        path = Path(checkpoints.directory) / str(step)
        if not (path / METADATA).is_file():
            set_aside(checkpoints, step, "incomplete", "orbax never committed it")
            continue
        try:
            json.loads((path / METADATA).read_text())
            with quiet_orbax():
                saved = checkpoints.item_metadata(step)
                expected = (checkpoints.metadata(step).custom_metadata or {}).get("fingerprint")
            if not jax.tree.leaves(getattr(saved, "tree", saved)):
                raise ValueError("no arrays recorded")
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged file
            set_aside(checkpoints, step, "damaged", f"its metadata is unreadable: {first_line(e)}")
            continue
        if difference := misfit(saved, state):
            raise ScalingError(
                f"checkpoint {step} in {checkpoints.directory} does not fit the state this config "
                f"builds ({difference}); it is kept: resume with the config that wrote it, or "
                "use another workdir"
            )
        try:
            with quiet_orbax():
                restored = checkpoints.restore(step, args=ocp.args.StandardRestore(state))
        except Exception as e:
            set_aside(checkpoints, step, "damaged", f"it does not read: {first_line(e)}")
            continue
        if expected is not None and (bad := damaged_arrays(restored, expected)):
            set_aside(checkpoints, step, "damaged", f"{bad} differs from its fingerprint")
            continue
        return restored
    return state


def misfit(saved, state) -> str | None:
    """How the arrays recorded in a checkpoint differ from `state`'s: a missing or extra array
    (first by path), or a shape or dtype; None when they fit."""
    want, have = arrays_by_path(state), arrays_by_path(getattr(saved, "tree", saved))
    if extra := sorted(set(have) - set(want)):
        return f"it holds {extra[0]}, which this model lacks" + more(extra)
    if missing := sorted(set(want) - set(have)):
        return f"it lacks {missing[0]}" + more(missing)
    for key, array in want.items():
        stored = have[key]
        shape = tuple(getattr(array, "shape", ()))
        if jnp.issubdtype(getattr(array, "dtype", np.float32), jax.dtypes.prng_key):
            continue  # stored as its raw key data
        if tuple(stored.shape) != shape:
            return f"{key} has shape {tuple(stored.shape)}, this model {shape}"
    return None


def arrays_by_path(tree) -> dict:
    """{'params/blocks/0/conv/kernel': leaf}: the same names for a state and for orbax's record
    of it (which stores attributes and integer keys as strings)."""

    def name(key):
        return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(map(name, path)): leaf for path, leaf in leaves}


def more(keys) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def damaged_arrays(restored, expected) -> str | None:
    """The path of the first array of `restored` whose fingerprint is not `expected`'s."""
    actual = [int(v) for v in jax.device_get(fingerprint(restored))]
    paths = list(arrays_by_path(restored))
    if len(actual) != len(expected):
        return "the number of arrays"
    return next((p for p, a, e in zip(paths, actual, expected, strict=True) if a != e), None)


def set_aside(checkpoints: ocp.CheckpointManager, step: int, kind: str, reason: str):
    """Rename checkpoint `step` to STEP.KIND (STEP.KIND-2, ... if taken), out of orbax's sight;
    one line says why. Process 0 renames; every process skips it."""
    path = Path(checkpoints.directory) / str(step)
    target, n = path.with_name(f"{step}.{kind}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{step}.{kind}-{n}")
    if jax.process_index() == 0:  # the hosts of a multi-host job share the directory
        path.rename(target)
        with quiet_orbax():
            checkpoints.reload()
    warn(f"checkpoint {step} is {kind} ({reason}); kept as {target.name}, trying the previous one")


@contextlib.contextmanager
def quiet_orbax():
    """Orbax and absl log many lines (specs of whole arrays) around a failed read: the one line
    `set_aside` prints says what matters."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
