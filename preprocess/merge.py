"""`merge`: combine the index.part-i-of-N.json files of a `--part i/N` job into index.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from preprocess.jobs import InputError
from preprocess.writer import write_json_atomic

PART_FILE = re.compile(r"index\.part-(\d+)-of-(\d+)\.json")


def merge_indexes(parts: list[dict]) -> dict:
    """One index from the parts' indexes; they must agree on everything but their shards and failures."""
    first = parts[0]
    for part in parts[1:]:
        for field in ("format", "name", "classes", "codec", "video_ext", "settings"):
            if part[field] != first[field]:
                raise InputError(
                    f"part {part['part']} differs from part {first['part']} in {field!r}: the parts "
                    f"were not made by the same command"
                )
    splits: dict[str, dict] = {}
    for part in parts:
        for name, split in part["splits"].items():
            merged = splits.setdefault(name, {"num_samples": 0, "shards": []})
            merged["num_samples"] += split["num_samples"]
            merged["shards"] += split["shards"]
    for split in splits.values():
        split["shards"].sort(key=lambda s: s["tar"])
    index = {k: v for k, v in first.items() if k != "part"}
    index.update(splits=splits, failures=sum(p["failures"] for p in parts))
    return index


def _read_part(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}): run that part again") from err


def merge(out: Path, console: Console) -> dict:
    found = {}
    for path in sorted(out.glob("index.part-*-of-*.json")):
        if m := PART_FILE.fullmatch(path.name):
            found[(int(m.group(1)), int(m.group(2)))] = path
    if not found:
        raise InputError(
            f"no index.part-i-of-N.json in {out}: run the `--part i/N` jobs first (into this folder, "
            f"or copy their outputs here)"
        )
    counts = {n for _, n in found}
    if len(counts) != 1:
        raise InputError(f"{out} mixes part files of different N: {sorted(counts)}")
    total = counts.pop()
    missing = [i for i in range(total) if (i, total) not in found]
    if missing:
        raise InputError(
            f"parts {missing} of {total} are missing in {out}: run `--part i/{total}` for them first"
        )
    parts = [_read_part(found[(i, total)]) for i in range(total)]
    index = merge_indexes(parts)
    for split in index["splits"].values():
        for shard in split["shards"]:
            if not (out / shard["tar"]).exists() or not (out / shard["index"]).exists():
                raise InputError(f"{out / shard['tar']} (or its .idx) is listed by a part but missing")
    with open(out / "failures.jsonl", "w") as f:
        for i in range(total):
            part_failures = out / f"failures.part-{i}-of-{total}.jsonl"
            if part_failures.exists():
                f.write(part_failures.read_text())
    write_json_atomic(out / "index.json", index)
    num = sum(s["num_samples"] for s in index["splits"].values())
    console.print(
        f"merged {total} parts: {num} samples, {index['failures']} failures -> {out / 'index.json'}"
    )
    return index
