"""The command line: `scaling info` JSON, `scaling train`, and one-line errors with exit 2."""

import json

import pytest
from conftest import TRAIN_CONFIG, one_line_exit_2, scaling_cli

from scaling import ScalingError
from scaling.config import load_config, parse_arg


def test_info_prints_one_json_object():
    out = scaling_cli("info", "wrn28_10", "--num-classes", "100")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["params"] == 36_536_884
    assert info["num_classes"] == 100 and info["image_size"] == 32
    assert info["flops"] > 0 and info["macs"] > 0 and info["activations"] > 0


def test_info_defaults_to_the_model_resolution_and_takes_settings():
    info = json.loads(scaling_cli("info", "resnet18").stdout)
    assert (info["image_size"], info["num_classes"], info["params"]) == (224, 1000, 11_689_512)
    small = json.loads(scaling_cli("info", "resnet18", "--set", "width_multiplier=0.5").stdout)
    assert small["params"] < info["params"] / 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["info", "resnet19"], "6n+2"),
        (["info", "lenet6"], "valid names: resnet"),
        (["info", "wrn22_0"], "k must be >= 1"),
        (["info", "resnet20", "--set", "width_multiplier=0"], "positive"),
        (["info", "resnet20", "--image-size", "0"], "image size must be positive"),
        (["train", "--config", TRAIN_CONFIG], "required: --workdir"),
        (
            ["train", "--config", TRAIN_CONFIG, "--config.no_such_key=1", "--workdir", "x"],
            "no_such_key",
        ),
        (["train", "--config", f"{TRAIN_CONFIG}:colour=red", "--workdir", "x"], "keys: model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert message in one_line_exit_2(args, capsys)


def test_bad_input_from_the_installed_command():
    out = scaling_cli("info", "resnet19")  # as a user's shell runs it: nothing else on stderr
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaling info: error: ") and "6n+2" in lines[0]


def test_train_command_runs_and_resumes(tmp_path):
    args = ["train", "--config", f"{TRAIN_CONFIG}:model=resnet8,image_size=8,steps=6,batch_size=32",
            "--config.log_every=3", "--workdir", str(tmp_path)]  # fmt: skip
    first = scaling_cli(*args, "--stop-after=3")
    assert first.returncode == 0, first.stderr
    assert "paused before the end" in first.stdout
    second = scaling_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "resumed from step 3" in second.stdout and "test accuracy" in second.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["config"]["log_every"] == 3


def test_config_argument_strings():
    config = load_config(f"{TRAIN_CONFIG}:model=wrn28_2,lr=1,steps=10,optimizer=adamw")
    assert config.model.name == "wrn28_2" and config.num_steps == 10
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.optimizer.to_dict() == {"name": "adamw"}
    assert parse_arg("a=3,b=x", a=1, b="y") == {"a": 3, "b": "x"}
    with pytest.raises(ScalingError, match="expected int"):
        parse_arg("a=x", a=1)
    with pytest.raises(ScalingError, match="does not exist"):
        load_config("configs/nope.py")
