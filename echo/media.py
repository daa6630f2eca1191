"""Decoding video and audio files with PyAV (FFmpeg's libraries; no ``ffmpeg`` binary needed).

The one reader of whole files shared by the pipeline's inputs (`pipelines.video_io`), data preparation
(`data_prep.media`) and the metrics (`echo.metrics.video`), and the one mp4 writer (`write_video`: deterministic H.264, AAC audio
muxed in) of echo-prep's clips, the synthetic conversations (`synthetic`), validation renders, echo-render and
echo-demo (`pipelines.video_io.write_mp4`).
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import numpy as np

from echo.audio import FPS, SAMPLE_RATE, StreamResampler

# Deterministic x264 (one thread, no macroblock tree): the same frames give the same bytes on every machine.
X264_OPTIONS = {"preset": "veryfast", "threads": "1", "x264-params": "no-mbtree=1"}


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


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float = FPS,
    crf: int = 18,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    trim_audio: bool = False,
) -> Path:
    r"""
    The project's one mp4 writer: `(T, H, W, 3)` uint8 RGB frames as H.264 / yuv420p (H and W even), encoded
    deterministically (one thread, `X264_OPTIONS`), with the audio muxed in as AAC. echo-prep's clips, the synthetic
    conversations, validation renders, echo-render and echo-demo (through `pipelines.video_io.write_mp4`, which adds
    the pipeline's input forms and the side-by-side view) all write through it. Unlike
    `diffusers.utils.export_to_video` (frames only, through imageio-ffmpeg), it muxes audio.

    Args:
        path (`str` or `os.PathLike`): the output file (its folder must exist).
        frames (`np.ndarray` of shape `(T, H, W, 3)`, uint8): RGB frames.
        fps (`float`, defaults to 25): frame rate.
        crf (`int`, defaults to 18): x264 quality.
        audio (`np.ndarray` of shape `(N,)`, *optional*): mono float audio in [-1, 1] muxed as an AAC stream.
        sample_rate (`int`, defaults to 16000): rate of ``audio``.
        trim_audio (`bool`, defaults to `False`): cut or pad ``audio`` with silence to the video's duration
            (``round(T / fps · sample_rate)`` samples), so the tracks end together.

    Returns:
        `Path` of the written file.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"`frames` has shape {frames.shape} and dtype {frames.dtype}, expected (T, H, W, 3) uint8.")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"`frames` are {height}×{width}; yuv420p needs even sizes.")
    if audio is not None and trim_audio:
        num_samples = int(round(len(frames) / fps * sample_rate))
        audio = np.asarray(audio, dtype=np.float32)[:num_samples]
        audio = np.pad(audio, (0, num_samples - len(audio)))
    to_i420 = _i420_converter()
    with av.open(str(path), "w", format="mp4") as container:
        rate = fractions.Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = 1 / rate
        stream.options = {"crf": str(crf), **X264_OPTIONS}
        stream.thread_count = 1
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=int(sample_rate), layout="mono")
        for index, image in enumerate(frames):
            frame = to_i420(image)
            frame.pts, frame.time_base = index, 1 / rate  # explicit timestamps: rate control never guesses
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            samples = np.asarray(audio, dtype=np.float32).reshape(1, -1)
            chunk = 1024
            for start in range(0, samples.shape[1], chunk):
                piece = np.ascontiguousarray(samples[:, start : start + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = int(sample_rate), start
                for packet in audio_stream.encode(frame):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
    return Path(path)


def _i420_converter():
    """RGB → I420 frames for `write_video`. OpenCV's conversion (BT.601 limited range, like swscale's default) keeps
    the bytes independent of the FFmpeg build; it is used wherever OpenCV is installed (always with the ``prep`` extra,
    so echo-prep's clips are reproducible), and swscale's otherwise (a render-only install)."""
    import av

    try:
        import cv2
    except ImportError:
        return lambda image: av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(
            format="yuv420p"
        )
    return lambda image: av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
