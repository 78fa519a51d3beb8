"""PyTorch twins (scaling/twins.py): exact parameter counts against the Flax models, and one
forward and backward pass at batch 2."""

import pytest

from scaling import models

torch = pytest.importorskip("torch")

from scaling import twins  # noqa: E402  (it imports torch: only where torch is installed)


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


def test_bench_times_the_twin_in_a_process_of_its_own(monkeypatch):
    from scaling import ScalingError, bench

    monkeypatch.delenv("SCALING_MALLOPT", raising=False)
    with bench.torch_process("resnet20", 2, 32, 1, 269_722) as (run_train, run_eval):
        run_train(), run_eval(), run_train()
    assert "SCALING_MALLOPT" not in bench.os.environ  # only the child ran with glibc's defaults
    with pytest.raises(ScalingError, match="twin of resnet20 has 269722 parameters, JAX 5"):
        with bench.torch_process("resnet20", 2, 32, 1, 5):
            pass
