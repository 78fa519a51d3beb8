"""The wheel, as a user gets it: built from the package's files alone, installed non-editable
into a fresh virtualenv, and run from a directory outside the repository, so that nothing can
lean on the checkout (package data, configs/, files found by path)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A user's own training config, as docs/training.md shows: the fields come from the package.
USER_CONFIG = """
from scaling.config import training_config


def get_config(arg=None):
    return training_config(arg)
"""


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args[1:3]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_the_installed_wheel_works_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # the wheel's inputs only: no build files land in the checkout
    shutil.copytree(
        ROOT / "scaling", source / "scaling", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    python = sys.executable
    run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(source)], tmp_path, os.environ)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("scaling-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("scaling/")}
    tree = {p.relative_to(source).as_posix() for p in (source / "scaling").rglob("*.*")}
    assert packaged == tree  # every file the package reads at run time (onednn_conv.cc), no more

    # A fresh virtualenv holding the wheel alone; the dependencies (not under test, and slow to
    # download) come from this environment's site-packages, listed after the venv's own.
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    fresh_python = str(fresh / "bin" / "python")
    purelib = run([fresh_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                  tmp_path, os.environ).strip()  # fmt: skip
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([python, "-m", "pip", "--python", fresh_python, "install", "-q", "--no-deps",
         str(wheel)], tmp_path, os.environ)  # fmt: skip

    user = tmp_path / "user"  # outside the repository
    user.mkdir()
    (user / "my_train.py").write_text(USER_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    scaling = str(fresh / "bin" / "scaling")
    where = run([fresh_python, "-c", "import scaling; print(scaling.__file__)"], user, env)
    assert Path(where.strip()).is_relative_to(purelib)  # the wheel's copy, not the checkout's
    assert '"params": 77850' in run([scaling, "info", "wrn10_1"], user, env)
    assert "wrn16_4" in run([scaling, "models", "wrn16*"], user, env)
    out = run([scaling, "train", "--config", "my_train.py:model=resnet8,image_size=8,"
               "steps=4,batch_size=32", "--workdir", "runs/a"], user, env)  # fmt: skip
    assert "test accuracy" in out
    assert "report:" in run([scaling, "report", "runs"], user, env)
    assert (user / "runs" / "report" / "REPORT.md").is_file()
    assert "--compare" in run([scaling, "bench", "--help"], user, env)
