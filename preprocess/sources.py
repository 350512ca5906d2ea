"""Input rows -> Jobs: the Kinetics CSV, generic lists (path label / CSV / UCF101 / Something-Something JSON),
Something-Something V1 and Jester `id;label` CSVs, Diving48 JSON, HMDB51 split files, frame folders, plus
class-name files. Pure parsing, no video is opened here."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.jobs import Failure, InputError, Job, make_key, unique_keys
from preprocess.runner import Dataset

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ogv")
SPLIT_ALIASES = {"validate": "val", "validation": "val", "valid": "val"}


# --- reading input files -----------------------------------------------------------------------------------


def read_text(path: Path, what: str) -> str:
    """The text of an input file; a missing, unreadable or non-UTF-8 file is an InputError naming it."""
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{what} {path} not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from err
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from err


def parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from err


# --- class names --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classes:
    names: list[str]
    base: int = 0  # what integer labels in lists count from (UCF101's classInd and lists count from 1)

    def index(self, name: str) -> int | None:
        lookup = getattr(self, "_lookup", None)
        if lookup is None:
            lookup = {n.lower(): i for i, n in enumerate(self.names)}
            object.__setattr__(self, "_lookup", lookup)
        return lookup.get(name.strip().lower())


def read_classes(path: str | Path) -> Classes:
    """One name per line (line order = index), UCF101's classInd.txt ("1 ApplyEyeMakeup"), or an SSv2 labels
    JSON ({"name": "index"})."""
    path = Path(path)
    text = read_text(path, "class file")
    if path.suffix == ".json":
        return Classes(_json_classes(parse_json(text, path), path))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"class file {path} lists no class names: give one name per line")
    numbered = [re.fullmatch(r"(\d+)\s+(.+)", line) for line in lines]
    if lines and all(numbered):
        pairs = sorted((int(m.group(1)), m.group(2).strip()) for m in numbered)  # type: ignore[union-attr]
        base = pairs[0][0]
        if [i for i, _ in pairs] != list(range(base, base + len(pairs))):
            raise InputError(f"class file {path}: numbered lines must count up from {base} without gaps")
        return Classes([n for _, n in pairs], base=base)
    return Classes(lines)


def _json_classes(mapping: Any, path: Path) -> list[str]:
    """SSv2's labels JSON, {name: index} with the indexes 0..N-1 as numbers or strings."""
    try:
        by_index = {int(idx): name for name, idx in mapping.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise InputError(f"class file {path}: expected a JSON object {{name: index}} ({err})") from err
    if sorted(by_index) != list(range(len(mapping))):
        raise InputError(f"class file {path}: the indexes of {{name: index}} must be 0..{len(mapping) - 1}")
    return [by_index[i] for i in range(len(mapping))]


# --- Kinetics -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KineticsRow:
    label: str | None
    youtube_id: str
    start: float
    end: float
    split: str


def read_kinetics_csv(path: str | Path) -> list[KineticsRow]:
    """The official CSV: label,youtube_id,time_start,time_end,split[,is_cc]; the test CSV has no label."""
    path = Path(path)
    rows = []
    reader = csv.DictReader(io.StringIO(read_text(path, "Kinetics CSV"), newline=""))
    need = {"youtube_id", "time_start", "time_end"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise InputError(
            f"{path}: expected a header with label,youtube_id,time_start,time_end,split; got "
            f"{reader.fieldnames or 'an empty file'}"
        )
    for line, row in enumerate(reader, start=2):
        try:
            start, end = float(row["time_start"]), float(row["time_end"])
        except (TypeError, ValueError) as err:
            raise InputError(f"{path}:{line}: time_start/time_end are not numbers: {row}") from err
        split = (row.get("split") or "train").strip()
        rows.append(
            KineticsRow(
                label=(row.get("label") or None),
                youtube_id=row["youtube_id"].strip(),
                start=start,
                end=end,
                split=SPLIT_ALIASES.get(split, split),
            )
        )
    return rows


def index_videos(root: str | Path) -> dict[str, str]:
    """Every video file under root by stem (without extension); the first in sorted order wins on repeats."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTS:
                found.setdefault(stem, os.path.join(dirpath, name))
    return found


def kinetics_dataset(
    csv_paths: list[str], video_dir: str, classes_path: str | None = None, splits: list[str] | None = None
) -> Dataset:
    """Trimmed clips `<id>_<start:06d>_<end:06d>.<ext>` are taken whole; a full video `<id>.<ext>` is trimmed
    to [time_start, time_end]; a row with neither becomes a 'file not found' failure (never dropped)."""
    if not Path(video_dir).is_dir():
        raise InputError(f"video folder {video_dir} not found: give the folder of downloaded Kinetics videos")
    rows = [row for path in csv_paths for row in read_kinetics_csv(path)]
    if splits:
        rows = [row for row in rows if row.split in splits]
    if classes_path:
        classes = read_classes(classes_path)
    else:
        classes = Classes(sorted({row.label for row in rows if row.label}))
    videos = index_videos(video_dir)
    jobs, rejected = [], []
    for row in rows:
        clip = f"{row.youtube_id}_{int(row.start):06d}_{int(row.end):06d}"
        label = classes.index(row.label) if row.label else -1
        if label is None:
            rejected.append(
                Failure(
                    clip,
                    f"label {row.label!r} is not in the class list",
                    key=make_key(clip),
                    split=row.split,
                    extra={"rejected": True},
                )
            )
            continue
        if clip in videos:
            source, start, end = videos[clip], None, None
        elif row.youtube_id in videos:
            source, start, end = videos[row.youtube_id], row.start, row.end
        else:
            source, start, end = os.path.join(video_dir, f"{clip}.mp4"), None, None
        jobs.append(
            Job(
                key=make_key(clip),
                source=source,
                label=label,
                label_name=classes.names[label] if label >= 0 else None,
                split=row.split,
                start=start,
                end=end,
            )
        )
    return _dataset(classes.names, jobs, rejected)


def _dataset(classes: list[str], jobs: list[Job], rejected: list[Failure]) -> Dataset:
    splits = list(dict.fromkeys([j.split for j in jobs] + [f.split for f in rejected]))
    fixed = []
    for split in splits:
        mine = [j for j in jobs if j.split == split]
        for job, key in zip(mine, unique_keys([j.key for j in mine]), strict=True):
            fixed.append(job if key == job.key else Job(**{**job.__dict__, "key": key}))
    return Dataset(classes=classes, splits=splits, jobs=fixed, rejected=rejected)


# --- generic lists ------------------------------------------------------------------------------------------


def _list_rows(path: Path) -> list[tuple[str, str | None]]:
    """(path, label or None) from "path label", "path num_frames label", "path,label" CSV or bare paths."""
    text = read_text(path, "list file")
    if path.suffix == ".json":
        items = parse_json(text, path)
        if not isinstance(items, list) or not all(isinstance(it, dict) and "id" in it for it in items):
            raise InputError(
                f"{path}: expected a JSON list of {{'id': ..., 'template': ...}} (Something-Something) or of "
                f"{{'vid_name': ..., 'label': ..., 'start_frame': ..., 'end_frame': ...}} (Diving48)"
            )
        return [
            (
                str(it["id"]),
                (it.get("template") or it.get("label") or "").replace("[", "").replace("]", "") or None,
            )
            for it in items
        ]
    lines = [line for line in text.splitlines() if line.strip()]
    if any(";" in line for line in lines):  # before the comma test: V1 labels may hold commas
        return id_label_rows(text, path)
    if path.suffix == ".csv" or (lines and "," in lines[0] and len(lines[0].split(",")) == 2):
        rows = list(csv.reader(lines))
        if rows and rows[0] and rows[0][0].strip().lower() in ("path", "video", "filename", "file"):
            rows = rows[1:]
        return [(r[0].strip(), r[1].strip() if len(r) > 1 else None) for r in rows]
    out = []
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) > 3:
            raise InputError(
                f"{path}:{number}: expected 'path label' or 'path num_frames label', got {line!r} "
                f"(multi-label lists are not supported)"
            )
        out.append((parts[0], parts[-1] if len(parts) > 1 else None))
    return out


def _resolve_label(raw: str | None, rel_path: str, classes: Classes | None) -> int | str:
    """Integer labels count from classes.base; names are looked up; a missing label comes from the folder name
    (UCF101 test lists), and a row with neither (Something-Something and Jester test CSVs: bare ids) is
    unlabelled (-1), like a Kinetics test row. Returns an error message (str) when nothing fits."""
    if raw is None and not Path(rel_path).parent.name:
        return -1
    if raw is not None and re.fullmatch(r"-?\d+", raw):
        label = int(raw) - (classes.base if classes else 0)
        if classes and not 0 <= label < len(classes.names):
            return f"label {raw} is outside the {len(classes.names)} classes"
        return label
    name = raw if raw is not None else Path(rel_path).parent.name
    if classes is None:
        return f"label {name!r} is a name but no --classes file was given"
    label = classes.index(name)
    return label if label is not None else f"label {name!r} is not in the class list"


@dataclass(frozen=True)
class Row:
    """One annotation row: a path under --root, its label as written (a name, a number or None) and, for
    Diving48, the window of source frames to keep (0-based, end excluded)."""

    path: str
    label: str | None
    start_frame: int | None = None
    end_frame: int | None = None


def read_rows(path: Path, kind: str, video_ext: str | None) -> list[Row]:
    """The rows of one list file of any supported format; JSON ids (SSv2, Diving48) get a video extension."""
    if path.suffix == ".json":
        items = parse_json(read_text(path, "list file"), path)
        if isinstance(items, list) and items and isinstance(items[0], dict) and "vid_name" in items[0]:
            return diving48_rows(items, path, video_ext or ".mp4")
    rows = [Row(rel, label) for rel, label in _list_rows(path)]
    if path.suffix == ".json" and kind == "video":  # Something-Something ids name <id>.webm files
        ext = video_ext or ".webm"
        rows = [Row(r.path if os.path.splitext(r.path)[1] else r.path + ext, r.label) for r in rows]
    return rows


def list_dataset(
    split_files: dict[str, str],
    root: str | None,
    classes_path: str | None,
    *,
    kind: str = "video",
    video_ext: str | None = None,
    frame_rate: float | None = None,
) -> Dataset:
    classes = read_classes(classes_path) if classes_path else None
    rows: dict[str, list[Row]] = {}
    for split, file in split_files.items():
        path = Path(file)
        if not path.exists():
            raise InputError(f"list file {path} (split {split}) not found")
        rows[split] = read_rows(path, kind, video_ext)
    return rows_dataset(rows, root, classes, kind=kind, frame_rate=frame_rate)


def _default_classes(rows: dict[str, list[Row]]) -> Classes:
    """Without a class file: the label names sorted, or 0..max for integer labels."""
    labels = [r.label for split_rows in rows.values() for r in split_rows if r.label]
    names = sorted({lab for lab in labels if not lab.isdigit()})
    if names:
        return Classes(names)
    return Classes([str(i) for i in range(max((int(lab) for lab in labels), default=-1) + 1)])


def rows_dataset(
    rows: dict[str, list[Row]],
    root: str | None,
    classes: Classes | None,
    *,
    kind: str = "video",
    frame_rate: float | None = None,
) -> Dataset:
    """Rows by split -> Jobs; a row whose label fits no class is rejected (failures.jsonl), never dropped."""
    classes = classes or _default_classes(rows)
    base = Path(root) if root else None
    jobs, rejected = [], []
    for split, split_rows in rows.items():
        for row in split_rows:
            rel = row.path
            source = str(base / rel) if base and not os.path.isabs(rel) else rel
            key = make_key(os.path.splitext(rel)[0] if kind == "video" else rel)
            label = _resolve_label(row.label, rel, classes)
            if isinstance(label, str):
                rejected.append(Failure(source, label, key=key, split=split, extra={"rejected": True}))
                continue
            jobs.append(
                Job(
                    key=key,
                    source=source,
                    label=label,
                    label_name=classes.names[label] if label >= 0 else None,
                    split=split,
                    kind=kind,
                    frame_rate=frame_rate,
                    start_frame=row.start_frame,
                    end_frame=row.end_frame,
                )
            )
    return _dataset(classes.names, jobs, rejected)


# --- Something-Something V1 and Jester ------------------------------------------------------------------


def id_label_rows(text: str, path: Path) -> list[tuple[str, str | None]]:
    """`id;label` lines (something-something-v1-train.csv, jester-v1-train.csv): the same format for both,
    each id a folder of frames. Split at the one ';' only, since labels may hold commas. A line without ';'
    is an id with no label (the test CSVs)."""
    rows: list[tuple[str, str | None]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(";")]
        if len(fields) > 2 or not fields[0] or (len(fields) == 2 and not fields[1]):
            raise InputError(
                f"{path}:{number}: expected 'id;label' (Something-Something V1 / Jester CSV), got {line!r}"
            )
        rows.append((fields[0], fields[1] if len(fields) == 2 else None))
    return rows


# --- Diving48 -------------------------------------------------------------------------------------------


def diving48_rows(items: list[Any], path: Path, video_ext: str = ".mp4") -> list[Row]:
    """Diving48_V2_{train,test}.json: [{vid_name, label, start_frame, end_frame}, ...] -> `<vid_name>.mp4`
    trimmed to the frames [start_frame, end_frame): 0-based with end_frame excluded, so a row keeps
    end_frame - start_frame frames (in the published files start_frame is 0 and end_frame is the clip's
    frame count, which TSM's list script writes as num_frames)."""
    return [_diving48_row(item, number, path, video_ext) for number, item in enumerate(items, start=1)]


def _diving48_row(item: Any, number: int, path: Path, video_ext: str) -> Row:
    where = f"{path}: entry {number}"
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected an object {{vid_name, label, start_frame, end_frame}}")
    missing = [k for k in ("vid_name", "label", "start_frame", "end_frame") if k not in item]
    if missing:
        raise InputError(f"{where} ({item.get('vid_name', '?')}): missing {', '.join(missing)}")
    name, label, first, end = item["vid_name"], item["label"], item["start_frame"], item["end_frame"]
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: vid_name must be a non-empty string, got {name!r}")
    numbers = (label, first, end)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
        raise InputError(f"{where} ({name}): label, start_frame, end_frame must be integers >= 0")
    if end <= first:
        raise InputError(f"{where} ({name}): end_frame {end} must be after start_frame {first}")
    return Row(name + video_ext, str(label), first, end)


# --- HMDB51 ---------------------------------------------------------------------------------------------

HMDB_SPLITS = {"1": "train", "2": "val"}  # the split files' codes; 0 = not used in this split
_HMDB_FILE = re.compile(r"(.+)_test_split(\d+)\.txt")


def hmdb51_split_rows(text: str, path: Path, class_name: str) -> list[tuple[str, Row]]:
    """`<class>_test_split<k>.txt` lines `name.avi 1|2|0` -> (split, Row(`<class>/<name>.avi`)); 0 rows are
    left out (they belong to neither side of split k)."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise InputError(f"{path}:{number}: expected 'name.avi 1|2|0' (1 train, 2 test), got {line!r}")
        if fields[1] != "0":
            out.append((HMDB_SPLITS[fields[1]], Row(f"{class_name}/{fields[0]}", class_name)))
    return out


def hmdb51_split_files(folder: Path, number: int) -> dict[str, Path]:
    """{class name: split file} of split `number`; the class names come from the file names."""
    if not folder.is_dir():
        raise InputError(
            f"HMDB51 split folder {folder} not found: give the folder of *_test_split<k>.txt files"
        )
    files = {}
    for file in sorted(folder.iterdir()):
        m = _HMDB_FILE.fullmatch(file.name)
        if m and int(m.group(2)) == number:
            files[m.group(1)] = file
    if not files:
        raise InputError(f"{folder} holds no <class>_test_split{number}.txt files")
    return files


def hmdb51_dataset(split_folder: str, number: int, root: str | None, classes_path: str | None) -> Dataset:
    """Videos `<root>/<class>/<name>.avi`, train = code 1 and val = code 2 of split `number`; classes from
    --classes (hmdb51_label_map.txt) or the split files' class names, sorted (the same order)."""
    files = hmdb51_split_files(Path(split_folder), number)
    rows: dict[str, list[Row]] = {"train": [], "val": []}
    for class_name, file in files.items():
        for split, row in hmdb51_split_rows(read_text(file, "HMDB51 split file"), file, class_name):
            rows[split].append(row)
    classes = read_classes(classes_path) if classes_path else Classes(sorted(files))
    return rows_dataset(rows, root, classes)


def parse_split_args(values: list[str]) -> dict[str, str]:
    """`--split train=list.txt --split val=val.txt` (a bare file means split 'train')."""
    out: dict[str, str] = {}
    for value in values:
        split, sep, file = value.partition("=")
        if not sep:
            split, file = "train", value
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise InputError(
                f"split name {split!r} must be letters, digits or _ (it becomes part of shard names)"
            )
        if split in out:
            raise InputError(f"split {split!r} given twice")
        out[split] = file
    return out
