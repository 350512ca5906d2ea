"""Shard files: a tar of (<key>.mp4, <key>.json, <key>.meta) samples plus its DALI index, both renamed into
place only when complete, so a file with its final name is always whole."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preprocess.jobs import RunError, Sample

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
    """Writes one shard. Members get fixed owner, mode and mtime so identical samples give identical bytes.

    finish() completes both files under their temporary names and returns their sizes (the runner records
    them before commit() renames the files into place); any OSError removes the temporary files and becomes
    a RunError naming the file, so a full disk is a one-line message and never a half-written shard.
    """

    def __init__(self, directory: Path, stem: str, video_ext: str = "mp4") -> None:
        self.tar_path = directory / f"{stem}.tar"
        self.idx_path = directory / f"{stem}.idx"
        self.video_ext = video_ext
        self.tmp_tar = Path(str(self.tar_path) + TMP_SUFFIX)
        self.tmp_idx = Path(str(self.idx_path) + TMP_SUFFIX)
        self._tar: tarfile.TarFile | None = None
        self._index_lines: list[str] = []
        self.num_samples = 0
        with self._cleanup_on_error(self.tmp_tar):
            self._tar = tarfile.open(self.tmp_tar, "w", format=tarfile.GNU_FORMAT)

    def add(self, sample: Sample) -> None:
        self.add_members(sample_members(sample, self.video_ext))

    def add_members(self, members: list[tuple[str, bytes]]) -> None:
        """One sample's members (new, or copied from an earlier tar of this shard when failed rows are
        retried: copying the bytes keeps the rebuilt shard identical to one written in a single run)."""
        assert self._tar is not None
        components = []
        with self._cleanup_on_error(self.tmp_tar):
            for name, data in members:
                member = tarfile.TarInfo(name)
                member.size, member.mode, member.mtime = len(data), 0o644, 0
                self._tar.addfile(member, io.BytesIO(data))
                # The data ends where the (block-padded) archive now ends, whatever the header took.
                offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                ext = name.split(".", 1)[1]
                components.append(f"{ext} {offset} {member.size} {name}")
        self._index_lines.append(" ".join(components))
        self.num_samples += 1

    def finish(self) -> dict[str, int]:
        """Complete both temporary files on disk; returns their sizes (restart checks the files by them)."""
        assert self._tar is not None
        with self._cleanup_on_error(self.tmp_tar):
            self._tar.close()
        with self._cleanup_on_error(self.tmp_idx):
            self.tmp_idx.write_text(
                f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n"
                + "".join(line + "\n" for line in self._index_lines)
            )
            for tmp in (self.tmp_idx, self.tmp_tar):
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        return {"tar_bytes": self.tmp_tar.stat().st_size, "idx_bytes": self.tmp_idx.stat().st_size}

    def commit(self) -> None:
        """Move both files into place, index first: the tar's final name means 'complete'."""
        os.replace(self.tmp_idx, self.idx_path)
        os.replace(self.tmp_tar, self.tar_path)

    def abort(self) -> None:
        if self._tar is not None:
            with contextlib.suppress(OSError):  # closing writes the end blocks: the disk may still be full
                self._tar.close()
        self.tmp_tar.unlink(missing_ok=True)
        self.tmp_idx.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _cleanup_on_error(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self.abort()
            raise RunError(write_error(err, path)) from err


def write_error(err: OSError, path: Path) -> str:
    """The one-line message for a failed write: a full disk says so and how to go on."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on" if err.errno == errno.ENOSPC else "disk quota exceeded on"
        return (
            f"{what} {path}: free some space (or use another --out on a bigger disk), then run the same "
            f"command again: the finished shards are kept"
        )
    return f"cannot write {path}: {err.strerror or err}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name unique to this process (parts of one job may write the same file, e.g.
    .records/plan.json, at once), then rename; a failed write leaves the previous file and no temporary."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunError(write_error(err, path)) from err


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


class KeptSamples:
    """The samples of a shard's earlier tar, read back by key when its failed rows are retried."""

    def __init__(self, tar_path: Path) -> None:
        self._tar = tarfile.open(tar_path)
        self._by_key: dict[str, list[tarfile.TarInfo]] = {}
        for member in self._tar.getmembers():
            self._by_key.setdefault(member.name.split(".", 1)[0], []).append(member)

    def members(self, key: str) -> list[tuple[str, bytes]]:
        return [(m.name, self._tar.extractfile(m).read()) for m in self._by_key[key]]  # type: ignore[union-attr]

    def close(self) -> None:
        self._tar.close()
