"""What flows through the pipeline: a Job (one input row) becomes exactly one Sample or one Failure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

FAILURE_TAIL_CHARS = 800  # how much of a tool's message a failure record keeps


class InputError(SystemExit):
    """A bad input file, option or output folder: the message names the thing and what to do (exit 2)."""


class RunError(Exception):
    """The run could not finish (every row failed, the disk is full, another run holds the folder): the
    message says why and what to do (exit 1)."""


@dataclass(frozen=True)
class Job:
    key: str  # sample key in the shard: unique within its split, no dots
    source: str  # path of the video or frame folder ("synthetic:..." for generated clips)
    label: int  # class index (-1: unlabelled)
    label_name: str | None
    split: str
    start: float | None = None  # trim window in seconds (Kinetics full videos)
    end: float | None = None
    kind: str = "video"  # video | frames | synthetic
    frame_rate: float | None = None  # frames: the rate the JPEG sequence was sampled at
    seed: int = 0  # synthetic: the clip's random seed
    num_frames: int | None = None  # synthetic: frames to render
    start_frame: int | None = None  # trim window in source frames, 0-based, end excluded (Diving48)
    end_frame: int | None = None


@dataclass(frozen=True)
class Sample:
    key: str
    video: bytes
    info: dict[str, Any]  # the sample's .json content
    source_seconds: float = 0.0  # seconds of source video consumed (for the realtime factor)
    warning: str = ""  # kept despite this (e.g. truncated, with --keep-truncated): noted in failures.jsonl


@dataclass(frozen=True)
class Failure:
    source: str
    reason: str
    detail: str = ""  # the tail of ffmpeg's (or the decoder's) message
    key: str = ""
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "key": self.key,
            "split": self.split,
            "reason": self.reason,
            "detail": tail(self.detail),
            **self.extra,
        }


def tail(text: str, chars: int = FAILURE_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(text: str) -> str:
    """A tar key from a path-like string: DALI and webdataset split names at the first dot, so no dots."""
    return _NOT_KEY.sub("_", text).strip("_") or "sample"


def unique_keys(keys: list[str]) -> list[str]:
    """Suffix repeats (`a`, `a_2`, ...): a video listed twice gives two distinct samples."""
    seen: dict[str, int] = {}
    out = []
    taken = set(keys)
    for key in keys:
        count = seen.get(key, 0) + 1
        seen[key] = count
        new = key
        while count > 1 and (new := f"{key}_{count}") in taken:
            count += 1
        if count > 1:
            seen[key] = count
            taken.add(new)
        out.append(new)
    return out
