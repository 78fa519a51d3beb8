"""scaling.convert without torch: every (family, source) table round-trips through `export`,
checkpoints are read from .safetensors and .npz, and a failed load names the tensor and changes
nothing. Agreement with the reference implementations (torchvision, timm, the WRN code,
big_vision checkpoints through timm's loader) needs torch and is checked outside the suite.

Most models here are built shape-only and filled with random numbers: building one for real
compiles every initializer, seconds per model on a small CPU."""

import functools
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling import ScalingError, convert, models

TINY_COATNET = dict(depths=(2, 1, 1, 2, 1), dims=(16, 16, 32, 48, 64), head_size=16)
# name, source, settings: small members of each family. resnet50's third stage (3 blocks at
# depth_multiplier 0.5) and the first ViT's encoder are scanned stacks; the second is unrolled.
CASES = {
    "resnet/torchvision": ("resnet50", "torchvision", dict(width_multiplier=0.25,
                                                           depth_multiplier=0.5)),
    "preact/timm": ("preact_resnet18", "timm", dict(width_multiplier=0.125)),
    "wrn/wrn": ("wrn10_1", "wrn", {}),
    "efficientnet/timm": ("efficientnet_b0", "timm", dict(width_coefficient=0.25,
                                                          depth_coefficient=0.3)),
    "vit/timm": ("vit_ti16", "timm", dict(image_size=32, depth=2)),
    "vit/big_vision": ("vit_ti16", "big_vision", dict(image_size=32, depth=2, scan=False)),
    "coatnet/timm": ("coatnet", "timm", dict(image_size=32, **TINY_COATNET)),
}  # fmt: skip


def variables(model) -> dict:
    state = nnx.state(model, convert.VARIABLES)
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}


def fill(model, value=None, seed=0):
    """Every parameter and statistic of `model` set to `value`, or random (no two alike)."""
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(model, convert.VARIABLES))
    new = []
    for path, var in flat:
        new_value = rng.standard_normal(var.shape) if value is None else np.full(var.shape, value)
        new.append(
            (path, var.replace(jnp.asarray(new_value.astype(var.dtype))))
        )  # numpy's cast: jnp's compiles per shape
    nnx.update(model, nnx.from_flat_state(new))


@functools.cache
def _built(case):
    name, _, settings = CASES[case]
    model = models.abstract(name, num_classes=7, **settings)
    fill(model)
    if name == "coatnet":  # S0 and S1 are as wide: timm's shortcut there is a bare pool
        model.blocks[0].shortcut.kernel[...] = jnp.eye(16)[None, None]
        model.blocks[0].shortcut.bias[...] = jnp.zeros(16)
    return model


def built(case):
    """A random-valued model of `case` (a copy of one built once)."""
    return nnx.clone(_built(case))


@pytest.mark.parametrize("case", list(CASES))
def test_export_then_load_gives_every_variable_back(case):
    name, source, _ = CASES[case]
    model = built(case)
    before = variables(model)
    tensors = convert.export(model, name, source)
    assert convert.detect_source(tensors) == source
    fill(model, 0.0)
    convert.load(model, name, tensors)
    after = variables(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))


def test_layouts_are_the_references():
    """Round trips cannot see a layout that is wrong both ways: a few spelled out."""
    resnet = built("resnet/torchvision")
    tensors = convert.export(resnet, "resnet50", "torchvision")
    kernel = np.asarray(resnet.blocks[5].blocks.conv2.kernel[1])  # block 6, in a Stack
    np.testing.assert_array_equal(tensors["layer3.2.conv2.weight"], kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(tensors["fc.weight"], np.asarray(resnet.head.kernel[...]).T)

    coat = built("coatnet/timm")
    tensors = convert.export(coat, "coatnet", "timm")
    block, ref = coat.blocks[3], "stages.2.blocks.1.attn"  # S3's second block, on a 2x2 map
    qkv, table = np.asarray(block.attn.qkv.kernel[...]), np.asarray(block.rel_bias[...])
    heads, size = block.attn.num_heads, 16
    t, h, d = 2, 1, 5  # v, head 1, channel 5: timm orders (heads, 3, size), ours (3, heads, size)
    theirs, ours = (h * 3 + t) * size + d, (t * heads + h) * size + d
    np.testing.assert_array_equal(tensors[f"{ref}.qkv.weight"][theirs, :, 0, 0], qkv[:, ours])
    dy, dx = 0, 2  # offsets shifted by (1, 1): timm's row dy * (2 * 2 - 1) + dx
    bias_table = tensors[f"{ref}.rel_pos.relative_position_bias_table"]
    np.testing.assert_array_equal(bias_table[dy * 3 + dx], table[dy, dx])


def test_scanned_and_unrolled_models_read_the_same_tensors():
    tensors = convert.export(built("vit/timm"), "vit_ti16", "timm")
    unrolled = models.abstract("vit_ti16", image_size=32, depth=2, num_classes=7, scan=False)
    fill(unrolled, 0.0)
    convert.load(unrolled, "vit_ti16", tensors)
    again = convert.export(unrolled, "vit_ti16", "timm")
    assert again.keys() == tensors.keys()
    for name, value in again.items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)
    assert tensors["blocks.1.attn.qkv.weight"].shape == (576, 192)  # torch's (out, in)


def test_read_safetensors_and_big_vision_npz(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"conv1.weight": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}
    save_file(tensors, tmp_path / "w.safetensors")
    read = convert.read(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(read["conv1.weight"], tensors["conv1.weight"])
    arrays = {
        "params/embedding/kernel": np.ones((2, 2, 3, 4), np.float32),
        "params/cls": np.ones(4),
    }
    np.savez(tmp_path / "vit.npz", **arrays)
    read = convert.read(tmp_path / "vit.npz")
    assert read.keys() == arrays.keys()
    assert convert.detect_source(read) == "big_vision"


def test_read_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ScalingError, match="no such checkpoint file"):
        convert.read(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ScalingError, match="unreadable .safetensors") as e:
        convert.read(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ScalingError, match="unknown checkpoint format '.h5'; valid: .safe"):
        convert.read(tmp_path / "w.h5")
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # as where torch is not installed
    with pytest.raises(ScalingError, match=r"needs torch .*convert the file to .safetensors"):
        convert.read(tmp_path / "w.pth")


def test_an_unknown_or_ambiguous_source_asks_for_it():
    with pytest.raises(ScalingError, match=r"\(no known naming fits them\); pass source=, one"):
        convert.detect_source({"weight": np.zeros(1)})
    both = {"conv1.weight", "layer1.0.conv1.weight", "fc.weight", "conv_stem.weight"}
    with pytest.raises(ScalingError, match=r"\(they fit torchvision and timm\); pass source="):
        convert.detect_source(dict.fromkeys(both))
    model = built("resnet/torchvision")
    with pytest.raises(ScalingError, match="no mapping from timm weights to resnet50; resnet"):
        convert.load(model, "resnet50", {}, source="timm")


def failed_load(case, change):
    """The error of loading `case`'s own export after `change`, checked to be one line and to
    leave the model as it was."""
    name, source, _ = CASES[case]
    model = built(case)
    tensors = convert.export(model, name, source)
    change(tensors)
    fill(model, 3.0)
    with pytest.raises(ScalingError) as e:
        convert.load(model, name, tensors, source)
    assert all((value == 3.0).all() for value in variables(model).values())
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_missing_tensor_is_named_and_nothing_is_loaded():
    message = failed_load("resnet/torchvision", lambda t: t.pop("layer3.2.bn1.running_var"))
    assert message == (  # the third block of stage 3, in a scanned stack
        "torchvision tensor 'layer3.2.bn1.running_var' is missing (for our blocks/6/norm1/var)"
    )


def test_an_extra_tensor_is_named_and_nothing_is_loaded():
    def add(tensors):
        tensors["layer1.0.bn1.num_batches_tracked"] = np.array(5)  # not a weight: ignored
        tensors["layer5.0.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)

    message = failed_load("resnet/torchvision", add)
    assert message == (
        "torchvision tensor 'layer5.0.conv1.weight' (4, 4, 3, 3) has no place in resnet50"
    )


def test_a_wrong_shape_is_named_with_both_shapes_and_nothing_is_loaded():
    def transpose(tensors):
        tensors["head.fc.weight"] = tensors["head.fc.weight"].transpose(1, 0, 2, 3)

    message = failed_load("preact/timm", transpose)
    assert message == (
        "timm tensor 'head.fc.weight' has shape (64, 7, 1, 1), expected (7, 64, 1, 1) for our "
        "head/kernel (64, 7)"
    )


def big_vision_names(original, depth):
    """The original ViT code's names (`export`'s) as big_vision's own checkpoints spell them."""
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
               "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}  # fmt: skip
    tensors = {}
    for name, value in original.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        tensors[name] = value
    # big_vision adds position embeddings before it prepends the class token: no row for it.
    tensors["pos_embedding"] = tensors.pop("Transformer/posembed_input/pos_embedding")[:, 1:]
    for name in [n for n in tensors if n.startswith("Transformer/encoderblock_0/")]:
        rest = name.removeprefix("Transformer/encoderblock_0/")
        blocks = [tensors.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(depth)]
        tensors[f"Transformer/encoderblock/{rest}"] = np.stack(blocks)  # a scanned encoder
    return {f"params/{name}": value for name, value in tensors.items()}


def test_big_vision_checkpoints_with_a_prefix_and_a_scanned_encoder():
    model = built("vit/big_vision")
    model.pos_embed[...] = model.pos_embed[...].at[:, 0].set(0)  # no position for the token
    before = variables(model)
    tensors = big_vision_names(convert.export(model, "vit_ti16", "big_vision"), depth=2)
    tensors["opt/state/mu"] = np.zeros(3)  # optimizer state beside the parameters: not weights
    fill(model, 0.0)
    convert.load(model, "vit_ti16", tensors)
    after = variables(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))


@pytest.fixture
def shape_only_building(monkeypatch):
    """`import_model` builds its model with `models.create`, which compiles every initializer
    (20 s for the tiny CoAtNet here on 2 busy cores), then overwrites every parameter and
    statistic: built shape-only, the same import is tested in a fraction of a second."""
    create = models.create
    shape_only = lambda *args, **settings: nnx.eval_shape(lambda: create(*args, **settings))  # noqa: E731
    monkeypatch.setattr(convert.models, "create", shape_only)


def test_import_model_reads_classes_and_resolution_and_resizes_vit(shape_only_building):
    model = built("vit/timm")
    tensors = convert.export(model, "vit_ti16", "timm")
    big = convert.import_model("vit_ti16", tensors, depth=2, image_size=64)
    assert (big.image_size, big.head.out_features) == (64, 7)
    assert big.pos_embed.shape == (1, 1 + 4 * 4, 192)  # a 2x2 grid of patches became 4x4
    np.testing.assert_array_equal(big.pos_embed[:, 0], model.pos_embed[:, 0])  # class token's
    np.testing.assert_array_equal(big.cls_token[...], model.cls_token[...])
    np.testing.assert_array_equal(big.head.kernel[...], model.head.kernel[...])


def test_import_model_reads_coatnet_resolution_and_layout_from_its_bias_tables(
    shape_only_building,
):
    tensors = convert.export(built("coatnet/timm"), "coatnet", "timm")
    assert tensors["stages.2.blocks.0.attn.rel_pos.relative_position_bias_table"].shape == (9, 3)
    assert "stages.0.blocks.0.shortcut.expand.weight" not in tensors  # the identity: no conv
    model = convert.import_model("coatnet", tensors, **TINY_COATNET)
    assert (model.image_size, model.layout, model.head.out_features) == (32, "CCTT", 7)
