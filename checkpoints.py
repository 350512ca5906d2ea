"""Checkpoints, the one module that reads and writes weight files: the model a config, a checkpoint or a
plain state_dict describes (train, evaluate, predict, models.export and models.online all load through
`load_model`), files written atomically, and the one `torch.load` of the project, with weights_only=True.

A gcvideo checkpoint is a dict of tensors and plain data only (model, optimizer, scheduler, scaler, train
state, classes, RNG states, resolved config), so `torch.load(..., weights_only=True)` reads it: a file whose
pickle carries anything else is refused instead of executed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import config
import models

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A weights file that cannot be used (missing, truncated, unsafe, for another model); says what to do."""


# What a plain state_dict (no config inside, e.g. from `python -m models.convert`) is run at when the user
# gives no geometry: the Kinetics val geometry the released models were tested with (centre crop 224 of
# frames of short side 256), and ~10 s training clips (Kinetics) for a stream's default window.
PLAIN_SHORT_SIDE = 256
PLAIN_CLIP_SECONDS = 10.0


def build_model(cfg: config.Config, num_classes: int, *, pretrained: bool = True) -> models.VideoNet:
    """The plain model `cfg.model` describes, for `num_classes` classes and cfg.data.num_segments frames;
    pretrained=False skips --model.pretrained (inference: the checkpoint's weights replace them anyway)."""
    kwargs = cfg.model.build_kwargs()
    if not pretrained:
        kwargs["pretrained"] = None
    return models.build_model(cfg.model.name, num_classes, cfg.data.num_segments, **kwargs)


# ------------------------------------------------------------------------------------------------ reading


def load(path: str | Path, what: str = "checkpoint") -> Any:
    """The one torch.load of the project: weights_only=True (a pickle that holds anything but tensors and
    plain data is refused, not run) and a one-line CheckpointError for every way the file can be unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} {'is a directory' if path.is_dir() else 'not found'}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): it was not written completely")
    try:
        with warnings.catch_warnings():
            # a plain pickle gets a warning about its protocol before the error that says what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" not in text.upper() and "class" not in text:  # no object refused: not a weights pickle
            raise CheckpointError(
                f"{what} {path} is not a weights file that loads with torch.load(weights_only=True): "
                f"{_reason(e)}"
            ) from None
        raise CheckpointError(
            f"{what} {path} refused: besides tensors and plain data its pickle holds Python objects, and "
            f"loading them could run code from the file ({_reason(e)}). Checkpoints written by this gcvideo "
            f"load safely; for an older or foreign file you trust, re-save just its tensors with "
            f"torch.save, or convert a released model with `python -m models.convert`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{what} {path} cannot be read ({_reason(e)}): it is truncated or not a torch checkpoint"
        ) from None


def _reason(err: Exception) -> str:
    """The informative line of a torch.load error (the weights-only unpickler's is one of ~6 lines)."""
    text = str(err)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]  # the object refused, when one was
    reason = (named or lines or [type(err).__name__])[0]
    return reason if len(reason) <= 200 else reason[:197] + "..."


def model_state(ckpt: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """A gcvideo checkpoint's weights, or a plain / {'state_dict': ...} file, without DDP's 'module.'."""
    state = ckpt.get("model") or ckpt.get("state_dict") or ckpt if isinstance(ckpt, dict) else None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise CheckpointError(
            f"{path} is neither a gcvideo checkpoint ('model' + 'config') nor a state_dict of tensors: it "
            f"holds no model weights"
        )
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


@dataclass
class Loaded:
    """A checkpoint's model in eval mode and what inference needs to render its input as in training."""

    model: models.VideoNet
    cfg: config.Config  # the run's config (a plain state_dict: the named model at the plain geometry)
    classes: list[str]  # [] when the file holds none
    plain: bool  # a plain state_dict: no config, no dataset facts inside
    facts: dict[str, Any]  # inference_facts() saved by training ({} for a plain state_dict or an old file)


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    name: str | None = None,
    num_segments: int | None = None,
    num_classes: int | None = None,
    plain: config.Config | None = None,
    hint: str = "--model NAME",
) -> Loaded:
    """The model a file describes, in eval mode: a gcvideo checkpoint builds what its config says (name,
    num_segments, num_classes override it); a plain state_dict (e.g. `python -m models.convert`'s output)
    needs the model named (`name`, or a whole `plain` config), T defaulting to 8 and the class count read
    off its classifier. `hint`: how the calling command names a model (said when a plain file has none)."""
    ckpt = load(path)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:
        cfg, classes, facts = (
            config.from_dict(ckpt["config"]),
            list(ckpt.get("classes") or []),
            ckpt.get("facts"),
        )
        cfg.model.name = name or cfg.model.name
        cfg.data.num_segments = num_segments or cfg.data.num_segments
        is_plain = False
    elif plain is not None or name:
        cfg, classes, facts, is_plain = plain or plain_config(name, num_segments or 8), [], None, True
    else:
        raise CheckpointError(
            f"{path} is a plain state_dict (no config inside): name the model it holds, e.g. {hint}"
        )
    state = model_state(ckpt, path)
    if is_plain or not cfg.model.num_classes:
        fc = state.get("fc.weight")
        cfg.model.num_classes = int(fc.shape[0]) if fc is not None else cfg.model.num_classes
    cfg.model.num_classes = num_classes or cfg.model.num_classes
    if cfg.model.name not in models.list_models():
        raise config.ConfigError(
            f"unknown model {cfg.model.name!r}; known: {', '.join(models.list_models())}"
        )
    if not cfg.model.num_classes:
        raise CheckpointError(f"{path} has no fc.weight to read the number of classes from")
    model = build_model(cfg, cfg.model.num_classes, pretrained=False)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{path} does not fit model {cfg.model.name} with {cfg.model.num_classes} classes: {problems}; "
            f"is that the model it was trained or converted as?"
        )
    model.load_state_dict(state)
    return Loaded(model.to(device).eval(), cfg, classes, is_plain, dict(facts or {}))


def plain_config(name: str, num_segments: int) -> config.Config:
    """The config of a plain state_dict: the named model at the plain geometry (crop 224 of short side
    256), inference settings only (no ImageNet weights to fetch, no compile)."""
    cfg = config.Config()
    cfg.model.name, cfg.model.pretrained, cfg.model.compile = name, "", False
    cfg.data.num_segments, cfg.data.scale_size, cfg.data.crop_size = num_segments, PLAIN_SHORT_SIDE, 224
    # frames per segment follow from the model; an unknown name is reported where the model is built
    return config.resolve(cfg)


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


def checkpoint_model(
    path: str | Path, device: torch.device, plain: config.Config | None = None
) -> tuple[models.VideoNet, config.Config, list[str]]:
    """(model, config, classes) of a checkpoint for `evaluate`: a plain state_dict is built as `plain`
    describes (--model.name, --data.num_segments ...); without `plain` it is refused, saying so."""
    loaded = load_model(path, device, plain=plain, hint="--model.name gc_tsm_r50 --data.num_segments 8")
    return loaded.model, loaded.cfg, loaded.classes


def inference_facts(index: str | Path, dataset: Any) -> dict[str, Any]:
    """What inference needs to know of the training data, saved in every checkpoint so that `predict`
    renders a video as the shards held it without the dataset at hand: the shards' frame size (index
    settings short_side / size; None when the index has none) and the median length in frames of (up to
    16) training videos."""
    try:
        settings = json.loads(Path(index).read_text())["settings"]
        shards = {"short_side": settings.get("short_side"), "size": settings.get("size")}
    except (OSError, ValueError, KeyError, TypeError):
        shards = None
    n = len(dataset) if dataset is not None else 0  # a loader without a dataset (tests' stand-ins)
    picks = sorted({round(i * (n - 1) / 15) for i in range(16)}) if n else []
    frames = []
    for i in picks:
        try:
            frames.append(dataset[i].num_frames)
        except (OSError, ValueError, KeyError):
            continue
    return {"shards": shards, "clip_frames": int(np.median(frames)) if frames else None}


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
