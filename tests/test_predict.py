"""predict: the clip equals the val loader's for the same video after preprocessing (rotation, pixel aspect,
short side), the scores equal evaluate's under the checkpoint's views, memory bounded by the sampled frames
on a long clip, one-line errors with exit codes through train.main, plain state_dicts with --model (at the
plain geometry whatever the working directory holds), several videos a call, truncated files, and streaming
(sliding window, TDN, online) over generated clips."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import EDGE, KINETICS, ROOT, run_preprocess

import checkpoints
import config
import evaluation
import models
import predict
import runtime
import shardformat
import train
from models.online import causal_model
from pipeline import LoaderConfig, build_loader
from pipeline import video_file as vf
from pipeline.shards import ShardDataset
from pipeline.video_file import Hop, ShardGeometry
from preprocess.ffmpeg_args import EncodeSettings, output_size

CLASSES = ["ball", "circle", "square"]


def tiny_config(index: str = "no/index.json") -> config.Config:
    """gc_tsm_mini, 3 classes, T=4, 32-pixel crops of short side 36 (no index here: short side = scale)."""
    cfg = config.Config()
    cfg.model = config.ModelConfig(
        name="gc_tsm_mini", num_classes=len(CLASSES), channels_last=False, compile=False
    )
    cfg.data = LoaderConfig(index=index, num_segments=4, crop_size=32, scale_size=36)
    return cfg


def tiny_model(cfg: config.Config) -> models.VideoNet:
    torch.manual_seed(0)
    return models.build_model(cfg.model.name, cfg.model.num_classes, cfg.data.num_segments)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A gcvideo checkpoint, the same weights as a plain state_dict, and class lists."""
    out = tmp_path_factory.mktemp("predict")
    cfg = tiny_config()
    model = tiny_model(cfg)
    torch.save(
        {"model": model.state_dict(), "config": config.to_dict(cfg), "classes": CLASSES}, out / "ckpt.pt"
    )
    torch.save(model.state_dict(), out / "plain.pt")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "two.txt").write_text("a\nb\n")
    return {
        "ckpt": out / "ckpt.pt",
        "plain": out / "plain.pt",
        "classes": out / "classes.txt",
        "two": out / "two.txt",
    }


def predictor(cfg: config.Config, model: models.VideoNet, short_side: int | None = None) -> predict.Predictor:
    """A Predictor of a model in memory (the val views of cfg, on the CPU)."""
    shards = ShardGeometry(short_side or cfg.data.scale_size)
    return predict.Predictor(model.eval(), cfg, CLASSES, shards, torch.device("cpu"), "fp32", None, "val")


def lavfi_clip(path: Path, *, seconds: int, size: str, rate: int, faststart: bool = False) -> Path:
    """A lavfi test pattern clip (H.264, a keyframe every 2 s; faststart: the index before the frames)."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i"]
    cmd += [f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * rate), "-pix_fmt", "yuv420p"]
    cmd += ["-movflags", "+faststart", str(path)] if faststart else [str(path)]
    subprocess.run(cmd, check=True, timeout=120)
    return path


# ------------------------------------------------------------------------------------- rendering as training


@pytest.mark.parametrize(
    "width, height, sar, rotation, settings",
    [
        (568, 320, Fraction(1), 90, EncodeSettings()),
        (568, 320, Fraction(1), 270, EncodeSettings(short_side=128)),
        (176, 144, Fraction(128, 117), 0, EncodeSettings()),
        (720, 480, Fraction(32, 27), 180, EncodeSettings(short_side=None)),
        (1920, 1080, Fraction(1), 0, EncodeSettings(size=(320, 240))),
    ],
)
def test_shard_frame_size_is_preprocess_output_size(width, height, sar, rotation, settings):
    assert shardformat.frame_size(
        width, height, sar, rotation, settings.short_side, settings.size
    ) == output_size(width, height, sar, rotation, settings)


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory) -> Path:
    """Two rotated, a non-square-pixel and a Kinetics video through the preprocess CLI (MJPEG, short side
    256)."""
    out = tmp_path_factory.mktemp("val-dataset")
    sources = [
        EDGE / "rotated_90.mov",
        EDGE / "rotated_270.mov",
        EDGE / "carphone_176x144_nonsquare.mp4",
        KINETICS / "arm_wrestling_demo.mp4",
    ]
    (out / "val.txt").write_text("".join(f"{p} {p.stem}\n" for p in sources))
    split = f"val={out / 'val.txt'}"
    run_preprocess(
        "list", "--split", split, "--out", str(out / "shards"), "--codec", "mjpeg", "--workers", "1"
    )
    return out / "shards" / "index.json"


def test_read_clip_equals_the_val_loader_after_preprocessing(val_dataset):
    """The same video, once as the val loader renders its shard and once by predict from the original file.

    Tolerance: the shard is the original re-encoded as MJPEG (-q:v 3) after ffmpeg's bicubic scale, so its
    pixels carry JPEG quantisation error and ffmpeg's (not PyAV's swscale call's) rounding: measured mean
    absolute difference 0.033-0.037 in normalised units (about 2 of 255 grey levels; 0.049 for H.264 crf 23),
    99th percentile 0.14-0.19 (8-11 levels, at edges). The bounds (mean 0.06, p99 0.3) sit well below what
    a wrong rendering gives: the clip turned a quarter (0.64-1.26 mean) or shifted one frame (up to 1.03).
    """
    cfg = config.Config()
    cfg.data = LoaderConfig(index=str(val_dataset), backend="torch", workers=0, batch_size=1)
    loader = build_loader(cfg.data, "val", "val")
    sources = {
        Path(line.split()[0]).stem: line.split()[0]
        for line in (val_dataset.parent.parent / "val.txt").read_text().splitlines()
    }
    for (x_NTCHW, _), ref in zip(loader, loader.dataset.refs, strict=True):
        source = next(path for stem, path in sources.items() if ref.key.endswith(stem))
        y_NTCHW = vf.read_views(source, cfg.data, ShardGeometry(256), mode="val").x.permute(0, 1, 4, 2, 3)
        assert y_NTCHW.shape == x_NTCHW.shape == (1, 8, 3, 224, 224), source
        diff = (x_NTCHW - y_NTCHW).abs().flatten()
        assert diff.mean() < 0.06 and diff.quantile(0.99) < 0.3, (source, diff.mean(), diff.quantile(0.99))
        turned = (x_NTCHW - y_NTCHW.rot90(1, dims=(-2, -1))).abs().mean()
        assert turned > 5 * diff.mean(), (source, turned)


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    from pipeline import LoaderConfig, video_file as vf
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = vf.read_views(sys.argv[1], LoaderConfig(), vf.ShardGeometry(256), mode="val").x.permute(0, 1, 4, 2, 3)
    print(tuple(x.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_read_clip_memory_is_bounded_by_the_sampled_frames(tmp_path):
    """60 s of 640x360 at 25 fps: decoding every frame held 1500 x 691 KB = 1 GB (measured peak growth 1050
    MB); decoding only the 8 sampled frames grows the peak by tens of MB (measured 24)."""
    video = lavfi_clip(tmp_path / "long.mp4", seconds=60, size="640x360", rate=25)
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(video)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, growth_mb = done.stdout.rsplit(")", 1)
    assert shape == "(1, 8, 3, 224, 224" and int(growth_mb) < 150, done.stdout


# --------------------------------------------------------------------------------------- errors (train.main)


def error_cases(files: dict[str, Path], tmp_path: Path):
    """(argv, exit code, words of the message) for every way predict refuses its input."""
    ckpt, plain, classes = str(files["ckpt"]), str(files["plain"]), str(files["classes"])
    video = str(KINETICS / "arm_wrestling_demo.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video\n" * 20)
    (tmp_path / "no-videos").mkdir(exist_ok=True)
    cases = [
        ([ckpt, str(tmp_path / "empty.mp4")], 1, "empty.mp4 is an empty file (0 bytes), not a video"),
        ([ckpt, str(tmp_path / "notes.mp4")], 1, "notes.mp4 is not a video: FFmpeg recognises no container"),
        ([ckpt, str(tmp_path / "no-videos")], 1, "holds no video files"),
        ([ckpt, video, video, "--stream"], 2, "--stream takes one source, got 2"),
        ([ckpt, str(EDGE / "audio_only.wav")], 1, "has no video stream (only audio)"),
        ([ckpt, str(EDGE / "mp4_no_streams.mp4")], 1, "has no video stream (no streams at all)"),
        ([ckpt, str(tmp_path / "missing.mp4")], 1, "not found"),
        ([ckpt, str(EDGE / "truncated.mkv")], 1, "cannot open"),
        ([ckpt, video, "--classes", str(tmp_path / "missing.txt")], 1, "class list"),
        ([ckpt, video, "--classes", str(files["two"])], 1, "has 3 classes but the class list has 2"),
        ([ckpt, video, "--top", "0"], 2, "--top must be >= 1"),
        ([ckpt, video, "--stream", "--hop", "-1"], 2, "--hop"),
        ([ckpt], 2, "required"),
        ([plain, video], 1, "plain state_dict (no config inside)"),
        ([plain, video, "--model", "gc_tsm_mini"], 1, "needs --classes FILE"),
        ([plain, video, "--model", "no_such_model", "--classes", classes], 2, "unknown model"),
        (
            [plain, video, "--model", "tsn_mini", "--classes", classes, "--num-segments", "4"],
            1,
            "does not fit",
        ),
        ([plain, video, "--model", "gc_tsm_mini", "--classes", str(files["two"])], 1, "has 3 classes"),
        ([str(tmp_path / "none.pt"), video], 1, "checkpoint"),
        ([ckpt, "9"], 1, "camera /dev/video9 not found"),
        (
            [ckpt, str(EDGE / "rotated_90.mov"), "--stream", "--stride", "2"],
            1,
            "ended after 3 frames, before a window of 4",
        ),
        ([ckpt, video, "--threads", "-1"], 2, "--threads must be >= 0"),
    ]
    if not torch.cuda.is_available():
        cases.append(([ckpt, video, "--device", "cuda"], 1, "asks for a GPU but torch sees none"))
    return cases


def test_errors_are_one_line_with_an_exit_code(files, tmp_path, caplog):
    for argv, code, words in error_cases(files, tmp_path):
        caplog.clear()
        assert train.main(["predict", *argv]) == code, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and words in errors[0], (argv, errors)


def test_a_plain_state_dict_predicts_with_model_and_classes(files, capsys):
    """`models.convert` writes a plain state_dict: --model and --classes make it usable as it is."""
    video = str(KINETICS / "arm_wrestling_demo.mp4")
    argv = [str(files["plain"]), video, "--model", "gc_tsm_mini", "--classes", str(files["classes"])]
    assert train.main(["predict", *argv, "--num-segments", "4", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split()[-1] in CLASSES for line in lines)
    # the same weights inside a gcvideo checkpoint score the same at the same geometry and views
    cpu = torch.device("cpu")
    named = {"classes_file": str(files["classes"]), "model_name": "gc_tsm_mini", "num_segments": 4}
    plain = predict.load_predictor(str(files["plain"]), cpu, short_side=36, **named)
    ckpt = predict.load_predictor(str(files["ckpt"]), cpu, short_side=36)
    plain.cfg.data = ckpt.cfg.data
    assert predict.predict_video(plain, video, 3) == predict.predict_video(ckpt, video, 3)


def test_a_plain_state_dict_ignores_a_dataset_in_the_working_directory(files, tmp_path, monkeypatch, capsys):
    """The default --data.index (data/synthetic/index.json) of a run directory once decided a plain
    state_dict's frame size (short side 64 after `make train`): its geometry is --short-side or 256."""
    video = str(EDGE / "bikes_640x272.mp4")
    plain = [str(files["plain"]), video, "--model", "gc_tsm_mini", "--classes", str(files["classes"])]
    plain += ["--num-segments", "4", "--json", "--device", "cpu"]

    def scores(*extra: str) -> list:
        assert train.main(["predict", *plain, *extra]) == 0
        return json.loads(capsys.readouterr().out)["top"]

    expected = scores("--short-side", "256")
    index = tmp_path / "data" / "synthetic" / "index.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps({"settings": {"short_side": 64}}))
    monkeypatch.chdir(tmp_path)
    assert scores() == expected
    assert scores("--short-side", "64") != expected  # the geometry does change the scores


# ------------------------------------------------------------------------- the checkpoint's evaluation views


@pytest.mark.parametrize(
    "views",
    [
        {"num_clips": 2, "num_crops": 3},
        {"num_clips": 2, "twice_sample": True},
        {"num_clips": 2, "num_crops": 3, "sampling": "dense", "full_res": True},
    ],
)
def test_predict_gives_evaluates_scores_for_a_video_of_the_shard_set(tiny_index, tmp_path, views, capsys):
    """A checkpoint whose --eval.* asks for several views: evaluate scores the shard set's val videos, and
    predict, given the very files the shards hold, must score each the same (the same views, draws, crops
    and averaging); --fast is one view."""
    cfg = config.apply_overrides(config.demo(), ["--data.index", str(tiny_index), "--data.backend", "torch"])
    cfg.model.compile, cfg.data.workers, cfg.data.num_segments = False, 0, 4
    cfg.data.crop_size, cfg.data.scale_size, cfg.data.dense_stride = 28, 32, 2
    cfg.eval = config.EvalConfig(**views, batch_size=4)
    torch.manual_seed(0)
    model = models.build_model(cfg.model.name, 8, 4)
    cfg.model.num_classes = 8
    facts = checkpoints.inference_facts(tiny_index, ShardDataset(tiny_index, "train"))
    classes = json.loads(tiny_index.read_text())["classes"]
    ckpt = tmp_path / "best.pt"
    torch.save(
        {"model": model.state_dict(), "config": config.to_dict(cfg), "classes": classes, "facts": facts}, ckpt
    )
    evaluation.evaluate([str(ckpt)], ["--eval.out", str(tmp_path / "ev"), "--run.device", "cpu"])
    expected = {
        (r := json.loads(line))["key"]: r
        for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    }
    dataset = ShardDataset(tiny_index, "val")
    videos = []
    for i in (0, 5):
        sample = dataset[i]
        videos.append(tmp_path / f"{sample.key}.{dataset.video_ext}")
        videos[-1].write_bytes(sample.video.tobytes())
    assert train.main(["predict", str(ckpt), *map(str, videos), "--top", "5", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    clips = 2 if views.get("twice_sample") else views["num_clips"]
    for video, record in zip(videos, records, strict=True):
        want = expected[video.stem]
        assert record["views"] == clips * views.get("num_crops", 1)
        assert [classes.index(name) for name, _ in record["top"]] == want["top5"]
        assert [s for _, s in record["top"]] == pytest.approx(want["top5_scores"], abs=2e-6)
    assert train.main(["predict", str(ckpt), str(videos[0]), "--fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views"] == 1


# ---------------------------------------------------------------------------------- several videos, bad files


def test_several_videos_folders_and_list_files_load_the_model_once(files, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("rotated_90.mov", "rotated_180.mov"):
        (folder / name).write_bytes((EDGE / name).read_bytes())
    (folder / "notes.txt").write_text("not a video")  # not a video suffix: not listed from the folder
    listing = tmp_path / "list.txt"
    listing.write_text(f"{KINETICS / 'arm_wrestling_demo.mp4'}\nclips/rotated_90.mov\n")
    loads = []
    monkeypatch.setattr(checkpoints, "load", lambda *a, _load=checkpoints.load: loads.append(a) or _load(*a))
    assert train.main(["predict", str(files["ckpt"]), str(folder), str(listing), "--top", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(loads) == 1
    assert [Path(r["video"]).name for r in records] == [
        "rotated_180.mov",
        "rotated_90.mov",
        "arm_wrestling_demo.mp4",
        "rotated_90.mov",
    ]
    assert all(len(r["top"]) == 1 and r["top"][0][0] in CLASSES for r in records)
    # a bad file among them gets its line and the others go on; the command then exits 1
    (tmp_path / "empty.mp4").write_bytes(b"")
    argv = [str(files["ckpt"]), str(tmp_path / "empty.mp4"), str(folder / "rotated_90.mov")]
    assert train.main(["predict", *argv]) == 1
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert "empty file" in first["error"] and second["top"]


def test_a_truncated_faststart_mp4_is_read_with_a_warning_that_gives_the_counts(
    files, tmp_path, caplog, capsys
):
    """The index (moov) of a faststart mp4 lies before the frames and still lists all 100 after the file is
    cut in half: predict reads the frames present, warns with both counts and says so in its record."""
    whole = lavfi_clip(tmp_path / "whole.mp4", seconds=10, size="160x120", rate=10, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert train.main(["predict", str(files["ckpt"]), str(cut), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    read = record["frames"]
    assert 20 < read < 80 and record["warning"] == f"truncated: {read} frames read of the 100 declared"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{read} frames read of the 100 its header declares" in w for w in warnings), warnings
    caplog.clear()
    assert train.main(["predict", str(files["ckpt"]), str(whole), "--json"]) == 0
    assert "warning" not in json.loads(capsys.readouterr().out) and not caplog.records


def test_device_auto_is_cuda_when_present_and_a_bad_name_names_the_option():
    assert runtime.resolve_device("auto", option="--device").type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    with pytest.raises(runtime.DeviceError, match="--device 'nonsense' is not a torch device"):
        runtime.resolve_device("nonsense", option="--device")
    assert runtime.resolve_device("cpu").type == "cpu"


# ------------------------------------------------------------------------------------------------- streaming


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_stream_over_three_minutes(files, tmp_path, monkeypatch):
    """3 min at 10 fps: a window of T=4 frames 2 apart is full at frame 6 (t=0.6 s), then a record every
    second: frames 6, 16, ..., 1796 = 180 records. Only the window's T preprocessed frames stay alive (each
    one is tracked by a weak reference), and the resident size stays flat after the first records."""
    video = lavfi_clip(tmp_path / "three_minutes.mp4", seconds=180, size="160x120", rate=10)
    p = predict.load_predictor(str(files["ckpt"]), torch.device("cpu"))
    alive = weakref.WeakSet()
    preprocess = vf.FramePreprocessor.__call__

    def tracked(self, frame):
        alive.add(x := preprocess(self, frame))
        return x

    monkeypatch.setattr(vf.FramePreprocessor, "__call__", tracked)
    records, rss, most_alive = [], [], 0
    for record in predict.stream_predictions(p, str(video), stride=2, hop=Hop(1, True)):
        records.append(record)
        rss.append(rss_mb())
        most_alive = max(most_alive, len(alive))
    assert most_alive == p.cfg.data.num_segments
    assert len(records) == 180
    assert [r["frame"] for r in records] == list(range(6, 1800, 10))
    times = [r["t"] for r in records]
    assert times[0] == pytest.approx(0.6) and all(
        b - a == pytest.approx(1.0) for a, b in zip(times, times[1:])
    )
    assert all(len(r["top"]) == 3 and r["top"][0][0] in CLASSES for r in records)
    assert max(rss[10:]) - rss[10] < 20, (rss[10], max(rss[10:]))


def test_stream_command_writes_jsonl_and_plain_lines(files, tmp_path, capsys):
    video = lavfi_clip(tmp_path / "short.mp4", seconds=6, size="160x120", rate=10)
    jsonl = tmp_path / "records.jsonl"
    argv = [str(files["ckpt"]), str(video), "--stream", "--stride", "1", "--hop", "15", "--top", "2"]
    assert train.main(["predict", *argv, "--jsonl", str(jsonl)]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # T=4 consecutive frames: the first window is full at frame 3, then every 15 frames up to frame 59
    assert [r["frame"] for r in records] == [3, 18, 33, 48]
    assert [r["t"] for r in records] == [0.3, 1.8, 3.3, 4.8] and all(len(r["top"]) == 2 for r in records)
    captured = capsys.readouterr()
    assert "60 frames decoded, 16 through the model (sliding window), 4 records" in captured.err
    assert train.main(["predict", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["0.30s", "frame", "3"]


def test_stream_stride_defaults_to_the_checkpoints_training_clip(tmp_path):
    """Trained on videos of a median 40 frames at T=4: the window's frames are 10 apart, so the first
    window is full at frame 30; a plain state_dict assumes 10-s clips (at 10 fps: 25 apart, full at 75, and
    windows end only where a segment can start, every 25 frames: the 100-frame video has room for one)."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    ckpt = tmp_path / "ckpt.pt"
    facts = {"shards": {"short_side": 36, "size": None}, "clip_frames": 40}
    torch.save(
        {"model": model.state_dict(), "config": config.to_dict(cfg), "classes": CLASSES, "facts": facts}, ckpt
    )
    video = str(lavfi_clip(tmp_path / "v.mp4", seconds=10, size="160x120", rate=10))
    p = predict.load_predictor(str(ckpt), torch.device("cpu"))
    assert [r["frame"] for r in predict.stream_predictions(p, video, hop=Hop(30, False))] == [30, 60, 90]
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    (tmp_path / "c.txt").write_text("\n".join(CLASSES))
    named = {"model_name": "gc_tsm_mini", "classes_file": str(tmp_path / "c.txt"), "num_segments": 4}
    p = predict.load_predictor(str(tmp_path / "plain.pt"), torch.device("cpu"), **named)
    assert [r["frame"] for r in predict.stream_predictions(p, video)] == [75]


def test_stream_frames_are_rendered_as_read_views_renders_them():
    """rotated_90.mov has 3 frames: a T=3 clip is frames 0, 1, 2, and so is the first stream window at
    stride 1, so both score the same (rotation, scaling, crop and normalisation shared)."""
    cfg = tiny_config()
    cfg.data.num_segments = 3
    p = predictor(cfg, tiny_model(cfg))
    video = str(EDGE / "rotated_90.mov")
    clip = predict.predict_video(p, video, 3)["top"]
    (record,) = predict.stream_predictions(p, video, stride=1, hop=Hop(1, False))
    assert record["frame"] == 2
    assert [name for name, _ in record["top"]] == [name for name, _ in clip]
    assert [score for _, score in record["top"]] == pytest.approx([score for _, score in clip], abs=1e-6)


def test_stream_of_a_tdn_model_holds_five_frames_a_segment(tmp_path):
    """TDN takes 5 consecutive frames a segment: a window is T segments of 5 frames (it held T frames and
    crashed). At stride 5 the window's frames are 0..9 for T=2, the same clip as read_views gives for a
    10-frame video (its TSN segment centres' 5-frame runs), and both score the same."""
    cfg = tiny_config()
    cfg.model.name, cfg.data.num_segments, cfg.data.frames_per_segment = "tdn_mini", 2, 5
    p = predictor(cfg, tiny_model(cfg))
    ten = lavfi_clip(tmp_path / "ten.mp4", seconds=1, size="160x120", rate=10)
    (record,) = predict.stream_predictions(p, str(ten), stride=5, hop=Hop(100, False), online=False)
    assert record["frame"] == 9
    clip = predict.predict_video(p, ten, 3)["top"]
    assert [score for _, score in record["top"]] == pytest.approx([score for _, score in clip], abs=1e-6)
    assert predict.online_model(p) is None  # TDN runs online only as a sliding window


def test_stream_runs_the_online_model_where_it_can(tmp_path, capsys):
    """tsm_mini streams online, one 2D forward a frame: its first record (after T frames) equals the causal
    offline model on the same T frames, and the command prints frames/s."""
    cfg = tiny_config()
    cfg.model.name = "tsm_mini"
    model = tiny_model(cfg)
    p = predictor(cfg, model)
    video = lavfi_clip(tmp_path / "v.mp4", seconds=2, size="160x120", rate=10)
    stats = predict.StreamStats()
    records = list(predict.stream_predictions(p, str(video), stride=2, hop=Hop(4, False), stats=stats))
    assert stats.how.startswith("online") and stats.scored == 10
    assert [r["frame"] for r in records] == [6, 10, 14, 18]
    with vf.open_video(video) as container:
        stream = vf.video_stream(container, video)
        _, _, window = next(vf.sliding_windows(container, stream, cfg.data, p.shards, 2, Hop(1, False)))
    offline = causal_model(model)(window.permute(0, 3, 1, 2)[None]).softmax(-1)[0]
    expected = sorted(offline.tolist(), reverse=True)
    assert [score for _, score in records[0]["top"]] == pytest.approx(expected, abs=1e-5)
    ckpt = tmp_path / "tsm.pt"
    torch.save({"model": model.state_dict(), "config": config.to_dict(cfg), "classes": CLASSES}, ckpt)
    assert train.main(["predict", str(ckpt), str(video), "--stream", "--stride", "2", "--hop", "4"]) == 0
    err = capsys.readouterr().err
    assert "20 frames decoded, 10 through the model (online, one frame per step), 4 records" in err
    assert "model frames/s" in err
