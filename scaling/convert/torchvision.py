"""torchvision's names: `resnet{18,34,50,101,152}` from the state dicts of torchvision's
`resnet18()` ...."""

from scaling.convert.tables import conv_numbers, resnet_blocks, stages


def looks_like(names) -> bool:
    return {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= names


def resnet_table(model, t):
    t.layer("conv1", "stem", "conv")
    t.layer("bn1", "stem_norm", "bn")
    blocks = resnet_blocks(model)
    for stage, j, ours, block in stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"layer{stage + 1}.{j}"
        for i in conv_numbers(block):
            t.layer(f"{ref}.conv{i}", f"{ours}/conv{i}", "conv")
            t.layer(f"{ref}.bn{i}", f"{ours}/norm{i}", "bn")
        t.layer(f"{ref}.downsample.0", f"{ours}/shortcut/proj", "conv", optional=True)
        t.layer(f"{ref}.downsample.1", f"{ours}/shortcut/proj_norm", "bn", optional=True)
    t.layer("fc", "head", "linear")


# Our families this source fills: (their table, the reference's classifier: its name and the
# axis of its classes, which sets `num_classes` on import).
TABLES = {"resnet": (resnet_table, ("fc.weight", 0))}
