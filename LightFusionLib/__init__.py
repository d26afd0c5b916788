"""LightFusionLib: LightFusionNet medical image fusion (network, training, metrics, volume fusion).

No Slicer or Qt imports here, and no eager torch import: inference can run on ONNX Runtime alone.
Public entry points are imported lazily on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "fuse_volumes": "fusion",
    "fuse_files": "fusion",
    "prepare_pair": "fusion",
    "FusionCancelled": "errors",
    "VolumeError": "errors",
    "LightFusionError": "errors",
    "read_volume": "volumeio",
    "write_volume": "volumeio",
    "load_backend": "backends",
    "LightFusionNet": "network",
    "NetworkConfig": "network",
    "evaluate_fusion": "metrics",
    "load_model": "models",
    "TASKS": "tasks",
    "get_task": "tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'LightFusionLib' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
