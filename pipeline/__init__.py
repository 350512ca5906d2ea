"""Video loaders with one contract: DALI (GPU NVDEC or CPU decode) and a torch DataLoader fallback.

``build_loader(cfg, split, mode, rank, world_size, device, dtype)`` returns an iterable of
(x_NTCHW, labels_N) (train/val) or (x_NVTCHW, labels_N, keys) (test); see docs/pipeline.md.
"""

from pipeline.loader import Loader, LoaderConfig, build_loader, select_backend

__all__ = ["Loader", "LoaderConfig", "build_loader", "select_backend"]
