"""PyTorch twins (benchmarks/torch_twins.py): exact parameter counts against the Flax models, and
one forward and backward pass at batch 2."""

import importlib.util

import pytest
from conftest import ROOT

from scaling import models

torch = pytest.importorskip("torch")

_spec = importlib.util.spec_from_file_location(
    "torch_twins", ROOT / "benchmarks" / "torch_twins.py"
)
twins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(twins)


@pytest.mark.parametrize("name", list(twins.TWINS))
def test_twin_matches_flax_model(name):
    spec = twins.TWINS[name]
    size = spec["image_size"]
    flax_model = models.abstract(spec["model"], image_size=size, num_classes=10, **spec["settings"])
    model = twins.build(name)
    assert twins.count_params(model) == models.count_params(flax_model)

    torch.manual_seed(0)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
