"""The GPU kit's transport: one bundle (wheels + H.264 shards) cut into parts that each fit one transfer to
the GPU host, a manifest with the sha256 of every part and of the whole, and the steps that put it back
together there.

Standard library only: on the host it runs under the host's own Python before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

FORMAT = "gcvideo-gpu-kit/1"
MANIFEST = "manifest.json"
MIB = 2**20
TRANSFER_LIMIT = 64 * MIB  # what one call to the host carries: the working tree and the carried paths
# room left in every transfer for the tree to grow between `prepare` and the run (docs, results)
TRANSFER_MARGIN = 1 * MIB
# the host's Python (3.12) and the rehearsal's (3.11): DALI's extension modules for other Pythons stay behind
KEEP_PYTHON_TAGS = ("311", "312")


class KitError(RuntimeError):
    """A kit that cannot be used as it is (missing or corrupt parts, a wrong manifest): says what to do."""


def sha256_file(path: Path, chunk: int = 4 * MIB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def part_bytes_for(bundle_bytes: int, tree_bytes: int) -> tuple[int, int]:
    """(number of parts, bytes per part) so that each transfer (tree + manifest + one part) fits the limit
    with the margin; parts are as equal as the bytes allow."""
    room = TRANSFER_LIMIT - TRANSFER_MARGIN - tree_bytes
    if room <= 0:
        raise KitError(f"the working tree alone ({tree_bytes / MIB:.1f} MiB) leaves no room in a transfer")
    count = max(1, math.ceil(bundle_bytes / room))
    return count, math.ceil(bundle_bytes / count)


def part_name(k: int, count: int) -> str:
    return f"part-{k}-of-{count}"


def split_file(path: Path, out_dir: Path, count: int, part_bytes: int) -> list[dict]:
    """Cut `path` into `count` files of at most part_bytes; their names, sizes and sha256, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*"):
        old.unlink()
    parts = []
    with open(path, "rb") as src:
        for k in range(1, count + 1):
            target = out_dir / part_name(k, count)
            with open(target, "wb") as dst:
                _copy_bytes(src, dst, part_bytes)
            parts.append({"name": target.name, "bytes": target.stat().st_size, "sha256": sha256_file(target)})
    return parts


def _copy_bytes(src, dst, n: int, chunk: int = 4 * MIB) -> None:
    while n > 0 and (block := src.read(min(chunk, n))):
        dst.write(block)
        n -= len(block)


def slim_wheel(wheel: Path, out: Path, keep_tags: tuple[str, ...] = KEEP_PYTHON_TAGS) -> int:
    """Copy a wheel without the extension modules built for other Pythons (`*.cpython-313-*.so` when only
    3.11 and 3.12 are kept), RECORD rewritten to match; returns the bytes left out. Members are copied
    compressed as they are, so the rest stays byte-identical."""
    tag = re.compile(r"\.cpython-(\d+t?)-")
    dropped = 0
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w") as zout:
        keep = []
        for info in zin.infolist():
            m = tag.search(info.filename)
            if m and m.group(1) not in keep_tags:
                dropped += info.compress_size
            else:
                keep.append(info)
        names = {i.filename for i in keep}
        for info in keep:
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",", 1)[0] in names or "RECORD" in ln).encode()
            zout.writestr(info, data, compress_type=info.compress_type)
    return dropped


def read_manifest(kit: Path) -> dict:
    path = kit / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise KitError(f"{path} not found: run `python -m benchmark.gpu.prepare` and carry it") from None
    except json.JSONDecodeError as err:
        raise KitError(f"{path} is not valid JSON ({err}): run prepare again") from None
    if manifest.get("format") != FORMAT:
        raise KitError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def receive(manifest: dict, sources: list[Path], store: Path) -> list[str]:
    """Copy every part found in `sources` whose sha256 matches the manifest into `store` (outside the tree,
    so it outlives the next transfer); a part that does not match is reported and left out. Returns one
    line per part looked at."""
    store.mkdir(parents=True, exist_ok=True)
    notes = []
    for part in manifest["parts"]:
        kept = store / part["name"]
        if kept.is_file() and kept.stat().st_size == part["bytes"]:
            continue  # verified when it was received
        for src in sources:
            candidate = src / part["name"]
            if not candidate.is_file():
                continue
            if candidate.stat().st_size != part["bytes"] or sha256_file(candidate) != part["sha256"]:
                notes.append(f"{part['name']}: checksum mismatch in {candidate}, not kept (send it again)")
                continue
            shutil.copyfile(candidate, store / (part["name"] + ".tmp"))
            (store / (part["name"] + ".tmp")).replace(kept)
            notes.append(f"{part['name']}: received ({part['bytes'] / MIB:.1f} MiB, sha256 ok)")
            break
    return notes


def missing_parts(manifest: dict, store: Path) -> list[str]:
    return [
        p["name"]
        for p in manifest["parts"]
        if not ((store / p["name"]).is_file() and (store / p["name"]).stat().st_size == p["bytes"])
    ]


def assemble(manifest: dict, store: Path, dest: Path) -> Path:
    """Join the parts into the bundle tar and check its sha256; unpack it into dest (wheels/, shards/)."""
    missing = missing_parts(manifest, store)
    if missing:
        raise KitError(f"parts missing on this host: {', '.join(missing)} (send them, then run again)")
    bundle = store / "bundle.tar"
    with open(bundle, "wb") as out:
        for p in manifest["parts"]:
            with open(store / p["name"], "rb") as src:
                shutil.copyfileobj(src, out, 4 * MIB)
    if sha256_file(bundle) != manifest["bundle"]["sha256"]:
        bundle.unlink()
        raise KitError("the joined parts do not match the bundle's sha256: prepare again and resend")
    if dest.exists():
        shutil.rmtree(dest)
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    bundle.unlink()
    for wheel in manifest["wheels"]:
        path = dest / "wheels" / wheel["name"]
        if not path.is_file() or sha256_file(path) != wheel["sha256"]:
            raise KitError(f"{wheel['name']} in the joined bundle does not match the manifest: prepare again")
    return dest


def install_wheels(wheels: list[Path], target: Path) -> str:
    """pip --no-index --no-deps into an empty target (the host has no network); where pip is missing the
    wheels are unpacked as they are (all of them are plain purelib/platlib archives). Returns how."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        done = subprocess.CompletedProcess(cmd, 1, "", str(err))
    if done.returncode == 0:
        return "pip --no-index --no-deps --target"
    if "No module named pip" not in done.stderr:
        raise KitError(f"pip could not install the kit's wheels: {done.stderr.strip()[-800:]}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return "unzipped (no pip on this Python)"
