"""Helpers for ml_collections config files (`configs/*.py` with `get_config(arg)`)."""

import ast
import importlib.util
from pathlib import Path

from scaling import ScalingError


def parse_value(text: str):
    """'3' -> 3, '0.1' -> 0.1, 'True' -> True, '(1, 2)' -> (1, 2), anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parse a config argument 'key=value,key=value' over typed defaults (big_vision style).

    Values take the type of their default (so 'seed=3' is an int); unknown keys are an error.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ScalingError(
                f"config argument {item!r}: expected key=value, keys: {', '.join(defaults)}"
            )
        default, value = defaults[key], parse_value(text)
        if isinstance(default, str):
            value = text
        elif isinstance(default, float) and type(value) is int:
            value = float(value)
        elif default is not None and type(value) is not type(default):
            raise ScalingError(f"config argument {key}={text}: expected {type(default).__name__}")
        out[key] = value
    return out


def parse_settings(items: list[str]) -> dict:
    """`--set key=value` pairs into a dict of Python values."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ScalingError(f"--set {item!r}: expected key=value")
        out[key] = parse_value(text)
    return out


def load_config(spec: str):
    """The ConfigDict of 'path/to/config.py[:arg]', as `--config` would give it."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ScalingError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
