"""Checkpoints: the model a config describes, and files that are written atomically and loaded without
running code.

A gcvideo checkpoint is a dict of tensors and plain data only (model, optimizer, scheduler, scaler, train
state, classes, RNG states, resolved config), so `torch.load(..., weights_only=True)` reads it: a file whose
pickle carries anything else is refused instead of executed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import config as C
import models

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, unsafe, for another model); says what to do."""


def build_model(cfg: C.Config, num_classes: int) -> models.VideoNet:
    """The plain model `cfg.model` describes, for `num_classes` classes and cfg.data.num_segments frames."""
    return models.build_model(cfg.model.name, num_classes, cfg.data.num_segments, **cfg.model.build_kwargs())


# ------------------------------------------------------------------------------------------------ reading


def load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True and a message for every way the file can be unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): it was not written completely")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{what} {path} refused: besides tensors and plain data its pickle holds Python objects, and "
            f"loading them could run code from the file ({reason}). Checkpoints written by this gcvideo "
            f"load safely; for an older or foreign file you trust, re-save just its tensors with "
            f"torch.save, or convert a released model with `python -m models.convert`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{what} {path} cannot be read ({str(e).strip().splitlines()[0][:200]}): it is truncated or "
            f"not a torch checkpoint"
        ) from None


def model_state(ckpt: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """A gcvideo checkpoint's weights, or a plain / {'state_dict': ...} file, without DDP's 'module.'."""
    state = ckpt.get("model") or ckpt.get("state_dict") or ckpt if isinstance(ckpt, dict) else None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise CheckpointError(f"{path} holds no model weights (a dict of tensors, or one under 'model')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_for_finetuning(model: torch.nn.Module, path: str) -> list[str]:
    """Load every weight of `path` but the classifier (the model has a new one); return the new classifier
    keys."""
    source = model_state(load(path, "--tune-from checkpoint"), path)
    target = model.state_dict()
    classifier = set(model.classifier_names())
    keep = {
        k: v for k, v in source.items() if k in target and k not in classifier and v.shape == target[k].shape
    }
    missing = sorted(set(target) - set(keep) - classifier)
    if missing:
        raise CheckpointError(
            f"--tune-from {path}: {len(missing)} weights of {type(model).__name__} are not in it "
            f"(first: {missing[:3]}); was it trained with the same --model.name?"
        )
    model.load_state_dict(keep, strict=False)
    return sorted(classifier)


def checkpoint_model(
    path: str | Path, device: torch.device, plain: C.Config | None = None
) -> tuple[models.VideoNet, C.Config, list[str]]:
    """The model of a checkpoint in eval mode, with the config and class names it was trained with.

    A gcvideo checkpoint carries its config; a plain state_dict (e.g. from `python -m models.convert`) is
    built as `plain` describes (--model.name, --data.num_segments ...), its class count read off its
    classifier; without `plain` it is refused with a message saying so.
    """
    ckpt = load(path)
    if isinstance(ckpt, dict) and "config" in ckpt:
        cfg, classes = C.from_dict(ckpt["config"]), list(ckpt.get("classes") or [])
    elif plain is not None:
        cfg, classes = plain, []
        fc = model_state(ckpt, path).get("fc.weight")
        cfg.model.num_classes = int(fc.shape[0]) if fc is not None else cfg.model.num_classes
    else:
        raise CheckpointError(
            f"{path} is not a gcvideo checkpoint (no config inside): for a converted or plain state_dict "
            f"name the model it holds, e.g. --model.name gc_tsm_r50 --data.num_segments 8, and the data "
            f"(--data.index, or --classes FILE for predict)"
        )
    model = build_model(cfg, cfg.model.num_classes)
    try:
        model.load_state_dict(model_state(ckpt, path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:3]
        raise CheckpointError(
            f"{path} does not fit --model.name {cfg.model.name} with {cfg.model.num_classes} classes: "
            f"{' '.join(line.strip() for line in first)[:300]}"
        ) from None
    return model.to(device).eval(), cfg, classes


# ------------------------------------------------------------------------------------------------ writing


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file beside `path` and rename it: a reader never sees half a checkpoint. torch
    writes through a Python file object, so a failed write raises the OSError (and errno) of the system call;
    torch.save(obj, filename) reports the same failure as a RuntimeError 'unexpected pos' without one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _write_failure_message(path, tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    with _write_failure_message(dst, tmp):
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


# Below this much free space, a write that failed without an errno (a RuntimeError from torch's writer) is
# taken for a full disk: a checkpoint of the smallest model needs more.
FULL_DISK_BYTES = 1 << 20
NO_SPACE = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on"}


def _errno_of(error: BaseException) -> int | None:
    """The errno of `error` or of an OSError it was raised from (torch wraps its writer's failures)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


@contextlib.contextmanager
def _write_failure_message(path: Path, tmp: Path):
    """A failed write ends the run with one line, the half-written temporary removed and the old file kept:
    a full disk or quota (by errno, or by the free space left when torch gives no errno), any other OSError
    with its reason."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        code = _errno_of(e)
        full = code in NO_SPACE or (code is None and 0 <= _free_bytes(path.parent) < FULL_DISK_BYTES)
        tmp.unlink(missing_ok=True)
        if not full and not isinstance(e, OSError):
            raise
        if full:
            raise CheckpointError(
                f"{NO_SPACE.get(code, 'no space left on')} {path.parent}: {path.name} was not written (the "
                f"previous one, if any, is intact); free some space, then continue with --resume"
            ) from None
        raise CheckpointError(
            f"cannot write {path} ({e.strerror or e}): the previous one, if any, is intact; make the folder "
            f"writable, then continue with --resume"
        ) from None


# ----------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain data (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "gauss": [has_gauss, gauss],
        },
        "python": [version, list(internal), gauss_next],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state(); GPUs beyond those saved (or saved beyond those present) are named, not fatal."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], int(numpy["gauss"][0]), float(numpy["gauss"][1])))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved = list(state.get("cuda") or [])
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(min(len(saved), present)):
        torch.cuda.set_rng_state(saved[i], i)
    if len(saved) != present:
        log.warning(
            "the checkpoint holds RNG states of %d GPU(s) and this machine has %d: restored %d; the others "
            "start from their seeds, so random draws on them differ from an uninterrupted run",
            len(saved),
            present,
            min(len(saved), present),
        )
