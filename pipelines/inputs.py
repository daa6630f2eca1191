# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""The accepted forms of `EchoPipeline`'s inputs, defined once, and their conversion.

`EchoPipeline.__call__`, `EchoPipeline.start_session`, `EchoSession.push` and the options of ``echo-render`` /
``echo-live`` all go through these functions. An accepted form is converted to the one form the pipeline computes
with; anything else is a `ValueError` naming the argument, what it got and what it accepts. Nothing is clipped,
rescaled or guessed without a word.

Images (``reference_image``, and every frame of ``user_video``):

=============================  ===========  ================================================================
form                           layout       values
=============================  ===========  ================================================================
`PIL.Image.Image`              any 8-bit    converted to RGB (16-bit and float modes are refused)
`np.ndarray`, integer dtype    `(H, W, 3)`  0 … 255 (uint8, or any integer array within that range)
`np.ndarray`, float dtype      `(H, W, 3)`  [0, 1]. Above 1 it looks like [0, 255] (pass uint8, or divide by
                                            255); below 0 it looks like [−1, 1] (pass ``(x + 1) / 2``)
`torch.Tensor`, float dtype    `(3, H, W)`  [−1, 1], as `echo.data` gives frames and the VAE reads them. A tensor
                                            with no negative value is refused: it is as likely in [0, 1]
                                            (torchvision's ``to_tensor``, the pipeline's ``"pt"`` output), so
                                            pass ``x * 2 − 1`` if it is (or a uint8 / [0, 1] array)
`torch.Tensor`, uint8          `(3, H, W)`  0 … 255
=============================  ===========  ================================================================

A video is the same forms with a leading time axis (`(T, H, W, 3)` arrays, `(T, 3, H, W)` tensors) or a list of
images; the range rules apply to the whole piece. Values within half a uint8 step outside a range are rounding and
count as its end (they round to the same uint8); NaN and infinity are refused. Frames written out
(`pipelines.video_io.write_mp4`) take the same forms, with float tensors in [0, 1] as the pipeline's ``"pt"`` output
gives them (``signed_tensors=False``).

Audio (``avatar_audio``, ``user_audio``): one channel, `(num_samples,)` (`(1, n)` and `(n, 1)` too), as an array, a
tensor or a sequence of numbers:

- float samples at full scale [−1, 1]; a peak above ``MAX_FLOAT_PEAK`` (2: room for resampling overshoot) is refused,
  it looks like integer PCM stored as floats;
- int16 or int32 PCM, divided by 2¹⁵ or 2³¹;
- at ``sampling_rate`` Hz (an integer, default 16000, at least ``MIN_SAMPLING_RATE``), resampled to the model's 16 kHz
  with the project's one resampler (`echo.audio.StreamResampler`, FFmpeg's swresample, as echo-prep and
  `echo.media.read_audio` resample); it is stateful, so a stream pushed in pieces gives exactly the samples of the
  whole;
- NaN and infinity are refused.

Numbers: counts (``num_inference_steps``, ``num_frames``, chunk lengths, sizes) are integers (Python or NumPy, not
`bool`) at least 1; ``height`` / ``width`` are positive multiples of the token unit (VAE factor × patch size); guidance
scales are finite real numbers >= 0. Texts (``emotion``, ``default_emotion``) are `str`, ``emotion`` also a list of
`str` (one per chunk).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from echo.audio import FPS, SAMPLE_RATE, resample_audio
from echo.masks import NUM_LANDMARKS

logger = logging.get_logger(__name__)

IMAGE_FORMS = (
    "a PIL image, an (H, W, 3) uint8 array, an (H, W, 3) float array in [0, 1], or a (3, H, W) float tensor in "
    "[-1, 1] (or uint8)"
)
VIDEO_FORMS = (
    "(T, H, W, 3) uint8 or float-in-[0, 1] frames, a (T, 3, H, W) float tensor in [-1, 1] (or uint8), or a list of "
    "images (PIL, arrays or tensors of those forms)"
)
OUTPUT_IMAGE_FORMS = IMAGE_FORMS.replace("[-1, 1]", "[0, 1]")
OUTPUT_VIDEO_FORMS = VIDEO_FORMS.replace("[-1, 1]", "[0, 1]")
AUDIO_FORMS = "a mono waveform (num_samples,): float in [-1, 1], or int16 / int32 PCM"
MAX_FLOAT_PEAK = 2.0
MIN_SAMPLING_RATE = 1000
_PIL_8_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_UINT8_HALF_STEP = 0.5 / 255


def _range_text(values: np.ndarray) -> str:
    """`` with values in [low, high]`` of a numeric array (its finite values), and whether it holds NaN / inf."""
    if not values.size or values.dtype.kind not in "fiu":
        return ""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    text = f" with values in [{finite.min():.4g}, {finite.max():.4g}]" if finite.size else ""
    return text + (" and NaN or infinite values" if finite.size < values.size else "")


def describe(value) -> str:
    """A short description of ``value`` for error messages: its type, and dtype / shape / range for arrays."""
    if isinstance(value, torch.Tensor):
        text = f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
        if value.is_complex() or value.dtype == torch.bool:
            return text
        return text + _range_text(value.detach().cpu().float().numpy())
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}" + _range_text(value)
    if isinstance(value, PIL.Image.Image):
        return f"a {value.mode} PIL image of size {value.size}"
    if isinstance(value, (str, bytes)):
        return f"the {type(value).__name__} {value[:60]!r}"
    if isinstance(value, (bool, numbers.Number)) or value is None:
        return f"{value!r} ({type(value).__name__})"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    module = type(value).__module__
    return f"a {'' if module == 'builtins' else module + '.'}{type(value).__qualname__}"


class _Said(str):
    """A description already written (`_refuse` uses it as is)."""


def _refuse(name: str, got, accepts: str, hint: str = "") -> ValueError:
    """The error for argument ``name``: what it got (``got``, described), what it accepts, and a hint."""
    said = got if isinstance(got, _Said) else describe(got)
    return ValueError(f"`{name}` is {said}; expected {accepts}.{hint}")


# ----------------------------------------------------------------------------------------------------------------
# Images and videos
# ----------------------------------------------------------------------------------------------------------------


def _finite(values: np.ndarray, name: str, got, accepts: str) -> None:
    if not np.isfinite(values).all():
        raise _refuse(name, got, accepts, " It holds NaN or infinite values.")


def _unit_float_to_uint8(values: np.ndarray, name: str, got, accepts: str) -> np.ndarray:
    """Float values in [0, 1] → uint8; [0, 255]- and [−1, 1]-looking floats are refused, never clipped."""
    _finite(values, name, got, accepts)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if high > 1 + _UINT8_HALF_STEP:
        raise _refuse(
            name,
            got,
            accepts,
            (
                f" Its values reach {high:.4g}: it looks like [0, 255]. Pass it as uint8 (`x.astype(np.uint8)`), or "
                "divide it by 255."
            ),
        )
    if low < -_UINT8_HALF_STEP:
        raise _refuse(name, got, accepts, f" Its values go down to {low:.4g}: it looks like [-1, 1]; pass (x + 1) / 2.")
    return (values * 255.0).round().clip(0, 255).astype(np.uint8)


def _signed_float_to_uint8(values: np.ndarray, name: str, got, accepts: str) -> np.ndarray:
    """Float values in [−1, 1] (a tensor) → uint8; a tensor with no negative value is refused as ambiguous."""
    _finite(values, name, got, accepts)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if high > 1 + 2 * _UINT8_HALF_STEP or low < -1 - 2 * _UINT8_HALF_STEP:
        hint = " It looks like [0, 255]: pass a uint8 tensor, or x / 127.5 - 1." if high > 2 else ""
        raise _refuse(name, got, accepts, f" Its values span [{low:.4g}, {high:.4g}], outside [-1, 1].{hint}")
    if low >= 0:
        raise _refuse(
            name,
            got,
            accepts,
            (
                " A float tensor is read in [-1, 1], and this one has no negative value: it may as well be in [0, 1] "
                "(torchvision's to_tensor, the pipeline's 'pt' output). If it is in [0, 1], pass x * 2 - 1 (or an "
                "(H, W, 3) float array in [0, 1]); if it really is a bright [-1, 1] image, pass it as uint8."
            ),
        )
    return ((values + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def _integer_to_uint8(values: np.ndarray, name: str, got, accepts: str) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high > 255:
        raise _refuse(name, got, accepts, f" Integer pixels must lie in 0 … 255; these span {low} … {high}.")
    return values.astype(np.uint8)


def _array_to_uint8(values: np.ndarray, name: str, got, accepts: str, signed: bool) -> np.ndarray:
    """An integer or float array (channels last) → uint8; floats in [−1, 1] when ``signed`` (tensors), else [0, 1]."""
    kind = values.dtype.kind
    if kind in "iu":
        return _integer_to_uint8(values, name, got, accepts)
    if kind == "f":
        convert = _signed_float_to_uint8 if signed else _unit_float_to_uint8
        return convert(values.astype(np.float32, copy=False), name, got, accepts)
    raise _refuse(name, got, accepts, f" Its dtype {values.dtype} is neither an integer nor a float type.")


def _pil_to_uint8(image: PIL.Image.Image, name: str, accepts: str) -> np.ndarray:
    if image.mode not in _PIL_8_BIT_MODES:
        raise _refuse(name, image, accepts, f" Mode {image.mode!r} is not 8-bit: convert it, e.g. to a uint8 array.")
    return np.asarray(image.convert("RGB"))


def _tensor_to_uint8(tensor: torch.Tensor, name: str, accepts: str, video: bool, signed: bool) -> np.ndarray:
    """A `(3, H, W)` (or `(T, 3, H, W)` when ``video``) tensor → channels-last uint8; floats in [−1, 1] when
    ``signed``, else in [0, 1]."""
    channel_axis = 1 if video else 0
    if tensor.ndim != (4 if video else 3) or tensor.shape[channel_axis] != 3:
        hint = " Tensors are channels-first; pass x.permute(...) or x.numpy() for a channels-last array."
        raise _refuse(name, tensor, accepts, hint if tensor.shape[-1:] == (3,) else "")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise _refuse(name, tensor, accepts)
    values = tensor.detach().cpu()
    values = values.float() if values.is_floating_point() else values
    values = values.movedim(channel_axis, -1).numpy()
    return _array_to_uint8(values, name, tensor, accepts, signed=signed)


def to_uint8_image(image, name: str = "reference_image", signed_tensors: bool = True) -> np.ndarray:
    """One image in any accepted form (module docstring) → `(H, W, 3)` uint8 RGB, or a `ValueError` naming ``name``.
    ``signed_tensors=False`` reads float tensors in [0, 1] (the pipeline's ``"pt"`` output) instead of [−1, 1]."""
    accepts = IMAGE_FORMS if signed_tensors else OUTPUT_IMAGE_FORMS
    if isinstance(image, PIL.Image.Image):
        return _pil_to_uint8(image, name, accepts)
    if isinstance(image, torch.Tensor):
        return _tensor_to_uint8(image, name, accepts, video=False, signed=signed_tensors)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            hint = (
                " Arrays are channels-last; pass x.transpose(1, 2, 0)."
                if image.ndim == 3 and image.shape[0] == 3
                else ""
            )
            raise _refuse(name, image, accepts, hint)
        return _array_to_uint8(image, name, image, accepts, signed=False)
    hint = " Load a file with `pipelines.video_io.load_image(path)`." if isinstance(image, (str, bytes)) else ""
    raise _refuse(name, image, accepts, hint)


def check_image(image, name: str = "reference_image") -> np.ndarray | torch.Tensor:
    """An image in an accepted form, validated: a float `(3, H, W)` tensor in [−1, 1] stays a float32 CPU tensor (so
    a dataset frame reaches the model without a uint8 round trip, as in training); every other form becomes
    `(H, W, 3)` uint8."""
    uint8 = to_uint8_image(image, name)
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        return image.detach().float().cpu().clamp(-1, 1)
    return uint8


def to_uint8_video(frames, name: str = "user_video", signed_tensors: bool = True) -> np.ndarray:
    """Frames in any accepted form (module docstring) → `(T, H, W, 3)` uint8 RGB, or a `ValueError` naming ``name``.
    ``signed_tensors=False`` reads float tensors in [0, 1] (the pipeline's ``"pt"`` output) instead of [−1, 1]."""
    accepts = VIDEO_FORMS if signed_tensors else OUTPUT_VIDEO_FORMS
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise _refuse(name, _Said("an empty list"), accepts)
        images = [to_uint8_image(frame, f"{name}[{t}]", signed_tensors) for t, frame in enumerate(frames)]
        sizes = {image.shape for image in images}
        if len(sizes) > 1:
            raise _refuse(name, _Said(f"a list of frames of different sizes {sorted(sizes)}"), accepts)
        return np.stack(images)
    if isinstance(frames, torch.Tensor):
        return _tensor_to_uint8(frames, name, accepts, video=True, signed=signed_tensors)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            hint = ""
            if frames.ndim == 4 and frames.shape[1] == 3:
                hint = " Arrays are channels-last; pass x.transpose(0, 2, 3, 1)."
            elif frames.ndim == 3 and frames.shape[-1] == 3:
                hint = " One frame? Pass x[None]."
            raise _refuse(name, frames, accepts, hint)
        return _array_to_uint8(frames, name, frames, accepts, signed=False)
    raise _refuse(name, frames, accepts)


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------


def check_sampling_rate(rate, name: str = "sampling_rate") -> int:
    """A sampling rate in Hz: an integer (or an integral float) >= ``MIN_SAMPLING_RATE``."""
    accepts = f"an integer rate in Hz >= {MIN_SAMPLING_RATE} (e.g. 16000, 44100)"
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or rate != int(rate):
        raise _refuse(name, rate, accepts)
    if rate < MIN_SAMPLING_RATE:
        hint = f" {rate} looks like kHz: pass {int(rate) * 1000}." if 0 < rate < 1000 else ""
        raise _refuse(name, rate, accepts, hint)
    return int(rate)


def to_waveform(audio, name: str) -> np.ndarray:
    """A mono waveform in any accepted form (module docstring) → `(num_samples,)` float32 at its own rate."""
    got = audio
    if isinstance(audio, torch.Tensor):
        if audio.is_complex():
            raise _refuse(name, got, AUDIO_FORMS)
        audio = audio.detach().cpu()
        audio = (audio.float() if audio.dtype in (torch.float16, torch.bfloat16) else audio).numpy()
    elif isinstance(audio, Sequence) and not isinstance(audio, (str, bytes)):
        try:
            audio = np.asarray(audio)
        except ValueError as error:  # ragged nested lists
            raise _refuse(
                name, _Said(f"a {type(got).__name__} that is not an array of numbers ({error})"), AUDIO_FORMS
            ) from error
        got = audio
    if not isinstance(audio, np.ndarray):
        hint = " Load a file with `pipelines.video_io.load_wav(path)`." if isinstance(audio, (str, bytes)) else ""
        raise _refuse(name, got, AUDIO_FORMS, hint)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        hint = " Several channels? Average them to one: x.mean(axis=...)." if audio.ndim == 2 else ""
        raise _refuse(name, got, AUDIO_FORMS, hint)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 2.0**15
    if audio.dtype == np.int32:
        return (audio.astype(np.float64) / 2.0**31).astype(np.float32)
    if audio.dtype.kind != "f":
        raise _refuse(name, got, AUDIO_FORMS, f" Its dtype {audio.dtype} is neither float, int16 nor int32.")
    audio = audio.astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise _refuse(name, got, AUDIO_FORMS, " It holds NaN or infinite samples.")
    peak = float(np.abs(audio).max(initial=0.0))
    if peak > MAX_FLOAT_PEAK:
        raise _refuse(
            name,
            got,
            AUDIO_FORMS,
            (
                f" Its float samples peak at {peak:.6g}: that is not full-scale audio in [-1, 1] but looks like integer "
                "PCM stored as floats; pass the int16 array, or divide by 32768."
            ),
        )
    return audio


def to_16khz(audio, name: str, sampling_rate=SAMPLE_RATE) -> np.ndarray:
    """A whole waveform in any accepted form at ``sampling_rate`` → `(num_samples,)` float32 at 16 kHz."""
    return resample_audio(to_waveform(audio, name), check_sampling_rate(sampling_rate))


def check_features(features, name: str, feature_shape: tuple[int, int]) -> torch.Tensor:
    """Per-frame wav2vec2 rows `(T, NL, D)` (array or tensor, finite) → a float32 CPU tensor (a copy)."""
    accepts = f"per-frame wav2vec2 rows (T, {feature_shape[0]}, {feature_shape[1]}) of the pipeline's audio encoder"
    got = features
    if isinstance(features, np.ndarray) or (isinstance(features, Sequence) and not isinstance(features, (str, bytes))):
        try:
            features = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: memory maps are read-only
        except (ValueError, TypeError) as error:
            raise _refuse(
                name, got if isinstance(got, np.ndarray) else _Said(f"a {type(got).__name__}"), accepts, f" ({error})"
            ) from error
    if not isinstance(features, torch.Tensor) or features.is_complex() or features.dtype == torch.bool:
        raise _refuse(name, got, accepts)
    features = features.detach().float().cpu()
    if features.ndim != 3 or tuple(features.shape[1:]) != tuple(feature_shape):
        raise _refuse(name, got, accepts)
    if not torch.isfinite(features).all():
        raise _refuse(name, got, accepts, " It holds NaN or infinite values.")
    return features


# ----------------------------------------------------------------------------------------------------------------
# Numbers and texts
# ----------------------------------------------------------------------------------------------------------------


def check_int(value, name: str, minimum: int = 1) -> int:
    """An integer (Python or NumPy, not `bool`) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _refuse(name, value, f"an integer >= {minimum}")
    return int(value)


def check_scale(value, name: str) -> float:
    """A guidance scale: a finite real number >= 0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise _refuse(name, value, "a finite number >= 0")
    return float(value)


def check_size(height, width, unit: int | tuple[int, int]) -> tuple[int, int]:
    """``height`` / ``width``: positive multiples of ``unit`` pixels (one token: VAE factor × patch size; one value, or
    `(rows, columns)`)."""
    units = (unit, unit) if isinstance(unit, int) else tuple(unit)
    for name, value, step in (("height", height, units[0]), ("width", width, units[1])):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < step or value % step:
            raise ValueError(
                f"`{name}` is {describe(value)}; expected a positive multiple of {step} (one token): `height` and "
                f"`width` have to be divisible by {units[0] if units[0] == units[1] else units} but are {height} and "
                f"{width}."
            )
    return int(height), int(width)


def check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise _refuse(name, value, "a str")
    return value


def check_emotion(emotion) -> str | list[str] | None:
    """``emotion``: `None`, a `str`, or a list of `str` (one per chunk; its length is checked against the chunks)."""
    accepts = "a str, or a list of str (one per chunk)"
    if emotion is None or isinstance(emotion, str):
        return emotion
    if isinstance(emotion, (list, tuple)):
        bad = [(index, text) for index, text in enumerate(emotion) if not isinstance(text, str)]
        if bad:
            index, text = bad[0]
            raise _refuse("emotion", _Said(f"a list whose item {index} is {describe(text)}"), accepts)
        return list(emotion)
    raise _refuse("emotion", emotion, accepts)


def check_call_settings(**values) -> dict:
    """The setting-like arguments of a call or session (``num_inference_steps``, guidance scales, chunk lengths, user
    video size, text length, default emotion), each `None` (the model's setting) or of its accepted type; returns them
    converted (NumPy integers to `int`). Their relations (``4k + 1`` frames, ...) are `EchoSettings`'s to check."""
    checks = {
        "num_inference_steps": check_int,
        "num_frames_per_chunk": check_int,
        "motion_frames": check_int,
        "user_video_size": check_int,
        "max_sequence_length": check_int,
        "audio_guidance_scale": check_scale,
        "user_guidance_scale": check_scale,
        "default_emotion": check_text,
    }
    return {name: None if value is None else checks[name](value, name) for name, value in values.items()}


def check_landmarks(landmarks, name: str, shape: tuple, what: str, allow_nan: bool = False) -> np.ndarray:
    """Face-mesh points of ``shape`` (``what`` says in which pixels) → float32; NaN rows (no face found) only when
    ``allow_nan`` (per-frame landmarks, as `echo.encoding.detect_face_landmarks` marks faceless frames)."""
    accepts = f"an array of shape {shape}: {what}"
    got = landmarks
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().cpu().float().numpy()
    try:
        landmarks = np.asarray(landmarks, dtype=np.float32)
    except (ValueError, TypeError) as error:
        raise _refuse(name, got, accepts, f" ({error})") from error
    if landmarks.shape != tuple(shape):
        raise _refuse(name, got, accepts)
    finite = np.isfinite(landmarks)
    if not finite.all() and not (allow_nan and not np.isinf(landmarks).any()):
        raise _refuse(name, got, accepts, " It holds NaN or infinite values.")
    return landmarks


def check_understanding(understanding, name: str, dim: int) -> torch.Tensor:
    """HBCU tokens ``S_usr`` `(N_s, D_s)` (or `(1, N_s, D_s)`), finite, with ``D_s = dim`` → float32 `(1, N_s, D_s)`."""
    accepts = f"understanding tokens (N_s, {dim}) as a tensor or an array (or a list of them, one per chunk)"
    got = understanding
    if isinstance(understanding, np.ndarray):
        understanding = torch.from_numpy(np.asarray(understanding, dtype=np.float32))
    if not isinstance(understanding, torch.Tensor) or understanding.is_complex() or understanding.dtype == torch.bool:
        raise _refuse(name, got, accepts)
    understanding = understanding.detach().float()
    if understanding.ndim == 2:
        understanding = understanding[None]
    if understanding.ndim != 3 or understanding.shape[0] != 1 or understanding.shape[2] != dim:
        raise _refuse(name, got, accepts)
    if not torch.isfinite(understanding).all():
        raise _refuse(name, got, accepts, " It holds NaN or infinite values.")
    return understanding


def check_generator(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        hint = " One generator draws the noise of every chunk in order." if isinstance(generator, list) else ""
        raise _refuse("generator", generator, "a torch.Generator or None", hint)
    return generator


def check_callable(value, name: str):
    if value is not None and not callable(value):
        raise _refuse(name, value, "a callable or None")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The checked inputs of a render, as one typed object each
# ----------------------------------------------------------------------------------------------------------------

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass(frozen=True)
class RenderOptions:
    r"""
    Everything a render (`EchoPipeline.__call__`, or a session of `EchoPipeline.start_session`) is asked for besides
    the model's settings and the media, checked and converted once by `check_render_options`. The session keeps it;
    `EchoPipeline.render_chunk` reads it.

    Args:
        reference_image (`np.ndarray` `(H, W, 3)` uint8 or `torch.Tensor` `(3, H, W)` in [−1, 1]): the avatar.
        height (`int`), width (`int`): the output size, multiples of the token unit.
        num_frames (`int`, *optional*): the conversation's length when known in advance.
        with_user (`bool`): whether the user's streams drive the avatar (the LCU branch).
        generator (`torch.Generator`, *optional*): one generator for the noise of all chunks, in order.
        emotion (`str` or `list[str]`, *optional*): one text, or one per chunk.
        emotion_reasoner (*optional*): an object with ``describe(history, clip_end, avatar_speaker)``.
        understanding (`torch.Tensor` `(1, N_s, D_s)` or a list of them, *optional*), understanding_model
            (`Callable`, *optional*): HBCU tokens, or what computes them.
        reference_landmarks (`np.ndarray` `(478, 2)`, *optional*), lip_mask / face_mask (*optional*): the SDCM masks'
            sources.
        output_type (`str` or `None`): of each chunk's frames (`None`: only the decoded video and latents).
        attention_kwargs (`dict`, *optional*), callback_on_step_end (`Callable`, *optional*),
            callback_on_step_end_tensor_inputs (`tuple[str]`): as in `EchoPipeline.__call__`.
        sampling_rate (`int`, *optional*): the rate of waveforms pushed without their own; `None` when the caller
            did not state it (16 kHz is assumed, with a warning, as transformers' feature extractors do).
        frame_inputs (`bool`): frame raw inputs to echo-prep's head crops (`echo.framing`).
    """

    reference_image: np.ndarray | torch.Tensor
    height: int
    width: int
    num_frames: int | None = None
    with_user: bool = False
    generator: torch.Generator | None = None
    emotion: str | list[str] | None = None
    emotion_reasoner: Any = None
    understanding: torch.Tensor | list | None = None
    understanding_model: Callable | None = None
    reference_landmarks: np.ndarray | None = None
    lip_mask: torch.Tensor | None = None
    face_mask: torch.Tensor | None = None
    output_type: str | None = "np"
    attention_kwargs: dict | None = None
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)
    sampling_rate: int | None = None
    frame_inputs: bool = True


def check_render_options(
    *,
    context_inputs: frozenset[str] | None,
    understanding_dim: int | None,
    callback_tensor_names: Sequence[str],
    reference_image,
    height: int,
    width: int,
    num_frames=None,
    with_user=None,
    generator=None,
    emotion=None,
    emotion_reasoner=None,
    understanding=None,
    understanding_model=None,
    reference_landmarks=None,
    lip_mask=None,
    face_mask=None,
    output_type="np",
    attention_kwargs=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=None,
    sampling_rate=None,
    frame_inputs=True,
    use_emotion=True,
    user_landmarks=None,
) -> RenderOptions:
    r"""
    Checks and converts a render's options once, into a [`RenderOptions`]; a `ValueError` naming the argument
    otherwise.

    Args:
        context_inputs (`frozenset[str]` or `None`): the inputs the pipeline's LCU reads
            (``context_encoder.required_inputs``), `None` without a context encoder.
        understanding_dim (`int`, *optional*): ``D_s`` of the LCU's understanding tokens.
        callback_tensor_names (`Sequence[str]`): the tensors a step callback may ask for.
        use_emotion (`bool`, defaults to `True`): whether the model reads the emotion text (``settings.use_emotion``);
            `False` (the "w/o LAU" ablation): ``emotion`` / ``emotion_reasoner`` are ignored, with a warning.
        user_landmarks (*optional*): the conversation's user landmarks (`EchoPipeline.__call__` passes them; the
            conversation's checks convert them), looked at here only so that the one warning about arguments the
            model does not use (`warn_ignored_arguments`) names them too.
        other arguments: as in `EchoPipeline.start_session` (``with_user=None``: whether there is an LCU).
    """
    if reference_image is None:
        raise ValueError("`reference_image` is required: it fixes the avatar's identity.")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` is {output_type!r}, expected 'np', 'pt', 'pil', 'latent' or None.")
    if num_frames is not None:
        num_frames = check_int(num_frames, "num_frames")
    if with_user is None:
        with_user = context_inputs is not None
    if not isinstance(with_user, bool):
        raise ValueError(f"`with_user` is {describe(with_user)}; expected True, False or None.")
    if with_user and context_inputs is None:
        raise ValueError("`with_user=True` but the pipeline has no `context_encoder` (LCU) to encode the user.")
    emotion = check_emotion(emotion)
    check_generator(generator)
    check_callable(callback_on_step_end, "callback_on_step_end")
    check_callable(understanding_model, "understanding_model")
    if emotion_reasoner is not None and not callable(getattr(emotion_reasoner, "describe", None)):
        raise ValueError(
            f"`emotion_reasoner` is {describe(emotion_reasoner)}; expected an object with "
            "describe(history, clip_end, avatar_speaker) (e.g. `echo.EmotionReasoner`)."
        )
    tensor_inputs = ["latents"] if callback_on_step_end_tensor_inputs is None else callback_on_step_end_tensor_inputs
    unknown = [name for name in tensor_inputs if name not in callback_tensor_names]
    if unknown:
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` has to be in {list(callback_tensor_names)}, but found {unknown}"
        )
    reads_understanding = with_user and "understanding" in context_inputs
    if understanding is not None and reads_understanding:
        if isinstance(understanding, (list, tuple)):  # one per chunk; None: computed by the understanding_model
            understanding = [
                None if u is None else check_understanding(u, f"understanding[{i}]", understanding_dim)
                for i, u in enumerate(understanding)
            ]
        else:
            understanding = check_understanding(understanding, "understanding", understanding_dim)
    if understanding is None and understanding_model is None and reads_understanding:
        raise ValueError(missing_understanding_message(understanding_dim))
    warn_ignored_arguments(
        use_emotion=use_emotion,
        context_inputs=context_inputs,
        with_user=with_user,
        emotion=emotion,
        emotion_reasoner=emotion_reasoner,
        understanding=understanding,
        understanding_model=understanding_model,
        user_landmarks=user_landmarks,
    )
    if sampling_rate is not None:
        sampling_rate = check_sampling_rate(sampling_rate)
    if not isinstance(frame_inputs, bool):
        raise ValueError(f"`frame_inputs` is {describe(frame_inputs)}; expected True or False.")
    return RenderOptions(
        reference_image=check_image(reference_image, "reference_image"),
        height=height,
        width=width,
        num_frames=num_frames,
        with_user=with_user,
        generator=generator,
        emotion=emotion,
        emotion_reasoner=emotion_reasoner,
        understanding=understanding,
        understanding_model=understanding_model,
        reference_landmarks=reference_landmarks,
        lip_mask=lip_mask,
        face_mask=face_mask,
        output_type=output_type,
        attention_kwargs=attention_kwargs,
        callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=tuple(tensor_inputs),
        sampling_rate=sampling_rate,
        frame_inputs=frame_inputs,
    )


def warn_ignored_arguments(
    *, use_emotion: bool, context_inputs: frozenset[str] | None, with_user: bool, **arguments
) -> list[str]:
    """One warning (diffusers' logger) naming each of ``arguments`` given (not `None`) that the loaded model does not
    use, and why: ``emotion`` / ``emotion_reasoner`` on a model trained without emotion (``use_emotion`` false),
    ``understanding`` / ``understanding_model`` on a model without understanding (no LCU, or its
    ``use_understanding`` false) or a render without the user branch, ``user_landmarks`` on a model that does not read
    the user's video (no LCU, or its ``use_visual`` false) or a render without the user branch. Returns the names
    warned about."""
    reasons = {}
    if not use_emotion:
        why = "the model was trained without emotion (settings.use_emotion is false: every prompt is empty)"
        reasons.update(emotion=why, emotion_reasoner=why)
    if context_inputs is None:
        why = "the pipeline has no context_encoder (LCU) to read understanding tokens"
        reasons.update(understanding=why, understanding_model=why)
    elif "understanding" not in context_inputs:
        why = "the model was trained without understanding (its LCU's use_understanding is false)"
        reasons.update(understanding=why, understanding_model=why)
    elif not with_user:
        why = "the user branch is off in this render (no user_video, or with_user=False)"
        reasons.update(understanding=why, understanding_model=why)
    if context_inputs is None:
        reasons["user_landmarks"] = "the pipeline has no context_encoder (LCU) to read the user's video"
    elif "user_video" not in context_inputs:
        reasons["user_landmarks"] = "the model was trained without the user's video (its LCU's use_visual is false)"
    elif not with_user:
        reasons["user_landmarks"] = "the user branch is off in this render (no user_video, or with_user=False)"
    ignored = [name for name in reasons if arguments.get(name) is not None]
    if ignored:
        logger.warning(
            "Ignored, as the loaded model does not use them: "
            + "; ".join(f"`{name}` ({reasons[name]})" for name in ignored)
            + "."
        )
    return ignored


def missing_understanding_message(understanding_dim: int) -> str:
    """What to pass when the LCU reads understanding tokens (HBCU, Eq. 8) and none are given."""
    return (
        "This model's context encoder reads understanding tokens (use_understanding=True, HBCU) and none were "
        "given. Pass `understanding_model=echo.OmniUnderstanding.from_pretrained(<Qwen2.5-Omni folder or hub id, "
        "e.g. 'Qwen/Qwen2.5-Omni-7B'>)` to compute them from the user's video and audio, or "
        f"`understanding=` precomputed tokens (N_s, {understanding_dim}) (e.g. the `user_omni.safetensors` "
        "of a prepared clip, echo-prep --stages omni), or render with a model trained without understanding "
        "(use_understanding: false, the w/o HBCU ablation); without `user_video` the user branch is off and none "
        "is needed."
    )


@dataclass(frozen=True)
class MediaPiece:
    r"""
    The next pieces of a conversation's streams, checked and converted by `check_media_piece` (`EchoSession.push`;
    `EchoPipeline.__call__` checks the whole conversation as one piece before any work).

    Args:
        avatar_audio (`np.ndarray` `(n,)` float32, *optional*), user_audio (*optional*): at ``sampling_rate``.
        user_video (`np.ndarray` `(n, H, W, 3)` uint8, *optional*).
        user_landmarks (`np.ndarray` `(n, 478, 2)` float32, *optional*): of the ``user_video`` frames.
        avatar_audio_features (`torch.Tensor` `(n, NL, D)`, *optional*), user_audio_features (*optional*).
        dialogue (`list[dict]`): transcript segments.
        sampling_rate (`int`, *optional*): the rate of the waveforms, `None` when not stated with the piece.
    """

    avatar_audio: np.ndarray | None = None
    user_audio: np.ndarray | None = None
    user_video: np.ndarray | None = None
    user_landmarks: np.ndarray | None = None
    avatar_audio_features: torch.Tensor | None = None
    user_audio_features: torch.Tensor | None = None
    dialogue: list[dict] = field(default_factory=list)
    sampling_rate: int | None = None

    @property
    def user_streams(self) -> list[str]:
        """The user streams the piece holds, by argument name."""
        names = ("user_audio", "user_video", "user_audio_features", "user_landmarks")
        return [name for name in names if getattr(self, name) is not None]


def check_media_piece(
    feature_shape: tuple[int, int],
    user_audio=None,
    user_video=None,
    avatar_audio=None,
    user_audio_features=None,
    avatar_audio_features=None,
    user_landmarks=None,
    dialogue=None,
    sampling_rate=None,
    fps=None,
) -> MediaPiece:
    """The arguments of `EchoSession.push` checked and converted (module docstring) into a [`MediaPiece`], each
    `ValueError` naming its argument; ``feature_shape`` is ``(NL, D)`` of the pipeline's audio encoder."""
    if fps is not None and fps != FPS:
        raise ValueError(f"`fps` is {fps}, expected {FPS}: the model renders and reads video at {FPS} fps.")
    if user_landmarks is not None and user_video is None:
        raise ValueError("`user_landmarks` must come with the `user_video` frames they belong to.")
    frames = None if user_video is None else to_uint8_video(user_video, "user_video")  # n, H, W, 3
    if user_landmarks is not None:
        user_landmarks = check_landmarks(
            user_landmarks,
            "user_landmarks",
            (len(frames), NUM_LANDMARKS, 2),
            "one face mesh per `user_video` frame, in its pixels (NaN rows: no face)",
            allow_nan=True,
        )
    return MediaPiece(
        avatar_audio=None if avatar_audio is None else to_waveform(avatar_audio, "avatar_audio"),
        user_audio=None if user_audio is None else to_waveform(user_audio, "user_audio"),
        user_video=frames,
        user_landmarks=user_landmarks,
        avatar_audio_features=None
        if avatar_audio_features is None
        else check_features(avatar_audio_features, "avatar_audio_features", feature_shape),
        user_audio_features=None
        if user_audio_features is None
        else check_features(user_audio_features, "user_audio_features", feature_shape),
        dialogue=[] if dialogue is None else check_dialogue(dialogue),
        sampling_rate=None if sampling_rate is None else check_sampling_rate(sampling_rate),
    )


def check_dialogue(dialogue) -> list[dict]:
    """Transcript segments ``{"speaker", "start", "end", "text"}`` (seconds, finite; strings) as a list."""
    if not isinstance(dialogue, (list, tuple)):
        raise ValueError(f"`dialogue` is a {type(dialogue).__name__}, expected a list of segments.")
    for segment in dialogue:
        if not isinstance(segment, dict) or not {"speaker", "start", "end", "text"} <= set(segment):
            raise ValueError(f"`dialogue` segment {segment!r} needs the keys speaker, start, end and text.")
        for key in ("start", "end"):
            value = segment[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"`dialogue` segment {segment!r}: {key!r} is not a finite number of seconds.")
        if not isinstance(segment["text"], str) or not isinstance(segment["speaker"], str):
            raise ValueError(f"`dialogue` segment {segment!r}: 'speaker' and 'text' must be strings.")
    return list(dialogue)


def check_output_memory(num_frames: int, height: int, width: int, available_bytes: int | None = None) -> None:
    """Refuses an offline render whose frames cannot fit in memory, before anything is allocated: `__call__` returns
    all ``num_frames`` frames at once (``num_frames · 3 · height · width`` float32 values, twice while they are
    stitched). A longer conversation is streamed with `EchoPipeline.start_session`, one chunk at a time."""
    needed = 2 * num_frames * 3 * height * width * 4
    available = physical_memory_bytes() if available_bytes is None else available_bytes
    if available is not None and needed > available:
        raise ValueError(
            f"`num_frames` = {num_frames} at {height}x{width} needs {needed / 2**30:.1f} GiB for the returned frames, "
            f"more than this machine's {available / 2**30:.1f} GiB of memory: render it in pieces with "
            "`pipe.start_session(...)` (each chunk's frames as they are ready), or pass a smaller `num_frames`."
        )


def physical_memory_bytes() -> int | None:
    """The machine's physical memory in bytes (POSIX), or `None` where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
