"""Shard files: a tar of (<key>.mp4, <key>.json, <key>.meta) samples plus its DALI index, both renamed into
place only when complete, so a file with its final name is always whole."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from pathlib import Path
from typing import Any

from preprocess.jobs import Sample

TMP_SUFFIX = ".tmp"
DALI_INDEX_VERSION = "v1.2"  # what DALI's wds2idx writes and fn.readers.webdataset reads


def shard_stem(name: str, split: str, number: int) -> str:
    return f"{name}-{split}-{number:06d}"


def meta_bytes(label: int, num_frames: int) -> bytes:
    return struct.pack("<2i", label, num_frames)


def sample_members(sample: Sample, video_ext: str) -> list[tuple[str, bytes]]:
    info = json.dumps(sample.info, sort_keys=True, ensure_ascii=False).encode()
    return [
        (f"{sample.key}.{video_ext}", sample.video),
        (f"{sample.key}.json", info),
        (f"{sample.key}.meta", meta_bytes(sample.info["label"], sample.info["num_frames"])),
    ]


class ShardWriter:
    """Writes one shard. Members get fixed owner, mode and mtime so identical samples give identical bytes."""

    def __init__(self, directory: Path, stem: str, video_ext: str = "mp4") -> None:
        self.tar_path = directory / f"{stem}.tar"
        self.idx_path = directory / f"{stem}.idx"
        self.video_ext = video_ext
        self._tmp_tar = Path(str(self.tar_path) + TMP_SUFFIX)
        self._tar = tarfile.open(self._tmp_tar, "w", format=tarfile.GNU_FORMAT)
        self._index_lines: list[str] = []
        self.num_samples = 0

    def add(self, sample: Sample) -> None:
        components = []
        for name, data in sample_members(sample, self.video_ext):
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(data), 0o644, 0
            self._tar.addfile(member, io.BytesIO(data))
            # The data ends where the (block-padded) archive now ends, whatever the header took.
            offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            ext = name.split(".", 1)[1]
            components.append(f"{ext} {offset} {member.size} {name}")
        self._index_lines.append(" ".join(components))
        self.num_samples += 1

    def close(self) -> None:
        """Finish both files and move them into place, index first: the tar's final name means 'complete'."""
        self._tar.close()
        tmp_idx = Path(str(self.idx_path) + TMP_SUFFIX)
        tmp_idx.write_text(
            f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n"
            + "".join(line + "\n" for line in self._index_lines)
        )
        for tmp in (tmp_idx, self._tmp_tar):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp_idx, self.idx_path)
        os.replace(self._tmp_tar, self.tar_path)

    def abort(self) -> None:
        self._tar.close()
        self._tmp_tar.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = Path(str(path) + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
