"""Reading inputs and writing the rendered avatar: H.264 mp4 at 25 fps with the avatar's audio (AAC) muxed in.

Everything goes through PyAV (FFmpeg's libraries), so no ``ffmpeg`` binary is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

from echo.audio import FPS, SAMPLE_RATE
from echo.media import read_audio, read_video, write_video

from .inputs import check_sampling_rate, to_uint8_video, to_waveform


def load_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any file PyAV reads (wav, mp3, mp4 ...) as mono float32 at ``sample_rate``.

    Returns:
        `np.ndarray` of shape `(num_samples,)`.
    """
    audio = read_audio(path, sample_rate)
    if audio is None:
        raise ValueError(f"{str(path)!r} has no audio stream.")
    return audio


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """All frames of the first video stream as `(T, H, W, 3)` uint8 RGB (the file is assumed to be at 25 fps)."""
    return read_video(path)[0]


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """An RGB PIL image. A 16-bit grayscale image (PIL mode ``I;16``, or ``I`` as older Pillows read 16-bit PNGs) is
    scaled to 8 bits (PIL's own conversion would clip it to white); a 32-bit integer or float image is refused."""
    image = PIL.Image.open(path)
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.float64) / 65535.0
        return PIL.Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"{str(path)!r} is a {'32-bit integer' if image.mode == 'I' else 'floating-point'} image (PIL mode "
            f"{image.mode!r}), whose range is not known; save it as an 8- or 16-bit PNG or a JPEG."
        )
    return image.convert("RGB")


def to_uint8_frames(frames, name: str = "frames") -> np.ndarray:
    """Frames to write → `(T, H, W, 3)` uint8: uint8 or float-in-[0, 1] `(T, H, W, 3)` arrays (the pipeline's ``"np"``
    output), `(T, 3, H, W)` tensors in [0, 1] or uint8 (its ``"pt"`` output), or lists of images
    (`pipelines.inputs.to_uint8_video` with ``signed_tensors=False``); values outside the range are refused, never
    clipped. ``name`` names the argument in errors."""
    return to_uint8_video(frames, name, signed_tensors=False)


def side_by_side(avatar: np.ndarray, user: np.ndarray) -> np.ndarray:
    """``[user | avatar]`` frames: the user's video resized to the avatar's height, its frame count matched to the
    avatar's (the last user frame repeats when the user's video is shorter)."""
    avatar, user = to_uint8_frames(avatar, "frames"), to_uint8_frames(user, "user_frames")
    height = avatar.shape[1]
    width = int(round(user.shape[2] * height / user.shape[1] / 2)) * 2
    index = np.minimum(np.arange(len(avatar)), len(user) - 1)
    resized = np.stack(
        [np.asarray(PIL.Image.fromarray(user[i]).resize((width, height), PIL.Image.BICUBIC)) for i in index]
    )
    return np.concatenate([resized, avatar], axis=2)


def write_mp4(
    path: str | os.PathLike,
    frames,
    audio: np.ndarray | None = None,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    user_frames=None,
    crf: int = 18,
) -> Path:
    r"""
    Write frames as an H.264 (libx264, yuv420p) mp4, with an AAC audio track of exactly the video's duration: the
    pipeline's output forms and the side-by-side view, encoded by the project's one writer, `echo.media.write_video`.

    Args:
        path (`str` or `os.PathLike`): the output file (its folder must exist).
        frames: `(T, H, W, 3)` uint8, or floats in [0, 1], or a list of PIL images, or a `(T, 3, H, W)` tensor in
            [0, 1] (`to_uint8_frames`).
        audio (`np.ndarray` of shape `(num_samples,)`, *optional*): mono waveform at ``sample_rate`` (float in [−1, 1]
            or int16 / int32 PCM, `pipelines.inputs`); cut or padded with silence to ``T / fps`` seconds.
        fps (`float`, defaults to 25): frame rate.
        sample_rate (`int`, defaults to 16000): rate of ``audio`` and of the mp4's audio track.
        user_frames (*optional*): the user's video; when given, the output shows ``[user | avatar]`` side by side.
        crf (`int`, defaults to 18): x264 quality.

    Returns:
        `Path` of the written file.
    """
    frames = to_uint8_frames(frames)
    if audio is not None:
        audio = to_waveform(audio, "audio")
        sample_rate = check_sampling_rate(sample_rate, "sample_rate")
    if user_frames is not None:
        frames = side_by_side(frames, user_frames)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"`frames` are {height}x{width}; H.264 yuv420p needs even sizes.")
    return write_video(path, frames, fps=fps, crf=crf, audio=audio, sample_rate=sample_rate, trim_audio=True)


def probe_mp4(path: str | os.PathLike) -> dict:
    """Decode an mp4 fully: ``num_frames``, ``fps``, ``width``, ``height`` and, when present, ``audio_seconds``
    (decoded samples / rate) and ``audio_codec``."""
    import av

    info = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info["fps"] = float(stream.average_rate)
        info["width"], info["height"] = stream.codec_context.width, stream.codec_context.height
        info["video_codec"] = stream.codec_context.name
        info["num_frames"] = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(audio=0))
            info["audio_seconds"] = samples / stream.codec_context.sample_rate
            info["audio_codec"] = stream.codec_context.name
    return info
