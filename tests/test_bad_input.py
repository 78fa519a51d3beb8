"""Every bad input: one line on stderr, exit status 2, before any work or write (issue 23)."""

# ruff: noqa: E501 (tables read best one case a line)

import math
import tempfile
from pathlib import Path

import pytest
from conftest import TRAIN_CONFIG, one_line_exit_2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TINY = f"{TRAIN_CONFIG}:model=resnet8,image_size=8,steps=3,batch_size=32"
STUDY = """
import ml_collections
from scaling import sweep
from scaling.config import load_config
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.base = load_config('{spec}')
    c.trials = {trials}
    return c
"""


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def place(tmp_path):
    """A directory of inputs (config files, a file, a one-class dataset, a damaged run)."""
    (tmp_path / "a_file").write_text("not a directory")
    configs = {
        "syntax.py": "def get_config(arg=None):\n    return (\n",
        "raises.py": "def get_config(arg=None):\n    return 1 / 0\n",
        "wrong_type.py": "def get_config(arg=None):\n    return {'lr': 0.1}\n",
        "no_function.py": "x = 1\n",
        "empty_study.py": STUDY.format(spec=TINY, trials="[]"),
        "study.py": STUDY.format(spec=TINY, trials="sweep.axis('seed', [0])"),
        "bad_trial.py": STUDY.format(spec=TINY, trials="sweep.axis('lr', [0.1, -1.0])"),
    }
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "one_class" / "train" / "cat").mkdir(parents=True)
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8), (i, i, i)).save(
            tmp_path / "one_class" / "train" / "cat" / f"{i}.png"
        )
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text('{"model": {"na')
    return tmp_path


TRAIN = ["train", "--config", TINY]
CASES = {
    "missing config file": (["train", "--config", "nope.py"], "config file nope.py does not exist"),
    "syntax error": (["train", "--config", "{p}/syntax.py"], "fails to load: SyntaxError"),
    "get_config raises": (["train", "--config", "{p}/raises.py"], "get_config failed: ZeroDivisionError"),
    "get_config wrong type": (["train", "--config", "{p}/wrong_type.py"], "returned a dict, not a ConfigDict"),
    "no get_config": (["train", "--config", "{p}/no_function.py"], "defines no get_config"),
    "study given to train": (["train", "--config", "{p}/empty_study.py"], "not a training config"),
    "workdir a file": ([*TRAIN, "--workdir", "{p}/a_file"], "exists and is not a directory"),
    "workdir under a file": ([*TRAIN, "--workdir", "{p}/a_file/run"], "is not a directory"),
    "workdir empty": ([*TRAIN, "--workdir", ""], "--workdir is empty"),
    "damaged config.json": (["train", "--workdir", "{p}/damaged"], "config.json is unreadable"),
    "batch_size=0": ([*TRAIN, "--config.batch_size=0"], "config.batch_size=0 is invalid: expected an integer >= 1"),
    "batch_size=-32": ([*TRAIN, "--config.batch_size=-32"], "config.batch_size=-32 is invalid"),
    "log_every=0": ([*TRAIN, "--config.log_every=0"], "config.log_every=0 is invalid"),
    "checkpoint_every=0": ([*TRAIN, "--config.checkpoint_every=0"], "config.checkpoint_every=0"),
    "eval_batch_size=0": ([*TRAIN, "--config.eval_batch_size=0"], "config.eval_batch_size=0"),
    "keep_checkpoints=0": ([*TRAIN, "--config.keep_checkpoints=0"], "config.keep_checkpoints=0"),
    "boundaries=abc": ([*TRAIN, "--config.schedule.boundaries=abc"], "boundaries"),
    "lr=-0.1": ([*TRAIN, "--config.lr=-0.1"], "config.lr=-0.1 is invalid: expected a number > 0"),
    "grad_clip_norm=-1": ([*TRAIN, "--config.grad_clip_norm=-1"], "config.grad_clip_norm=-1.0"),
    "weight_decay=-1": ([*TRAIN, "--config.weight_decay=-1"], "config.weight_decay=-1.0"),
    "label_smoothing=2": ([*TRAIN, "--config.label_smoothing=2"], "expected a number in [0, 1)"),
    "warmup_steps=-5": ([*TRAIN, "--config.schedule.warmup_steps=-5"], "warmup_steps=-5"),
    "unknown optimizer": ([*TRAIN, "--config.optimizer.name=adamax"], "unknown optimizer 'adamax'"),
    "stop-after -1": ([*TRAIN, "--stop-after", "-1"], "--stop-after must be >= 1"),
    "one-class dataset": ([*TRAIN, "--config.dataset=folder:{p}/one_class"], "only one class"),
    "study with no trials": (["sweep", "--config", "{p}/empty_study.py"], "the study has no trials"),
    "a bad trial": (["sweep", "--config", "{p}/bad_trial.py"], "trial lr=-1: config.lr=-1.0"),
    "sweep --parallel 0": (["sweep", "--config", "{p}/bad_trial.py", "--parallel", "0"], "--parallel"),
    "sweep workdir a file": (["sweep", "--config", "{p}/study.py", "--workdir", "{p}/a_file"], "exists and is not a directory"),
    "bench --out a file": (["bench", "--models", "resnet8", "--out", "{p}/a_file"], "not a directory"),
    "phi=-100": (["info", "efficientnet", "--set", "phi=-100"], "phi must be"),
    "accelerator v4-7": (["launch", "tpu", "--config", "{p}/bad_trial.py", "--name", "n", "--zone",
                          "us-central2-b", "--accelerator", "v4-7", "--bucket", "gs://bkt"], "v4-7"),
    "report of nothing": (["report", "{p}/no_such_sweep"], "no such results directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, place, capsys, monkeypatch):
    argv, message = CASES[case]
    argv = [a.replace("{p}", str(place)) for a in argv]
    if argv[0] in ("train", "sweep") and "--workdir" not in argv:
        argv += ["--workdir", str(place / "new")]
    monkeypatch.chdir(place)
    before = files(place)
    line = one_line_exit_2(argv, capsys)
    assert message in line, line
    assert files(place) == before and not (place / "new").exists()


def test_cache_directory_a_file(place, capsys, monkeypatch):
    import jax

    monkeypatch.setenv("SCALING_CACHE_DIR", str(place / "a_file"))
    cache = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # so `scaling info` sets its own
    try:
        line = one_line_exit_2(["info", "resnet20"], capsys)
    finally:
        jax.config.update("jax_compilation_cache_dir", cache)
    assert "cache directory" in line and "not a directory" in line


# ---- Fuzz: any invalid setting, with any other command-line arguments ----
def numbers(min_value=None, max_value=None):
    whole = dict(
        min_value=None if min_value is None else math.ceil(min_value),
        max_value=None if max_value is None else math.floor(max_value),
    )
    bounds = dict(min_value=min_value, max_value=max_value)
    return st.one_of(st.integers(**whole), st.floats(**bounds, allow_nan=False))


TEXT = st.characters(codec="utf-8", exclude_categories=("Cs",))
INVALID = {
    "batch_size": st.integers(max_value=0),
    "eval_batch_size": st.integers(max_value=0),
    "log_every": st.integers(max_value=0),
    "checkpoint_every": st.integers(max_value=0),
    "keep_checkpoints": st.integers(max_value=0),
    "eval_every": st.integers(max_value=-1),
    "image_size": st.integers(max_value=0),
    "seed": st.integers(max_value=-1),
    "lr": st.one_of(numbers(max_value=0), st.sampled_from([math.nan, math.inf])),
    "weight_decay": st.one_of(numbers(max_value=-1e-9), st.just(math.nan)),
    "label_smoothing": st.one_of(numbers(min_value=1), numbers(max_value=-1e-9)),
    "data_fraction": st.one_of(numbers(min_value=1.001), numbers(max_value=0)),
    "holdout_fraction": st.one_of(numbers(min_value=1), numbers(max_value=0)),
    "grad_clip_norm": numbers(max_value=0),
    "schedule.warmup_steps": st.integers(max_value=-1),
    "schedule.decay_factor": numbers(max_value=0),
    "optimizer.name": st.text("abcdefghijklmnopqrstuvwxyz_", max_size=12).filter(
        lambda s: s not in ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "lamb")
    ),
    "augment": st.text(TEXT, max_size=12).filter(
        lambda s: s not in ("none", "crop", "flip", "crop_flip")
    ),
    "compute_dtype": st.text(TEXT, max_size=12).filter(lambda s: s not in ("float32", "bfloat16")),
}
OTHER_ARGS = st.lists(
    st.sampled_from([["--overwrite"], ["--stop-after", "2"], ["--stop-after", "0"],
                     ["--config.lr=0.5"], ["--config.num_steps=2"], ["--config.seed=3"]]),
    max_size=3,
)  # fmt: skip


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), key=st.sampled_from(sorted(INVALID)), others=OTHER_ARGS)
def test_fuzz_invalid_settings_fail_in_one_line_before_any_write(data, key, others, capsys):
    value = data.draw(INVALID[key])
    with tempfile.TemporaryDirectory() as place:
        place = Path(place)
        (place / "keep.txt").write_text("a user's file")
        workdir = place / "run"
        argv = ["train", "--config", TINY, *[a for arg in others for a in arg],
                f"--config.{key}={value}", "--workdir", str(workdir)]  # fmt: skip
        one_line_exit_2(argv, capsys)
        assert files(place) == {"keep.txt": b"a user's file"} and not workdir.exists()
