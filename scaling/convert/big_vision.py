"""`vit_*` from the `.npz` checkpoints of Google's ViT code (the original `vision_transformer`
names, `Transformer/posembed_input/...`, as timm's `_load_weights` reads them) and of big_vision
itself (`params/` prefix, `pos_embedding`, scanned `encoderblock`)."""

import numpy as np

from scaling import ScalingError
from scaling.convert.tables import SAME, Transform, vit_depth, vit_heads


def looks_like(names) -> bool:
    return any(name.endswith("embedding/kernel") for name in names)


def prepare(tensors) -> dict:
    """The parameter tree out of a checkpoint, a scanned encoder split block by block."""
    prefixes = ("", "params/", "opt/target/", "params/img/")
    prefix = next((p for p in prefixes if f"{p}embedding/kernel" in tensors), None)
    if prefix is None:
        raise ScalingError("big_vision checkpoint lacks 'embedding/kernel' (or params/...)")
    # Beside the parameters, a checkpoint may hold other trees (optimizer state): not weights.
    params = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
    scanned = "Transformer/encoderblock/"
    for name in [n for n in params if n.startswith(scanned)]:
        stacked = params.pop(name)
        for i, value in enumerate(stacked):
            params[f"Transformer/encoderblock_{i}/{name[len(scanned) :]}"] = value
    return params


def _attention(heads: int, part: str) -> Transform:
    """big_vision's separate query/key/value kernels (D, heads, head_dim) and biases
    (heads, head_dim), and out kernel (heads, head_dim, D), as our fused qkv and proj."""
    if part == "qkv_kernel":  # (D, 3, heads, head_dim): the (3, heads, head_dim) layout of ours
        return Transform(
            lambda q, k, v: np.stack([q, k, v], 1).reshape(q.shape[0], -1),
            lambda a: tuple(a.reshape(a.shape[0], 3, heads, -1).swapaxes(0, 1)),
        )
    if part == "qkv_bias":
        return Transform(
            lambda q, k, v: np.stack([q, k, v]).reshape(-1),
            lambda a: tuple(a.reshape(3, heads, -1)),
        )
    return Transform(  # out kernel
        lambda o: o.reshape(-1, o.shape[-1]), lambda a: (a.reshape(heads, -1, a.shape[-1]),)
    )


# big_vision adds its position embeddings before it prepends the class token; ours are added
# after, with a row for the token: that row is zero.
NO_CLASS_ROW = Transform(
    lambda p: np.concatenate([np.zeros_like(p[:, :1]), p], axis=1), lambda a: (a[:, 1:],)
)


def vit_table(model, t):
    """The original ViT code's names (as timm's `_load_weights` reads them), or big_vision's:
    `pos_embedding` (no class-token row) and other module numbers."""
    big_vision = t.has("pos_embedding")
    heads = vit_heads(model)
    t.layer("embedding", "patch_embed", "flax")
    t.layer("cls", "cls_token", "param", optional=True)
    if big_vision:
        cls = model.cls_token is not None
        t.rule(["pos_embedding"], "pos_embed", NO_CLASS_ROW if cls else SAME)
    else:
        t.layer("Transformer/posembed_input/pos_embedding", "pos_embed", "param")
    attention, norm2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
    for i in range(vit_depth(model)):
        ref, ours = f"Transformer/encoderblock_{i}", f"encoder/blocks/{i}"
        mha = f"{ref}/MultiHeadDotProductAttention_{attention}"
        t.layer(f"{ref}/LayerNorm_0", f"{ours}/norm1", "flax")
        for part in ("kernel", "bias"):
            refs = [f"{mha}/{n}/{part}" for n in ("query", "key", "value")]
            t.rule(refs, f"{ours}/attn/qkv/{part}", _attention(heads, f"qkv_{part}"))
        t.rule([f"{mha}/out/kernel"], f"{ours}/attn/proj/kernel", _attention(heads, ""))
        t.rule([f"{mha}/out/bias"], f"{ours}/attn/proj/bias", SAME)
        t.layer(f"{ref}/LayerNorm_{norm2}", f"{ours}/norm2", "flax")
        t.layer(f"{ref}/MlpBlock_{mlp}/Dense_0", f"{ours}/mlp/fc1", "flax")
        t.layer(f"{ref}/MlpBlock_{mlp}/Dense_1", f"{ours}/mlp/fc2", "flax")
    t.layer("Transformer/encoder_norm", "norm", "flax")
    t.layer("head", "head", "flax")


# Our families this source fills: (their table, the reference's classifier: its name and the
# axis of its classes).
TABLES = {"vit": (vit_table, ("head/kernel", -1))}
