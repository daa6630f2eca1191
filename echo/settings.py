"""`EchoSettings`: the settings a trained ECHO model depends on, in one place.

Training writes them next to the weights it saves (``echo_settings.json`` in every checkpoint and in ``final/``),
the export step copies them into the pipeline folder (``EchoPipeline``'s ``settings`` config entry in
``model_index.json``), and `EchoPipeline.__call__`, ``echo-render`` and validation read their defaults from there.
A value given explicitly to the pipeline or a CLI overrides the saved one for that call only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from .chunks import check_chunking

SETTINGS_NAME = "echo_settings.json"
# Beyond any Wan model's trained frame size by far; a larger value is a typo (e.g. 1e9), refused at load.
MAX_RESOLUTION = 8192


@dataclass(frozen=True)
class EchoSettings:
    """What a trained model was trained with, and how it samples by default.

    Args:
        resolution (`int`, defaults to 512): square frame size the model was trained at (height = width).
        num_frames_per_chunk (`int`, defaults to 33): frames of a training window and of a rendered chunk, ``4k + 1``.
        motion_frames (`int`, defaults to 1): frames a continuation chunk shares with the previous one,
            ``4(m − 1) + 1`` (their VAE latents are the chunk's motion condition, with the reference image).
        user_video_size (`int`, defaults to 64): square size of the user's frames read by the LCU's visual branch.
        max_history_frames (`int`, *optional*): the user history the LCU reads is at most this many frames long (at
            least a chunk).
        max_sequence_length (`int`, defaults to 512): emotion-text tokens (capped by the tokenizer's maximum).
        default_emotion (`str`, defaults to `"neutral"`): emotion text when none is given or known yet.
        understanding_stride (`int`, defaults to 25), emotion_stride (`int`, defaults to 50): frames between the
            reasoning frames of the understanding model Φ (HBCU) and of the emotion reasoner (LAU), on the
            conversation's clock: a window or chunk ending at frame ``t`` reads what was reasoned at
            `echo.clip_format.reasoning_frame` ``(t, stride)``, the latest ``k·stride − 1 ≤ t`` (nothing, and
            ``default_emotion``, before the first). Training takes them from the prepared caches (echo-prep
            ``--omni-stride`` / ``--emotion-stride``), the session reasons at exactly those frames.
        use_emotion (`bool`, defaults to `True`): `False` = the "w/o LAU" ablation, every prompt is ``""``.
        num_inference_steps (`int`, defaults to 40), audio_guidance_scale (`float`, defaults to 4.5),
        user_guidance_scale (`float`, defaults to 2.0): sampling defaults.
    """

    resolution: int = 512
    num_frames_per_chunk: int = 33
    motion_frames: int = 1
    user_video_size: int = 64
    max_history_frames: int | None = None
    max_sequence_length: int = 512
    default_emotion: str = "neutral"
    understanding_stride: int = 25
    emotion_stride: int = 50
    use_emotion: bool = True
    num_inference_steps: int = 40
    audio_guidance_scale: float = 4.5
    user_guidance_scale: float = 2.0

    def __post_init__(self):
        self._check_types()
        if not 16 <= self.resolution <= MAX_RESOLUTION or self.resolution % 16:
            raise ValueError(
                f"`resolution` is {self.resolution}, expected a positive multiple of 16, at most {MAX_RESOLUTION}."
            )
        check_chunking(self.num_frames_per_chunk, self.motion_frames)
        if self.user_video_size < 8 or self.user_video_size % 8:
            raise ValueError(f"`user_video_size` is {self.user_video_size}, expected a positive multiple of 8.")
        if self.max_history_frames is not None and self.max_history_frames < self.num_frames_per_chunk:
            raise ValueError(
                f"`max_history_frames` is {self.max_history_frames}, expected None or at least num_frames_per_chunk = "
                f"{self.num_frames_per_chunk} (the history ends with the chunk)."
            )
        for name in ("understanding_stride", "emotion_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` is {getattr(self, name)}, expected at least 1 frame.")
        if self.max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` is {self.max_sequence_length}, expected at least 1.")
        if self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` is {self.num_inference_steps}, expected at least 1.")
        for name in ("audio_guidance_scale", "user_guidance_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value):
                raise ValueError(f"`{name}` is {value!r}, expected a finite number >= 0.")

    def _check_types(self) -> None:
        """Every field of its declared type (an integer given as ``1e9`` or ``"512"`` is refused, naming the key)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                ok, accepts = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                accepts = "a finite number"
            elif kind == "bool":
                ok, accepts = isinstance(value, bool), "true or false"
            else:
                ok, accepts = isinstance(value, str), "a string"
            if not ok:
                raise ValueError(
                    f"settings key `{field.name}` is {value!r} ({type(value).__name__}), expected {accepts}"
                    f"{' or null' if 'None' in kind else ''}."
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None, source: str = "settings") -> EchoSettings:
        """Settings from a dict; an unknown key is an error naming it (a typo never silently falls back)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source} has unknown keys {unknown}; known keys: {sorted(known)}.")
        return cls(**values)

    def replace(self, **changes) -> EchoSettings:
        return dataclasses.replace(self, **changes)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``echo_settings.json`` into ``folder`` atomically."""
        return write_text_atomic(
            Path(folder) / SETTINGS_NAME, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EchoSettings:
        """Read ``echo_settings.json`` of ``folder``; errors name the file."""
        path = Path(folder) / SETTINGS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist: the folder holds no saved ECHO settings.")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from error
        return cls.from_dict(values, source=repr(str(path)))
