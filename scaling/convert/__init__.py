"""Weights from reference implementations, imported into this library's models (and exported back).

Sources (`SOURCES`) and the families each one fills:
- `torchvision`: `resnet{18,34,50,101,152}`, `resnext*`, `wide_resnet*`, `alexnet`, `vgg*`,
  `googlenet` (with or without its auxiliary heads) and `densenet*` from the state dicts of
  torchvision's constructors of those names;
- `timm`: `preact_resnet*` from `resnetv2_*`, `efficientnet_b*` from `tf_efficientnet_b*`,
  `vit_*` from `vit_*_patch*_*`, `coatnet_*` from `coatnet_*_224`, `seresnet*`/`seresnext*`
  from timm's networks of those names;
- `wrn`: `wrn{d}_{k}` from the official Wide ResNet PyTorch code's flat parameter dict;
- `big_vision`: `vit_*` from the `.npz` checkpoints of Google's ViT code (the original
  `vision_transformer` names, `Transformer/posembed_input/...`, as timm's `_load_weights` reads
  them) and of big_vision itself (`params/` prefix, `pos_embedding`, scanned `encoderblock`).

Each (family, source) pair is a table of rules "reference tensor(s) -> our variable, transform",
built from our model's own structure (`tables.Table`), so one generic core checks every load the
same way: every variable of ours (parameters and BatchNorm statistics) gets exactly one rule, every
reference tensor is used exactly once (BatchNorm step counters and timm's index buffers excepted),
and shapes are compared in the reference's own layout, all before anything is written: a load
either fills the whole model or changes nothing. Scanned stacks (a ResNet stage's `Stack`, a ViT's
vmapped encoder) are seen block by block, their per-block tensors stacked on the leading axis.

The same rules run backwards (`export`), giving a state dict in the reference's names and layouts,
which the tests use to round-trip every pair without torch.

Modules: `files` reads checkpoint files; `tables` holds the transforms, our variables block by
block and the table builder; one module per source naming (`torchvision`, `timm`, `wrn`,
`big_vision`) holds its tables and how to recognise its names; `core` detects the source and
loads, exports and imports through the tables.
"""

from scaling import models  # noqa: F401  (convert.models: what import_model builds with)
from scaling.convert.core import (
    FAMILIES,
    HEADS,
    MAPPINGS,
    SOURCES,
    detect_source,
    export,
    import_model,
    load,
)
from scaling.convert.files import TORCH_SUFFIXES, read
from scaling.convert.tables import VARIABLES

__all__ = [
    "FAMILIES",
    "HEADS",
    "MAPPINGS",
    "SOURCES",
    "TORCH_SUFFIXES",
    "VARIABLES",
    "detect_source",
    "export",
    "import_model",
    "load",
    "read",
]
