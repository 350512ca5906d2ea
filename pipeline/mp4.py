"""Where each frame's bytes lie in an MP4 file, read from its sample tables (no demuxing, no decoding).

An MJPEG shard sample is an MP4 whose every sample is one complete JPEG. DALI 2.4's CPU video decoder has no
frame index: to reach frame k it decodes frames 0..k-1 in full (measured: ~1 ms per skipped 256p frame, so a
TSN clip of a 355-frame video costs about a decode of the whole video). Slicing out the sampled frames' JPEGs
and handing them to DALI's image decoder decodes 8 frames instead of ~all of them. The box walk below reads
only the few boxes on the path to the first video track's sample tables: 0.1-0.2 ms for a 10 s clip, against
~4 ms for PyAV's demuxer to visit every packet.
"""

from __future__ import annotations

import numpy as np

_CONTAINERS = (b"moov", b"trak", b"mdia", b"minf", b"stbl")


def _boxes(buf: memoryview, start: int, end: int):
    """(type, payload start, payload end) of the boxes in buf[start:end] (ISO/IEC 14496-12 4.2)."""
    pos = start
    while pos + 8 <= end:
        size = int.from_bytes(buf[pos : pos + 4], "big")
        kind = bytes(buf[pos + 4 : pos + 8])
        head = 8
        if size == 1:
            size, head = int.from_bytes(buf[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"MP4 box {kind!r} at byte {pos} overruns its parent ({size} bytes)")
        yield kind, pos + head, pos + size
        pos += size


def _children(buf: memoryview, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    found: dict[bytes, tuple[int, int]] = {}
    for kind, a, b in _boxes(buf, start, end):
        found.setdefault(kind, (a, b))
    return found


def _video_stbl(buf: memoryview) -> dict[bytes, tuple[int, int]]:
    top = _children(buf, 0, len(buf))
    if b"moov" not in top:
        raise ValueError("not an MP4 file with a moov box")
    for kind, a, b in _boxes(buf, *top[b"moov"]):
        if kind != b"trak":
            continue
        mdia = _children(buf, *_children(buf, a, b).get(b"mdia", (a, a)))
        hdlr = mdia.get(b"hdlr")
        if hdlr and bytes(buf[hdlr[0] + 8 : hdlr[0] + 12]) == b"vide" and b"minf" in mdia:
            return _children(buf, *_children(buf, *mdia[b"minf"]).get(b"stbl", (0, 0)))
    raise ValueError("the MP4 file has no video track")


def _table(buf: memoryview, box: tuple[int, int], count_at: int, dtype: str, cols: int = 1) -> np.ndarray:
    """A full box's entry array: its count is the u32 at payload offset ``count_at``, entries follow."""
    a, b = box
    count = int.from_bytes(buf[a + count_at : a + count_at + 4], "big")
    first = a + count_at + 4
    width = np.dtype(dtype).itemsize * cols
    if first + count * width > b:
        raise ValueError("an MP4 sample table is shorter than its entry count")
    return np.frombuffer(buf, dtype=dtype, count=count * cols, offset=first).reshape(count, cols)


def frame_ranges(video: np.ndarray | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, sizes) int64 of the video track's samples in file order. For an intra-only track without
    composition offsets (MJPEG) that is presentation order, frame numbers as DALI and PyAV count them.

    Raises ValueError for anything else: no moov or video track, truncated tables, reordered frames (ctts).
    """
    buf = memoryview(np.frombuffer(video, dtype=np.uint8))
    stbl = _video_stbl(buf)
    if not {b"stsz", b"stsc"} <= stbl.keys() or not {b"stco", b"co64"} & stbl.keys():
        raise ValueError(f"the MP4 video track lacks sample tables (has {sorted(k.decode() for k in stbl)})")
    if b"ctts" in stbl:
        raise ValueError("the MP4 video track reorders frames (ctts): file order is not frame order")
    a, _ = stbl[b"stsz"]
    fixed = int.from_bytes(buf[a + 4 : a + 8], "big")
    if fixed:
        sizes = np.full(int.from_bytes(buf[a + 8 : a + 12], "big"), fixed, dtype=np.int64)
    else:
        sizes = _table(buf, stbl[b"stsz"], 8, ">u4")[:, 0].astype(np.int64)
    chunks = (
        _table(buf, stbl[b"co64"], 4, ">u8") if b"co64" in stbl else _table(buf, stbl[b"stco"], 4, ">u4")
    )[:, 0].astype(np.int64)
    runs = _table(buf, stbl[b"stsc"], 4, ">u4", cols=3).astype(np.int64)  # first_chunk (1-based), per chunk
    run_ends = np.append(runs[1:, 0], len(chunks) + 1)
    per_chunk = np.repeat(runs[:, 1], np.maximum(run_ends - runs[:, 0], 0))
    if per_chunk.sum() != len(sizes) or len(per_chunk) != len(chunks):
        raise ValueError(
            f"the MP4 sample tables disagree ({per_chunk.sum()} samples in chunks, {len(sizes)})"
        )
    chunk_of = np.repeat(np.arange(len(chunks)), per_chunk)
    before = np.cumsum(sizes) - sizes  # bytes of earlier samples, all chunks
    offsets = chunks[chunk_of] + before - before[np.cumsum(per_chunk) - per_chunk][chunk_of]
    if (offsets < 0).any() or (offsets + sizes > len(buf)).any():
        raise ValueError("an MP4 sample lies outside the file (truncated file)")
    return offsets, sizes
