"""Table tests for pipeline.sampling: frame indices per rule, short videos, crop geometry (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import sampling


def _indices(num_frames, mode, rule, T, clips=1, twice=False, stride=8, seed=0):
    rng = np.random.default_rng(seed)
    u = sampling.frame_draws(
        rng, mode=mode, sampling=rule, num_segments=T, num_clips=clips, twice_sample=twice
    )
    return sampling.frame_indices(num_frames, u, sampling=rule, dense_stride=stride).tolist()


@pytest.mark.parametrize(
    "num_frames, mode, rule, T, clips, twice, stride, expected",
    [
        # TSN val = segment centres, as TSM's int(tick / 2 + tick * k)
        (16, "val", "tsn", 8, 1, False, 8, [[1, 3, 5, 7, 9, 11, 13, 15]]),
        (300, "val", "tsn", 8, 1, False, 8, [[18, 56, 93, 131, 168, 206, 243, 281]]),
        # shorter than T: frames repeat in order, never past the end
        (5, "val", "tsn", 8, 1, False, 8, [[0, 0, 1, 2, 2, 3, 4, 4]]),
        (1, "val", "tsn", 4, 1, False, 8, [[0, 0, 0, 0]]),
        # test: twice_sample = centres then starts; N clips evenly offset inside the segments
        (16, "test", "tsn", 8, 1, True, 8, [[1, 3, 5, 7, 9, 11, 13, 15], [0, 2, 4, 6, 8, 10, 12, 14]]),
        (40, "test", "tsn", 4, 2, False, 8, [[2, 12, 22, 32], [7, 17, 27, 37]]),
        # dense 8x8: centre window; a 64-frame video is exactly one window
        (64, "val", "dense", 8, 1, False, 8, [[0, 8, 16, 24, 32, 40, 48, 56]]),
        (100, "val", "dense", 8, 1, False, 8, [[18, 26, 34, 42, 50, 58, 66, 74]]),
        # dense on a 32-frame video (shorter than the 64-frame window): start 0, wrap around
        (32, "val", "dense", 8, 1, False, 8, [[0, 8, 16, 24, 0, 8, 16, 24]]),
        (32, "test", "dense", 8, 10, False, 8, [[0, 8, 16, 24, 0, 8, 16, 24]] * 10),
        (40, "val", "dense", 4, 1, False, 2, [[16, 18, 20, 22]]),  # span 40 - 8 + 1 = 33, start floor(16.5)
    ],
)
def test_frame_index_table(num_frames, mode, rule, T, clips, twice, stride, expected):
    assert _indices(num_frames, mode, rule, T, clips, twice, stride) == expected


@pytest.mark.parametrize(
    "num_frames, mode, rule, T, clips, expected",
    [
        # centres 2, 6, 10, 14 (the TSN val indices); each segment is the 5 frames around its centre, the
        # last clamped to the video's last frame
        (16, "val", "tsn", 4, 1, [[0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 12, 13, 14, 15, 15]]),
        # a 3-frame video: centres 0 and 2, both ends clamped
        (3, "val", "tsn", 2, 1, [[0, 0, 0, 1, 2, 0, 1, 2, 2, 2]]),
        (1, "val", "tsn", 2, 1, [[0] * 10]),
        # two test clips: centres floor((k + 0.25) * 40 / 2) = 5, 25 and floor((k + 0.75) * 20) = 15, 35
        (
            40,
            "test",
            "tsn",
            2,
            2,
            [[3, 4, 5, 6, 7, 23, 24, 25, 26, 27], [13, 14, 15, 16, 17, 33, 34, 35, 36, 37]],
        ),
        # dense (stride 8) centre window of a 100-frame video: start floor(0.5 * (100 - 16 + 1)) = 42, centres
        # 42 and 50 with their neighbours
        (100, "val", "dense", 2, 1, [[40, 41, 42, 43, 44, 48, 49, 50, 51, 52]]),
    ],
)
def test_frames_per_segment_table(num_frames, mode, rule, T, clips, expected):
    u = sampling.frame_draws(None, mode=mode, sampling=rule, num_segments=T, num_clips=clips)
    got = sampling.frame_indices(num_frames, u, sampling=rule, dense_stride=8, frames_per_segment=5)
    assert got.tolist() == expected


@pytest.mark.parametrize("num_frames", [1, 4, 5, 9, 40, 301])
def test_frames_per_segment_train_centres_are_the_tsn_indices(num_frames):
    rng = np.random.default_rng(num_frames)
    for _ in range(100):
        u = sampling.frame_draws(rng, mode="train", sampling="tsn", num_segments=8)
        centres = sampling.frame_indices(num_frames, u, sampling="tsn")[0]
        windows = sampling.frame_indices(num_frames, u, sampling="tsn", frames_per_segment=5).reshape(8, 5)
        assert windows[:, 2].tolist() == centres.tolist()
        assert windows.min() >= 0 and windows.max() < num_frames
        unclamped = centres[:, None] + np.arange(-2, 3)
        assert np.array_equal(windows, np.clip(unclamped, 0, num_frames - 1))
    with pytest.raises(ValueError, match="frames_per_segment"):
        sampling.frame_indices(10, u, sampling="tsn", frames_per_segment=0)


def test_dense_test_windows_are_evenly_spaced():
    got = _indices(100, "test", "dense", 8, clips=10)
    starts = [row[0] for row in got]
    assert starts == [1, 5, 9, 12, 16, 20, 24, 27, 31, 35]  # floor((c + .5) / 10 * 37)
    assert all(np.diff(row).tolist() == [8] * 7 for row in got)


@pytest.mark.parametrize("num_frames, T", [(1, 8), (7, 8), (8, 8), (16, 8), (301, 8), (10, 16), (1000, 3)])
def test_tsn_train_draws_one_frame_per_segment(num_frames, T):
    rng = np.random.default_rng(num_frames)
    for _ in range(200):
        u = sampling.frame_draws(rng, mode="train", sampling="tsn", num_segments=T)
        idx = sampling.frame_indices(num_frames, u, sampling="tsn")[0]
        assert idx.min() >= 0 and idx.max() < num_frames
        lo = np.floor(np.arange(T) * num_frames / T)
        hi = np.maximum(np.ceil(np.arange(1, T + 1) * num_frames / T) - 1, lo)
        assert np.all(idx >= lo) and np.all(idx <= hi), (idx, lo, hi)


def test_train_draws_cover_every_frame_of_a_segment():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(300):
        u = sampling.frame_draws(rng, mode="train", sampling="tsn", num_segments=4)
        seen.add(int(sampling.frame_indices(20, u, sampling="tsn")[0, 1]))
    assert seen == {5, 6, 7, 8, 9}


def test_dense_train_windows_stay_inside_the_video():
    rng = np.random.default_rng(2)
    starts = set()
    for _ in range(500):
        u = sampling.frame_draws(rng, mode="train", sampling="dense", num_segments=8)
        idx = sampling.frame_indices(80, u, sampling="dense", dense_stride=8)[0]
        assert idx[0] >= 0 and idx[-1] < 80 and np.all(np.diff(idx) == 8)
        starts.add(int(idx[0]))
    assert starts == set(range(17))  # 80 - 64 + 1 possible windows


def test_draws_are_deterministic_per_seed_epoch_sample():
    a = sampling.frame_draws(sampling.sample_rng(3, 1, 42), mode="train", sampling="tsn", num_segments=8)
    b = sampling.frame_draws(sampling.sample_rng(3, 1, 42), mode="train", sampling="tsn", num_segments=8)
    c = sampling.frame_draws(sampling.sample_rng(3, 2, 42), mode="train", sampling="tsn", num_segments=8)
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    p0, p1 = sampling.epoch_permutation(50, 0, 0), sampling.epoch_permutation(50, 0, 1)
    assert sorted(p0) == list(range(50)) and np.array_equal(p0, sampling.epoch_permutation(50, 0, 0))
    assert not np.array_equal(p0, p1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sampling"):
        sampling.frame_draws(None, mode="val", sampling="uniform", num_segments=8)
    with pytest.raises(ValueError, match="num_frames"):
        sampling.frame_indices(0, np.zeros((1, 8), np.float32), sampling="tsn")
    with pytest.raises(ValueError, match="num_crops"):
        sampling.eval_crop_boxes(64, 64, scale_size=64, crop_size=56, num_crops=5)


# ----- crop geometry (TSM's GroupMultiScaleCrop / GroupCenterCrop / GroupFullResSample / GroupOverSample)


def test_multiscale_pairs_match_tsm():
    # 340x256: short side 256 -> 256, 224, 192, 168 (224 snaps to crop size); |i - j| <= 1
    pairs = sampling.multiscale_crop_pairs(340, 256, 224)
    assert pairs == [
        (256, 256),
        (224, 256),
        (256, 224),
        (224, 224),
        (192, 224),
        (224, 192),
        (192, 192),
        (168, 192),
        (192, 168),
        (168, 168),
    ]
    assert sampling.multiscale_crop_pairs(340, 256, 224, max_distort=0) == [
        (256, 256),
        (224, 224),
        (192, 192),
        (168, 168),
    ]


def test_fixed_offsets_match_tsm():
    assert sampling.tsm_fixed_offsets(340, 256, 224, 224) == [
        (0, 0),
        (116, 0),
        (0, 32),
        (116, 32),
        (58, 16),
        (0, 16),
        (116, 16),
        (58, 32),
        (58, 0),
        (29, 8),
        (87, 8),
        (29, 24),
        (87, 24),
    ]
    assert len(sampling.tsm_fixed_offsets(340, 256, 224, 224, more_fix_crop=False)) == 5


def test_multiscale_crop_box_draws_pairs_and_offsets():
    rng = np.random.default_rng(0)
    sizes, positions = set(), set()
    for _ in range(2000):
        x0, y0, x1, y1 = sampling.multiscale_crop_box(rng, 340, 256, 224)
        assert 0 <= x0 < x1 <= 340 and 0 <= y0 < y1 <= 256
        sizes.add((x1 - x0, y1 - y0))
        positions.add((x0, y0))
    assert sizes == set(sampling.multiscale_crop_pairs(340, 256, 224))
    assert (0, 0) in positions and (116, 32) in positions and (29, 8) in positions  # corners, quarters
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert sampling.multiscale_crop_box(rng_a, 64, 48, 56) == sampling.multiscale_crop_box(rng_b, 64, 48, 56)


@pytest.mark.parametrize(
    "w, h, scale, crop, n, boxes, flips, out",
    [
        (340, 256, 256, 224, 1, [[58, 16, 282, 240]], [False], 224),
        # 128x96 stored, thought of as resized to short side 64: a 56 crop there is 84 pixels here
        (128, 96, 64, 56, 1, [[22, 6, 106, 90]], [False], 56),
        # TSM full-resolution 3 crops: the whole short side at the start, end and centre of the long side
        (340, 256, 256, 224, 3, [[0, 0, 256, 256], [84, 0, 340, 256], [42, 0, 298, 256]], [False] * 3, 256),
        (256, 340, 256, 224, 3, [[0, 0, 256, 256], [0, 84, 256, 340], [0, 42, 256, 298]], [False] * 3, 256),
        (
            340,
            256,
            256,
            224,
            10,
            [[0, 0, 224, 224], [116, 0, 340, 224], [0, 32, 224, 256], [116, 32, 340, 256], [58, 16, 282, 240]]
            * 2,
            [False] * 5 + [True] * 5,
            224,
        ),
    ],
)
def test_eval_crop_table(w, h, scale, crop, n, boxes, flips, out):
    got_boxes, got_flips, got_out = sampling.eval_crop_boxes(
        w, h, scale_size=scale, crop_size=crop, num_crops=n
    )
    assert got_boxes.tolist() == boxes and got_flips.tolist() == flips and got_out == out


class ScriptedRNG:
    """Answers integers(n) from a script and records each n: which choice was drawn, and among how many."""

    def __init__(self, *answers: int):
        self.answers, self.bounds = list(answers), []

    def integers(self, n: int) -> int:
        self.bounds.append(n)
        return self.answers.pop(0)


# 340x256, crop 224: pair 3 is (224, 224); its 13 fixed offsets (test_fixed_offsets_match_tsm), in order
OFFSETS_224 = [
    (0, 0),
    (116, 0),
    (0, 32),
    (116, 32),
    (58, 16),
    (0, 16),
    (116, 16),
    (58, 32),
    (58, 0),
    (29, 8),
    (87, 8),
    (29, 24),
    (87, 24),
]


@pytest.mark.parametrize("choice, offset", list(enumerate(OFFSETS_224)))
def test_multiscale_crop_box_picks_each_fixed_offset(choice, offset):
    rng = ScriptedRNG(3, choice)
    box = sampling.multiscale_crop_box(rng, 340, 256, 224)
    assert rng.bounds == [10, 13]  # one of the 10 pairs, then one of all 13 offsets
    assert box == (offset[0], offset[1], offset[0] + 224, offset[1] + 224)


@pytest.mark.parametrize(
    "pair, size, offsets",
    [
        # (256, 256) on 340x256: w_step 21, h_step 0
        (0, (256, 256), [(0, 0), (84, 0), (0, 0), (84, 0), (42, 0), (0, 0), (84, 0), (42, 0), (42, 0)]),
        # (168, 192): w_step 43, h_step 16
        (7, (168, 192), [(0, 0), (172, 0), (0, 64), (172, 64), (86, 32), (0, 32), (172, 32), (86, 64)]),
    ],
)
def test_multiscale_crop_box_offsets_per_pair(pair, size, offsets):
    for choice, (x, y) in enumerate(offsets):
        rng = ScriptedRNG(pair, choice)
        assert sampling.multiscale_crop_box(rng, 340, 256, 224) == (x, y, x + size[0], y + size[1])
    last = sampling.tsm_fixed_offsets(340, 256, *size)[12]
    rng = ScriptedRNG(pair, 12)
    assert sampling.multiscale_crop_box(rng, 340, 256, 224)[:2] == last


def test_random_crops_reach_every_pair_and_every_offset():
    rng = np.random.default_rng(0)
    seen: dict[tuple[int, int], set] = {}
    for _ in range(4000):
        x0, y0, x1, y1 = sampling.multiscale_crop_box(rng, 340, 256, 224)
        seen.setdefault((x1 - x0, y1 - y0), set()).add((x0, y0))
    assert set(seen) == set(sampling.multiscale_crop_pairs(340, 256, 224))
    for (w, h), positions in seen.items():
        assert positions == set(sampling.tsm_fixed_offsets(340, 256, w, h)), (w, h)


# ----- the corners of the rules (what mutation testing found unpinned)

TOP = float(np.nextafter(np.float32(1), np.float32(0)))  # the largest float32 draw below 1


def test_defaults_one_test_clip_dense_stride_8_val_ignores_clip_options():
    assert sampling.frame_draws(None, mode="test", sampling="tsn", num_segments=4).tolist() == [[0.5] * 4]
    # val is one centred clip whatever the test options say
    for kw in ({"num_clips": 3}, {"twice_sample": True}):
        assert sampling.frame_draws(None, mode="val", sampling="tsn", num_segments=2, **kw).tolist() == [
            [0.5, 0.5]
        ]
    u = sampling.frame_draws(None, mode="val", sampling="dense", num_segments=4)
    assert sampling.frame_indices(100, u, sampling="dense").tolist() == [[34, 42, 50, 58]]  # stride 8


def test_train_draws_are_the_rngs_float32_stream():
    # float32 draws (what the DALI graph computes with), one per segment: the same numbers from the same RNG
    u = sampling.frame_draws(np.random.default_rng(7), mode="train", sampling="tsn", num_segments=8)
    expected = np.random.default_rng(7).random((1, 8), dtype=np.float32)
    assert u.dtype == np.float32 and np.array_equal(u, expected)


@pytest.mark.parametrize(
    "num_frames, T, u, expected",
    [
        # k + u rounds up to k + 1 in float32 for k >= 1 (as in the DALI graph): floor((k + 1) * 2 / 8),
        # the last clamped to frame 1
        (2, 8, TOP, [0, 0, 0, 1, 1, 1, 1, 1]),
        # a one-frame video: (7 + u) * 1 / 8 rounds to 1.0, clamped to frame 0
        (1, 8, TOP, [0] * 8),
        # float64 draws are computed as float32: 1 - 1e-9 is 1.0, so (0 + 1) * 10 / 2 = 5, then 9 (clamped)
        (10, 2, 1 - 1e-9, [5, 9]),
    ],
)
def test_tsn_arithmetic_is_float32_and_clamped(num_frames, T, u, expected):
    got = sampling.frame_indices(num_frames, np.full((1, T), u), sampling="tsn")
    assert got.dtype == np.int64 and got.tolist() == [expected]


@pytest.mark.parametrize("num_frames", [1, 2, 3, 5, 7, 8, 9, 16, 301, 1000])
def test_draws_at_the_top_of_the_range_stay_inside_the_video(num_frames):
    for rule in sampling.SAMPLINGS:
        idx = sampling.frame_indices(num_frames, np.full((1, 8), TOP, np.float32), sampling=rule)
        assert 0 <= idx.min() and idx.max() <= num_frames - 1, (rule, idx)


def test_two_frames_per_segment_are_the_centre_and_the_one_before():
    u = sampling.frame_draws(None, mode="val", sampling="tsn", num_segments=2)
    got = sampling.frame_indices(8, u, sampling="tsn", frames_per_segment=2)
    assert got.tolist() == [[1, 2, 5, 6]]  # centres 2 and 6, offsets -1, 0


def test_unknown_rule_is_named_by_frame_indices_too():
    with pytest.raises(ValueError, match="sampling must be one of .*'uniform'"):
        sampling.frame_indices(10, np.zeros((1, 4), np.float32), sampling="uniform")


@pytest.mark.parametrize(
    "short, expected",
    [
        # 258 * 0.875 = 225.75 -> 225, within 3 pixels of the crop: snapped to 224
        (258, [258, 224, 193, 170]),
        # 260 * 0.875 = 227.5 -> 227: 3 pixels off, kept
        (260, [260, 227, 195, 171]),
        # 254 * 0.875 = 222.25 -> 222: 2 pixels below, snapped
        (254, [254, 224, 190, 167]),
    ],
)
def test_multiscale_sizes_snap_to_the_crop_within_3_pixels(short, expected):
    pairs = sampling.multiscale_crop_pairs(400, short, 224, max_distort=0)
    assert [w for w, _ in pairs] == expected


def test_multiscale_crop_box_passes_max_distort_and_more_fix_crop_on():
    rng = ScriptedRNG(3, 4)
    box = sampling.multiscale_crop_box(rng, 340, 256, 224, max_distort=0, more_fix_crop=False)
    assert rng.bounds == [4, 5]  # 4 square pairs; corners and centre only
    assert box == (86, 44, 254, 212)  # pair 3 = (168, 168), offset 4 = the centre (2 * 43, 2 * 22)


def test_ten_crops_scale_the_crop_to_the_stored_frame():
    # 128x96 stored, short side thought of as 64 (s = 2/3): a 56 crop is 84 pixels here
    boxes, flips, out = sampling.eval_crop_boxes(128, 96, scale_size=64, crop_size=56, num_crops=10)
    five = [[0, 0, 84, 84], [44, 0, 128, 84], [0, 12, 84, 96], [44, 12, 128, 96], [22, 6, 106, 90]]
    assert boxes.tolist() == five * 2
    assert flips.tolist() == [False] * 5 + [True] * 5 and out == 56
