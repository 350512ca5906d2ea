"""Random access to the samples of a shard dataset (README: "The shard format and dataset index").

Every loader reads samples by byte offset, taken from the DALI index file (``.idx``, wds2idx format) beside
each tar, instead of streaming tars: random access is what lets an epoch's order be an exact function of
(seed, epoch), lets a resumed run start at any batch, and lets each rank read exactly its samples.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardformat import FORMAT

# Shards open at once per reading thread (per DataLoader worker): Kinetics-400 has ~940 shards at 256
# videos each, more than a default `ulimit -n` of 1024 leaves room for once sockets, libraries and workers
# take theirs. Below that, a dataset's threads share an eighth of the process's open-file limit
# (open_shard_budget): under `ulimit -n 256` 4 reader threads x 64 used every descriptor the process had.
MAX_OPEN_SHARDS = 64
# A sample's members are read in one pread when the tar headers between them are all that lies in between
# (preprocess writes them together); members scattered by other tools are read one by one.
SPAN_SLACK = 3 * 1024
TAR_BLOCK = 512  # a tar member's header: the block before its data
POOL_GRAIN = 2**20  # read buffers are whole MiBs, so one fits the next samples of about its size
# A remote dataset's local shard cache (pipeline.remote): --data.cache_dir, --data.cache_gb.
DEFAULT_CACHE_DIR = "~/.cache/gcvideo/shards"
DEFAULT_CACHE_BYTES = 100 * 10**9


class DatasetError(RuntimeError):
    """A dataset that cannot be used as it is (missing or malformed files, nothing left to train on); the
    message names the file and the fix."""


@dataclass(frozen=True)
class Member:
    offset: int
    size: int
    name: str = ""  # as the .idx names it; the tar header before `offset` must carry it


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
    # (offsets, sizes) of each frame's bytes in ``video``, for loaders that decode frames as images
    frames: tuple[np.ndarray, np.ndarray] | None = None


def open_shard_budget() -> int:
    """Shard descriptors one dataset may hold open, all its threads together: an eighth of the open-file
    limit, after raising the soft limit to the hard one (as servers do; an unprivileged process may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # some systems cap the soft limit below the hard one: keep it
    return max(1, soft // 8) if soft != resource.RLIM_INFINITY else 1 << 13


def read_index(index: str | os.PathLike) -> dict:
    """index.json, checked: a missing, unreadable or foreign file is an error that says what to do. `index`
    may be an fsspec URL (s3://bucket/prefix/index.json, pipeline.remote)."""
    from pipeline import remote

    rebuild = "build the dataset with `python -m preprocess ...` or pass --data.index PATH/index.json"
    if remote.is_remote(index):
        path, text = str(index), remote.read_remote_text(str(index))
    else:
        path = Path(remote.local_path(index))
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "not found"
            raise DatasetError(f"dataset index {path} {what}: {rebuild}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"dataset index {path} cannot be read ({e}): {rebuild}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset index {path} cannot be read as JSON ({e}): {rebuild}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{path}: format {found!r} is not {FORMAT!r}; re-shard with this version")
    if not isinstance(meta.get("splits"), dict) or not isinstance(meta.get("classes"), list):
        raise DatasetError(f"{path} has no 'splits' object or no 'classes' list: {rebuild}")
    return meta


def read_codec(index: str | os.PathLike) -> str:
    return read_index(index).get("codec", "")


def check_files(index: Path, paths: list[Path]) -> None:
    """Every shard and index file that index.json lists exists: training on part of a dataset is an error."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise missing_files_error(index, missing)


def missing_files_error(index: Path | str, missing: list) -> DatasetError:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    names = ", ".join(str(p) for p in missing[:5]) + more
    return DatasetError(
        f"{index} lists {len(missing)} file(s) that are missing: {names}. Re-run the preprocess command "
        f"(it rebuilds only what is missing), or rebuild an index with DALI's wds2idx TAR IDX"
    )


def shard_file(index: Path, split: str, shard: object, part: str) -> str:
    """The relative path of a shard's tar or index: one that is absolute or climbs out with `..` is refused
    (index.json would otherwise make the loader read any file of the machine)."""
    name = shard.get(part) if isinstance(shard, dict) else None
    if not isinstance(name, str) or not name:
        raise DatasetError(
            f"{index} split {split!r}: shard entry {shard!r} has no {part!r} path; re-run preprocess"
        )
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise DatasetError(
            f"{index} split {split!r}: shard entry {part} {name!r} points outside the dataset folder "
            f"{index.parent}; shard paths must be relative paths inside it: re-run preprocess"
        )
    return name


def check_split_count(index: Path, split: str, entry: dict, num_shards: int, found: int) -> None:
    """The samples of the listed shards add up to the split's num_samples: a shard dropped from the list (or
    a count that lies) would otherwise shrink or misreport the epoch silently."""
    claimed = entry.get("num_samples")
    if claimed is not None and claimed != found:
        raise DatasetError(
            f"{index} split {split!r} claims {claimed} samples but its {num_shards} listed shard(s) hold "
            f"{found}: a shard is missing from the list or the count is wrong; re-run preprocess (or "
            f"`python -m preprocess merge` for --part jobs)"
        )


def check_index_matches(
    tar: Path | str, idx: Path | str, samples: list, num_samples: int | None, tar_size: int | None = None
) -> None:
    """A stale .idx (from another version of its tar) would send reads to wrong offsets: compare the sample
    count with index.json and the last member's end with the tar's size."""
    end = max((m[0] + m[1] for _, members in samples for m in members.values()), default=0)
    tar_size = Path(tar).stat().st_size if tar_size is None else tar_size
    if (num_samples is not None and len(samples) != num_samples) or end > tar_size:
        raise DatasetError(
            f"{idx} does not match {tar} ({len(samples)} samples indexed, {num_samples} listed; last member "
            f"ends at byte {end} of {tar_size}): rebuild the index with `wds2idx {tar} {idx}` or "
            f"re-run preprocess"
        )


def parse_idx(path: Path, names: bool = False) -> list[tuple[str, dict[str, tuple]]]:
    """A wds2idx file: a line per sample, repeated ``ext offset size name`` groups -> [(key, members)],
    members {ext: (offset, size)}, or (offset, size, name) with ``names``."""
    try:
        lines = path.read_text().splitlines()
        version, count = lines[0].split()
        if not version.startswith("v1"):
            raise ValueError(f"unknown DALI index version {version!r}")
        samples = []
        for line in lines[1 : 1 + int(count)]:
            fields = line.split()
            members = {
                fields[i]: (
                    int(fields[i + 1]),
                    int(fields[i + 2]),
                    *fields[i + 3 : i + 4 if names else i + 3],
                )
                for i in range(0, len(fields), 4)
            }
            samples.append((fields[3].split(".", 1)[0], members))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"{path} is not a DALI index file ({e}): rebuild it with wds2idx or re-run preprocess"
        ) from None
    return samples


def check_header(ref: SampleRef, member: Member, data: np.ndarray, at: int) -> None:
    """The tar header at ``data[at:]`` names ``member``: swapped or shifted .idx offsets would otherwise
    give a sample another's bytes and label without a sound."""
    header = data[at : at + TAR_BLOCK].tobytes()
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = (
        header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
    )
    found = f"{prefix}/{name}" if prefix else name
    expected = member.name
    truncated = len(name) >= 99 and expected.startswith(name)  # a long name lives in a header before this one
    if expected and found.rsplit("/", 1)[-1] != expected.rsplit("/", 1)[-1] and not truncated:
        raise DatasetError(
            f"{ref.tar}: its .idx puts {expected} at byte {member.offset}, where the tar holds "
            f"{found or 'no member header'!r}: the index does not match the tar (samples would get other "
            f"samples' bytes and labels); rebuild it with `wds2idx TAR IDX` or re-run preprocess"
        )


class ShardDataset:
    """The samples of one split of a dataset, addressable by position (0 .. len-1)."""

    def __init__(
        self,
        index: str | os.PathLike,
        split: str,
        cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        """`index` is a path or an fsspec URL; a remote dataset is read through a shard cache in `cache_dir`
        holding at most `cache_bytes` of shards (pipeline.remote)."""
        from pipeline import remote

        self.index_path = Path(remote.local_path(index))
        meta = read_index(index)
        if split not in meta["splits"]:
            raise DatasetError(
                f"{index} has no split {split!r} (has {sorted(meta['splits'])}): shard one with "
                f"`python -m preprocess ... --split {split}=LIST` or choose another split"
            )
        self.classes: list[str] = list(meta["classes"])
        self.codec: str = meta.get("codec", "")
        self.video_ext: str = meta.get("video_ext", "mp4")
        shards = meta["splits"][split].get("shards", [])
        names = [shard_file(self.index_path, split, s, part) for s in shards for part in ("tar", "index")]
        self.cache: remote.ShardCache | None = None
        self._remote: dict[str, tuple[str, int | None]] = {}  # shard URL -> (name in the store, bytes)
        if remote.is_remote(index):
            files = self._open_remote(str(index), shards, names, cache_dir, cache_bytes)
        else:
            root = self.index_path.parent
            check_files(self.index_path, [root / n for n in names])
            files = [(str(root / s["tar"]), root / s["index"], None) for s in shards]
        self.refs: list[SampleRef] = []
        for shard, (tar, idx, tar_size) in zip(shards, files):
            samples = parse_idx(idx, names=True)
            check_index_matches(tar, idx, samples, shard.get("num_samples"), tar_size)
            for key, members in samples:
                missing = {self.video_ext, "meta", "json"} - members.keys()
                if missing:
                    raise DatasetError(f"{idx}: a sample lacks members {sorted(missing)}; re-run preprocess")
                self.refs.append(
                    SampleRef(
                        key=key,
                        tar=tar,
                        video=Member(*members[self.video_ext]),
                        meta=Member(*members["meta"]),
                        info=Member(*members["json"]),
                    )
                )
        check_split_count(self.index_path, split, meta["splits"][split], len(shards), len(self.refs))
        self._open_files()
        # Set by a loader that gives the buffers back once their bytes were used (the DALI loader).
        self.buffers: BufferPool | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def _open_remote(
        self, index: str, shards: list[dict], names: list[str], cache_dir: str | os.PathLike, cache_bytes: int
    ) -> list[tuple[str, Path, int | None]]:
        """(tar URL, local .idx, tar bytes) per shard: every listed file must be in the store; the .idx files
        are fetched now, the tars on first read. A tar's size is the one index.json records (what preprocess
        wrote), else the store's."""
        from pipeline import remote

        self.cache = remote.ShardCache(index.rsplit("/", 1)[0], cache_dir, cache_bytes)
        stored = self.cache.listing()
        missing = [self.cache.url(n) for n in names if n not in stored]
        if missing:
            raise missing_files_error(index, missing)
        idx_files = self.cache.paths([s["index"] for s in shards], stored)
        files = []
        for shard, idx in zip(shards, idx_files):
            url, size = self.cache.url(shard["tar"]), shard.get("tar_bytes", stored[shard["tar"]])
            self._remote[url] = (shard["tar"], size)
            files.append((url, idx, size))
        return files

    def _open_files(self) -> None:
        """Open descriptors are per thread (a reader thread pool shares one dataset) and per process (a forked
        DataLoader worker must not share its parent's)."""
        self._local, self._all_fds, self._lock, self._pid = (
            threading.local(),
            [],
            threading.Lock(),
            os.getpid(),
        )
        self._budget = open_shard_budget()

    def _fd(self, tar: str) -> int:
        if self._pid != os.getpid():
            self._open_files()
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = OrderedDict()
            with self._lock:
                self._all_fds.append(fds)
        fd = fds.get(tar)
        if fd is not None and self.cache is not None and not self.cache.touch(self._remote[tar][0]):
            os.close(fds.pop(tar))  # evicted from the cache: let its disk space go, fetch it again
            fd = None
        if fd is None:
            per_thread = max(1, min(MAX_OPEN_SHARDS, self._budget // len(self._all_fds)))
            while len(fds) >= per_thread:
                os.close(fds.popitem(last=False)[1])
            path = tar if self.cache is None else self.cache.path(*self._remote[tar])
            fd = fds[tar] = os.open(path, os.O_RDONLY)
        else:
            fds.move_to_end(tar)
        return fd

    def _pread(self, tar: str, size: int, offset: int, pooled: bool = False) -> np.ndarray:
        if pooled and self.buffers is not None:
            data = self.buffers.take(size)
            got = os.preadv(self._fd(tar), [memoryview(data)], offset)
        else:
            data = np.frombuffer(os.pread(self._fd(tar), size, offset), dtype=np.uint8)
            got = len(data)
        if got != size:
            raise OSError(f"{tar}: short read at offset {offset}; the shard is truncated, rebuild it")
        return data

    def __getitem__(self, i: int) -> Sample:
        """One sample in one read: its members lie together in the tar, so one pread spans them (3 syscalls
        and 3 buffers fewer per sample than a read per member). The read starts at the first member's tar
        header, so every member's header is at hand to check the offsets (check_header)."""
        ref = self.refs[i]
        members = (ref.video, ref.meta, ref.info)
        start = min(m.offset for m in members) - TAR_BLOCK
        size = max(m.offset + m.size for m in members) - start
        parts = {}
        if size > sum(m.size for m in members) + TAR_BLOCK + SPAN_SLACK:  # not written together: one each
            for m in members:
                data = self._pread(ref.tar, TAR_BLOCK + m.size, m.offset - TAR_BLOCK)
                check_header(ref, m, data, 0)
                parts[m] = data[TAR_BLOCK:]
        else:
            span = self._pread(ref.tar, size, start, pooled=True)
            for m in members:
                check_header(ref, m, span, m.offset - start - TAR_BLOCK)
                parts[m] = span[m.offset - start : m.offset - start + m.size]
        info = json.loads(parts[ref.info].tobytes())
        label, num_frames = parts[ref.meta].view("<i4")[:2]
        if not 0 <= label < len(self.classes):
            raise DatasetError(
                f"sample {ref.key} in {ref.tar} has label {label}, outside the {len(self.classes)} classes "
                f"of {self.index_path}: the shard and index.json come from different runs; re-run preprocess"
            )
        return Sample(
            key=ref.key,
            video=parts[ref.video],
            label=int(label),
            num_frames=int(num_frames),
            width=int(info["width"]),
            height=int(info["height"]),
        )

    def __getstate__(self):
        skip = ("_local", "_all_fds", "_lock", "_pid", "_budget", "buffers")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state):
        self.__dict__.update(state, buffers=None)
        self._open_files()

    def close(self) -> None:
        with self._lock:
            for fds in self._all_fds:
                for fd in fds.values():
                    os.close(fd)
                fds.clear()


class BufferPool:
    """Reusable read buffers. Reading into fresh memory costs a page fault per 4 KiB page: measured on the
    H.264 Kinetics shards (0.8 MB a sample), reads kept a batch of 32 at a time took 193 minor faults and
    3.6x the time of reads into reused buffers. ``take(size)`` returns a buffer's first ``size`` bytes;
    ``give_back(arrays)`` returns the buffers under views handed out by ``take`` once nothing reads them (the
    DALI loader: after external_source copied them). Buffers never given back are simply freed."""

    def __init__(self, max_free_bytes: int = 256 * 2**20):
        self.max_free_bytes = max_free_bytes
        self._free: list[np.ndarray] = []
        self._out: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            fits = [b for b in self._free if b.size >= size]
            if fits:
                buf = min(fits, key=lambda b: b.size)
                self._free = [b for b in self._free if b is not buf]
            else:
                buf = np.empty(-(-size // POOL_GRAIN) * POOL_GRAIN, dtype=np.uint8)
            self._out[id(buf)] = buf
        return buf[:size]

    def give_back(self, arrays: Iterable[np.ndarray]) -> None:
        with self._lock:
            for a in arrays:
                buf = a.base if a.base is not None else a
                if self._out.get(id(buf)) is buf:
                    del self._out[id(buf)]
                    self._free.append(buf)
            while sum(b.size for b in self._free) > self.max_free_bytes:
                self._free.pop(0)


class ReadAhead:
    """Reads samples in a thread pool ahead of their use: ``want(ids)`` starts reading, ``get(id)`` returns
    the result (``fetch``'s value, or the exception it raised, as a value). Reads are plain ``pread``s, which
    release the GIL, so a few threads overlap I/O and copies with the rest of the host's work; with
    ``threads=0`` ``get`` reads in the calling thread. Results are keyed by sample id, so what a caller gets
    never depends on the order in which reads finish."""

    def __init__(self, fetch: Callable[[int], object], threads: int):
        self.fetch = fetch
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-read") if threads > 0 else None
        self.pending: dict[int, Future] = {}

    def _call(self, sample_id: int):
        try:
            return self.fetch(sample_id)
        except Exception as e:  # noqa: BLE001 (handed to the caller, who decides what is a broken sample)
            return e

    def want(self, ids: Iterable[int]) -> None:
        if self.pool is None:
            return
        for sid in ids:
            sid = int(sid)
            if sid not in self.pending:
                self.pending[sid] = self.pool.submit(self._call, sid)

    def get(self, sample_id: int):
        future = self.pending.pop(int(sample_id), None)
        return future.result() if future is not None else self._call(int(sample_id))

    def clear(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()

    def close(self) -> None:
        self.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
