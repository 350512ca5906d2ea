"""The dataset-specific inputs of preprocess/: Something-Something V1 and Jester `id;label` CSVs over JPEG
frame folders, Diving48 JSON (trimmed to exact source frames), HMDB51 split files. Readers are table-tested;
each format is then run through the CLI on a small file written here, pointing at real clips from
../shared/data, and the rows are checked in index.json, in the tar members and in failures.jsonl."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import DATA, EDGE, KINETICS

from preprocess.__main__ import main as cli_main
from preprocess.ffmpeg_args import EncodeSettings, transcode_args
from preprocess.jobs import InputError
from preprocess.sources import (
    Row,
    _list_rows,
    diving48_rows,
    hmdb51_split_files,
    hmdb51_split_rows,
    list_dataset,
    read_classes,
)

LABEL_MAPS = DATA / "annotations" / "label_maps"
FAST = ["--workers", "1", "--no-progress", "--codec", "mjpeg", "--short-side", "64"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps at 80 columns when not on a terminal, which would split the messages the tests look for."""
    monkeypatch.setenv("COLUMNS", "400")


def label_map(name: str) -> list[str]:
    return read_classes(LABEL_MAPS / f"{name}_label_map.txt").names


# --- readers (pure) -----------------------------------------------------------------------------------------

# (file text, rows) of the `id;label` format shared by Something-Something V1 and Jester
ID_LABEL = {
    "SSv1 train": (
        "100218;Pretending to pick something up\n1;Putting something, something and something on the table\n",
        [
            ("100218", "Pretending to pick something up"),
            ("1", "Putting something, something and something on the table"),
        ],
    ),
    "Jester, blank line, CRLF": (
        "34870;Drumming Fingers\r\n\r\n56557;Sliding Two Fingers Right\r\n",
        [("34870", "Drumming Fingers"), ("56557", "Sliding Two Fingers Right")],
    ),
    "spaces around fields": (" 7 ; Thumb Up \n", [("7", "Thumb Up")]),
    "an id without a label": ("7;Thumb Up\n8\n", [("7", "Thumb Up"), ("8", None)]),
    "test CSV: ids only (no ';', read as bare paths)": ("8\n9\n", [("8", None), ("9", None)]),
}


@pytest.mark.parametrize("case", ID_LABEL)
def test_id_label_rows(case, tmp_path):
    text, rows = ID_LABEL[case]
    (tmp_path / "v1.csv").write_text(text)
    assert _list_rows(tmp_path / "v1.csv") == rows


@pytest.mark.parametrize(
    "text, message",
    [
        ("1;a;b\n", "v1.csv:1: expected 'id;label'"),
        ("1;a\n2;\n", "v1.csv:2: expected 'id;label'"),
        ("1;a\n\n;a\n", "v1.csv:3: expected 'id;label'"),
    ],
)
def test_id_label_errors(text, message, tmp_path):
    (tmp_path / "v1.csv").write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        _list_rows(tmp_path / "v1.csv")


def _dive(**kw) -> dict:
    return {"vid_name": "-mmq0PT-u8k_00155", "label": 12, "start_frame": 0, "end_frame": 52, **kw}


@pytest.mark.parametrize(
    "item, row",
    [
        (_dive(), Row("-mmq0PT-u8k_00155.mp4", "12", 0, 52)),
        (_dive(start_frame=10, end_frame=11), Row("-mmq0PT-u8k_00155.mp4", "12", 10, 11)),  # one frame
    ],
)
def test_diving48_rows(item, row):
    assert diving48_rows([item], Path("d.json")) == [row]


@pytest.mark.parametrize(
    "item, message",
    [
        ({"vid_name": "x", "label": 1, "start_frame": 0}, "d.json: entry 2 (x): missing end_frame"),
        ({"label": 1}, "entry 2 (?): missing vid_name, start_frame, end_frame"),
        (_dive(vid_name=""), "vid_name must be a non-empty string"),
        (_dive(label="12"), "label, start_frame, end_frame must be integers >= 0"),
        (_dive(end_frame=True), "must be integers"),
        (_dive(start_frame=-1), "must be integers >= 0"),
        (_dive(start_frame=52), "end_frame 52 must be after start_frame 52"),
        ("x.mp4", "d.json: entry 2: expected an object"),
    ],
)
def test_diving48_errors(item, message):
    with pytest.raises(InputError, match=re.escape(message)):
        diving48_rows([_dive(), item], Path("d.json"))


def test_diving48_labels_index_the_real_label_map(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([_dive(), _dive(vid_name="b", label=48)]))
    d = list_dataset({"val": str(tmp_path / "d.json")}, "/dv", str(LABEL_MAPS / "diving48_label_map.txt"))
    (job,) = d.jobs
    assert (job.source, job.label, job.label_name) == (
        "/dv/-mmq0PT-u8k_00155.mp4",
        12,
        label_map("diving48")[12],
    )
    assert (job.start_frame, job.end_frame, job.start, job.end) == (0, 52, None, None)
    assert [r.reason for r in d.rejected] == ["label 48 is outside the 48 classes"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "a.avi 1 \nb.avi 2 \nc.avi 0 \n",  # the official files end lines with a space
            [
                ("train", Row("brush_hair/a.avi", "brush_hair")),
                ("val", Row("brush_hair/b.avi", "brush_hair")),
            ],
        ),
        ("\n", []),
    ],
)
def test_hmdb51_split_rows(text, expected):
    assert hmdb51_split_rows(text, Path("brush_hair_test_split1.txt"), "brush_hair") == expected


@pytest.mark.parametrize("line", ["a.avi", "a.avi 3", "a.avi 1 x", "1"])
def test_hmdb51_split_row_errors(line):
    with pytest.raises(InputError, match=r"brush_hair_test_split1.txt:2: expected 'name.avi 1\|2\|0'"):
        hmdb51_split_rows(f"ok.avi 1\n{line}\n", Path("brush_hair_test_split1.txt"), "brush_hair")


def test_hmdb51_split_files(tmp_path):
    for name in (
        "brush_hair_test_split1.txt",
        "brush_hair_test_split2.txt",
        "sword_exercise_test_split1.txt",
    ):
        (tmp_path / name).write_text("")
    (tmp_path / "README").write_text("")
    assert list(hmdb51_split_files(tmp_path, 1)) == ["brush_hair", "sword_exercise"]
    assert hmdb51_split_files(tmp_path, 2) == {"brush_hair": tmp_path / "brush_hair_test_split2.txt"}
    with pytest.raises(InputError, match="holds no <class>_test_split3.txt files"):
        hmdb51_split_files(tmp_path, 3)
    with pytest.raises(InputError, match="HMDB51 split folder .*nope not found"):
        hmdb51_split_files(tmp_path / "nope", 1)


def test_real_label_maps():
    jester, diving, hmdb = label_map("jester"), label_map("diving48"), label_map("hmdb51")
    assert (len(jester), len(diving), len(hmdb)) == (27, 48, 51)
    assert hmdb == sorted(hmdb)  # so the default (split file names, sorted) gives the same indexes


def test_bare_ids_are_unlabelled(tmp_path):
    """Something-Something / Jester test CSVs list ids only: label -1, as a Kinetics test row."""
    (tmp_path / "test.csv").write_text("8\n9\n")
    d = list_dataset({"test": str(tmp_path / "test.csv")}, "/f", str(LABEL_MAPS / "jester_label_map.txt"))
    assert [(j.source, j.label, j.label_name) for j in d.jobs] == [("/f/8", -1, None), ("/f/9", -1, None)]


def _graph(args: list[str]) -> str:
    return args[args.index("-filter_complex") + 1]


@pytest.mark.parametrize(
    "frames, settings, graph_start, absent",
    [
        ((10, 40), EncodeSettings(), "[0:2]trim=end_frame=40:start_frame=10[s0];[s0]setpts=PTS-STARTPTS", []),
        ((0, 52), EncodeSettings(fps=15), "[0:2]trim=end_frame=52:start_frame=0", []),
        (None, EncodeSettings(), "[0:2]scale=", ["trim"]),
    ],
)
def test_frame_trim_args(frames, settings, graph_start, absent):
    """Trimming by frame number (exact for any frame rate), before scale and fps: frame numbers are the
    source's. No seek options: -ss would land on a rounded time, not on a frame."""
    args = transcode_args("in.mp4", "o.mp4", stream_index=2, size=(64, 48), settings=settings, frames=frames)
    graph = _graph(args)
    assert graph.startswith(graph_start)
    assert graph.index("scale=") > graph.find("setpts")
    if settings.fps:
        assert graph.index("trim") < graph.index("fps=")
    assert "-ss" not in args and "-t" not in args
    for text in absent:
        assert text not in graph


# --- end to end: each format through the CLI into shards ---------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, " ".join(capsys.readouterr().err.split())


def run(capsys, *argv: str) -> None:
    code, err = cli([*argv, *FAST], capsys)
    assert code == 0, err


def shards(out: Path) -> dict[str, dict[str, tuple[dict, bytes]]]:
    """{split: {key: (the sample's json, its mp4)}} from the tars that index.json lists."""
    index = json.loads((out / "index.json").read_text())
    result: dict[str, dict[str, tuple[dict, bytes]]] = {}
    for split, entry in index["splits"].items():
        members: dict[str, dict[str, bytes]] = {}
        for shard in entry["shards"]:
            with tarfile.open(out / shard["tar"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        assert sum(1 for _ in members) == entry["num_samples"]
        result[split] = {k: (json.loads(v["json"]), v["mp4"]) for k, v in members.items()}
    return result


def failures(out: Path) -> dict[str, str]:
    return {
        (r := json.loads(line))["key"]: r["reason"]
        for line in (out / "failures.jsonl").read_text().splitlines()
    }


def labels(samples: dict[str, tuple[dict, bytes]]) -> dict[str, tuple[int, str | None]]:
    return {key: (info["label"], info["label_name"]) for key, (info, _) in samples.items()}


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory) -> Path:
    """8 JPEG frames of a real clip named like V1 and Jester (00001.jpg ...), shared by the frame tests."""
    folder = tmp_path_factory.mktemp("frames") / "frames"
    folder.mkdir()
    args = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(KINETICS / "cleaning_pool_test.mp4")]
    args += ["-frames:v", "8", "-vf", "scale=96:-2", str(folder / "%05d.jpg")]
    subprocess.run(args, check=True)
    return folder


def _frame_tree(root: Path, frame_folder: Path, ids: list[str]) -> None:
    root.mkdir()
    for clip_id in ids:
        os.symlink(frame_folder, root / clip_id)


def test_something_something_v1(tmp_path, frame_folder, capsys):
    """`id;label` CSV + one-name-per-line labels file (V1's something-something-v1-labels.csv); a missing
    folder fails its row, an unknown label is rejected, the test CSV (ids only) gives unlabelled samples."""
    root = tmp_path / "20bn-something-something-v1"
    _frame_tree(root, frame_folder, ["1001", "1002"])
    (tmp_path / "labels.csv").write_text(
        "Holding something\nPutting something, something and something on the table\n"
    )
    (tmp_path / "train.csv").write_text(
        "1001;Holding something\n1002;Putting something, something and something on the table\n"
        "1003;Holding something\n1004;Flying something\n"
    )
    (tmp_path / "test.csv").write_text("1002\n")
    out = tmp_path / "out"
    run(
        capsys,
        "frames",
        "--split", f"train={tmp_path / 'train.csv'}",
        "--split", f"test={tmp_path / 'test.csv'}",
        "--root", str(root),
        "--classes", str(tmp_path / "labels.csv"),
        "--out", str(out),
        "--name", "sthv1",
    )  # fmt: skip
    got = shards(out)
    assert labels(got["train"]) == {
        "1001": (0, "Holding something"),
        "1002": (1, "Putting something, something and something on the table"),
    }
    assert labels(got["test"]) == {"1002": (-1, None)}
    info, video = got["train"]["1001"]
    assert (info["num_frames"], info["fps"], info["height"]) == (8, 12.0, 64)
    assert info["source"] == str(root / "1001")
    with av.open(io.BytesIO(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    assert failures(out) == {
        "1003": "frame folder not found",
        "1004": "label 'Flying something' is not in the class list",
    }
    assert (
        json.loads((out / "index.json").read_text())["classes"] == read_classes(tmp_path / "labels.csv").names
    )


def test_jester(tmp_path, frame_folder, capsys):
    """Jester's CSVs are the V1 format (the same reader); classes from the real Jester label map."""
    root = tmp_path / "20bn-jester-v1"
    _frame_tree(root, frame_folder, ["34870", "56557"])
    (tmp_path / "jester-v1-train.csv").write_text("34870;Thumb Up\n")
    (tmp_path / "jester-v1-validation.csv").write_text("56557;Swiping Left\n")
    out = tmp_path / "out"
    run(
        capsys,
        "frames",
        "--split", f"train={tmp_path / 'jester-v1-train.csv'}",
        "--split", f"val={tmp_path / 'jester-v1-validation.csv'}",
        "--root", str(root),
        "--classes", str(LABEL_MAPS / "jester_label_map.txt"),
        "--out", str(out),
        "--name", "jester",
    )  # fmt: skip
    got = shards(out)
    assert labels(got["train"]) == {"34870": (20, "Thumb Up")}
    assert labels(got["val"]) == {"56557": (0, "Swiping Left")}
    assert got["val"]["56557"][0]["num_frames"] == 8
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == label_map("jester") and not failures(out)


def _gray(frame: av.VideoFrame) -> np.ndarray:
    return frame.reformat(width=64, height=48, format="gray").to_ndarray().astype(float)


def test_diving48_trims_exact_frames(tmp_path, capsys):
    """[start_frame, end_frame) of the source: end - start frames, and the first and last kept frames are the
    source's frames start and end-1 (compared with their neighbours)."""
    videos = tmp_path / "Diving48_rgb"
    videos.mkdir()
    os.symlink(KINETICS / "cleaning_pool_test.mp4", videos / "-mmq0PT-u8k_00155.mp4")  # 300 frames at 30 fps
    os.symlink(EDGE / "short_32_frames.mp4", videos / "_8Vy3dlHg2w_00000.mp4")
    rows = [
        {"vid_name": "-mmq0PT-u8k_00155", "label": 12, "start_frame": 100, "end_frame": 124},
        {"vid_name": "_8Vy3dlHg2w_00000", "label": 0, "start_frame": 0, "end_frame": 32},  # the whole clip
        {"vid_name": "missing_00001", "label": 3, "start_frame": 0, "end_frame": 40},
        {"vid_name": "_8Vy3dlHg2w_00000", "label": 47, "start_frame": 40, "end_frame": 60},  # past the end
    ]
    (tmp_path / "Diving48_V2_test.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    run(
        capsys,
        "list",
        "--split", f"val={tmp_path / 'Diving48_V2_test.json'}",
        "--root", str(videos),
        "--classes", str(LABEL_MAPS / "diving48_label_map.txt"),
        "--out", str(out),
        "--name", "diving48",
        "--short-side", "128",
        "--quality", "2",
    )  # fmt: skip
    got = shards(out)["val"]
    names = label_map("diving48")
    # keys are the vid_names with leading underscores stripped (make_key); a repeat gets _2
    assert labels(got) == {"-mmq0PT-u8k_00155": (12, names[12]), "8Vy3dlHg2w_00000": (0, names[0])}
    info, video = got["-mmq0PT-u8k_00155"]
    assert info["num_frames"] == 124 - 100 and info["source_frames"] == [100, 124]
    assert (info["source_start"], info["source_end"]) == (None, None)
    assert got["8Vy3dlHg2w_00000"][0]["num_frames"] == 32
    with av.open(io.BytesIO(video)) as container:
        kept = [_gray(f) for f in container.decode(video=0)]
    with av.open(str(KINETICS / "cleaning_pool_test.mp4")) as container:
        source = [_gray(f) for i, f in enumerate(container.decode(video=0)) if i < 130]
    for out_index, src_index in ((0, 100), (23, 123)):
        diffs = [np.abs(kept[out_index] - source[i]).mean() for i in range(src_index - 3, src_index + 4)]
        assert int(np.argmin(diffs)) == 3, diffs
    fails = failures(out)
    assert fails["missing_00001"] == "file not found"
    assert fails["8Vy3dlHg2w_00000_2"].startswith("no frames")  # a window past the end is a failed row


def test_hmdb51(tmp_path, capsys):
    """Split 1's code-1 rows -> train, code-2 rows -> val, code 0 unused; split 2's files are not read."""
    annotations, root = tmp_path / "testTrainMulti_7030_splits", tmp_path / "hmdb51_org"
    annotations.mkdir()
    for folder in ("brush_hair", "cartwheel"):
        (root / folder).mkdir(parents=True)
    os.symlink(
        EDGE / "ucf101_apply_eye_makeup_mpeg4_mp3.avi",
        root / "brush_hair" / "April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
    )
    os.symlink(
        EDGE / "short_32_frames.mp4",
        root / "brush_hair" / "Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0.avi",
    )
    os.symlink(
        EDGE / "rotated_0.mov",
        root / "cartwheel" / "Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8.avi",
    )
    (annotations / "brush_hair_test_split1.txt").write_text(
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
        "Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0.avi 2 \n"
    )
    (annotations / "cartwheel_test_split1.txt").write_text(
        "Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8.avi 1 \nmissing_cartwheel_0.avi 2 \n"
        "unused_cartwheel_0.avi 0 \n"
    )
    (annotations / "cartwheel_test_split2.txt").write_text("other_cartwheel_0.avi 1 \n")
    out = tmp_path / "out"
    run(
        capsys,
        "hmdb51",
        "--annotations", str(annotations),
        "--hmdb-split", "1",
        "--root", str(root),
        "--classes", str(LABEL_MAPS / "hmdb51_label_map.txt"),
        "--out", str(out),
        "--name", "hmdb51_1",
    )  # fmt: skip
    got = shards(out)
    assert labels(got["train"]) == {
        "brush_hair_April_09_brush_hair_u_nm_np1_ba_goo_0": (0, "brush_hair"),
        "cartwheel_Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8": (1, "cartwheel"),
    }
    assert labels(got["val"]) == {
        "brush_hair_Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0": (0, "brush_hair")
    }
    assert got["train"]["brush_hair_April_09_brush_hair_u_nm_np1_ba_goo_0"][0]["num_frames"] == 164
    assert failures(out) == {"cartwheel_missing_cartwheel_0": "file not found"}
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == label_map("hmdb51") and list(index["splits"]) == ["train", "val"]


# --- input mistakes: one message naming the file and line, exit status 2 ----------------------------------


def _mistake_files(tmp: Path) -> None:
    (tmp / "v1.csv").write_text("1001;Holding something\n1002;Holding something;extra\n")
    (tmp / "dive.json").write_text(json.dumps([{"vid_name": "a", "label": 1, "start_frame": 0}]))
    (tmp / "splits").mkdir()
    (tmp / "splits" / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi train\n")


MISTAKES = {
    "V1 CSV with a third column": (
        ["frames", "--split", "train={tmp}/v1.csv"],
        ["v1.csv:2: expected 'id;label' (Something-Something V1 / Jester CSV)"],
    ),
    "Diving48 entry without end_frame": (
        ["list", "--split", "train={tmp}/dive.json"],
        ["dive.json: entry 1 (a): missing end_frame"],
    ),
    "HMDB51 line with a bad code": (
        ["hmdb51", "--annotations", "{tmp}/splits", "--root", "{tmp}"],
        ["brush_hair_test_split1.txt:2: expected 'name.avi 1|2|0'", "'b.avi train'"],
    ),
    "HMDB51 split with no files": (
        ["hmdb51", "--annotations", "{tmp}/splits", "--hmdb-split", "3", "--root", "{tmp}"],
        ["holds no <class>_test_split3.txt files"],
    ),
    "HMDB51 split folder missing": (
        ["hmdb51", "--annotations", "{tmp}/nope", "--root", "{tmp}"],
        ["HMDB51 split folder", "nope not found"],
    ),
    "HMDB51 split number out of range": (
        ["hmdb51", "--annotations", "{tmp}/splits", "--hmdb-split", "4", "--root", "{tmp}"],
        ["--hmdb-split: invalid choice: 4"],
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_format_mistakes(case, tmp_path, capsys):
    argv, messages = MISTAKES[case]
    _mistake_files(tmp_path)
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    code, err = cli([*argv, "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2, err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "index.json").exists()
