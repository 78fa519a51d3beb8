"""Reading checkpoint files: `.safetensors` and big_vision `.npz` without torch, PyTorch
pickles with it."""

from pathlib import Path

import numpy as np

from scaling import ScalingError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pt7")


def read(path) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint file by name: `.safetensors` and big_vision `.npz` without
    torch, PyTorch pickles (`.pth`, `.pt`, `.bin`, `.pt7`) with it."""
    path = Path(path)
    if not path.is_file():
        raise ScalingError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    valid = ".safetensors, .npz, " + "/".join(TORCH_SUFFIXES) + " (PyTorch)"
    if suffix not in (".safetensors", ".npz", *TORCH_SUFFIXES):
        raise ScalingError(f"{path}: unknown checkpoint format {suffix!r}; valid: {valid}")
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(path)
        with np.load(path, allow_pickle=False) as npz:  # big_vision: flat names joined by '/'
            return {name: npz[name] for name in npz.files}
    except Exception as e:  # each reader has its own errors for a damaged file
        raise ScalingError(f"{path}: unreadable {suffix} checkpoint ({_first_line(e)})") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict, or the one inside a training checkpoint's dict (under
    `state_dict`, `model` or, in the official WRN code's, `params`)."""
    try:
        import torch
    except ImportError:
        raise ScalingError(
            f"{path}: reading PyTorch checkpoints needs torch (pip install torch); or convert "
            "the file to .safetensors"
        ) from None
    try:  # weights_only: a checkpoint is data, never code to run
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ScalingError(f"{path}: unreadable PyTorch checkpoint ({_first_line(e)})") from None
    for key in ("state_dict", "model", "params"):  # torch/timm/WRN training checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ScalingError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            tensors[name] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return tensors


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
