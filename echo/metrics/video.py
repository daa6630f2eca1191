"""Video reading and the video metrics of the paper: FID, FVD, CSIM, LSE-D and LSE-C.

Frames are `(T, H, W, 3)` uint8 RGB arrays as decoded by `read_video` (PyAV). The feature networks come from
`echo.metrics.networks` (loaded from a folder the user gives).

Choices fixed here (the paper cites the metrics without these details):

- **FID**: every frame of every clip is one sample (optionally every ``frame_stride``-th frame); features are the
  2048-d InceptionV3 pool3 activations of the whole frame (the clips are face crops); Fréchet distance as
  pytorch-fid.
- **FVD**: non-overlapping windows of ``clip_length`` = 16 frames (a clip shorter than that is one window); I3D
  logits per window; Fréchet distance between the window sets.
- **CSIM**: cosine similarity between the ArcFace embedding of each generated frame and that of the reference
  image, averaged over frames (the paper compares against the avatar's reference image; ``echo-eval`` uses the
  first frame of the ground-truth clip unless a reference image is given).
- **LSE-D / LSE-C**: SyncNet as in syncnet_python's ``SyncNetInstance.evaluate``: 5-frame visual windows at 224²
  (BGR, 0-255), 13-d MFCC windows of 20 rows starting at ``4·frame`` (python_speech_features defaults, 100 Hz, audio
  on the 16-bit PCM scale); mean over frames of the feature distance at each offset in ``[−vshift, vshift]``
  (``vshift`` = 15); LSE-D is the minimum of those means, LSE-C their median minus the minimum.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from echo.media import read_audio, read_video, write_video  # noqa: F401 (the project's one mp4 writer, re-exported)
from echo.metrics.motion import frechet_distance_from_statistics

SYNCNET_SAMPLE_RATE = 16_000


# --------------------------------------------------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------------------------------------------------


def video_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the first video stream of ``path``, from the container (nothing is decoded).

    Raises:
        ValueError: the file has no video stream (PyAV's errors for an unreadable file pass through).
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream.")
        context = container.streams.video[0].codec_context
        return int(context.height), int(context.width)


def video_rate(path: str) -> float:
    """Frames per second of the first video stream of ``path`` (its average rate, as `read_video` reports it; 25 when
    the container does not say), from the container: nothing is decoded.

    Raises:
        ValueError: the file has no video stream (PyAV's errors for an unreadable file pass through).
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream.")
        rate = container.streams.video[0].average_rate
        return float(rate) if rate else 25.0


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(T, H, W, 3)` uint8 frames resized to ``size`` = ``(height, width)`` (area filter when shrinking, bicubic when
    enlarging)."""
    import cv2

    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    shrink = height * width < frames.shape[1] * frames.shape[2]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return np.stack([cv2.resize(frame, (width, height), interpolation=interpolation) for frame in frames])


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 → `(T, 3, H, W)` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def _param(network: torch.nn.Module) -> torch.Tensor:
    return next(network.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_features(network: torch.nn.Module, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Per-frame features `(T, C)` of `(T, H, W, 3)` uint8 frames with an image network (Inception, ArcFace)."""
    p = _param(network)
    out = []
    for i in range(0, len(frames), batch_size):
        x = _to_tensor(frames[i : i + batch_size]).to(device=p.device, dtype=p.dtype)
        out.append(network(x).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


@torch.no_grad()
def video_features(
    network: torch.nn.Module, frames: np.ndarray, clip_length: int = 16, batch_size: int = 4
) -> np.ndarray:
    """I3D features `(W, C)` of the non-overlapping ``clip_length``-frame windows of one clip (W ≥ 1)."""
    p = _param(network)
    num_windows = max(1, len(frames) // clip_length)
    length = min(clip_length, len(frames))
    windows = [frames[i * clip_length : i * clip_length + length] for i in range(num_windows)]
    out = []
    for i in range(0, num_windows, batch_size):
        x = torch.stack([_to_tensor(w).permute(1, 0, 2, 3) for w in windows[i : i + batch_size]])  # N, 3, T, H, W
        out.append(network(x.to(device=p.device, dtype=p.dtype)).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def _statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature vectors per set, got {len(features)}.")
    return features.mean(0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_feature_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between two feature sets `(N, C)` and `(M, C)`."""
    return frechet_distance_from_statistics(*_statistics(features_a), *_statistics(features_b))


def fid(
    network: torch.nn.Module,
    generated: Iterable[np.ndarray],
    reference: Iterable[np.ndarray],
    frame_stride: int = 1,
    batch_size: int = 32,
) -> float:
    """FID between the frames of two sets of clips (each clip `(T, H, W, 3)` uint8)."""
    gen = np.concatenate([image_features(network, c[::frame_stride], batch_size) for c in generated])
    ref = np.concatenate([image_features(network, c[::frame_stride], batch_size) for c in reference])
    return frechet_feature_distance(gen, ref)


def fvd(
    network: torch.nn.Module, generated: Iterable[np.ndarray], reference: Iterable[np.ndarray], clip_length: int = 16
) -> float:
    """FVD between two sets of clips (each `(T, H, W, 3)` uint8), over ``clip_length``-frame windows."""
    gen = np.concatenate([video_features(network, c, clip_length) for c in generated])
    ref = np.concatenate([video_features(network, c, clip_length) for c in reference])
    return frechet_feature_distance(gen, ref)


def csim(network: torch.nn.Module, frames: np.ndarray, reference_image: np.ndarray, batch_size: int = 32) -> float:
    """Mean cosine similarity between ArcFace embeddings of `(T, H, W, 3)` frames and a `(H, W, 3)` reference.

    The whole frame is resized to the network's input (ArcFace expects aligned face crops; the prepared and
    generated clips of this project are face-centred crops, so no further alignment is done).
    """
    emb = torch.from_numpy(image_features(network, frames, batch_size))
    ref = torch.from_numpy(image_features(network, np.asarray(reference_image)[None], batch_size))
    return float(F.cosine_similarity(emb, ref.expand_as(emb), dim=1).mean())


# --------------------------------------------------------------------------------------------------------------------
# SyncNet: MFCC (python_speech_features defaults) and the offset search
# --------------------------------------------------------------------------------------------------------------------


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mfcc(
    signal: np.ndarray,
    sample_rate: int = SYNCNET_SAMPLE_RATE,
    num_cepstra: int = 13,
    num_filters: int = 26,
    nfft: int = 512,
    window: float = 0.025,
    step: float = 0.01,
    preemphasis: float = 0.97,
    cepstral_lifter: int = 22,
) -> np.ndarray:
    """MFCC `(N, num_cepstra)` with python_speech_features' ``mfcc`` defaults (c0 replaced by the log frame energy)."""
    from scipy.fft import dct

    signal = np.asarray(signal, dtype=np.float64).reshape(-1)
    signal = np.append(signal[:1], signal[1:] - preemphasis * signal[:-1])
    frame_len, frame_step = int(round(window * sample_rate)), int(round(step * sample_rate))
    num_frames = 1 if len(signal) <= frame_len else 1 + int(np.ceil((len(signal) - frame_len) / frame_step))
    padded = np.concatenate([signal, np.zeros((num_frames - 1) * frame_step + frame_len - len(signal))])
    idx = np.arange(frame_len)[None] + frame_step * np.arange(num_frames)[:, None]
    power = np.abs(np.fft.rfft(padded[idx], nfft)) ** 2 / nfft  # N, nfft/2+1
    energy = power.sum(1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    # triangular mel filter bank between 0 Hz and Nyquist
    mel = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_filters + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mel) / sample_rate)
    bank = np.zeros((num_filters, nfft // 2 + 1))
    for j in range(num_filters):
        lo, mid, hi = int(bins[j]), int(bins[j + 1]), int(bins[j + 2])
        for i in range(lo, mid):
            bank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(mid, hi):
            bank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feats = power @ bank.T
    feats = np.log(np.where(feats == 0, np.finfo(float).eps, feats))
    feats = dct(feats, type=2, axis=1, norm="ortho")[:, :num_cepstra]
    lift = 1 + (cepstral_lifter / 2.0) * np.sin(np.pi * np.arange(num_cepstra) / cepstral_lifter)
    feats = feats * lift
    feats[:, 0] = np.log(energy)
    return feats


def sync_distances(visual: torch.Tensor, audio: torch.Tensor, vshift: int = 15) -> torch.Tensor:
    """Mean over frames of ``‖visual[i] − audio[i + k]‖`` for each offset k in ``[−vshift, vshift]`` → `(2·vshift+1,)`.

    Audio embeddings outside the clip are zero vectors (syncnet_python's ``calc_pdist``).
    """
    window = 2 * vshift + 1
    padded = F.pad(audio, (0, 0, vshift, vshift))
    dists = [F.pairwise_distance(visual[[i]].repeat(window, 1), padded[i : i + window]) for i in range(len(visual))]
    return torch.stack(dists, 1).mean(1)


@torch.no_grad()
def lse(
    network: torch.nn.Module,
    frames: np.ndarray,
    audio: np.ndarray,
    fps: float = 25.0,
    vshift: int = 15,
    batch_size: int = 20,
) -> dict[str, float]:
    """LSE-D, LSE-C and the best offset (frames) of a face clip `(T, H, W, 3)` with its 16 kHz mono ``audio``."""
    if abs(fps - 25.0) > 1e-3:
        raise ValueError(f"SyncNet expects 25 fps video (4 MFCC rows per frame), got {fps} fps.")
    p = _param(network)
    # 1. Lengths: 640 samples (4 MFCC rows) per frame, 5-frame windows
    num_frames = min(len(frames), len(audio) // 640)
    last = num_frames - 5
    if last < 1:
        raise ValueError(f"LSE needs at least 6 frames with audio, got {num_frames} (video {len(frames)} frames).")
    # 2. Inputs: BGR 0-255 at 224², MFCC (13, N)
    video = torch.from_numpy(np.ascontiguousarray(frames[:num_frames, :, :, ::-1])).permute(3, 0, 1, 2).float()
    video = F.interpolate(video.permute(1, 0, 2, 3), size=(224, 224), mode="bilinear", align_corners=False)
    video = video.permute(1, 0, 2, 3)  # 3, T, 224, 224
    # syncnet_python reads 16-bit PCM, so its MFCC c0 (log energy) is on the int16 scale
    cc = torch.from_numpy(mfcc(np.asarray(audio, dtype=np.float64) * 32768.0).T.copy()).float()  # 13, N
    # 3. Embeddings of every window
    vis, aud = [], []
    for i in range(0, last, batch_size):
        idx = range(i, min(last, i + batch_size))
        v = torch.stack([video[:, t : t + 5] for t in idx]).to(device=p.device, dtype=p.dtype)
        a = torch.stack([cc[None, :, 4 * t : 4 * t + 20] for t in idx]).to(device=p.device, dtype=p.dtype)
        vis.append(network.forward_visual(v).float().cpu())
        aud.append(network.forward_audio(a).float().cpu())
    # 4. Offset search
    mdist = sync_distances(torch.cat(vis), torch.cat(aud), vshift=vshift)
    minval, minidx = torch.min(mdist, 0)
    return {
        "lse_d": float(minval),
        "lse_c": float(torch.median(mdist) - minval),
        "offset": int(vshift - minidx),
    }


__all__ = [
    "csim",
    "fid",
    "frechet_feature_distance",
    "fvd",
    "image_features",
    "lse",
    "mfcc",
    "read_audio",
    "read_video",
    "sync_distances",
    "video_features",
    "write_video",
]
