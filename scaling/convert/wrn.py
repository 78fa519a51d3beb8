"""The official Wide ResNet PyTorch code's flat parameter dict: `wrn{d}_{k}`."""

from scaling.convert.tables import resnet_blocks, stages


def looks_like(names) -> bool:
    return {"conv0", "group0.block0.conv0"} <= names


# The official WRN block: o1 = relu(bn0(x)); z = conv1(relu(bn1(conv0(o1)))); z + convdim(o1).
WRN_BLOCK = (
    ("bn0", "norm1", "bn"),
    ("conv0", "conv1", "bare_conv"),
    ("bn1", "norm2", "bn"),
    ("conv1", "conv2", "bare_conv"),
)


def wrn_table(model, t):
    t.layer("conv0", "stem", "bare_conv")
    blocks = resnet_blocks(model)
    for group, j, ours, _ in stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"group{group}.block{j}"
        for theirs, mine, kind in WRN_BLOCK:
            t.layer(f"{ref}.{theirs}", f"{ours}/{mine}", kind)
        t.layer(f"{ref}.convdim", f"{ours}/shortcut/proj", "bare_conv", optional=True)
    t.layer("bn", "final_norm", "bn")
    t.layer("fc", "head", "linear")


# Our families this source fills: (their table, the reference's classifier: its name and the
# axis of its classes).
TABLES = {"wrn": (wrn_table, ("fc.weight", 0))}
