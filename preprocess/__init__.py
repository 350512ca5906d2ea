"""Turn raw videos into WebDataset tar shards plus a dataset index.json (see README "The shard format").

Subcommands of `python -m preprocess`: kinetics, list, frames, synthetic, merge. The modules, top to bottom:
sources (input rows -> Jobs), probe + ffmpeg_args (pure argument builders) + transcode (one Job -> one Sample
or Failure), writer (tar + DALI index + index.json), runner (deterministic shard plan, process pool, restart),
synthetic (the embedded demo dataset).
"""

from __future__ import annotations

__version__ = "0.1.0"
