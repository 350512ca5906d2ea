"""predict: the clip equals the val loader's for the same video after preprocessing (rotation, pixel aspect,
short side), memory bounded by the sampled frames on a long clip, one-line errors with exit codes through
train.main, plain state_dicts with --model, and streaming over a generated several-minute clip."""

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

import config as C
import models
import predict
import train
from pipeline import LoaderConfig, build_loader
from preprocess.ffmpeg_args import EncodeSettings, output_size

CLASSES = ["ball", "circle", "square"]


def tiny_config(index: str = "no/index.json") -> C.Config:
    """gc_tsm_mini, 3 classes, T=4, 32-pixel crops of short side 36 (no index here: short side = scale)."""
    cfg = C.Config()
    cfg.model = C.ModelConfig(
        name="gc_tsm_mini", num_classes=len(CLASSES), channels_last=False, compile=False
    )
    cfg.data = LoaderConfig(index=index, num_segments=4, crop_size=32, scale_size=36)
    return cfg


def tiny_model(cfg: C.Config) -> models.VideoNet:
    torch.manual_seed(0)
    return models.build_model(cfg.model.name, cfg.model.num_classes, cfg.data.num_segments)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A gcvideo checkpoint, the same weights as a plain state_dict, and class lists."""
    out = tmp_path_factory.mktemp("predict")
    cfg = tiny_config()
    model = tiny_model(cfg)
    torch.save({"model": model.state_dict(), "config": C.to_dict(cfg), "classes": CLASSES}, out / "ckpt.pt")
    torch.save(model.state_dict(), out / "plain.pt")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "two.txt").write_text("a\nb\n")
    return {
        "ckpt": out / "ckpt.pt",
        "plain": out / "plain.pt",
        "classes": out / "classes.txt",
        "two": out / "two.txt",
    }


def lavfi_clip(path: Path, *, seconds: int, size: str, rate: int) -> Path:
    """A lavfi test pattern clip (H.264, a keyframe every 2 s)."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i"]
    cmd += [f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * rate), "-pix_fmt", "yuv420p", str(path)]
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
    assert predict.shard_frame_size(
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
    cfg = C.Config()
    cfg.data = LoaderConfig(index=str(val_dataset), backend="torch", workers=0, batch_size=1)
    loader = build_loader(cfg.data, "val", "val")
    sources = {
        Path(line.split()[0]).stem: line.split()[0]
        for line in (val_dataset.parent.parent / "val.txt").read_text().splitlines()
    }
    for (x_NTCHW, _), ref in zip(loader, loader.dataset.refs, strict=True):
        source = next(path for stem, path in sources.items() if ref.key.endswith(stem))
        y_NTCHW = predict.read_clip(source, cfg)
        assert y_NTCHW.shape == x_NTCHW.shape == (1, 8, 3, 224, 224), source
        diff = (x_NTCHW - y_NTCHW).abs().flatten()
        assert diff.mean() < 0.06 and diff.quantile(0.99) < 0.3, (source, diff.mean(), diff.quantile(0.99))
        turned = (x_NTCHW - y_NTCHW.rot90(1, dims=(-2, -1))).abs().mean()
        assert turned > 5 * diff.mean(), (source, turned)


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    import config as C, predict
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = predict.read_clip(sys.argv[1], C.Config())
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
    cases = [
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
        ([ckpt, str(EDGE / "rotated_90.mov"), "--stream"], 1, "ended after 3 frames, before a window of 4"),
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
    # the same weights inside a gcvideo checkpoint score the same at the same geometry
    cfg = predict.plain_config("gc_tsm_mini", 4, len(CLASSES))
    model, _, _ = predict.load_model(str(files["ckpt"]), torch.device("cpu"))
    named = {"classes_file": str(files["classes"]), "model_name": "gc_tsm_mini", "num_segments": 4}
    plain, _, _ = predict.load_model(str(files["plain"]), torch.device("cpu"), **named)
    x = predict.read_clip(video, cfg)
    assert predict.top_classes(model, x, CLASSES, 3) == predict.top_classes(plain, x, CLASSES, 3)


# ------------------------------------------------------------------------------------------------- streaming


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_stream_over_three_minutes(files, tmp_path, monkeypatch):
    """3 min at 10 fps: a window of T=4 frames 2 apart is full at frame 6 (t=0.6 s), then a record every
    second: frames 6, 16, ..., 1796 = 180 records. Only the window's T preprocessed frames stay alive (each
    one is tracked by a weak reference), and the resident size stays flat after the first records."""
    video = lavfi_clip(tmp_path / "three_minutes.mp4", seconds=180, size="160x120", rate=10)
    model, cfg, classes = predict.load_model(str(files["ckpt"]), torch.device("cpu"))
    alive = weakref.WeakSet()
    preprocess = predict.FramePreprocessor.__call__

    def tracked(self, frame):
        alive.add(x := preprocess(self, frame))
        return x

    monkeypatch.setattr(predict.FramePreprocessor, "__call__", tracked)
    records, rss, most_alive = [], [], 0
    for record in predict.stream_predictions(
        model, cfg, classes, str(video), stride=2, hop=predict.Hop(1, True)
    ):
        records.append(record)
        rss.append(rss_mb())
        most_alive = max(most_alive, len(alive))
    assert most_alive == cfg.data.num_segments
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
    capsys.readouterr()
    assert train.main(["predict", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["0.30s", "frame", "3"]


def test_stream_frames_are_rendered_as_read_clip_renders_them():
    """rotated_90.mov has 3 frames: a T=3 clip is frames 0, 1, 2, and so is the first stream window at
    stride 1, so both score the same (rotation, scaling, crop and normalisation shared)."""
    cfg = tiny_config()
    cfg.data.num_segments = 3
    model = tiny_model(cfg).eval()
    video = str(EDGE / "rotated_90.mov")
    clip = predict.top_classes(model, predict.read_clip(video, cfg), CLASSES, 3)
    (record,) = predict.stream_predictions(model, cfg, CLASSES, video, stride=1, hop=predict.Hop(1, False))
    assert record["frame"] == 2
    assert [name for name, _ in record["top"]] == [name for name, _ in clip]
    assert [score for _, score in record["top"]] == pytest.approx([score for _, score in clip], abs=1e-6)
