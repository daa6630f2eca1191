"""Decoding video and audio files with PyAV (FFmpeg's libraries; no ``ffmpeg`` binary needed).

The one reader of whole files shared by the pipeline's inputs (`pipelines.video_io`), data preparation
(`data_prep.media`) and the metrics (`echo.metrics.video`).
"""

from __future__ import annotations

import os

import numpy as np

from echo.audio import SAMPLE_RATE, StreamResampler


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode all frames of the first video stream of ``path``.

    Returns:
        `(frames, fps)`: `(T, H, W, 3)` uint8 RGB frames and the stream's average frame rate (25 when unknown).

    Raises:
        ValueError: the file has no video stream, or no frame decodes.
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream.")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 25.0
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path} has a video stream but no decodable frame.")
    return np.stack(frames), fps


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """Decode the first audio stream of ``path`` (wav, mp3, mp4 ...) as mono float32 at ``sample_rate``: decoded and
    downmixed at the stream's own rate, then resampled by `echo.audio.StreamResampler` (the project's one resampler).

    Returns:
        `np.ndarray` of shape `(num_samples,)`, or `None` when the file has no audio stream.
    """
    import av

    to_mono = av.AudioResampler(format="flt", layout="mono")  # the stream's own rate
    resampler = None
    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        for frame in container.decode(container.streams.audio[0]):
            for out in to_mono.resample(frame):
                if resampler is None:
                    resampler = StreamResampler(out.sample_rate, sample_rate)
                chunks.append(resampler(out.to_ndarray().reshape(-1)))
        for out in to_mono.resample(None):
            chunks.append(resampler(out.to_ndarray().reshape(-1)))
    if resampler is not None:
        chunks.append(resampler.flush())
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
