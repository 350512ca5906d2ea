"""Video loaders with one contract: DALI (GPU NVDEC or CPU decode) and a torch DataLoader fallback.

``build_loader(cfg, split, mode, rank, world_size, device, dtype, views)`` returns an iterable of
(x_NTCHW, labels_N) (train/val) or (x_NVTCHW, labels_N, keys) (test, V = views' clips x crops); see
docs/pipeline.md.
"""

from pipeline.build import build_loader, select_backend
from pipeline.loader import Loader, LoaderConfig, ResourceError, TestViews
from pipeline.shards import DatasetError

__all__ = [
    "DatasetError",
    "Loader",
    "LoaderConfig",
    "ResourceError",
    "TestViews",
    "build_loader",
    "select_backend",
]
