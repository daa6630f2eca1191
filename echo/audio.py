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


@torch.no_grad()
def wav2vec2_frame_features(
    model,
    feature_extractor,
    waveform: np.ndarray,
    num_frames: int,
    fps: float = FPS,
    chunk_seconds: float = 30.0,
) -> torch.Tensor:
    """Per-video-frame wav2vec2 hidden states of 16 kHz mono audio: the one definition data preparation and the
    pipeline share, so training features and inference features are computed identically.

    Every hidden state is kept (the CNN projection output plus each transformer layer, ``num_hidden_layers + 1``) and
    the ~50 Hz rows are linearly resampled to exactly one row per video frame. The waveform is zero-padded (silence)
    or cut to ``num_frames / fps`` seconds; audio longer than ``chunk_seconds`` is encoded in chunks (attention cost is
    quadratic) with one second of context on each side, keeping each chunk's own frames.

    Args:
        model (`transformers.Wav2Vec2Model`), feature_extractor (`transformers.Wav2Vec2FeatureExtractor`).
        waveform (`np.ndarray` of shape `(N,)`): float audio at 16 kHz.
        num_frames (`int`): T, the number of video frames the audio covers.

    Returns:
        `torch.Tensor` of shape `(T, num_hidden_layers + 1, hidden_size)`, float32 on the CPU.
    """

    def encode(samples: np.ndarray) -> torch.Tensor:
        inputs = feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        values = inputs.input_values.to(model.device, model.dtype)
        hidden_states = model(values, output_hidden_states=True).hidden_states
        return torch.stack(hidden_states, dim=2)[0].float().cpu()  # N_50Hz, NL, D

    num_samples = int(round(num_frames * SAMPLE_RATE / fps))
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)[:num_samples]
    waveform = np.pad(waveform, (0, num_samples - len(waveform)))
    if num_samples <= int(chunk_seconds * SAMPLE_RATE):
        return resample_rows(encode(waveform), num_frames)  # T, NL, D
    context, frames_per_chunk, pieces = SAMPLE_RATE, int(chunk_seconds * fps), []
    for first in range(0, num_frames, frames_per_chunk):
        last = min(num_frames, first + frames_per_chunk)
        lo, hi = int(round(first * SAMPLE_RATE / fps)), int(round(last * SAMPLE_RATE / fps))
        pad_lo, pad_hi = min(context, lo), min(context, num_samples - hi)
        rows = encode(waveform[lo - pad_lo : hi + pad_hi])
        total = (hi + pad_hi) - (lo - pad_lo)
        keep = resample_rows(rows, max(1, int(round(total * fps / SAMPLE_RATE))))
        offset = int(round(pad_lo * fps / SAMPLE_RATE))
        pieces.append(keep[offset : offset + (last - first)])
    return resample_rows(torch.cat(pieces), num_frames)  # T, NL, D
