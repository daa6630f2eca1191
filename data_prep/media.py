"""Video and audio input/output for data preparation: PyAV decode/encode, WAV read/write, resampling.

Conventions:
- Video frames are ``uint8`` RGB arrays of shape `(H, W, 3)`; a clip is `(T, H, W, 3)`.
- Prepared videos are H.264 (``libx264``, ``yuv420p``, BT.601 limited range) at 25 fps, encoded with one thread,
  explicit timestamps, OpenCV's colour conversion and no macroblock-tree rate control, so that the same frames
  always give the same bytes (resume and reruns are reproducible).
- Audio is mono ``float32`` in [-1, 1] at 16 kHz. Sources above 16 kHz are resampled by the project's one resampler
  (`echo.audio.resample_audio`, FFmpeg's swresample, as the pipeline and sessions resample); sources *below* 16 kHz are rejected with `MediaError`: upsampling would feed
  wav2vec2 band-limited speech whose features differ from those it was trained on, and in a dataset of 16 kHz or
  higher recordings a lower rate signals a broken file.
- Frame-rate conversion picks, for every output frame ``k`` (time ``k / fps``), the source frame whose timestamp is
  nearest (ties to the earlier frame).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

import echo.media
from echo import clip_format
from echo.audio import FPS, SAMPLE_RATE, resample_audio
from echo.clip_format import write_wav  # noqa: F401 (the writer of 16-bit PCM WAV files, re-exported)
from echo.media import X264_OPTIONS, write_video  # noqa: F401 (the H.264 writer, re-exported)

# x264 settings of prepared videos. One thread makes the bytes independent of scheduling; macroblock-tree rate
# control is off because with it the same frames were seen to encode to different bytes from run to run.


class MediaError(RuntimeError):
    """A source file that cannot be used; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------------


def probe_video(path: str | Path) -> dict:
    """Frame timestamps and size of a video, from its packets (no decoding).

    Returns:
        `dict` with ``times`` (`np.ndarray` of shape `(N,)`, sorted presentation times in seconds), ``duration``
        (seconds, last timestamp plus one frame period), ``width``, ``height`` and ``fps`` (the stream's average
        rate, or estimated from the timestamps).

    Raises:
        `MediaError`: the container cannot be opened or demuxed, or holds no video frame.
    """
    import av

    path = Path(path)
    times = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path.name}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = float(stream.average_rate) if stream.average_rate else None
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    times.append(float(packet.pts * packet.time_base))
    except av.error.FFmpegError as error:
        raise MediaError(f"{path.name}: cannot decode video ({error})") from error
    if not times or not width or not height:
        raise MediaError(f"{path.name}: the video has no decodable frame")
    times = np.sort(np.asarray(times, dtype=np.float64))
    if rate is None:
        rate = (len(times) - 1) / max(times[-1] - times[0], 1e-6) if len(times) > 1 else FPS
    period = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / rate
    return {
        "times": times,
        "duration": float(times[-1] - times[0] + period),
        "width": width,
        "height": height,
        "fps": rate,
    }


def resample_indices(source_times: np.ndarray, num_frames: int, fps: float = FPS) -> np.ndarray:
    """Index of the source frame nearest to each output time ``k / fps``, `k = 0 … num_frames − 1` (ties: earlier)."""
    source_times = np.asarray(source_times, dtype=np.float64) - float(source_times[0])
    targets = np.arange(num_frames) / fps
    right = np.searchsorted(source_times, targets, side="left").clip(0, len(source_times) - 1)
    left = (right - 1).clip(0, len(source_times) - 1)
    take_left = np.abs(targets - source_times[left]) <= np.abs(source_times[right] - targets)
    return np.where(take_left, left, right)


def iter_resampled_frames(path: str | Path, indices: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Decode a video once and yield ``(k, frame)`` for every output frame ``k``, ``frame = source[indices[k]]``.

    Args:
        path (`str` or `Path`): the video.
        indices (`np.ndarray` of shape `(T,)`): non-decreasing source frame indices (see `resample_indices`).
    """
    import av

    path = Path(path)
    indices = np.asarray(indices)
    k = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for source_index, frame in enumerate(container.decode(stream)):
                if k >= len(indices):
                    break
                if indices[k] != source_index:
                    continue
                image = frame.to_ndarray(format="rgb24")
                while k < len(indices) and indices[k] == source_index:
                    yield k, image
                    k += 1
    except av.error.FFmpegError as error:
        raise MediaError(f"{path.name}: cannot decode video ({error})") from error
    if k < len(indices):
        raise MediaError(f"{path.name}: the video ended after {k} of {len(indices)} expected frames")


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video as `(T, H, W, 3)` uint8 RGB (for small files: tests, prepared clips)."""
    return echo.media.read_video(path)[0]


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A WAV file as mono float32 in [-1, 1] and its sample rate (`echo.clip_format.read_wav`, channels averaged).

    Raises:
        `MediaError`: the file is missing or unreadable; the message starts with its name.
    """
    path = Path(path)
    try:
        return clip_format.read_wav(path)
    except clip_format.ClipFormatError as error:
        raise MediaError(f"{path.name}: {error.reason}") from error
    except FileNotFoundError as error:
        raise MediaError(f"{path.name}: no such file") from error


def read_video_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """The first audio stream of a video container as mono float32 and its sample rate."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path.name}: no audio stream and no separate audio file")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            chunks = []
            for frame in container.decode(stream):
                array = frame.to_ndarray().astype(np.float32)
                if frame.format.is_planar:
                    chunks.append(array.mean(axis=0))
                else:
                    chunks.append(array.reshape(-1, len(frame.layout.channels)).mean(axis=1))
    except av.error.FFmpegError as error:
        raise MediaError(f"{path.name}: cannot decode audio ({error})") from error
    if not chunks:
        raise MediaError(f"{path.name}: the audio stream is empty")
    return np.concatenate(chunks), rate


def load_audio(path: str | Path, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio source (WAV or any container PyAV reads) to mono float32 at ``target_rate``.

    Raises:
        `MediaError`: the file cannot be decoded, or its rate is below ``target_rate`` (see the module docstring).
    """
    path = Path(path)
    if path.suffix.lower() == ".wav":
        waveform, rate = read_wav(path)
    else:
        waveform, rate = read_video_audio(path)
    if rate < target_rate:
        raise MediaError(
            f"{path.name}: sample rate {rate} Hz is below the {target_rate} Hz that wav2vec2 expects; upsampling "
            "would give band-limited speech, re-export the audio at 16 kHz or more"
        )
    return resample_audio(waveform, rate, target_rate)
