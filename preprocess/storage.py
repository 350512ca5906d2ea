"""Output in object storage: `--out s3://bucket/prefix` (any fsspec URL but file://, which is a local path).

A run into a URL works in a local staging folder (its lock, its records, each shard while it is written):
each finished shard is uploaded, tar and .idx first, then its record (.records/<stem>.json, the "done"
record: a shard counts as finished only when its record is in the store and the store's files have the sizes
it lists), and the local copies of its files are removed; failures.jsonl and index.json come last, so an
index in the store always describes shards that are all there. A re-run reads the records back from the
store, so it skips finished shards and retries failed rows from any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from preprocess.jobs import InputError, RunError
from preprocess.writer import write_json_atomic

UPLOAD_ATTEMPTS = 4
RETRY_SECONDS = 0.5
THREADS = 16


def is_remote(text: str | os.PathLike) -> bool:
    text = str(text)
    return "://" in text and not text.startswith("file://")


def local_path(text: str) -> str:
    return text[len("file://") :] if text.startswith("file://") else text


def output_location(out: str, staging: str | None) -> tuple[Path, str | None]:
    """(the local folder a run writes into, the URL it publishes to or None) for --out and --staging."""
    if not is_remote(out):
        if staging:
            raise InputError(f"--staging applies to an --out in object storage (s3://...), not to {out}")
        return Path(local_path(out)), None
    return Path(staging).expanduser() if staging else default_staging(out), out.rstrip("/")


def default_staging(url: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.split("://", 1)[1])
    return Path("~/.cache/gcvideo/staging").expanduser() / f"{url.split('://', 1)[0]}_{safe}"


class RemoteOutput:
    """The output folder in the store: sizes of what is there, uploads and downloads with retries."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            raise InputError(
                f"--out {url}: {err}. Install the fsspec backend of its protocol (s3fs for s3://, gcsfs "
                f"for gs://)"
            ) from None
        self.root = self.root.rstrip("/")

    def __reduce__(self):  # travels to Ray workers as its URL
        return (RemoteOutput, (self.url,))

    def _retry(self, what: str, call):
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                return call()
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as err:
                if attempt == UPLOAD_ATTEMPTS - 1:
                    raise RunError(
                        f"{what} failed {UPLOAD_ATTEMPTS} times ({err}): check the network and the store's "
                        f"credentials, then run the same command again (finished shards are kept)"
                    ) from None
                time.sleep(RETRY_SECONDS * 2**attempt)
        raise AssertionError("unreachable")

    def sizes(self) -> dict[str, int]:
        """{name relative to the output folder: bytes} of every file in the store."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self._retry(f"listing {self.url}", lambda: self.fs.find(self.root, detail=True))
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        return {p[len(prefix) :]: int(e["size"]) for p, e in found.items() if p.startswith(prefix)}

    def put(self, local: Path, name: str) -> None:
        self._retry(
            f"uploading {local} to {self.url}/{name}", lambda: self.fs.put_file(str(local), self._path(name))
        )

    def put_text(self, name: str, text: str) -> None:
        data = text.encode("utf-8")
        self._retry(f"writing {self.url}/{name}", lambda: self.fs.pipe_file(self._path(name), data))

    def get(self, name: str, local: Path) -> None:
        self._retry(f"downloading {self.url}/{name}", lambda: self.fs.get_file(self._path(name), str(local)))

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"


def sync_records(remote: RemoteOutput, staging: Path, records: str) -> dict[str, int]:
    """Make the staging folder's records those of the store (the store is the truth: a record that never
    reached it belongs to an upload that did not finish); shard files left in staging are removed. Returns
    the store's file sizes."""
    stored = remote.sizes()
    for leftover in [*staging.glob("*.tar"), *staging.glob("*.idx")]:
        leftover.unlink()
    wanted = {n for n in stored if n.startswith(f"{records}/") and n.endswith(".json") and n.count("/") == 1}
    for path in (staging / records).glob("*.json"):
        if f"{records}/{path.name}" not in wanted:
            path.unlink()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda n: remote.get(n, staging / n), sorted(wanted)))
    return stored


def publish_shard(src: Path, stem: str, record: dict, dest: Path | RemoteOutput, records: str) -> None:
    """Move a shard written in `src` to its output, files first, then its done record. A shard whose retried
    rows failed again has no new files: only its record changes. Renames into a local folder are atomic, and
    so is each put into a store: when two attempts of a shard race (a straggler's), both write the same
    bytes and the first to finish wins."""
    files = [src / f"{stem}.idx", src / f"{stem}.tar"]
    new = all(f.exists() for f in files)
    if isinstance(dest, RemoteOutput):
        for f in files if new else []:
            dest.put(f, f.name)
            f.unlink()
        dest.put_text(f"{records}/{stem}.json", _record_text(record))
        return
    for f in files if new else []:
        try:
            os.replace(f, dest / f.name)
        except OSError:  # another filesystem (a node-local attempt folder): copy next to it, then rename
            tmp = dest / f"{f.name}.{os.getpid()}.copy"
            shutil.copyfile(f, tmp)
            os.replace(tmp, dest / f.name)
    write_json_atomic(dest / records / f"{stem}.json", record)


def _record_text(record: dict) -> str:
    return json.dumps(record, indent=1, ensure_ascii=False) + "\n"
