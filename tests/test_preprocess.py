"""preprocess/ end to end on the real files in ../shared/data: shards decode, frame counts match ffprobe,
every row lands in a shard or in failures.jsonl, restarts and --part/merge give the same bytes, DALI reads
the shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import pytest
from conftest import EDGE, K400_CLASSES, KINETICS, ROOT

from preprocess.__main__ import main as cli_main
from preprocess.ffmpeg_args import EncodeSettings, count_frames_args
from preprocess.probe import ProbeError, ffprobe, probe, probe_in_process
from preprocess.transcode import NO_FRAMES, inspect_video

EXPECTED_FAILURES = {
    "audio_only.wav": "no video stream",
    "mp4_audio_only.mp4": "no video stream",
    "mp4_no_streams.mp4": "no video stream",
    "truncated.mkv": "unreadable",
    "corrupted.mp4": "transcode failed",
    "does_not_exist.mp4": "file not found",
}


def ffprobe_frames(path: Path) -> int:
    return int(
        subprocess.run(count_frames_args(str(path)), capture_output=True, text=True, check=True).stdout
    )


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard listed in index.json."""
    index = json.loads((out / "index.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for split in index["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["tar"]) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def preprocess(*argv: str) -> None:
    assert cli_main([*argv, "--workers", "2", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """One run over the five Kinetics clips (split val) and every edge case (split edge), H.264 at 64 px."""
    out = tmp_path_factory.mktemp("real")
    edge_list = out.parent / "edge.txt"
    edge_list.write_text("".join(f"{p.name} 0\n" for p in sorted(EDGE.iterdir())) + "does_not_exist.mp4 0\n")
    kinetics = out.parent / "kinetics.csv"  # labels.csv's paths are relative to KINETICS: make them absolute
    kinetics.write_text(
        "path,label\n"
        + "".join(
            f"{KINETICS / line.split(',')[0]},{line.split(',', 1)[1]}\n"
            for line in (KINETICS / "labels.csv").read_text().splitlines()[1:]
        )
    )
    preprocess(
        "list",
        "--split",
        f"val={kinetics}",
        "--split",
        f"edge={edge_list}",
        "--root",
        str(EDGE),
        "--classes",
        str(K400_CLASSES),
        "--short-side",
        "64",
        "--shard-size",
        "4",
        "--name",
        "real",
        "--out",
        str(out),
    )
    return out


def test_every_row_lands_in_a_shard_or_in_failures(real_run):
    index = json.loads((real_run / "index.json").read_text())
    samples = read_shards(real_run)
    failures = [json.loads(line) for line in (real_run / "failures.jsonl").read_text().splitlines()]
    failed = {Path(f["source"]).name: f for f in failures}
    assert {
        name: f["reason"] for name, f in failed.items() if not f["reason"].startswith(EXPECTED_FAILURES[name])
    } == {}
    assert set(failed) == set(EXPECTED_FAILURES) and index["failures"] == len(failures)
    assert failed["corrupted.mp4"]["detail"]  # the tail of ffmpeg's message comes with the reason
    sources = {Path(json.loads(s["json"])["source"]).name for s in samples.values()}
    expected = {p.name for p in EDGE.iterdir()} - set(EXPECTED_FAILURES) | {
        p.name for p in KINETICS.glob("*.m*")
    }
    assert sources == expected
    assert index["splits"]["val"]["num_samples"] == 5
    assert index["splits"]["edge"]["num_samples"] == len(expected) - 5
    assert sum(s["num_samples"] for split in index["splits"].values() for s in split["shards"]) == len(
        samples
    )
    assert len(index["classes"]) == 400 and index["codec"] == "h264" and index["video_ext"] == "mp4"


def test_kinetics_frames_decode_and_match_ffprobe(real_run, tmp_path):
    samples = read_shards(real_run)
    labels = dict(line.split(",", 1) for line in (KINETICS / "labels.csv").read_text().splitlines()[1:])
    classes = K400_CLASSES.read_text().splitlines()
    kinetics = {k: s for k, s in samples.items() if str(KINETICS) in json.loads(s["json"])["source"]}
    assert len(kinetics) == 5
    for key, sample in kinetics.items():
        info = json.loads(sample["json"])
        source = Path(info["source"])
        assert "." not in key and set(sample) == {"mp4", "json", "meta"}
        assert info["label_name"] == labels[source.name] and classes[info["label"]] == info["label_name"]
        assert list(memoryview(sample["meta"]).cast("i")) == [info["label"], info["num_frames"]]
        video = tmp_path / f"{key}.mp4"
        video.write_bytes(sample["mp4"])
        assert info["num_frames"] == ffprobe_frames(video) == ffprobe_frames(source)
        with av.open(io.BytesIO(sample["mp4"])) as container:
            assert len(container.streams) == 1 and not container.streams.audio
            frames = list(container.decode(video=0))
        assert len(frames) == info["num_frames"]
        assert (frames[0].width, frames[0].height) == (info["width"], info["height"])
        assert min(info["width"], info["height"]) == 64 and info["width"] % 2 == info["height"] % 2 == 0
        assert frames[0].format.name == "yuv420p"
        keyframes = [i for i, f in enumerate(frames) if f.key_frame]
        # the default fixed GOP (fast seeking)
        assert keyframes == list(range(0, info["num_frames"], EncodeSettings().gop))


def test_edge_cases_are_normalised(real_run):
    by_name = {
        Path(json.loads(s["json"])["source"]).name: json.loads(s["json"])
        for s in read_shards(real_run).values()
    }
    assert by_name["rotated_90.mov"]["height"] > by_name["rotated_90.mov"]["width"]  # rotation applied
    assert by_name["rotated_0.mov"]["width"] > by_name["rotated_0.mov"]["height"]
    assert by_name["two_video_streams.mp4"]["num_frames"] == 325  # first video stream only
    assert by_name["vfr_1080p.mp4"]["num_frames"] == 72  # VFR: every frame kept once, none duplicated
    # square pixels: the display size (176*128/117) x 144 scaled to 64 tall (ignoring the SAR would give 78)
    assert by_name["carphone_176x144_nonsquare.mp4"]["width"] == 86
    for name in (
        "hevc_10bit.mp4",
        "h264_10bit.mp4",
        "av1.mkv",
        "h264_full_range.mp4",
        "ucf101_apply_eye_makeup_mpeg4_mp3.avi",
        "unordered_timestamps.mov",
    ):
        assert by_name[name]["num_frames"] > 0


def test_dali_index_files_match_wds2idx(real_run, tmp_path):
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for tar in sorted(real_run.glob("*.tar")):
        subprocess.run([str(wds2idx), str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text() == (tmp_path / "ref.idx").read_text()
    assert not list(real_run.glob("*.tmp"))


def test_kinetics_command_finds_clips_and_trims_full_videos(tmp_path):
    videos = tmp_path / "videos" / "some class"
    videos.mkdir(parents=True)
    os.symlink(KINETICS / "arm_wrestling_demo.mp4", videos / "-abc_def-12_000000_000010.mp4")  # trimmed clip
    os.symlink(KINETICS / "cleaning_pool_test.mp4", videos / "xyz.mp4")  # full video: trim to 2..5 s
    csv = tmp_path / "k.csv"
    csv.write_text(
        'label,youtube_id,time_start,time_end,split,is_cc\n"arm wrestling",-abc_def-12,0,10,train,0\n'
        'cleaning pool,xyz,2,5,val,0\n"arm wrestling",missing1234,3,13,train,0\n'
        "cleaning pool,xyz,100,110,val,0\n"  # a window past the end of the 10 s video
    )
    out = tmp_path / "out"
    preprocess(
        "kinetics",
        "--csv",
        str(csv),
        "--videos",
        str(tmp_path / "videos"),
        "--codec",
        "mjpeg",
        "--short-side",
        "64",
        "--out",
        str(out),
        "--name",
        "k",
    )
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["arm wrestling", "cleaning pool"] and index["codec"] == "mjpeg"
    samples = {k: json.loads(s["json"]) for k, s in read_shards(out).items()}
    assert set(samples) == {"-abc_def-12_000000_000010", "xyz_000002_000005"}
    assert samples["-abc_def-12_000000_000010"]["num_frames"] == 280
    trimmed = samples["xyz_000002_000005"]
    assert (trimmed["source_start"], trimmed["source_end"]) == (2.0, 5.0)
    assert trimmed["num_frames"] == 90 and trimmed["label"] == 1  # 3 s at 30 fps
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((f["key"], f["reason"]) for f in failures) == [
        ("missing1234_000003_000013", "file not found"),
        ("xyz_000100_000110", NO_FRAMES),
    ]


def test_frames_command(tmp_path):
    frames = tmp_path / "frames" / "clip1"
    frames.mkdir(parents=True)
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(KINETICS / "cleaning_pool_test.mp4"),
            "-frames:v",
            "12",
            "-vf",
            "scale=96:-2",
            str(frames / "%05d.jpg"),
        ],
        check=True,
    )
    (tmp_path / "list.txt").write_text("clip1 12 3\n")
    out = tmp_path / "out"
    preprocess(
        "frames",
        "--split",
        f"train={tmp_path / 'list.txt'}",
        "--root",
        str(tmp_path / "frames"),
        "--codec",
        "mjpeg",
        "--short-side",
        "64",
        "--out",
        str(out),
        "--name",
        "f",
    )
    (sample,) = read_shards(out).values()
    info = json.loads(sample["json"])
    assert (info["num_frames"], info["label"], info["fps"], info["height"]) == (12, 3, 12.0, 64)


SMALL_SYNTHETIC = ["--train-per-class", "12", "--val-per-class", "3", "--shard-size", "16"]


def _small_synthetic(out: Path, *extra: str) -> None:
    preprocess("synthetic", "--out", str(out), *SMALL_SYNTHETIC, *extra)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    _small_synthetic(out)
    return out


def test_synthetic_is_deterministic_and_restart_redoes_only_missing_shards(synthetic_run, tmp_path):
    reference = tar_hashes(synthetic_run)
    assert len(reference) == 8  # 96 train clips in 6 shards of 16, 24 val clips in 2
    out = tmp_path / "again"
    _small_synthetic(out)
    assert tar_hashes(out) == reference
    # Simulate a kill in the middle of shard 2: its tar is gone, a half-written temp file is left behind.
    victim = out / "synthetic-train-000002.tar"
    victim.rename(out / "synthetic-train-000002.tar.tmp")
    (out / ".records" / "synthetic-train-000002.json").unlink()
    (out / "synthetic-train-000002.tar.tmp").write_bytes(b"partial")
    untouched = (out / "synthetic-train-000000.tar").stat().st_mtime_ns
    _small_synthetic(out)
    assert tar_hashes(out) == reference and not list(out.glob("*.tmp"))
    assert (out / "synthetic-train-000000.tar").stat().st_mtime_ns == untouched


def test_killed_run_restarts_to_the_same_shards(synthetic_run, tmp_path):
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "preprocess",
        "synthetic",
        "--out",
        str(out),
        *SMALL_SYNTHETIC,
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way: one worker (in-process) makes the run last ~2 s
    assert proc.wait() == -signal.SIGKILL and not (out / "index.json").exists()
    assert 0 < len(list(out.glob("*.tar"))) < 8
    _small_synthetic(out)
    assert tar_hashes(out) == tar_hashes(synthetic_run)
    assert (out / "index.json").read_text() == (synthetic_run / "index.json").read_text()


def test_parts_and_merge_give_the_single_run_index(synthetic_run, tmp_path):
    out = tmp_path / "parts"
    for i in range(3):
        _small_synthetic(out, "--part", f"{i}/3")
        part = json.loads((out / f"index.part-{i}-of-3.json").read_text())
        assert 0 < sum(s["num_samples"] for s in part["splits"].values()) < 120
    assert not (out / "index.json").exists()
    assert cli_main(["merge", str(out)]) == 0
    merged = json.loads((out / "index.json").read_text())
    single = json.loads((synthetic_run / "index.json").read_text())
    assert merged == single
    assert tar_hashes(out) == tar_hashes(synthetic_run)


def test_dali_reads_the_shards(synthetic_run):
    from nvidia.dali import fn, pipeline_def, types

    index = json.loads((synthetic_run / "index.json").read_text())
    shards = index["splits"]["val"]["shards"]
    batch = 4

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        video, meta = fn.readers.webdataset(
            paths=[str(synthetic_run / s["tar"]) for s in shards],
            index_paths=[str(synthetic_run / s["index"]) for s in shards],
            ext=["mp4", "meta"],
            dtypes=[types.UINT8, types.INT32],
        )
        return fn.decoders.video(video, device="cpu", frames=[0, 7, 15]), meta

    p = pipe()
    p.build()
    labels = []
    for _ in range(index["splits"]["val"]["num_samples"] // batch):
        frames, meta = p.run()
        for i in range(batch):
            assert frames.at(i).shape == (3, 64, 64, 3)
            label, num_frames = meta.at(i).tolist()
            assert num_frames == 16
            labels.append(label)
    assert sorted(labels) == sorted(list(range(8)) * 3)


def test_shard_size_in_bytes_uses_the_pilot_mean(tmp_path):
    out = tmp_path / "bytes"
    preprocess(
        "list",
        "--split",
        f"val={KINETICS / 'labels.csv'}",
        "--root",
        str(KINETICS),
        "--codec",
        "mjpeg",
        "--short-side",
        "64",
        "--shard-size",
        "2MB",
        "--out",
        str(out),
        "--name",
        "b",
    )
    index = json.loads((out / "index.json").read_text())
    sizes = [
        len(s["mp4"]) for s in read_shards(out).values()
    ]  # all 5 clips were the pilot (it takes up to 8)
    per_shard = max(1, int(2_000_000 / (sum(sizes) / len(sizes))))
    assert 1 < per_shard < 5  # several shards of several videos
    assert index["settings"]["shard_samples"] == per_shard and index["settings"]["shard_bytes"] == 2_000_000
    counts = [s["num_samples"] for s in index["splits"]["val"]["shards"]]
    assert counts[:-1] == [per_shard] * (len(counts) - 1) and sum(counts) == 5


@pytest.mark.parametrize(
    "name",
    [
        "rotated_90.mov",
        "rotated_270.mov",
        "carphone_176x144_nonsquare.mp4",
        "two_video_streams.mp4",
        "ucf101_apply_eye_makeup_mpeg4_mp3.avi",
        "vfr_1080p.mp4",
        "av1.mkv",
        "audio_only.wav",
    ],
)
def test_in_process_probe_reads_what_ffprobe_reads(name):
    """The per-video probe runs in-process (PyAV) and must see the same stream, size, pixel aspect, rotation
    and declared length as ffprobe (or the same 'no video stream' verdict)."""
    path = str(EDGE / name)

    def read(fn):
        try:
            return fn(path)
        except ProbeError as err:
            return err.reason

    assert read(probe_in_process) == read(ffprobe)


def test_probe_starts_no_process_for_a_readable_file_and_leaves_unreadable_ones_to_ffprobe(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", no_process)
        stream = probe(str(KINETICS / "flipping_pancake.mkv"))
    assert (stream.width, stream.height, stream.fps) == (426, 240, 30.0)
    assert probe_in_process(str(EDGE / "truncated.mkv")) is None
    with pytest.raises(ProbeError, match="unreadable: ffprobe cannot open it"):
        probe(str(EDGE / "truncated.mkv"))


def test_validating_decode_with_threads_counts_the_same_frames():
    data = (EDGE / "short_32_frames.mp4").read_bytes()
    assert inspect_video(data, threads=2) == inspect_video(data, threads=1)
    assert inspect_video(data).num_frames == 32
