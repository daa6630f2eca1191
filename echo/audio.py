"""Audio helpers shared by the generator, the LCU, the dataset and data preparation.

Wav2vec2 features are stored one row per video frame (``T × layers × 768``). Both the generator and the LCU read a
per-frame *context window* of ``2·radius + 1`` rows centred on each frame (Hallo's scheme, radius 2 → L_w = 5), with
edge rows repeated at the clip borders.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16_000
FPS = 25


def window_features(features: torch.Tensor, radius: int = 2, dim: int = 1) -> torch.Tensor:
    """Per-frame context windows: `(..., T, ...)` → `(..., T, 2·radius + 1, ...)` along ``dim``, edges replicated.

    Row ``t`` of the result holds frames ``t − radius … t + radius`` (clamped to ``[0, T − 1]``).
    """
    num_frames = features.shape[dim]
    offsets = torch.arange(-radius, radius + 1, device=features.device)
    index = (torch.arange(num_frames, device=features.device)[:, None] + offsets).clamp(0, num_frames - 1)  # T, L_w
    windows = features.index_select(dim, index.flatten())
    shape = list(features.shape)
    shape[dim : dim + 1] = [num_frames, 2 * radius + 1]
    return windows.reshape(shape)


def resample_rows(features: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Linearly resample `(N, ...)` feature rows to exactly ``num_rows`` rows (e.g. 50 Hz wav2vec2 → 25 fps)."""
    if features.shape[0] == num_rows:
        return features
    flat = features.reshape(features.shape[0], -1).T[None].float()  # 1, C, N
    out = F.interpolate(flat, size=num_rows, mode="linear", align_corners=True)
    return out[0].T.reshape(num_rows, *features.shape[1:]).to(features.dtype)


def frame_rms(waveform: np.ndarray, num_frames: int, sample_rate: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """Short-time RMS energy of a mono waveform, one value per video frame (window = one frame period)."""
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    hop = sample_rate / fps
    rms = np.zeros(num_frames, dtype=np.float32)
    for t in range(num_frames):
        lo, hi = int(round(t * hop)), int(round((t + 1) * hop))
        segment = waveform[lo:hi]
        rms[t] = float(np.sqrt(np.mean(segment**2))) if segment.size else 0.0
    return rms
