"""Random access to the samples of a shard dataset (README: "The shard format and dataset index").

Every loader reads samples by byte offset, taken from the DALI index file (``.idx``, wds2idx format) beside
each tar, instead of streaming tars: random access is what lets an epoch's order be an exact function of
(seed, epoch), lets a resumed run start at any batch, and lets each rank read exactly its samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "gcvideo-shards/1"


class DatasetError(RuntimeError):
    """A dataset that cannot be used as it is (missing or malformed files, nothing left to train on); the
    message names the file and the fix."""


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass(frozen=True)
class SampleRef:
    key: str
    tar: str
    video: Member
    meta: Member
    info: Member


@dataclass(frozen=True)
class Sample:
    key: str
    video: np.ndarray  # encoded file, uint8
    label: int
    num_frames: int
    width: int
    height: int


def read_index(index: str | os.PathLike) -> dict:
    """index.json, checked: a missing, unreadable or foreign file is an error that says what to do."""
    path = Path(index)
    rebuild = "build the dataset with `python -m preprocess ...` or pass --data.index PATH/index.json"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise DatasetError(f"dataset index {path} {what}: {rebuild}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset index {path} cannot be read as JSON ({e}): {rebuild}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{path}: format {found!r} is not {FORMAT!r}; re-shard with this version")
    if not isinstance(meta.get("splits"), dict) or not isinstance(meta.get("classes"), list):
        raise DatasetError(f"{path} has no 'splits' object or no 'classes' list: {rebuild}")
    return meta


def read_codec(index: str | os.PathLike) -> str:
    return read_index(index).get("codec", "")


def parse_idx(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse a wds2idx file: one line per sample, repeated ``ext offset size name`` groups -> (key,
    members)."""
    lines = path.read_text().splitlines()
    version, count = lines[0].split()
    if not version.startswith("v1"):
        raise ValueError(f"{path}: unknown DALI index version {version!r}; rebuild it with wds2idx")
    samples = []
    for line in lines[1 : 1 + int(count)]:
        fields = line.split()
        members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        samples.append((fields[3].split(".", 1)[0], members))
    return samples


class ShardDataset:
    """The samples of one split of a dataset, addressable by position (0 .. len-1)."""

    def __init__(self, index: str | os.PathLike, split: str):
        self.index_path = Path(index)
        meta = read_index(index)
        if split not in meta["splits"]:
            raise DatasetError(
                f"{self.index_path} has no split {split!r} (has {sorted(meta['splits'])}): shard one with "
                f"`python -m preprocess ... --split {split}=LIST` or choose another split"
            )
        self.classes: list[str] = list(meta["classes"])
        self.codec: str = meta.get("codec", "")
        self.video_ext: str = meta.get("video_ext", "mp4")
        root = self.index_path.parent
        self.refs: list[SampleRef] = []
        for shard in meta["splits"][split]["shards"]:
            tar, idx = root / shard["tar"], root / shard["index"]
            for key, members in parse_idx(idx):
                missing = {self.video_ext, "meta", "json"} - members.keys()
                if missing:
                    raise ValueError(f"{idx}: a sample lacks members {sorted(missing)}")
                self.refs.append(
                    SampleRef(
                        key=key,
                        tar=str(tar),
                        video=Member(*members[self.video_ext]),
                        meta=Member(*members["meta"]),
                        info=Member(*members["json"]),
                    )
                )
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.refs)

    def _read(self, tar: str, member: Member) -> bytes:
        if self._pid != os.getpid():  # forked DataLoader worker: file descriptors are not to be shared
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(tar)
        if fd is None:
            fd = self._fds[tar] = os.open(tar, os.O_RDONLY)
        data = os.pread(fd, member.size, member.offset)
        if len(data) != member.size:
            raise OSError(f"{tar}: short read at offset {member.offset}; the shard is truncated, rebuild it")
        return data

    def __getitem__(self, i: int) -> Sample:
        ref = self.refs[i]
        info = json.loads(self._read(ref.tar, ref.info))
        label, num_frames = np.frombuffer(self._read(ref.tar, ref.meta), dtype="<i4")[:2]
        video = np.frombuffer(self._read(ref.tar, ref.video), dtype=np.uint8)
        return Sample(
            key=ref.key,
            video=video,
            label=int(label),
            num_frames=int(num_frames),
            width=int(info["width"]),
            height=int(info["height"]),
        )

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
