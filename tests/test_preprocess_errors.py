"""preprocess/ when things go wrong: failed rows retried on a re-run, a run where every row fails, paths that
look like options, a full disk, concurrent runs into one folder, and every user mistake of the CLI ending in a
message and an exit code (2: bad usage, 1: the run failed), never a traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import EDGE, ROOT, TINY_SYNTHETIC

from preprocess.__main__ import main as cli_main

# Five short clips (<= 1 s each): cheap to transcode several times.
CLIPS = ["short_32_frames.mp4", "rotated_0.mov", "rotated_90.mov", "hevc.mp4", "h264_10bit.mp4"]
FAST = ["--workers", "1", "--no-progress", "--short-side", "64", "--codec", "mjpeg"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps at 80 columns when not on a terminal, which would split the paths the tests look for."""
    monkeypatch.setenv("COLUMNS", "400")


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr with rich's line wrapping undone); argparse errors raise SystemExit(2)."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, " ".join(capsys.readouterr().err.split())


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _list_run(list_file: Path, root: Path, out: Path, capsys) -> tuple[int, str]:
    argv = ["list", "--split", f"train={list_file}", "--root", str(root), "--shard-size", "2"]
    return cli([*argv, "--out", str(out), "--name", "r", *FAST], capsys)


def test_failed_rows_are_retried_and_give_the_shards_of_a_clean_run(tmp_path, capsys):
    """Wrong --root, then some videos, then all: the result is byte-identical to one clean run, and a shard
    that was complete and clean is not rewritten."""
    videos, out, ref = tmp_path / "videos", tmp_path / "out", tmp_path / "ref"
    videos.mkdir()
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{name} 0\n" for name in CLIPS))

    code, err = _list_run(list_file, videos, out, capsys)
    assert code == 1 and "every one of the 5 rows failed" in err and "file not found (5)" in err
    assert "--root" in err

    for name in CLIPS[:4]:  # the download finished for all but one: two of the three shards are clean
        os.symlink(EDGE / name, videos / name)
    assert _list_run(list_file, videos, out, capsys)[0] == 0
    records = {p.stem: json.loads(p.read_text()) for p in (out / ".records").glob("r-*.json")}
    clean = [stem for stem, r in records.items() if not r["failures"]]
    assert len(clean) == 2 and len(json.loads((out / "index.json").read_text())["splits"]["train"]) == 2
    untouched = {stem: (out / f"{stem}.tar").stat().st_mtime_ns for stem in clean}

    os.symlink(EDGE / CLIPS[4], videos / CLIPS[4])
    assert _list_run(list_file, videos, out, capsys)[0] == 0
    assert _list_run(list_file, videos, ref, capsys)[0] == 0
    assert tar_hashes(out) == tar_hashes(ref) and len(tar_hashes(ref)) == 3
    for name in ("index.json", "failures.jsonl"):
        assert (out / name).read_text() == (ref / name).read_text()
    assert {stem: (out / f"{stem}.tar").stat().st_mtime_ns for stem in clean} == untouched
    assert not list(out.glob("*.tmp"))


def test_paths_that_look_like_options_or_protocols(tmp_path, monkeypatch, capsys):
    """A relative list path starting with '-' (ffprobe read it as an option) or holding ':' (ffmpeg read the
    part before it as a protocol)."""
    monkeypatch.chdir(tmp_path)
    for name in ("-clip.mp4", "clip:2.mp4"):
        shutil.copy(EDGE / "short_32_frames.mp4", tmp_path / name)
    (tmp_path / "list.txt").write_text("-clip.mp4 0\nclip:2.mp4 0\n")
    code, err = cli(["list", "--split", "train=list.txt", "--out", "out", "--name", "d", *FAST], capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "failures.jsonl").read_text()
    with tarfile.open(tmp_path / "out" / "d-train-000000.tar") as tar:
        sources = {
            json.load(tar.extractfile(m))["source"] for m in tar.getmembers() if m.name.endswith("json")
        }
    assert sources == {"-clip.mp4", "clip:2.mp4"}


def _synthetic(out: Path, capsys, *extra: str) -> tuple[int, str]:
    argv = ["synthetic", "--out", str(out), *TINY_SYNTHETIC, "--shard-size", "8", "--workers", "1"]
    return cli([*argv, "--no-progress", *extra], capsys)


def test_disk_full_is_a_message_and_keeps_the_finished_shards(tmp_path, monkeypatch, capsys):
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert _synthetic(ref, capsys)[0] == 0
    calls = {"n": 0}
    real_addfile = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8 * 3 + 4:  # the second shard, part-way through (3 members per sample)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    code, err = _synthetic(out, capsys)
    assert code == 1 and "Traceback" not in err
    assert f"no space left on {out / 'synthetic-train-000001.tar.tmp'}" in err
    assert [p.name for p in out.glob("*.tar")] == ["synthetic-train-000000.tar"]
    assert (
        not list(out.glob("*.tmp")) and not list(out.glob("*.idx.tmp")) and not (out / "index.json").exists()
    )

    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)
    assert _synthetic(out, capsys)[0] == 0  # the same command again finishes the job
    assert tar_hashes(out) == tar_hashes(ref)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    from preprocess.runner import output_lock

    out = tmp_path / "out"
    with output_lock(out, (0, 2)):  # as if `--part 0/2` were running elsewhere into this folder
        code, err = _synthetic(out, capsys, "--part", "0/2")
        assert code == 1 and f"another run (pid {os.getpid()} on " in err
        code, err = _synthetic(out, capsys)  # a whole run would write the shards of part 0/2 too
        assert code == 1 and "another run" in err
        assert _synthetic(out, capsys, "--part", "1/2")[0] == 0  # the other part of the same job is welcome
    assert _synthetic(out, capsys, "--part", "0/2")[0] == 0


def test_parts_of_one_job_run_at_once_into_one_folder(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "preprocess", "synthetic", "--out", str(out), *TINY_SYNTHETIC]
    argv += ["--shard-size", "8", "--workers", "1", "--no-progress", "--part"]
    procs = [subprocess.Popen([*argv, f"{i}/2"], cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        proc.stderr.close()
    assert cli(["merge", str(out)], capsys)[0] == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["splits"].values()] == [32, 16]


def _files(tmp_path: Path) -> dict[str, Path]:
    """Inputs for the table below, written once per test."""
    files = {
        "list": tmp_path / "list.txt",
        "unknown_label": tmp_path / "unknown.txt",
        "empty": tmp_path / "empty.csv",
        "binary": tmp_path / "binary.txt",
        "bad_json": tmp_path / "bad.json",
        "classes": tmp_path / "classes.txt",
        "no_classes": tmp_path / "no_classes.txt",
        "bad_class_json": tmp_path / "classes.json",
        "a_file": tmp_path / "a_file",
        "kinetics_empty": tmp_path / "k.csv",
        "bad_part": tmp_path / "parts" / "index.part-0-of-1.json",
    }
    files["list"].write_text("video.mp4 walking\n")
    files["unknown_label"].write_text("video.mp4 flying\n")
    files["empty"].write_text("")
    files["binary"].write_bytes(b"\xff\xfe\x00\x81video.mp4 0\n")
    files["bad_json"].write_text('[{"id": 1, ')
    files["classes"].write_text("walking\nrunning\n")
    files["no_classes"].write_text("\n\n")
    files["bad_class_json"].write_text('{"walking": "zero"}')
    files["a_file"].write_text("x")
    files["kinetics_empty"].write_text("")
    files["bad_part"].parent.mkdir()
    files["bad_part"].write_text("{not json")
    return files


def _list(split: str, *extra: str) -> list[str]:
    return ["list", "--split", f"train={split}", *extra]


# (argv with {name} placeholders for _files, exit code, message substrings)
MISTAKES = {
    "missing list file": (_list("{tmp}/nope.txt"), 2, ["list file", "nope.txt (split train) not found"]),
    "list file is a folder": (_list("{tmp}"), 2, ["is a folder, not a file"]),
    "missing --classes file": (
        _list("{list}", "--classes", "{tmp}/nope.txt"),
        2,
        ["class file", "nope.txt not found"],
    ),
    "empty class file": (_list("{list}", "--classes", "{no_classes}"), 2, ["lists no class names"]),
    "class JSON with a bad index": (
        _list("{list}", "--classes", "{bad_class_json}"),
        2,
        ["classes.json", "{name: index}"],
    ),
    "label not in the class list": (
        _list("{unknown_label}", "--classes", "{classes}"),
        1,
        ["every one of the 1 rows failed", "label 'flying' is not in the class list (1)", "--classes"],
    ),
    "every video missing (wrong --root)": (
        _list("{list}", "--root", "{tmp}/wrong"),
        1,
        ["every one of the 1 rows failed", "file not found (1)", "check --root", "failures.jsonl"],
    ),
    "empty CSV": (_list("{empty}"), 2, ["the inputs list no videos:", "empty.csv hold no rows"]),
    "list that is not text": (_list("{binary}"), 2, ["binary.txt is not UTF-8 text"]),
    "list JSON that does not parse": (_list("{bad_json}"), 2, ["bad.json is not valid JSON (line 1"]),
    "--out under a regular file": (
        ["list", "--split", "train={list}", "--out", "{a_file}/out"],
        2,
        ["cannot create the output folder", "a_file is a file"],
    ),
    "--out is a regular file": (
        ["list", "--split", "train={list}", "--out", "{a_file}"],
        2,
        ["a_file is a file, not a folder"],
    ),
    "--part 3/2": (_list("{list}", "--part", "3/2"), 2, ["--part must be i/N with 0 <= i < N"]),
    "kinetics: missing --videos folder": (
        ["kinetics", "--csv", "{kinetics_empty}", "--videos", "{tmp}/nope"],
        2,
        ["video folder", "not found"],
    ),
    "kinetics: empty CSV": (
        ["kinetics", "--csv", "{kinetics_empty}", "--videos", "{tmp}"],
        2,
        ["expected a header with label,youtube_id,time_start,time_end,split; got an empty file"],
    ),
    "synthetic: odd frame size": (["synthetic", "--frame-size", "33"], 2, ["--frame-size must be even"]),
    "merge: a part index that does not parse": (
        ["merge", "{tmp}/parts"],
        2,
        ["index.part-0-of-1.json is not valid JSON"],
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_cli_mistakes_end_in_a_message_and_an_exit_code(case, tmp_path, capsys):
    argv, expected_code, messages = MISTAKES[case]
    names = {"tmp": tmp_path, **_files(tmp_path)}
    argv = [arg.format(**names) for arg in argv]
    if argv[0] not in ("merge",) and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if argv[0] != "merge":
        argv += ["--workers", "1", "--no-progress"]
    code, err = cli(argv, capsys)
    assert code == expected_code, err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err


@pytest.fixture
def truncated_download(tmp_path) -> Path:
    """A faststart MP4 of 50 frames cut at the 30th frame's packet: its moov still declares 50 frames, ffmpeg
    reads 29 with "partial file" and exits 0 (-xerror does not catch demuxer errors)."""
    import av

    whole, cut = tmp_path / "whole.mp4", tmp_path / "videos" / "cut.mp4"
    cut.parent.mkdir()
    encode = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", "50"]
    encode += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(whole)]
    subprocess.run(encode, check=True, timeout=60)
    with av.open(str(whole)) as container:
        starts = [
            p.pos for p in container.demux(container.streams.video[0]) if p.pos is not None and p.pos > 0
        ]
    cut.write_bytes(whole.read_bytes()[: starts[29]])
    shutil.copy(EDGE / "short_32_frames.mp4", cut.parent / "good.mp4")
    return cut


@pytest.mark.parametrize("keep", [False, True])
def test_a_truncated_faststart_download_fails_as_truncated_or_is_kept_with_a_warning(
    keep, truncated_download, tmp_path, capsys
):
    videos, out = truncated_download.parent, tmp_path / "out"
    (tmp_path / "list.txt").write_text("cut.mp4 0\ngood.mp4 0\n")
    argv = ["list", "--split", f"train={tmp_path / 'list.txt'}", "--root", str(videos), "--out", str(out)]
    code, err = cli([*argv, *FAST, *(["--keep-truncated"] if keep else [])], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["cut"] and rows[0]["reason"].startswith("truncated: ")
    assert "29 frames (1.16 s) decoded of the 2.00 s declared" in (
        rows[0]["reason"] + rows[0].get("detail", "")
    )
    assert rows[0].get("warning", False) == keep
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["num_samples"] == (2 if keep else 1) and index["failures"] == (
        0 if keep else 1
    )
