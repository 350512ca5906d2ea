"""Build a registry model from a weights file for inference (export, online mode), loading only data.

Two kinds of file are accepted:

- a gcvideo training checkpoint (`train.py` writes `last.pt` / `best.pt`): a dict with 'model' (the
  state_dict) and 'config' (the run's config as plain dicts), whose config['model'] (name, num_classes,
  shift_div, shift_place, cdiv, gc_loop) and config['data']['num_segments'] say which model to build;
- a plain state_dict (e.g. the output of `python -m models.convert`), optionally under 'state_dict' and with
  DDP's 'module.' prefix; the model name must then be given, the number of classes is read from fc.weight.

Files are read with torch.load(weights_only=True): nothing in them is executed (gcvideo's training checkpoints
hold tensors and plain data only).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from . import build_model, list_models
from .video import VideoNet

# config['model'] keys that change the built model (dropout and partial_bn do not matter in eval mode).
_MODEL_OPTIONS = ("shift_div", "shift_place", "cdiv", "gc_loop", "ratio")


class CheckpointError(ValueError):
    """A weights file that cannot give a model; the message (one line) says why."""


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) of `path` as a dict; FileNotFoundError / CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with warnings.catch_warnings():
            # A plain pickle gets a warning about its protocol before the error that says what is wrong.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(
            f"{path} is not a weights file that loads with torch.load(weights_only=True): {_reason(err)}"
        ) from err
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a checkpoint or a state_dict")
    return content


def _reason(err: Exception) -> str:
    """The informative line of a torch.load error (the weights-only unpickler's is one of ~6 lines)."""
    text = str(err)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    reason = lines[0] if lines else type(err).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def load_model(
    path: str | Path,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    num_segments: int | None = None,
) -> tuple[VideoNet, str]:
    """(model in eval mode with the file's weights, its registry name). Arguments given override the
    checkpoint's config; for a plain state_dict `name` is required and num_segments defaults to 8."""
    content = read_weights_file(path)
    if "model" in content and "config" in content:
        config = content["config"]
        state = content["model"]
        model_config = config.get("model", {})
        name = name or model_config.get("name")
        num_classes = num_classes or model_config.get("num_classes") or None
        num_segments = num_segments or config.get("data", {}).get("num_segments")
        options = {k: model_config[k] for k in _MODEL_OPTIONS if k in model_config}
    else:
        state = content.get("state_dict", content)
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{path} is neither a gcvideo checkpoint ('model' + 'config') nor a state_dict of tensors"
            )
        if name is None:
            raise CheckpointError(f"{path} is a plain state_dict: say which model it is with --model NAME")
        options = {}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if name not in list_models():
        raise CheckpointError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    if num_classes is None:
        if "fc.weight" not in state:
            raise CheckpointError(f"{path} has no fc.weight to read the number of classes from")
        num_classes = state["fc.weight"].shape[0]
    model = build_model(name, num_classes, num_segments or 8, **options)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path} does not fit {name} with {num_classes} classes: {problems}")
    model.load_state_dict(state)
    return model.eval(), name


def _mismatches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """One line naming missing, unexpected and wrongly shaped keys (load_state_dict's message is many)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {tuple(given[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = [
        f"{label} {len(keys)} (first: {', '.join(keys[:3])})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    return "; ".join(parts)
