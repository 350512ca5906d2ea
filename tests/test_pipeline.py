"""Loaders on real shards: MJPEG shards of the real Kinetics clips in ../shared/data, built by the preprocess
CLI."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import VIDEOS, run_preprocess

from pipeline import DatasetError, LoaderConfig, TestViews, build_loader, sampling, select_backend
from pipeline.build import BACKENDS
from pipeline.dali_loader import decode_frames_dali, frame_index_graph
from pipeline.shards import ShardDataset, parse_idx
from pipeline.torch_loader import _decode_forward, decode_frames

KINETICS = [
    "arm_wrestling_demo.mp4",
    "cleaning_pool_test.mp4",
    "flipping_pancake.mkv",
    "clean_and_jerk_GGSY1Qvo990.mp4",
    "walking_the_dog_ZNVhz7ctTq0.mp4",
]


def _preprocess(out: Path, rows: dict[str, list[tuple[str, str]]], *extra: str) -> Path:
    args = ["list", "--root", str(VIDEOS), "--out", str(out), "--name", "t", "--codec", "mjpeg"]
    args += ["--short-side", "64", "--shard-samples", "2", "--workers", "2", *extra]
    for split, items in rows.items():
        lst = out.parent / f"{out.name}-{split}.csv"
        lst.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in items))
        args += ["--split", f"{split}={lst}"]
    run_preprocess(*args)
    return out / "index.json"


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """6 clips per split (5 Kinetics + a 32-frame clip), short side 64, MJPEG, 2 samples per shard."""
    labels = [Path(k).stem.split("_")[0] for k in KINETICS]
    rows = [(f"kinetics/{k}", lab) for k, lab in zip(KINETICS, labels)] + [
        ("edge/short_32_frames.mp4", "short")
    ]
    return _preprocess(tmp_path_factory.mktemp("shards") / "ds", {"train": rows, "val": rows})


@pytest.fixture(scope="module")
def corrupt_index(index, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the dataset with one val video overwritten by random bytes (tar and index stay valid)."""
    out = tmp_path_factory.mktemp("corrupt") / "ds"
    shutil.copytree(index.parent, out)
    shard = json.loads((out / "index.json").read_text())["splits"]["val"]["shards"][1]
    key, members = parse_idx(out / shard["index"])[0]
    offset, size = members["mp4"]
    with open(out / shard["tar"], "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return out / "index.json", key


def _cfg(index, **kw) -> LoaderConfig:
    base = dict(index=str(index), crop_size=56, scale_size=64, num_segments=4, batch_size=2, workers=2)
    return LoaderConfig(**{**base, **kw})


def test_reads_the_preprocess_output(index):
    ds = ShardDataset(index, "val")
    assert len(ds) == 6 and ds.codec == "mjpeg"
    samples = [ds[i] for i in range(len(ds))]
    assert {s.num_frames for s in samples} >= {32, 280}
    for s in samples:
        assert min(s.width, s.height) == 64 and ds.classes[s.label] in s.key.replace("_", " ") + " short"


def test_dali_decodes_the_requested_frames(index):
    """DALI frame i == PyAV frame i (up to colour conversion), and is unlike frames i +- 1."""
    ds = ShardDataset(index, "val")
    for i in (0, 3, 5):
        s = ds[i]
        idx = np.array([0, s.num_frames // 2, s.num_frames - 1, 7, 7])
        got = decode_frames_dali(s.video, idx).astype(np.int16)
        ref = decode_frames(s.video, np.concatenate([idx, idx[:3] + [1, 1, -1]])).astype(np.int16)
        assert got.shape == ref[:5].shape == (5, s.height, s.width, 3)
        err = np.abs(got - ref[:5]).mean(axis=(1, 2, 3))
        assert np.all(err < 3.0), err  # chroma upsampling differs; same frame
        assert np.array_equal(got[3], got[4])
        neighbour = np.abs(got[:3] - ref[5:]).mean(axis=(1, 2, 3))
        assert np.all(neighbour > err[:3]), (neighbour, err)


@pytest.mark.parametrize(
    "rule, mode, clips, per_segment",
    [
        ("tsn", "train", 1, 1),
        ("tsn", "test", 2, 1),
        ("dense", "train", 1, 1),
        ("dense", "test", 3, 1),
        ("tsn", "val", 1, 1),
        ("tsn", "train", 1, 5),  # TDN: 5 frames around each index, clamped at the ends
        ("tsn", "test", 2, 5),
        ("dense", "train", 1, 3),
    ],
)
def test_dali_index_arithmetic_equals_numpy(rule, mode, clips, per_segment):
    from nvidia.dali import fn, pipeline_def, types

    T, stride = 8, 4
    lengths = [1, 3, 7, 8, 31, 32, 33, 64, 100, 301, 1000, 4097]
    rng = np.random.default_rng(0)
    draws = [
        sampling.frame_draws(rng, mode=mode, sampling=rule, num_segments=T, num_clips=clips) for _ in lengths
    ]
    draws[0][:] = np.float32(np.nextafter(np.float32(1), np.float32(0)))  # the largest draw

    @pipeline_def(batch_size=len(lengths), num_threads=1, device_id=None)
    def pipe():
        n, u = fn.external_source(
            source=lambda: ([np.int32(x) for x in lengths], draws),
            num_outputs=2,
            batch=True,
            dtype=[types.INT32, types.FLOAT],
        )
        return frame_index_graph(
            n, u, sampling_rule=rule, num_segments=T, dense_stride=stride, frames_per_segment=per_segment
        )

    p = pipe()
    p.build()
    out = p.run()[0]
    for i, (length, u) in enumerate(zip(lengths, draws)):
        expected = sampling.frame_indices(
            length, u, sampling=rule, dense_stride=stride, frames_per_segment=per_segment
        ).ravel()
        assert np.array(out[i]).tolist() == expected.tolist(), (length, u)


@pytest.mark.parametrize("mode, crops", [("train", 1), ("val", 1), ("test", 10)])
def test_dali_and_torch_fallback_agree(index, mode, crops):
    outs, views = {}, TestViews(num_clips=2, num_crops=crops)  # train and val take one view all the same
    for backend in ("dali-cpu", "torch"):
        loader = build_loader(_cfg(index, backend=backend, batch_size=3), "val", mode, views=views)
        loader.set_epoch(2)
        outs[backend] = list(loader)
    assert len(outs["dali-cpu"]) == len(outs["torch"]) == 2
    for a, b in zip(outs["dali-cpu"], outs["torch"]):
        assert a[0].shape == b[0].shape and a[1].tolist() == b[1].tolist()
        diff = (a[0] - b[0]).abs()
        assert diff.mean() < 0.05 and diff.max() < 1.2  # normalised units: 0.05 ~ 3 grey levels
        if mode == "test":
            assert a[2] == b[2]
    other = list(build_loader(_cfg(index, backend="torch", batch_size=3), "val", mode, views=views))
    if mode == "train":  # a different epoch draws other frames and crops
        assert (other[0][0] - outs["torch"][0][0]).abs().mean() > 0.1


@pytest.mark.parametrize("mode", ["train", "test"])
def test_frames_per_segment_in_both_backends(index, mode):
    # TDN input: 5 consecutive frames per segment, segment-major; both backends compute the indices on their
    # own (numpy / the DALI graph), so equal pixels mean equal frames.
    outs = {}
    for backend in ("dali-cpu", "torch"):
        cfg = _cfg(index, backend=backend, num_segments=2, frames_per_segment=5, batch_size=3)
        loader = build_loader(cfg, "val", mode, views=TestViews(num_clips=2))
        loader.set_epoch(1)
        outs[backend] = next(iter(loader))[0]
    shape = (3, 2, 10, 3, 56, 56) if mode == "test" else (3, 10, 3, 56, 56)
    assert outs["dali-cpu"].shape == outs["torch"].shape == shape
    diff = (outs["dali-cpu"] - outs["torch"]).abs()
    assert diff.mean() < 0.05 and diff.max() < 1.2
    x = outs["torch"].flatten(0, -5)  # (clips, 10, 3, S, S)
    neighbours = (x[:, 1:5] - x[:, :4]).abs().mean()
    across = (x[:, 5:] - x[:, :5]).abs().mean()  # the frames of the other segment, far away in time
    assert neighbours < across


def test_output_contract(index):
    loader = build_loader(
        _cfg(index, backend="dali-cpu", batch_size=4), "train", "train", dtype=torch.bfloat16
    )
    assert loader.classes == json.loads(index.read_text())["classes"] and len(loader) == 1
    assert loader.num_samples == 4
    batches = list(loader)
    assert len(batches) == len(loader)
    x, y = batches[0]
    assert x.shape == (4, 4, 3, 56, 56) and x.dtype == torch.bfloat16 and y.dtype == torch.long
    assert x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    test = build_loader(
        _cfg(index, backend="dali-cpu", batch_size=4),
        "val",
        "test",
        views=TestViews(num_clips=2, num_crops=3),
    )
    x, y, keys = next(iter(test))
    assert x.shape == (4, 6, 4, 3, 64, 64) and len(keys) == 4 and len(y) == 4
    # view v = clip * crops + crop: the 3 crops of one clip share their frames, the 2 clips do not
    assert not torch.equal(x[:, 0], x[:, 3]) and not torch.equal(x[:, 0], x[:, 1])


def test_normalisation_and_flip(index):
    """Values are ImageNet-normalised; train flips mirror the crop (same frames and box, flip on and off)."""
    loaders = {
        flip: build_loader(
            _cfg(index, backend="dali-cpu", flip=flip, batch_size=6, scales=(1.0,)), "train", "train"
        )
        for flip in (True, False)
    }
    ((xf, yf),) = list(loaders[True])
    ((xn, yn),) = list(loaders[False])
    assert torch.equal(yf, yn) and -2.2 < float(xn.min()) and float(xn.max()) < 2.7
    mirrored = [torch.allclose(xf[i], xn[i].flip(-1), atol=1e-5) for i in range(6)]
    same = [torch.equal(xf[i], xn[i]) for i in range(6)]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_val_ranks_cover_every_sample_once(index, backend):
    keys = []
    for rank in range(4):
        loader = build_loader(_cfg(index, backend=backend), "val", "test", rank=rank, world_size=4)
        got = [k for _, _, batch_keys in loader for k in batch_keys]
        assert len(got) == loader.num_samples
        keys += got
    assert sorted(keys) == sorted(r.key for r in ShardDataset(index, "val").refs)


def test_train_ranks_get_equal_disjoint_batches(index):
    loaders = [
        build_loader(_cfg(index, backend="dali-cpu", batch_size=1), "train", "train", rank=r, world_size=4)
        for r in range(4)
    ]
    for epoch in (0, 1):
        ids = []
        for loader in loaders:
            loader.set_epoch(epoch)
            ids.append([int(i) for b in loader.batches() for i in b])
        assert [len(x) for x in ids] == [1, 1, 1, 1] and len({i for x in ids for i in x}) == 4
    assert [len(loader) for loader in loaders] == [1] * 4 and len(list(loaders[3])) == 1


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_resume_sees_exactly_the_remaining_batches(index, backend):
    cfg = _cfg(index, backend=backend, batch_size=2)
    full = build_loader(cfg, "train", "train")
    full.set_epoch(5)
    whole = list(full)
    assert len(whole) == 3
    resumed = build_loader(cfg, "train", "train")
    resumed.set_epoch(5, start_batch=1)
    rest = list(resumed)
    assert len(rest) == 2
    for (xa, ya), (xb, yb) in zip(whole[1:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_corrupt_sample_is_skipped_and_counted(corrupt_index, backend):
    index, bad_key = corrupt_index
    val = build_loader(_cfg(index, backend=backend, batch_size=4), "val", "test")
    keys = [k for _, _, batch_keys in val for k in batch_keys]
    assert val.skipped == 1 and len(keys) == 5 and bad_key not in keys
    train = build_loader(_cfg(index, backend=backend, batch_size=6), "val", "train")
    ((x, y),) = list(train)
    assert x.shape[0] == 6 and train.skipped == 1  # refilled to a full batch
    list(train)
    assert train.skipped == 2  # counted again when met again, not decoded again


@pytest.fixture(scope="module")
def h264_index(tmp_path_factory) -> Path:
    rows = [(f"kinetics/{k}", "x") for k in KINETICS[:3]]
    return _preprocess(tmp_path_factory.mktemp("h264") / "ds", {"val": rows}, "--codec", "h264", "--gop", "8")


def test_fallback_seeking_decode_equals_decoding_forward(h264_index):
    """Seeking to keyframes (H.264, GOP 8, B-frames) returns exactly the frames a full forward decode does."""
    ds = ShardDataset(h264_index, "val")
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        s = ds[i]
        idx = np.concatenate([rng.integers(0, s.num_frames, 9), [s.num_frames - 1, 0, 8, 7, 9]])
        with av.open(io.BytesIO(bytes(s.video))) as c:
            forward = _decode_forward(c, c.streams.video[0], sorted(set(idx.tolist())))
        assert np.array_equal(decode_frames(s.video, idx), np.stack([forward[j] for j in idx]))
    loader = build_loader(_cfg(h264_index, batch_size=3, workers=0), "val", "val")  # auto: H.264 on CPU
    ((x, y),) = list(loader)
    assert loader.backend == "torch" and x.shape == (3, 4, 3, 56, 56) and loader.skipped == 0


def test_dali_pipelines_are_built_once_across_epochs(index, monkeypatch):
    from pipeline import dali_loader

    built = []
    real_build = dali_loader.DaliLoader._build
    monkeypatch.setattr(
        dali_loader.DaliLoader, "_build", lambda self, *a, **kw: built.append(1) or real_build(self, *a, **kw)
    )
    loader = build_loader(_cfg(index, backend="dali-cpu", batch_size=2), "train", "train")
    epochs = []
    for epoch in range(3):  # as the training loop does: exactly len(loader) batches, never exhausting it
        loader.set_epoch(epoch)
        batches = iter(loader)
        epochs.append([next(batches)[0].clone() for _ in range(len(loader))])
    assert len(built) == 1
    fresh = build_loader(_cfg(index, backend="dali-cpu", batch_size=2), "train", "train")
    for epoch in (0, 2):
        fresh.set_epoch(epoch)
        for got, want in zip(epochs[epoch], fresh):
            torch.testing.assert_close(got, want[0])


@pytest.mark.parametrize(
    "message, resource",
    [
        ("CUDA error: out of memory", True),
        ("cudaErrorMemoryAllocation: out of memory allocating 12 MB", True),
        ("CUDA_ERROR_OUT_OF_MEMORY", True),
        ("NVDEC: decoder session limit reached", True),
        ("Failed to create video decoder", False),  # e.g. a codec NVDEC lacks: a property of the file
        ("Invalid data found when processing input", False),
        ("Could not find a stream of type video", False),
        ("moov atom not found", False),
    ],
)
def test_resource_errors_are_told_from_broken_files(message, resource):
    from pipeline.dali_loader import is_resource_error

    assert is_resource_error(message) is resource


def test_explicit_device_names_the_current_gpu(monkeypatch):
    from pipeline.loader import explicit_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert explicit_device("cuda") == torch.device("cuda", 3)
    assert explicit_device("cuda:1") == torch.device("cuda", 1)
    assert explicit_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "requested, codec, device, expected",
    [
        ("auto", "mjpeg", "cpu", "dali-cpu"),
        ("auto", "h264", "cpu", "torch"),
        ("auto", "vp9", "cpu", "torch"),
        ("auto", "h264", "cuda:0", "dali-gpu"),
        ("auto", "hevc", "cuda:0", "dali-gpu"),
        ("auto", "mjpeg", "cuda:0", "dali-cpu"),  # NVDEC refuses MJPEG: decode on the CPU, move to the GPU
        ("torch", "mjpeg", "cuda:0", "torch"),
        ("dali-cpu", "mjpeg", "cuda:0", "dali-cpu"),
        ("dali-cpu", "h264", "cpu", "cannot decode 'h264'"),
        ("dali-gpu", "h264", "cpu", "needs a CUDA device"),
        ("dali-gpu", "mjpeg", "cuda:0", "NVDEC (backend dali-gpu) cannot decode 'mjpeg'"),
    ],
)
def test_select_backend_table(requested, codec, device, expected):
    if expected in BACKENDS:
        assert select_backend(requested, codec=codec, device=torch.device(device)) == expected
    else:
        with pytest.raises(ValueError, match=re.escape(expected)):
            select_backend(requested, codec=codec, device=torch.device(device))


@pytest.mark.parametrize(
    "ranking, codec, device, expected",
    [
        ({"mjpeg": ("dali-cpu", "torch")}, "mjpeg", "cpu", "dali-cpu"),
        ({"mjpeg": ("torch", "dali-cpu")}, "mjpeg", "cpu", "torch"),  # the fallback ranked first
        ({"mjpeg": ("torch", "dali-cpu")}, "mjpeg", "cuda:0", "torch"),  # both decode on the CPU
        ({"vp9": ("dali-cpu", "torch")}, "vp9", "cpu", "dali-cpu"),
        ({"vp9": ("dali-cpu", "torch")}, "vp9", "cuda:0", "dali-gpu"),  # NVDEC codec on a GPU
        ({"h264": ("dali-cpu", "torch")}, "h264", "cpu", "torch"),  # DALI's CPU cannot decode it
        ({"h264": ("dali-cpu", "torch")}, "h264", "cuda:0", "dali-gpu"),
        ({}, "mjpeg", "cpu", "torch"),  # nothing ranked: the fallback
        ({}, "hevc", "cuda:0", "dali-gpu"),
    ],
)
def test_auto_picks_the_backend_ranked_fastest(monkeypatch, ranking, codec, device, expected):
    from pipeline import build

    monkeypatch.setattr(build, "CPU_BACKENDS_FASTEST_FIRST", ranking)
    assert select_backend("auto", codec=codec, device=torch.device(device)) == expected
    assert select_backend("torch", codec=codec, device=torch.device(device)) == "torch"  # asked for, kept


def test_bad_paths_and_sizes_are_named(index, tmp_path):
    with pytest.raises(DatasetError, match="preprocess"):
        build_loader(_cfg(tmp_path / "nothing.json"), "train", "train")
    with pytest.raises(DatasetError, match="no split 'test'"):
        build_loader(_cfg(index), "test", "test")
    with pytest.raises(DatasetError, match="batch_size"):
        build_loader(_cfg(index, batch_size=64), "train", "train")


def test_mp4_frame_ranges_are_the_demuxed_packets(index, h264_index):
    from pipeline.mp4 import frame_ranges

    ds = ShardDataset(index, "val")
    for i in range(len(ds)):
        s = ds[i]
        offsets, sizes = frame_ranges(s.video)
        with av.open(io.BytesIO(bytes(s.video))) as c:
            packets = [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]
        assert len(offsets) == s.num_frames == len(packets)
        assert all(bytes(s.video[o : o + n]) == p for o, n, p in zip(offsets, sizes, packets))
    video = ds[0].video
    with pytest.raises(ValueError, match="overruns"):
        frame_ranges(video[: len(video) // 2])  # truncated: the mdat box overruns the file
    with pytest.raises(ValueError, match="with a moov box"):
        frame_ranges(video[: int.from_bytes(video[:4].tobytes(), "big")])  # the ftyp box alone
    with pytest.raises(ValueError, match="reorders frames"):
        frame_ranges(_h264_with_b_frames())  # file order is not frame order
    offsets, sizes = frame_ranges(ShardDataset(h264_index, "val")[0].video)  # no B-frames: readable
    assert len(offsets) == ShardDataset(h264_index, "val")[0].num_frames


def _h264_with_b_frames() -> np.ndarray:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=25, options={"bf": "2", "g": "8"})
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(16):
            x = np.zeros((64, 64, 3), np.uint8)
            x[:, (4 * i) % 64 :] = 255
            c.mux(stream.encode(av.VideoFrame.from_ndarray(x, format="rgb24")))
        c.mux(stream.encode())
    return np.frombuffer(buf.getvalue(), np.uint8)


@pytest.mark.parametrize(
    "codec, ext, gpu, expected",
    [("mjpeg", "mp4", False, True), ("MJPEG", "mp4", False, True), ("mjpeg", "mkv", False, False)]
    + [("mjpeg", "mp4", True, False), ("vp9", "mp4", False, False), ("h264", "mp4", True, False)],
)
def test_jpeg_frames_graph_serves_mjpeg_in_mp4_on_the_cpu(codec, ext, gpu, expected):
    from pipeline.dali_loader import decodes_jpeg_frames

    assert decodes_jpeg_frames(codec, ext, gpu=gpu) is expected


def test_read_ahead_returns_each_read_by_id_from_threads(index):
    from pipeline.shards import ReadAhead

    ds = ShardDataset(index, "train")

    def fetch(i):
        if i == 4:
            raise OSError("broken")
        return ds[i]

    for threads in (0, 3):
        reader = ReadAhead(fetch, threads)
        reader.want([5, 4, 3, 2, 1, 0])
        got = [reader.get(i) for i in range(6)]
        reader.close()
        assert isinstance(got[4], OSError)
        for i in (0, 1, 2, 3, 5):
            assert got[i].key == ds.refs[i].key and np.array_equal(
                got[i].video, ShardDataset(index, "train")[i].video
            )
    assert 1 < len(ds._all_fds) <= 4  # one descriptor cache per reading thread: this one and up to 3 readers
    ds.close()


def test_jpeg_frames_that_fail_to_decode_are_skipped(index, tmp_path):
    """Valid MP4 tables, JPEGs without their start markers: the DALI batch fails, the sample is skipped."""
    from pipeline.mp4 import frame_ranges

    out = tmp_path / "ds"
    shutil.copytree(index.parent, out)
    shard = json.loads((out / "index.json").read_text())["splits"]["val"]["shards"][0]
    key, members = parse_idx(out / shard["index"])[0]
    offset, size = members["mp4"]
    with open(out / shard["tar"], "r+b") as f:
        f.seek(offset)
        video = np.frombuffer(f.read(size), np.uint8)
        for frame_offset in frame_ranges(video)[0]:
            f.seek(offset + int(frame_offset))
            f.write(b"\0\0\0\0")
    loader = build_loader(_cfg(out / "index.json", backend="dali-cpu", batch_size=3), "val", "val")
    batches = list(loader)
    assert loader.jpeg and loader.skipped == 1 and sum(len(y) for _, y in batches) == 5


def test_buffer_pool_reuses_only_its_own_buffers():
    from pipeline.shards import POOL_GRAIN, BufferPool

    pool = BufferPool(max_free_bytes=2 * POOL_GRAIN)
    a = pool.take(1000)
    assert a.size == 1000 and a.base.size == POOL_GRAIN
    pool.give_back([a[10:20], np.zeros(POOL_GRAIN, np.uint8)])  # a view of a taken buffer; a foreign array
    b = pool.take(900)
    assert b.base is a.base  # reused
    assert pool.take(10).base is not a.base  # nothing free: a new buffer
    big = [pool.take(POOL_GRAIN + 1) for _ in range(3)]
    pool.give_back(big)
    assert len(pool._free) == 1  # trimmed to max_free_bytes
    pool.give_back(big)  # given back twice: ignored
    assert len(pool._free) == 1


def test_dali_loader_reads_into_reused_buffers(index):
    loader = build_loader(_cfg(index, backend="dali-cpu", batch_size=2), "train", "train")
    pool = loader.dataset.buffers
    first = [x.clone() for x, _ in loader]
    loader.set_epoch(0)
    again = [x.clone() for x, _ in loader]
    assert len(pool._free) > 0  # buffers went back and were reused
    assert all(torch.equal(a, b) for a, b in zip(first, again))
