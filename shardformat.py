"""The shard format's rules that are code, in the one module both preprocess/ (which writes shards) and
pipeline/ (which reads them, and turns a video file into the frames a model was trained on) import; the two
packages never import each other (README: "The shard format and dataset index"). Imports nothing else.
"""

from __future__ import annotations

from fractions import Fraction

FORMAT = "gcvideo-shards/1"  # index.json's "format": a reader refuses any other


def even(x: float) -> int:
    """Nearest even integer >= 2 (libx264 with 4:2:0 needs even sizes)."""
    return max(2, 2 * round(x / 2))


def frame_size(
    width: int,
    height: int,
    sar: Fraction,
    rotation: int,
    short_side: int | None,
    size: tuple[int, int] | None,
) -> tuple[int, int]:
    """(width, height) preprocess gives a coded frame: the display size in square pixels after rotation, with
    its short side scaled to `short_side` (None: kept), made even; or `size` where given."""
    display_w, display_h = width * float(sar), float(height)
    if rotation % 180 == 90:
        display_w, display_h = display_h, display_w
    if size is not None:
        return size
    if short_side is None:
        return even(display_w), even(display_h)
    scale = short_side / min(display_w, display_h)
    return even(display_w * scale), even(display_h * scale)
