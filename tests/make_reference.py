"""Write the reference fixtures of tests/reference.py (needs torch, torchvision and timm).

    python tests/make_reference.py [--check] [NAMES...]     # all fixtures when no name is given

Each reference network is built in eval mode without dropout, its state_dict (buffers included)
is replaced by tensors drawn with `reference.draw` from laws chosen here, and its logits on
`reference.images` are stored with the tensor list. The laws are for random, untrained weights:
they keep activations from vanishing or blowing up, and make every tensor matter. `--check`
redraws each tensor in turn and prints the smallest relative change of the logits: how large a
conversion error in any one tensor shows in the test.
"""

import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import _load_weights

sys.path.insert(0, str(Path(__file__).parent))
from reference import FIXTURES, draw, images, relative_difference  # noqa: E402

SEED = 0
BATCH = 2


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def law(name: str, shape: list, kind: str, fan_in: int | None = None) -> list:
    """The law tensor `name` of the layer type `kind` (a torch module's class name) is drawn from.

    Weights of two or more dims are normal with std 1 / sqrt(fan_in), fan_in by default that of
    torch's (out, in, ...) layouts; norms and biases are kept away from the identity and zero.
    BatchNorm's running statistics are rescaled afterwards by `calibrate`.
    """
    leaf = re.split(r"[./]", name)[-1]
    if leaf == "num_batches_tracked":
        return ["count"]
    if leaf == "running_mean":
        return ["normal", 0.1]
    if leaf == "running_var":
        return ["uniform", 0.5, 1.5]
    if "BatchNorm" in kind:
        return ["uniform", 0.5, 1.0] if leaf == "weight" else ["normal", 0.1]
    if "LayerNorm" in kind:
        return ["uniform", 0.5, 1.5] if leaf in ("weight", "scale") else ["normal", 0.1]
    if leaf == "relative_position_bias_table":  # large: random features vary little in space
        return ["normal", 2.0]
    if leaf in ("cls_token", "pos_embed", "cls", "pos_embedding"):
        return ["normal", 0.1]
    if len(shape) < 2:
        return ["normal", 0.1]
    return ["normal", _round(1 / math.sqrt(fan_in or math.prod(shape[1:])))]


def torch_tensors(model: torch.nn.Module) -> list:
    """[name, shape, law] for each entry of the model's state_dict, in its order."""
    modules = dict(model.named_modules())
    out = []
    for name, value in model.state_dict().items():
        kind = type(modules[name.rpartition(".")[0]]).__name__
        out.append([name, list(value.shape), law(name, list(value.shape), kind)])
    return out


def load_state(model: torch.nn.Module, weights: dict) -> None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)


def calibrate(model: torch.nn.Module, tensors: list, x: torch.Tensor) -> None:
    """Scale each BatchNorm's running statistics to what reaches it, as in a trained network.

    With random running statistics, BatchNorm in eval mode is a mere affine map: the signal then
    shrinks or grows from layer to layer, and in SiLU/GELU networks (EfficientNet, CoAtNet) the
    border between the two is a knife's edge. Here, in one pass in order, each BatchNorm's
    running_var law becomes uniform(0.5 s, 1.5 s) and running_mean's normal(0.1 sqrt(s)), where s
    is the mean square of its input on the fixture's images. The laws in `tensors` are updated.
    """
    laws = {name: entry for name, _, entry in tensors}
    names = {module: name for name, module in model.named_modules()}

    def rescale(module, inputs):
        s = inputs[0].double().square().mean().item()
        laws[f"{names[module]}.running_var"][1:] = [_round(0.5 * s), _round(1.5 * s)]
        laws[f"{names[module]}.running_mean"][1] = _round(0.1 * math.sqrt(s))
        module.running_var.mul_(s)  # the drawn uniform(0.5, 1.5) values, rescaled
        module.running_mean.mul_(math.sqrt(s))

    load_state(model, draw(tensors, SEED))
    norms = [
        m for m in model.modules() if isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]
    hooks = [m.register_forward_pre_hook(rescale) for m in norms]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()


class _BatchNorm(torch.nn.Module):
    """The official Wide ResNet's batch norm: four tensors, F.batch_norm in eval mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        mean, var = self.running_mean, self.running_var
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=1e-5)


class WideResNet(torch.nn.Module):
    """The official Wide ResNet (szagoruyko/wide-residual-networks, pytorch/resnet.py), rewritten:
    its flat parameter names (conv0, group{g}.block{b}.{bn0,conv0,bn1,conv1,convdim}, bn, fc),
    pre-activation blocks, the shortcut a 1x1 convolution of relu(bn0(x)) where widths differ."""

    def __init__(self, depth: int = 16, width: int = 2, num_classes: int = 10):
        super().__init__()
        self.conv0 = torch.nn.Parameter(torch.zeros(16, 3, 3, 3))
        self.strides = []
        cin = 16
        for g, cout in enumerate((16 * width, 32 * width, 64 * width)):
            group = torch.nn.Module()
            for b in range((depth - 4) // 6):
                block = torch.nn.Module()
                block.bn0 = _BatchNorm(cin)
                block.conv0 = torch.nn.Parameter(torch.zeros(cout, cin, 3, 3))
                block.bn1 = _BatchNorm(cout)
                block.conv1 = torch.nn.Parameter(torch.zeros(cout, cout, 3, 3))
                if cin != cout:
                    block.convdim = torch.nn.Parameter(torch.zeros(cout, cin, 1, 1))
                setattr(group, f"block{b}", block)
                self.strides.append(2 if g > 0 and b == 0 else 1)
                cin = cout
            setattr(self, f"group{g}", group)
        self.bn = _BatchNorm(cin)
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.conv2d(x, self.conv0, padding=1)
        blocks = [b for g in (self.group0, self.group1, self.group2) for b in g.children()]
        for block, stride in zip(blocks, self.strides, strict=True):
            o1 = F.relu(block.bn0(x))
            y = F.conv2d(o1, block.conv0, stride=stride, padding=1)
            o2 = F.relu(block.bn1(y))
            z = F.conv2d(o2, block.conv1, padding=1)
            if hasattr(block, "convdim"):
                x = z + F.conv2d(o1, block.convdim, stride=stride)
            else:
                x = z + x
        return self.fc(F.relu(self.bn(x)).mean(dim=(2, 3)))


def big_vision_tensors(embed: int, depth: int, heads: int, mlp: int, patch: int, classes: int):
    """[name, shape, law] of every ViT parameter in a JAX/Flax .npz checkpoint, named as timm's
    vision_transformer._load_weights reads them; kernels HWIO, (in, out), (in, heads, head_dim)
    and (heads, head_dim, out)."""
    shapes = {
        "embedding/kernel": (patch, patch, 3, embed),
        "embedding/bias": (embed,),
        "cls": (1, 1, embed),
        "Transformer/posembed_input/pos_embedding": (1, (224 // patch) ** 2 + 1, embed),
    }
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        shapes[f"{block}/LayerNorm_0/scale"] = shapes[f"{block}/LayerNorm_0/bias"] = (embed,)
        for projection in ("query", "key", "value"):
            shapes[f"{attention}/{projection}/kernel"] = (embed, heads, embed // heads)
            shapes[f"{attention}/{projection}/bias"] = (heads, embed // heads)
        shapes[f"{attention}/out/kernel"] = (heads, embed // heads, embed)
        shapes[f"{attention}/out/bias"] = (embed,)
        shapes[f"{block}/LayerNorm_2/scale"] = shapes[f"{block}/LayerNorm_2/bias"] = (embed,)
        for j, (fan_in, fan_out) in enumerate(((embed, mlp), (mlp, embed))):
            shapes[f"{block}/MlpBlock_3/Dense_{j}/kernel"] = (fan_in, fan_out)
            shapes[f"{block}/MlpBlock_3/Dense_{j}/bias"] = (fan_out,)
    shapes["Transformer/encoder_norm/scale"] = shapes["Transformer/encoder_norm/bias"] = (embed,)
    shapes["head/kernel"] = (embed, classes)
    shapes["head/bias"] = (classes,)
    out = []
    for name, shape in shapes.items():
        kind = "LayerNorm" if "LayerNorm" in name or "encoder_norm" in name else "Dense"
        # the input dims: all but the last, but the first alone for (in, heads, head_dim)
        fan_in = (
            shape[0] if re.search(r"(query|key|value)/kernel$", name) else math.prod(shape[:-1])
        )
        out.append([name, list(shape), law(name, list(shape), kind, fan_in)])
    return out


def load_npz(model: torch.nn.Module, weights: dict) -> None:
    """Through timm's own loader of JAX/Flax ViT checkpoints; every tensor must come from it."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.fill_(float("nan"))
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "checkpoint.npz", **weights)
        _load_weights(model, str(Path(tmp) / "checkpoint.npz"))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values()), "not all loaded"


def timm_model(name: str) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)


def narrow_classifier(model: torch.nn.Module, hidden: int) -> torch.nn.Module:
    """torchvision's AlexNet or VGG with its two hidden dense layers `hidden` units wide instead
    of 4096: the same code and layers (our `hidden` setting), a tenth of the weights to draw."""
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, torch.nn.Linear)]
    for k, i in enumerate(linears):
        old = model.classifier[i]
        fan_in = old.in_features if k == 0 else hidden
        model.classifier[i] = torch.nn.Linear(fan_in, hidden if k < 2 else old.out_features)
    return model


# Settings of our model that a fixture's reference needs (default: none).
SETTINGS = {"alexnet": {"hidden": 128}, "vgg11_bn": {"hidden": 128}}
TV, TIMM = f"torchvision {torchvision.__version__}", f"timm {timm.__version__}"
# fixture: our model, source, image size, reference network, its description
SPECS = {
    "resnet18": (
        "resnet18",
        "torchvision",
        64,
        lambda: torchvision.models.resnet18(weights=None),
        f"torchvision.models.resnet18(weights=None), {TV}",
    ),
    "resnet50": (
        "resnet50",
        "torchvision",
        64,
        lambda: torchvision.models.resnet50(weights=None),
        f"torchvision.models.resnet50(weights=None), {TV}",
    ),
    "preact_resnet50": (
        "preact_resnet50",
        "timm",
        64,
        lambda: timm_model("resnetv2_50"),
        f'timm.create_model("resnetv2_50"), {TIMM}',
    ),
    "preact_resnet18": (
        "preact_resnet18",
        "timm",
        64,
        lambda: timm_model("resnetv2_18"),
        f'timm.create_model("resnetv2_18"), {TIMM}',
    ),
    "wrn16_2": (
        "wrn16_2",
        "wrn",
        32,
        lambda: WideResNet(16, 2, 10),
        "WRN-16-2 of szagoruyko/wide-residual-networks pytorch/resnet.py (its functional forward "
        "over a flat parameter dict, rewritten in tests/make_reference.py), torch "
        + torch.__version__,
    ),
    "efficientnet_b0": (
        "efficientnet_b0",
        "timm",
        64,
        lambda: timm_model("tf_efficientnet_b0"),
        f'timm.create_model("tf_efficientnet_b0") (TF "same" padding, BN eps 1e-3), {TIMM}',
    ),
    "vit_ti16": (
        "vit_ti16",
        "timm",
        224,
        lambda: timm_model("vit_tiny_patch16_224"),
        f'timm.create_model("vit_tiny_patch16_224"), {TIMM}',
    ),
    "vit_ti16_big_vision": (
        "vit_ti16",
        "big_vision",
        224,
        lambda: timm_model("vit_tiny_patch16_224"),
        "a JAX/Flax ViT-Ti/16 .npz checkpoint loaded into "
        'timm.create_model("vit_tiny_patch16_224") by '
        f"timm.models.vision_transformer._load_weights, {TIMM}",
    ),
    "coatnet_0": (
        "coatnet_0",
        "timm",
        224,
        lambda: timm_model("coatnet_0_224"),
        f'timm.create_model("coatnet_0_224"), {TIMM}',
    ),
    "resnext50_32x4d": (
        "resnext50_32x4d",
        "torchvision",
        64,
        lambda: torchvision.models.resnext50_32x4d(weights=None),
        f"torchvision.models.resnext50_32x4d(weights=None), {TV}",
    ),
    "wide_resnet50_2": (
        "wide_resnet50_2",
        "torchvision",
        64,
        lambda: torchvision.models.wide_resnet50_2(weights=None),
        f"torchvision.models.wide_resnet50_2(weights=None), {TV}",
    ),
    "seresnet50": (
        "seresnet50",
        "timm",
        64,
        lambda: timm_model("seresnet50"),
        f'timm.create_model("seresnet50"), {TIMM}',
    ),
    # 160 pixels leave AlexNet's last pool 4x4, which the adaptive pool spreads over 6x6 with
    # overlapping windows: the pool and the order of fc6's inputs are both tested. The hidden
    # dense layers are 128 wide (SETTINGS), not 4096: 4M weights to draw in each test, not 61M.
    "alexnet": (
        "alexnet",
        "torchvision",
        160,
        lambda: narrow_classifier(torchvision.models.alexnet(weights=None), 128),
        "torchvision.models.alexnet(weights=None), its fc6 and fc7 128 units wide (classifier[1] "
        f"and [4] replaced by Linear(9216, 128), Linear(128, 128)), {TV}",
    ),
    # 64 pixels leave VGG's last pool 2x2, spread over 7x7 (windows overlap in the middle).
    # Hidden layers 128 wide, as AlexNet's: 12M weights, not 133M.
    "vgg11_bn": (
        "vgg11_bn",
        "torchvision",
        64,
        lambda: narrow_classifier(torchvision.models.vgg11_bn(weights=None), 128),
        "torchvision.models.vgg11_bn(weights=None), its two hidden dense layers 128 units wide "
        f"(classifier[0] and [3] replaced by Linear(25088, 128), Linear(128, 128)), {TV}",
    ),
    # 64 pixels: each ceil-mode pool rounds up (32 -> 16, 16 -> 8, 8 -> 4; floor would give
    # 15, 7, 3). The auxiliary heads run in training mode only: not in this eval-mode fixture.
    "googlenet": (
        "googlenet",
        "torchvision",
        64,
        lambda: torchvision.models.googlenet(
            weights=None, aux_logits=False, transform_input=False, init_weights=False
        ),
        "torchvision.models.googlenet(weights=None, aux_logits=False, transform_input=False, "
        f"init_weights=False), {TV}",
    ),
    "densenet121": (
        "densenet121",
        "torchvision",
        64,
        lambda: torchvision.models.densenet121(weights=None),
        f"torchvision.models.densenet121(weights=None), {TV}",
    ),
}


def make(fixture: str, check: bool = False) -> dict:
    ours, source, size, build, description = SPECS[fixture]
    start = time.perf_counter()
    model = build().eval()
    x = torch.from_numpy(images(SEED, BATCH, size))
    if source == "big_vision":
        tensors, load = big_vision_tensors(192, 12, 3, 768, 16, 1000), load_npz
    else:
        tensors, load = torch_tensors(model), load_state
        calibrate(model, tensors, x)

    def logits(weights):
        load(model, weights)
        with torch.no_grad():
            return model(x).numpy()

    weights = draw(tensors, SEED)
    reference = logits(weights)
    assert np.isfinite(reference).all()
    between = (reference[0] - reference[1]).std() / reference.std() / math.sqrt(2)
    print(
        f"{fixture}: {len(tensors)} tensors, logit std {reference.std():.3g} "
        f"(between images {between:.2f} of it), {time.perf_counter() - start:.1f} s"
    )
    if check:  # each tensor redrawn in turn: how much the logits move
        changes = []
        for i, (name, _, entry) in enumerate(tensors):
            if entry[0] not in ("count", "zeros"):
                redrawn = draw([tensors[i]], SEED + 1)
                changes.append(
                    (relative_difference(logits({**weights, **redrawn}), reference), name)
                )
        print("  least sensitive:", ", ".join(f"{n} {c:.1e}" for c, n in sorted(changes)[:4]))
    return dict(
        model=ours,
        settings=SETTINGS.get(fixture, {}),
        source=source,
        reference=description,
        seed=SEED,
        image_size=size,
        batch=BATCH,
        num_classes=int(reference.shape[1]),
        tensors=tensors,
        # the shortest decimal that reads back as the same float32: exact, half the digits
        logits=[[float(str(x)) for x in row] for row in reference],
    )


def write(fixture: str, data: dict) -> None:
    """JSON with one tensor per line and one line of logits per image."""
    head = json.dumps({k: v for k, v in data.items() if k not in ("tensors", "logits")})
    tensors = ",\n".join(f"  {json.dumps(t)}" for t in data["tensors"])
    logits = ",\n".join(f"  {json.dumps(row)}" for row in data["logits"])
    text = f'{head[:-1]},\n "tensors": [\n{tensors}\n ],\n "logits": [\n{logits}\n ]\n}}\n'
    assert json.loads(text) == data
    FIXTURES.mkdir(exist_ok=True)
    (FIXTURES / f"{fixture}.json").write_text(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    check = "--check" in sys.argv[1:]
    names = [a for a in sys.argv[1:] if a != "--check"] or list(SPECS)
    for name in names:
        write(name, make(name, check))
