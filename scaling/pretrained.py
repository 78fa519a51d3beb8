"""Imported weights on disk, and training that starts from them.

`scaling import SOURCE --model NAME --out DIR` converts a reference checkpoint (`scaling.convert`)
and writes DIR with `pretrained.json` (the model's name and the settings it was built with) and
`weights/` (an orbax checkpoint of its parameters and BatchNorm statistics). A run fine-tunes
from it with `--config.init_from=DIR`: every parameter and BatchNorm statistic is copied into the
freshly built model, the classifier re-initialised when the number of classes differs, and ViT
position embeddings or CoAtNet bias tables resized when the resolution does.
"""

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from scaling import ScalingError, models

MANIFEST = "pretrained.json"
HEAD = "head"  # every family's classifier, re-initialised for another number of classes


def check_new_directory(out) -> Path:
    """`out` as a Path, refused when it exists and is not an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScalingError(f"{out} exists and is not an empty directory; choose a new --out")
    return out


def save(model, name: str, settings: dict, out, source: str) -> Path:
    """Write `model` (built as `models.create(name, **settings)`) to a new directory `out`."""
    out = check_new_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((out / "weights").absolute(), dict(params=params, model_state=rest))
    manifest = dict(model=name, settings=settings, source=source)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def import_weights(path, name: str, out, *, kind=None, image_size=None, settings=None):
    """Convert the reference checkpoint at `path` (`scaling.convert`; `kind` its naming, else
    detected) into model `name` and save it to the new directory `out`. Every check comes
    before the checkpoint is read. Returns (the model, the naming read, the tensor count)."""
    from scaling import convert

    settings = dict(settings or {})
    models.abstract(name, **settings)  # a bad name or setting
    out = check_new_directory(out)
    tensors = convert.read(path)
    source = kind or convert.detect_source(tensors)
    model = convert.import_model(name, tensors, source=source, image_size=image_size, **settings)
    settings["num_classes"] = model.head.out_features
    # What the importer read off the checkpoint, so that `init_from` rebuilds the same model:
    # ViT and CoAtNet are built for one resolution, a ViT pools or not, a CoAtNet has a layout.
    for key in ("image_size", "pool", "layout"):
        if (value := getattr(model, key, None)) is not None:
            settings[key] = value
    save(model, name, settings, out, source)
    return model, source, len(tensors)


def describe(directory) -> dict:
    """The manifest of an imported-weights directory: {model, settings, source}."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScalingError(
            f"init_from {directory}: no {MANIFEST} there (write one with `scaling import`)"
        ) from None
    except (OSError, ValueError) as e:
        raise ScalingError(f"init_from {directory}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or not {"model", "settings"} <= set(manifest):
        raise ScalingError(f"init_from {directory}: {MANIFEST} lacks model and settings")
    return manifest


def check(directory, name: str, settings: dict) -> dict:
    """Refuse, before any work, weights of another model or of another shape than the run's
    (`settings` are the run's model settings). Returns the manifest."""
    manifest = describe(directory)
    if manifest["model"] != name:
        raise ScalingError(
            f"init_from {directory} holds {manifest['model']} weights, not {name} ones"
        )
    # The run's model as the run builds it, at the weights' classes and resolution (the two
    # things `initial_state` adapts): any other difference is a different network.
    run = {k: v for k, v in settings.items() if k not in ("num_classes", "image_size", "dtype")}
    adapted = {k: v for k, v in manifest["settings"].items() if k in ("num_classes", "image_size")}
    ours = models.abstract(name, **adapted, **run)
    theirs = models.abstract(name, **manifest["settings"])
    if mismatch := _mismatches(nnx.state(theirs), nnx.state(ours)):
        path, theirs_shape, ours_shape = mismatch[0]
        there = "absent" if theirs_shape is None else f"{theirs_shape}"
        here = "absent" if ours_shape is None else f"{ours_shape}"
        raise ScalingError(
            f"init_from {directory}: {path} is {there} there but {here} with this run's model "
            "settings (the weights' settings are in its pretrained.json)"
        )
    return manifest


def _flat(state) -> dict:
    return {_name(path): leaf for path, leaf in nnx.to_flat_state(state)}


def _mismatches(source, target) -> list:
    """(path, source shape, target shape) of variables whose shapes differ, outside the head."""
    source, target = _flat(source), _flat(target)
    out = [(p, None, v.shape) for p, v in target.items() if p not in source]
    out += [(p, v.shape, None) for p, v in source.items() if p not in target]
    out += [
        (p, v.shape, target[p].shape)
        for p, v in source.items()
        if p in target and v.shape != target[p].shape
    ]
    return [m for m in out if not m[0].startswith(HEAD + "/")]


def restore(directory) -> nnx.Module:
    """The imported model, as `scaling import` wrote it."""
    manifest = describe(directory)
    abstract = models.abstract(manifest["model"], **manifest["settings"])
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = dict(params=params, model_state=rest)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            state = checkpointer.restore(
                (Path(directory) / "weights").absolute(), jax.tree.map(_as_array_spec, target)
            )
        except Exception as e:  # orbax raises many kinds for a missing or damaged checkpoint
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ScalingError(f"init_from {directory}: unreadable weights ({reason})") from None
    return nnx.merge(nnx.graphdef(abstract), state["params"], state["model_state"])


def _as_array_spec(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if hasattr(leaf, "shape") else leaf


def initial_state(directory, params, model_state, image_size: int):
    """The run's initial (params, model_state) with the imported weights in them: every
    parameter and BatchNorm statistic copied, the head only when it has the run's number of
    classes (else it keeps its fresh initialisation), resolution-dependent tables resized to
    `image_size`; random-stream state stays the run's own. Returns them and whether the head
    was re-initialised."""
    imported = models.resize(restore(directory), image_size)
    weights = nnx.state(imported, nnx.Any(nnx.Param, nnx.BatchStat))
    theirs = {path: var.get_value() for path, var in nnx.to_flat_state(weights)}
    fresh_head = False

    def fill(state, kinds):
        nonlocal fresh_head
        flat = []
        for path, var in nnx.to_flat_state(state):
            if isinstance(var, kinds):
                if path not in theirs:
                    raise ScalingError(f"init_from {directory}: no weights for {_name(path)}")
                value = theirs[path]
                if value.shape == var.get_value().shape:
                    var = var.replace(np.asarray(value, var.get_value().dtype))
                elif path[0] == HEAD:
                    fresh_head = True
                else:
                    raise ScalingError(f"init_from {directory}: {_name(path)} differs in shape")
            flat.append((path, var))
        return nnx.from_flat_state(flat)

    params = fill(params, nnx.Param)
    model_state = fill(model_state, nnx.BatchStat)
    return params, model_state, fresh_head


def _name(path) -> str:
    return "/".join(map(str, path))
