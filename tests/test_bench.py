"""`scaling bench`: the harness measures what it says (timings are not asserted)."""

import contextlib
import json
import sys
import types

import pytest
from conftest import one_line_exit_2

from scaling import bench, flops


def test_bench_records_every_measure(tmp_path):
    result = bench.bench(["resnet8"], batch=8, image_size=8, steps=1, windows=2, echo=lambda _: 0)
    machine, (record,) = result["machine"], result["records"]
    assert machine["platform"] == "cpu" and machine["dtype"] == "float32"
    assert machine["measured_peak_flops"] > 1e8
    timed = bench.models.abstract("resnet8", num_classes=10)
    assert record["params"] == bench.models.count_params(timed) == 75_290
    assert record["compile_seconds"] > 0 and record["peak_memory_bytes"] > 0
    # A training step costs about 3x the forward pass: XLA's count of it must say so.
    forward = 8 * flops.xla_flops(timed, 8)
    assert 2 * forward < record["flops_per_step"] < 5 * forward
    assert record["jax_train_images_per_second"] > 0 and record["jax_eval_images_per_second"] > 0
    assert record["input_images_per_second"] > 0 and record["utilisation"] > 0
    bench.write(result, tmp_path, "scaling bench --models resnet8")
    assert json.loads((tmp_path / "bench.json").read_text())["records"][0]["model"] == "resnet8"
    table = (tmp_path / "README.md").read_text()
    assert "| resnet8 | 75,290 |" in table and "scaling bench --models resnet8" in table


def test_bench_times_a_streamed_input_pipeline(digits_tree):
    result = bench.bench(["resnet8"], batch=8, image_size=8, steps=2, windows=2,
                         stream=f"folder:{digits_tree}", echo=lambda _: 0)  # fmt: skip
    assert result["machine"]["input"] == f"streamed from folder:{digits_tree}"
    assert result["records"][0]["input_images_per_second"] > 0


def test_bench_times_batches_gathered_on_the_device(monkeypatch):
    copies, taken = [], []
    device_batches = bench.pipeline.device_batches

    def counted(ds, start, end, *rest):
        copies.append((start, end))
        for arrays in device_batches(ds, start, end, *rest):
            taken.append(arrays)
            yield arrays

    monkeypatch.setattr(bench.pipeline, "data_on_device", lambda setting, ds: True)  # as on a GPU
    monkeypatch.setattr(bench.pipeline, "device_batches", counted)
    result = bench.bench(["resnet8"], batch=8, image_size=8, steps=2, windows=2, echo=lambda _: 0)
    assert result["records"][0]["input_images_per_second"] > 0
    assert copies == [(0, 2**31 - 1)]  # the training set goes to the devices once, as in a run
    assert len(taken) == 2 + 2 * 2  # the warm-up's steps, then each window's


def test_rates_and_torch_ratio_from_known_window_times(monkeypatch):
    twins = type("Twins", (), {"TWINS": {"resnet8": {}}})
    monkeypatch.setattr(bench, "load_twins", lambda: twins)
    monkeypatch.setattr(bench, "torch_process", lambda *args: contextlib.nullcontext((0, 0)))
    # CI has no PyTorch: the record only needs its version string from the parent process.
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="9.9.9"))
    seconds = dict(  # per window; the host slowed in window 2
        jax_train=[1.0, 2.0, 1.0], jax_eval=[0.5, 0.5, 0.5], input=[0.25, 0.5, 0.25],
        torch_train=[1.5, 2.0, 0.9], torch_eval=[1.0, 1.0, 1.0],
    )  # fmt: skip

    def windows_of(runners, windows):
        assert set(runners) == set(seconds) and windows == 3
        return seconds

    monkeypatch.setattr(bench, "windows_of", windows_of)
    monkeypatch.setattr(bench, "measured_peak", lambda dtype: 1e9)
    result = bench.bench(["resnet8"], batch=8, image_size=8, steps=2, windows=3, compare="torch",
                         echo=lambda _: 0)  # fmt: skip
    (record,) = result["records"]
    assert result["machine"]["torch"] == "9.9.9"
    # 2 steps of 8 images in the median window: 1 s to train, 0.5 s to evaluate, 0.25 s to load.
    assert record["jax_train_images_per_second"] == 16.0
    assert record["jax_eval_images_per_second"] == 32.0
    assert record["input_images_per_second"] == 64.0 and record["input_over_train"] == 4.0
    # Two training steps a second, against the 1 GFLOP/s peak.
    assert record["achieved_flops"] == pytest.approx(2 * record["flops_per_step"])
    assert record["utilisation"] == pytest.approx(2 * record["flops_per_step"] / 1e9)
    assert record["jax_over_torch"] == 1.0  # the median of 1.5, 1.0, 0.9
    assert record["jax_over_torch_range"] == [0.9, 1.5]
    assert "| 1.00 | 0.90-1.50 |" in bench.table([record])[-1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch", "0"], "--batch must be positive, got 0"),
        (["--stream", "digits"], "streaming reads folder:DIR or tfds:NAME sources, not 'digits'"),
        (["--models", "resnet20", "nosuchnet"], "unknown model 'nosuchnet'"),
    ],
)
def test_bad_bench_input_is_one_line(args, message, capsys):
    assert message in one_line_exit_2(["bench", "--steps", "1", "--windows", "1", *args], capsys)
