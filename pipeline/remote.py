"""Datasets in object storage: an index.json behind an fsspec URL (s3://bucket/prefix/index.json, gs://...)
is read through a local shard cache, so the loaders keep reading local files by offset.

Shards are fetched whole on first use (with retries, checked against the size index.json or the store gives)
into ``<cache_dir>/<hash of the dataset URL>/``; the .idx files of a split are fetched when the dataset is
opened. The cache is bounded: every read marks its shard used, and before a shard is fetched the least
recently used shards of the whole cache directory are evicted until it fits. A reader that finds its open
shard evicted closes it (freeing the space) and fetches it again; a read under way finishes on its open
descriptor. The samples and their order are those of the local dataset, so random access, exact resume and
once-per-sample evaluation are unchanged. Fetches and evictions hold a lock on the cache directory, so the
DataLoader workers, DDP ranks and runs of one machine share one cache without fetching a shard twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dirlock
from pipeline.shards import DatasetError

log = logging.getLogger(__name__)
FETCH_ATTEMPTS = 4  # a shard's fetch is tried this many times (transient network or store errors)
RETRY_SECONDS = 0.5  # first pause between attempts; doubled after each
IDX_FETCH_THREADS = 16
CACHE_LOCK = ".lock"
PARTIAL = ".partial"


def is_remote(path: str | os.PathLike) -> bool:
    """An fsspec URL other than file:// (those are local paths)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    text = str(path)
    return text[len("file://") :] if text.startswith("file://") else text


def remote_fs(url: str):
    """(filesystem, path without the protocol); a missing fsspec backend (s3fs, gcsfs) is a clear error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise DatasetError(
            f"cannot open {url}: {err}. Install the fsspec backend for its protocol (s3fs for s3://, "
            f"gcsfs for gs://)"
        ) from None


def read_remote_text(url: str) -> str:
    fs, path = remote_fs(url)
    try:
        return _retry(url, lambda: fs.cat_file(path)).decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(
            f"dataset index {url} not found: check the URL, or preprocess into it (python -m preprocess ... "
            f"--out {url.rsplit('/', 1)[0]})"
        ) from None


def _retry(url: str, call):
    """call(), tried FETCH_ATTEMPTS times on errors other than a missing object; the last error is raised as a
    DatasetError naming `url`."""
    for attempt in range(FETCH_ATTEMPTS):
        try:
            return call()
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as err:  # s3fs and gcsfs raise OSErrors for network and store errors
            if attempt == FETCH_ATTEMPTS - 1:
                raise DatasetError(
                    f"cannot fetch {url} ({FETCH_ATTEMPTS} attempts): {err}; check the network and the "
                    f"credentials of the store"
                ) from None
            log.warning("fetching %s failed (%s): trying again", url, err)
            time.sleep(RETRY_SECONDS * 2**attempt)
    raise AssertionError("unreachable")


class ShardCache:
    """Local copies of one remote dataset's files; ``path(name, size)`` fetches on first use."""

    def __init__(self, root_url: str, cache_dir: str | os.PathLike, max_bytes: int):
        self.root_url = root_url.rstrip("/")
        self.fs, self.root = remote_fs(self.root_url)
        self.top = Path(cache_dir).expanduser()
        self.dir = self.top / hashlib.sha256(self.root_url.encode()).hexdigest()[:16]
        self.max_bytes = max_bytes
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetError(
                f"cannot create the shard cache {self.dir}: {err.strerror or err}; set --data.cache_dir"
            ) from None

    def url(self, name: str) -> str:
        return f"{self.root_url}/{name}"

    def listing(self) -> dict[str, int]:
        """{name relative to the dataset folder: size} of the files in the store (one listing request per
        1000 files on S3)."""
        self.fs.invalidate_cache(self.root)
        found = _retry(self.root_url, lambda: self.fs.find(self.root, detail=True))
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix) :]: int(e["size"]) for p, e in found.items() if p.startswith(prefix)}

    def path(self, name: str, size: int | None = None) -> Path:
        """The local copy of `name` (fetched when missing, after making room); its use time is updated."""
        local = self.dir / name
        if not local.is_file():
            with dirlock.holding(self.top / CACHE_LOCK):
                if not local.is_file():
                    if name.endswith(".tar"):
                        self._make_room(name, size)
                    self._fetch(name, local, size)
        self.touch(name)  # False when evicted meanwhile by another process: still ours through its descriptor
        return local

    def touch(self, name: str) -> bool:
        """Mark a cached file used now (its place in the LRU order); False when it is no longer cached."""
        now = time.time_ns()  # not the filesystem's clock: its ticks are coarser than two uses can be apart
        try:
            os.utime(self.dir / name, ns=(now, now))
        except FileNotFoundError:
            return False
        return True

    def paths(self, names: list[str], sizes: dict[str, int]) -> list[Path]:
        """Many small files (the .idx files) at once, fetched by a few threads."""
        with ThreadPoolExecutor(min(IDX_FETCH_THREADS, max(1, len(names)))) as pool:
            return list(pool.map(lambda n: self.path(n, sizes.get(n)), names))

    def _fetch(self, name: str, local: Path, size: int | None) -> None:
        url = self.url(name)
        tmp = local.with_name(f"{local.name}.{os.getpid()}{PARTIAL}")

        def get() -> None:
            self.fs.get_file(f"{self.root}/{name}", str(tmp))
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise ValueError(f"fetched {got} bytes where the dataset lists {size}")

        try:
            _retry(url, get)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise DatasetError(
                f"shard file {url} is missing from the store (deleted after index.json was written?): re-run "
                f"the preprocess command with --out {self.root_url} (it redoes the missing shards)"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, local)
        log.debug("fetched %s (%d bytes) into %s", url, local.stat().st_size, local)

    def _make_room(self, name: str, size: int | None) -> None:
        """Evict the least recently used shards of the whole cache directory until `size` more bytes fit."""
        if size is not None and size > self.max_bytes:
            raise DatasetError(
                f"shard {self.url(name)} ({size / 1e9:.2f} GB) does not fit in the shard cache of "
                f"{self.max_bytes / 1e9:.2f} GB: raise --data.cache_gb"
            )
        cached = []
        for path in self.top.glob("*/*.tar"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                cached.append((st.st_mtime_ns, st.st_size, path))
        total = sum(s for _, s, _ in cached)
        for _, st_size, path in sorted(cached):
            if total + (size or 0) <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st_size
            log.debug("evicted %s from the shard cache", path)
