"""Pure parts of preprocess/: argument builders, probe parsing, sizes, keys, list/CSV parsers, shard plans."""

from __future__ import annotations

import errno
import json
import os
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from preprocess.__main__ import main as cli_main
from preprocess.ffmpeg_args import (
    EncodeSettings,
    count_frames_args,
    frames_args,
    output_size,
    probe_args,
    transcode_args,
)
from preprocess.jobs import InputError, Job, make_key, unique_keys
from preprocess.probe import ProbeError, parse_probe
from preprocess.runner import Dataset, all_failed_message, part_of, plan_shards
from preprocess.sources import (
    _list_rows,
    _resolve_label,
    list_dataset,
    parse_split_args,
    read_classes,
    read_kinetics_csv,
)
from preprocess.synthetic import render
from preprocess.transcode import frame_pattern
from preprocess.writer import meta_bytes, write_error

ANN = DATA / "annotations"


@pytest.mark.parametrize(
    "w, h, sar, rot, settings, expected",
    [
        (340, 256, Fraction(1), 0, EncodeSettings(short_side=128), (170, 128)),
        (256, 340, Fraction(1), 0, EncodeSettings(short_side=128), (128, 170)),
        (568, 320, Fraction(1), 90, EncodeSettings(short_side=128), (128, 228)),  # portrait after rotation
        (568, 320, Fraction(1), 180, EncodeSettings(short_side=128), (228, 128)),
        (340, 256, Fraction(64, 51), 0, EncodeSettings(short_side=128), (214, 128)),  # non-square pixels
        (176, 144, Fraction(128, 117), 0, EncodeSettings(short_side=None), (192, 144)),
        (1920, 1080, Fraction(1), 0, EncodeSettings(short_side=256), (456, 256)),  # 455.1 -> even
        (50, 51, Fraction(1), 0, EncodeSettings(short_side=None), (50, 52)),  # odd -> even
        (640, 360, Fraction(1), 0, EncodeSettings(size=(224, 224)), (224, 224)),
    ],
)
def test_output_size(w, h, sar, rot, settings, expected):
    assert output_size(w, h, sar, rot, settings) == expected


def _opt(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(
    "settings, start, end, expect, absent",
    [
        (
            EncodeSettings(),
            None,
            None,
            {
                "-vcodec": "libx264",
                "-g": "4",  # the default keyframe interval (docs/preprocess.md)
                "-keyint_min": "4",
                "-bf": "0",
                "-sc_threshold": "0",
                "-pix_fmt": "yuv420p",
                "-fps_mode": "vfr",
            },
            ["-ss", "-t", "-q:v"],
        ),
        (
            EncodeSettings(codec="mjpeg", mjpeg_quality=4),
            None,
            None,
            {"-vcodec": "mjpeg", "-q:v": "4", "-pix_fmt": "yuvj420p"},
            ["-g", "-crf"],
        ),
        (
            EncodeSettings(gop=8, fps=15),
            417.0,
            427.0,
            {"-ss": "417.0", "-t": "10.0", "-g": "8", "-fps_mode": "cfr"},
            [],
        ),
        (EncodeSettings(tolerate_decode_errors=True), 0.0, 10.0, {"-t": "10.0"}, ["-xerror", "-ss"]),
    ],
)
def test_transcode_args(settings, start, end, expect, absent):
    args = transcode_args(
        "in put.mp4", "out.mp4", stream_index=3, size=(128, 96), settings=settings, start=start, end=end
    )
    assert args[0] == "ffmpeg" and args[-1] == "out.mp4"
    assert _opt(args, "-i") == "file:in put.mp4"  # one argument, no shell quoting
    for flag, value in expect.items():
        assert _opt(args, flag) == value, flag
    for flag in absent:
        assert flag not in args
    graph = _opt(args, "-filter_complex")
    assert graph.startswith("[0:3]scale=128:96")  # only the chosen stream; audio and the rest are not mapped
    assert ("fps=" in graph) == (settings.fps is not None)
    assert "-an" not in args and args.count("-map") == 1
    assert args.index("-ss" if start else "-i") <= args.index("-i")  # input seek before -i
    assert ("-xerror" in args) != settings.tolerate_decode_errors
    assert args.index("-y") < args.index("-i")  # global options first
    # the source decoder runs on the encoder's threads (not ffmpeg's one per core): an input option
    assert args.index("-threads") < args.index("-i") and _opt(args, "-threads") == str(settings.threads)
    assert args.count("-threads") == 2


def test_frames_args_and_probe_args():
    args = frames_args(
        "/d/img_%05d.jpg",
        "o.mp4",
        start_number=1,
        frame_rate=12,
        size=(64, 48),
        settings=EncodeSettings(codec="mjpeg"),
    )
    assert (
        _opt(args, "-framerate") == "12"
        and _opt(args, "-start_number") == "1"
        and _opt(args, "-f") == "image2"
    )
    assert _opt(args, "-i") == "file:/d/img_%05d.jpg"
    assert args.index("-threads") < args.index("-i") and _opt(args, "-threads") == "1"
    assert count_frames_args("a b.mp4")[-1] == "file:a b.mp4"


_SETTINGS = EncodeSettings()


# Every builder gives ffmpeg/ffprobe the input as one `file:` argument: a path starting with '-' is not an
# option, one holding ':' is not a protocol, '-' is not stdin.
@pytest.mark.parametrize(
    "build, where",
    [
        (probe_args, -1),
        (count_frames_args, -1),
        (lambda p: transcode_args(p, "o.mp4", stream_index=0, size=(64, 64), settings=_SETTINGS), "-i"),
        (
            lambda p: frames_args(
                p, "o.mp4", start_number=1, frame_rate=12, size=(64, 64), settings=_SETTINGS
            ),
            "-i",
        ),
    ],
)
@pytest.mark.parametrize("path", ["-clip.mp4", "--x", "a:b.mp4", "-", "/abs/-c.mp4", "rel/dir/v.mp4"])
def test_input_paths_are_file_urls(build, where, path):
    args = build(path)
    assert (args[where] if isinstance(where, int) else _opt(args, where)) == f"file:{path}"
    assert args.count(f"file:{path}") == 1 and path not in args


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codec="vp9"),
        dict(short_side=255),
        dict(size=(63, 64)),
        dict(fps=0),
        dict(gop=0),
        dict(crf=52),
        dict(mjpeg_quality=1),
    ],
)
def test_bad_settings_rejected(kwargs):
    with pytest.raises(ValueError):
        EncodeSettings(**kwargs)


def _stream(**kw):
    base = {
        "index": 0,
        "codec_type": "video",
        "codec_name": "h264",
        "width": 320,
        "height": 240,
        "avg_frame_rate": "30000/1001",
        "pix_fmt": "yuv420p",
        "duration": "10.0",
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "info, index, rotation, sar, fps",
    [
        ({"streams": [_stream()]}, 0, 0, Fraction(1), 29.97),
        (
            {"streams": [{"index": 0, "codec_type": "audio"}, _stream(index=1, sample_aspect_ratio="64:51")]},
            1,
            0,
            Fraction(64, 51),
            29.97,
        ),
        ({"streams": [_stream(disposition={"attached_pic": 1}), _stream(index=1)]}, 1, 0, Fraction(1), 29.97),
        ({"streams": [_stream(side_data_list=[{"rotation": -90}])]}, 0, 90, Fraction(1), 29.97),
        (
            {"streams": [_stream(tags={"rotate": "270"}, avg_frame_rate="0/0", r_frame_rate="25/1")]},
            0,
            270,
            Fraction(1),
            25.0,
        ),
        ({"streams": [_stream(sample_aspect_ratio="0:1")]}, 0, 0, Fraction(1), 29.97),
    ],
)
def test_parse_probe(info, index, rotation, sar, fps):
    stream = parse_probe(info)
    assert (stream.index, stream.rotation, stream.sar) == (index, rotation, sar)
    assert stream.fps == pytest.approx(fps, abs=0.01)


@pytest.mark.parametrize(
    "info, reason",
    [
        ({"streams": [{"index": 0, "codec_type": "audio"}]}, "no video stream (only audio)"),
        ({"streams": []}, "no video stream (no streams at all)"),
        ({"streams": [_stream(width=0)]}, "video stream 0 has no size (0x240)"),
    ],
)
def test_parse_probe_failures(info, reason):
    with pytest.raises(ProbeError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_probe(info)


def test_keys():
    assert make_key("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01") == "ApplyEyeMakeup_v_ApplyEyeMakeup_g08_c01"
    assert make_key("--nQbRBEz2s_000104_000114") == "--nQbRBEz2s_000104_000114"
    assert "." not in make_key("a.b.c")
    keys = unique_keys(["a", "b", "a", "a_2", "a"])
    assert len(set(keys)) == 5 and keys[:2] == ["a", "b"] and keys[3] == "a_2"
    assert struct.unpack("<2i", meta_bytes(7, 300)) == (7, 300) and len(meta_bytes(-1, 1)) == 8


def test_kinetics_csv_real_validation_file():
    rows = read_kinetics_csv(ANN / "kinetics400" / "kinetics-400_val.csv")
    assert len(rows) == 19906
    assert len({r.label for r in rows}) == 400 and {r.split for r in rows} == {"val"}
    quoted = [r for r in rows if r.youtube_id == "--nQbRBEz2s"]
    assert quoted and quoted[0].label == "air drumming" and (quoted[0].start, quoted[0].end) == (104, 114)
    k400 = (ANN / "label_maps" / "kinetics_label_map_k400.txt").read_text().split("\n")
    assert {r.label for r in rows} <= set(k400)


def test_kinetics_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="expected a header"):
        read_kinetics_csv(bad)
    with pytest.raises(InputError, match="not found"):
        read_kinetics_csv(tmp_path / "missing.csv")


def test_class_files(tmp_path):
    ucf = read_classes(ANN / "ucf101" / "classInd.txt")
    assert ucf.base == 1 and len(ucf.names) == 101 and ucf.names[0] == "ApplyEyeMakeup"
    plain = read_classes(ANN / "label_maps" / "sthv2_label_map.txt")
    assert plain.base == 0 and len(plain.names) == 174
    ssv2 = tmp_path / "labels.json"
    ssv2.write_text(json.dumps({"Pushing something": "1", "Holding something": "0"}))
    assert read_classes(ssv2).names == ["Holding something", "Pushing something"]


def test_list_formats(tmp_path):
    (tmp_path / "a.txt").write_text("x/a.mp4 3\nx/b.mp4 300 4\n")
    assert _list_rows(tmp_path / "a.txt") == [("x/a.mp4", "3"), ("x/b.mp4", "4")]
    (tmp_path / "b.csv").write_text('path,label\n"a b.mp4",arm wrestling\n')
    assert _list_rows(tmp_path / "b.csv") == [("a b.mp4", "arm wrestling")]
    (tmp_path / "c.json").write_text(json.dumps([{"id": "78687", "template": "Holding [something]"}]))
    assert _list_rows(tmp_path / "c.json") == [("78687", "Holding something")]
    (tmp_path / "d.txt").write_text("a.mp4 1 2 3\n")
    with pytest.raises(InputError, match="multi-label"):
        _list_rows(tmp_path / "d.txt")


def test_ucf101_split_files():
    d = list_dataset(
        {"train": str(ANN / "ucf101" / "trainlist01.txt"), "val": str(ANN / "ucf101" / "testlist01.txt")},
        "/ucf",
        str(ANN / "ucf101" / "classInd.txt"),
    )
    assert not d.rejected and d.splits == ["train", "val"] and len(d.jobs) == 9537 + 3783
    first = d.jobs[0]
    assert first.label == 0 and first.label_name == "ApplyEyeMakeup"  # 1-based list label -> 0-based
    yoyo = [j for j in d.jobs if j.split == "val"][-1]
    assert yoyo.label == 100 and yoyo.source.startswith("/ucf/YoYo/")  # test list: label from the folder
    assert all("." not in j.key for j in d.jobs)


def test_resolve_label_errors():
    classes = read_classes(ANN / "ucf101" / "classInd.txt")
    assert _resolve_label("102", "x.avi", classes) == "label 102 is outside the 101 classes"
    assert "not in the class list" in _resolve_label("Nope", "x.avi", classes)


def _jobs(n: int, split: str) -> list[Job]:
    return [
        Job(key=f"{split}{i}", source=f"/v/{i}.mp4", label=i % 3, label_name=None, split=split)
        for i in range(n)
    ]


def test_plan_is_deterministic_and_parts_cover_everything():
    dataset = Dataset(
        classes=["a", "b", "c"], splits=["train", "val"], jobs=_jobs(10, "train") + _jobs(3, "val")
    )
    plans = plan_shards(dataset, 4, seed=0)
    assert [(p.split, p.number, len(p.jobs)) for p in plans] == [
        ("train", 0, 4),
        ("train", 1, 4),
        ("train", 2, 2),
        ("val", 0, 3),
    ]
    assert plans == plan_shards(dataset, 4, seed=0)
    assert [j.key for j in plans[0].jobs] != [j.key for j in plan_shards(dataset, 4, seed=1)[0].jobs]
    assert sorted(j.key for p in plans for j in p.jobs) == sorted(j.key for j in dataset.jobs)
    parts = [part_of(plans, (i, 3)) for i in range(3)]
    assert sorted((p.split, p.number) for part in parts for p in part) == sorted(
        (p.split, p.number) for p in plans
    )


def test_split_args():
    assert parse_split_args(["train=a.txt", "val=b.txt"]) == {"train": "a.txt", "val": "b.txt"}
    assert parse_split_args(["a.txt"]) == {"train": "a.txt"}
    with pytest.raises(InputError, match="given twice"):
        parse_split_args(["train=a", "train=b"])
    with pytest.raises(InputError, match="letters, digits"):
        parse_split_args(["tr-ain=a"])


def test_frame_pattern(tmp_path):
    for i in (1, 2, 3):
        (tmp_path / f"img_{i:05d}.jpg").write_bytes(b"")
    assert frame_pattern(tmp_path) == (str(tmp_path / "img_%05d.jpg"), 1, 3)
    (tmp_path / "img_00005.jpg").write_bytes(b"")
    with pytest.raises(ProbeError, match="not contiguous"):
        frame_pattern(tmp_path)


@pytest.mark.parametrize("pair", range(4))
def test_synthetic_pairs_are_time_reversals(pair):
    forward, backward = render(2 * pair, 1234, 16, 64), render(2 * pair + 1, 1234, 16, 64)
    assert forward.shape == (16, 64, 64, 3) and forward.dtype == np.uint8
    np.testing.assert_array_equal(backward, forward[::-1])
    assert not np.array_equal(forward[0], forward[-1])  # something moves
    assert not np.array_equal(render(2 * pair, 1235, 16, 64), forward)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["list", "--split", "val=/nonexistent.txt"], "not found"),
        (["list", "--split", "val=x.txt", "--short-side", "127"], "short side must be an even"),
        (["list", "--split", "val=x.txt", "--name", "my.data"], "--name"),
        (["merge", "/nonexistent-dir"], "no index.part"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    assert cli_main(argv + (["--out", str(tmp_path)] if argv[0] != "merge" else [])) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["list", "--split", "a=b", "--part", "3/2"], ["kinetics"], ["list", "--size", "5"]]
)
def test_cli_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("256", ("samples", 256)),
        ("500MB", ("bytes", 500_000_000)),
        ("1.5GB", ("bytes", 1_500_000_000)),
        ("2GiB", ("bytes", 2 * 2**30)),
        ("64kb", ("bytes", 64_000)),
    ],
)
def test_shard_size_option(text, expected):
    from preprocess.__main__ import _shard_size

    assert _shard_size(text) == expected


@pytest.mark.parametrize("text", ["0", "1.5", "12XB", "-3", "big"])
def test_bad_shard_size_option(text):
    import argparse

    from preprocess.__main__ import _shard_size

    with pytest.raises(argparse.ArgumentTypeError, match="shard size must be"):
        _shard_size(text)


@pytest.mark.parametrize(
    "reasons, expected",
    [
        (
            ["file not found"] * 3,
            ["3 rows failed", "file not found (3)", "check --root", "f.jsonl must exist"],
        ),
        (
            ["label 'a' is not in the class list", "unreadable: ffprobe cannot open it", "file not found"] * 2
            + ["label 'b' is not in the class list"],
            ["7 rows failed", "label 'a' is not in the class list (2)", "check --classes", "ffprobe FILE"],
        ),
        (["transcode failed (ffmpeg exit status 1): x"], ["--tolerate-decode-errors", "f.jsonl"]),
        (["something new"], ["something new (1). see f.jsonl"]),
    ],
)
def test_all_failed_message(reasons, expected):
    message = all_failed_message([{"reason": r} for r in reasons], Path("f.jsonl"))
    assert "\n" not in message
    for text in expected:
        assert text in message


@pytest.mark.parametrize(
    "code, expected",
    [
        (errno.ENOSPC, "no space left on /d/x.tar.tmp: free some space"),
        (errno.EDQUOT, "disk quota exceeded on /d/x.tar.tmp"),
        (errno.EACCES, "cannot write /d/x.tar.tmp: Permission denied"),
    ],
)
def test_write_error(code, expected):
    assert write_error(OSError(code, os.strerror(code)), Path("/d/x.tar.tmp")).startswith(expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["kinetics", "--csv", "a.csv", "--videos", "v"],
        ["list", "--split", "train=a.txt"],
        ["frames", "--split", "train=a.txt"],
        ["hmdb51", "--annotations", "a", "--root", "r"],
    ],
)
def test_cli_defaults_are_the_dataclass_defaults(argv, capsys):
    """The CLI repeats no default: a change to EncodeSettings or ShardJob is the CLI's change."""
    from preprocess import __main__ as cli
    from preprocess.runner import ShardJob

    args = cli.build_parser().parse_args(argv)
    settings = cli.settings_from(args)
    assert settings == EncodeSettings()
    job = cli.shard_job(args, settings)
    assert job == ShardJob(out=job.out, name=job.name, settings=EncodeSettings())
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([argv[0], "--help"])
    assert f"libx264 preset (default {EncodeSettings().preset})" in " ".join(capsys.readouterr().out.split())
