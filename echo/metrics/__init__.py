"""Evaluation of generated avatar videos as in the ECHO paper (Sec. 4.1, Tables 1-4).

- `echo.metrics.motion`: MSE, FD, Var, SID, rPCC on motion-coefficient sequences `(T, D)`.
- `echo.metrics.extractor`: MediaPipe face-mesh head pose and expression (no downloads), FLAME/3DMM adapter.
- `echo.metrics.networks`: the feature networks of FID, FVD, CSIM, LSE-D/LSE-C, loaded from a user folder.
- `echo.metrics.video`: video decoding and the video metrics.
- `echo.metrics.cli`: the ``echo-eval`` command.

Submodules are imported lazily (``import echo.metrics`` stays light).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "mse": "echo.metrics.motion",
    "frechet_distance": "echo.metrics.motion",
    "variance": "echo.metrics.motion",
    "sid": "echo.metrics.motion",
    "rpcc": "echo.metrics.motion",
    "pcc": "echo.metrics.motion",
    "MediaPipeMotionExtractor": "echo.metrics.extractor",
    "FlameCoefficientAdapter": "echo.metrics.extractor",
    "MotionCoefficients": "echo.metrics.extractor",
    "load_feature_network": "echo.metrics.networks",
    "fid": "echo.metrics.video",
    "fvd": "echo.metrics.video",
    "csim": "echo.metrics.video",
    "lse": "echo.metrics.video",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'echo.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
