"""Preparation of one conversation into clip folders (the work each pool process does).

For a conversation with participants P and Q (see `data_prep.layouts`):

1. Text: transcripts (and VAD) from the dataset files; without them, Whisper ASR when a model folder is given.
2. Audio: every participant's track decoded to mono 16 kHz (`data_prep.media.load_audio`).
3. Video: frame timestamps probed; the conversation has ``T = min(floor(duration · 25))`` frames at 25 fps (nearest
   source frame per output time); audio shorter than its video by more than ``av_tolerance`` is an error, and so is
   audio longer than its video by more than ``max(AUDIO_OVERRUN_S, AUDIO_OVERRUN_RATIO · video)`` (1 s or 10 %: a
   track of another recording, or a video cut short, would otherwise be cut to the video without a word).
4. Faces: detection on every 25 fps frame, one tracked face, causally smoothed square crop boxes (`echo.framing`,
   the framing `pipelines.EchoPipeline` applies to raw inputs: no look-ahead).
5. Clips of ``clip_frames`` frames (the last one kept if it has at least ``min_clip_frames``). Per clip and
   participant: crops (``size``²), face-mesh landmarks on the crops, the clip's rows of the wav2vec2 features of the
   participant's whole track (`echo.audio.audio_frame_features`, one row per frame, at most 49 frames of look-ahead,
   across clip boundaries as at inference); then two
   clip folders, ``<conversation>_<P>_c<k>`` (P avatar, Q user) and ``<conversation>_<Q>_c<k>``.

Atomicity and resume: a clip folder is written as ``<out>/.tmp-<clip_id>-<pid>`` and renamed to ``<out>/<clip_id>``
when complete, so it exists only when complete; an existing clip folder is never rewritten. When every clip of a
conversation exists, ``<out>/.done/<conversation>.json`` records it and later runs skip the conversation without
decoding anything. All per-clip computations start from fresh state (a new face-mesh tracker per clip, no shared
smoothing state), so a resumed run writes the same bytes as an uninterrupted one. The options that shape the outputs
are recorded in ``<out>/prep_options.json`` (`record_options`); a rerun with other values is refused
(`OptionsMismatch`), never mixed with the earlier outputs.

Errors a source can cause raise `PrepError` (a `data_prep.media.MediaError`) whose message starts with the
offending file's name.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import echo
from data_prep import caches
from data_prep.audio_features import Wav2Vec2Features
from data_prep.caches import CACHE_STAGES, DEFAULT_EMOTION_STRIDE, DEFAULT_OMNI_STRIDE, torch_threads  # noqa: F401 (torch_threads re-exported)
from data_prep.layouts import Conversation
from data_prep.media import (
    FPS,
    SAMPLE_RATE,
    MediaError,
    iter_resampled_frames,
    load_audio,
    probe_video,
    resample_indices,
    write_video,
)
from data_prep.transcripts import WhisperTranscriber, clip_transcript, read_pairs_transcript, read_seamless_json
from echo import clip_format
from echo.atomic import write_text_atomic
from echo.audio import AUDIO_BLOCK_FRAMES, AUDIO_CONTEXT_FRAMES
from echo.faces import FaceMesh
from echo.framing import CROP_SCALE, DETECT_MAX_SIDE, FACE_BACKENDS, SMOOTH_HALF_LIFE, FaceFramer, crop_frame

PrepError = MediaError
CORE_STAGE = "clips"
TEXT_ENCODER_DTYPES = ("float32", "bfloat16", "float16")
#: The model option each cache stage needs.
STAGE_NEEDS = (
    ("user_tokens", "vae"),
    ("omni", "omni_model"),
    ("emotion", "emotion_model"),
    ("emotion_embeds", "text_encoder"),
)

#: The options that shape the clip folders (compared on every rerun into an existing output folder).
CLIP_OPTIONS = (
    "wav2vec2",
    "size",
    "clip_seconds",
    "min_clip_seconds",
    "crop_scale",
    "smooth_half_life",
    "face_backend",
    "min_face_ratio",
    "detect_max_side",
    "av_tolerance",
    "asr_model",
)
#: The options that shape each cache stage's files (compared when the stage runs again).
STAGE_OPTIONS = {
    "omni": ("omni_model", "omni_stride"),
    "emotion": ("emotion_model", "emotion_served_model", "emotion_stride"),
    "emotion_embeds": ("text_encoder", "text_encoder_dtype", "default_emotion"),
    "user_tokens": ("vae", "user_video_size"),
}
#: Options without a command-line flag of their own (Python API only).
_API_ONLY = {"detect_max_side"}
_PATH_OPTIONS = {"wav2vec2", "asr_model", "vae", "omni_model", "emotion_model", "text_encoder"}
#: Audio may run past the end of its video by at most max(AUDIO_OVERRUN_S, AUDIO_OVERRUN_RATIO × the video's length).
AUDIO_OVERRUN_S = 1.0
AUDIO_OVERRUN_RATIO = 0.1
#: The record of the output-shaping options of an output folder (see `record_options`).
PREP_OPTIONS = "prep_options.json"


def _option(name: str) -> str:
    """``\\`size\\` (--size)``: an option as the Python API and the command line spell it."""
    return f"`{name}`" if name in _API_ONLY else f"`{name}` (--{name.replace('_', '-')})"


def _normalised(name: str, value):
    """An existing model folder as its resolved path (so ``./w2v`` and ``/abs/w2v`` compare equal)."""
    if name in _PATH_OPTIONS and isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


@dataclass
class PrepOptions:
    """Options of a preparation run (all recorded in each clip's ``meta.json``; the output-shaping ones also in the
    output folder's ``prep_options.json``, see `record_options`). A value wrong for every clip raises a `ValueError`
    naming the option (and its command-line flag) when the options are made, before any input is read.

    Args:
        wav2vec2 (`str`): folder (or cache id) of the ``Wav2Vec2Model`` and its feature extractor.
        size (`int`, defaults to 512): side of the square crops, a multiple of 16.
        clip_seconds (`float`, defaults to 10.0): clip length; ``min_clip_seconds`` (1.0) for the last one.
        crop_scale (`float`, defaults to 1.8): crop side over the larger side of the detected face box.
        smooth_half_life (`float`, defaults to 2.0): half-life in frames of the causal exponential smoothing of box
            centres and sizes (`echo.framing`; 0 = none). It replaced a centred Gaussian (``smooth_sigma``), which
            looked ahead: an output folder prepared with it is refused (`OptionsMismatch`), not mixed.
        face_backend (`str`, defaults to `"mediapipe"`): box detector, ``"mediapipe"`` or ``"face_alignment"``.
        min_face_ratio (`float`, defaults to 0.5): a participant whose face is found in fewer frames fails.
        detect_max_side (`int`, defaults to 640): frames are downscaled to this longer side for detection.
        av_tolerance (`float`, defaults to 0.1): seconds an audio track may be shorter than its video (zero-padded).
        asr_model (`str`, *optional*): Whisper folder used when a conversation has no transcript.
        stages (`list[str]`): ``"clips"`` (the clip folders) and optional caches
            ``"omni"`` (needs ``omni_model``) and ``"emotion"`` (needs ``emotion_model``: a causal-LM folder or an
            OpenAI-compatible endpoint URL serving ``emotion_served_model``) and ``"emotion_embeds"`` (needs
            ``text_encoder``: the T5/UMT5 text encoder of the emotion texts, run after ``"emotion"``) and
            ``"user_tokens"`` (needs ``vae``: the LCU's per-frame VAE tokens of the user video); see `data_prep.caches`.
        text_encoder (`str`, *optional*): an encoder folder with its tokenizer, or a pipeline folder holding
            ``text_encoder/`` and ``tokenizer/`` (stage ``"emotion_embeds"``).
        text_encoder_dtype (`str`, defaults to `"float32"`): ``"float32"``, ``"bfloat16"`` or ``"float16"``; the
            cached embeddings keep this dtype.
        default_emotion (`str`, defaults to `"neutral"`): the dataset's ``default_emotion`` (clips without
            ``emotion.json``), also embedded by stage ``"emotion_embeds"``.
        user_video_size (`int`, defaults to 64): training's ``data.user_video_size``, the square size stage
            ``"user_tokens"`` resizes the user frames to.
        omni_stride (`int`, defaults to 25): frames between the understanding entries of stage ``"omni"`` (one
            thinker call per stride of every clip; a training window uses the entry of its reasoning frame,
            `echo.clip_format.reasoning_frame`). Training saves it with the model (``understanding_stride``).
        emotion_stride (`int`, defaults to 50): frames between the emotion windows of stage ``"emotion"`` (one
            reasoner call per stride, by the same rule); saved with the model as ``emotion_stride``.
        device (`str`, defaults to `"cpu"`).
        threads (`int`, defaults to 1): torch CPU threads per worker process (the pool provides the parallelism).
    """

    wav2vec2: str
    size: int = 512
    clip_seconds: float = 10.0
    min_clip_seconds: float = 1.0
    crop_scale: float = CROP_SCALE
    smooth_half_life: float = SMOOTH_HALF_LIFE
    face_backend: str = "mediapipe"
    min_face_ratio: float = 0.5
    detect_max_side: int = DETECT_MAX_SIDE
    av_tolerance: float = 0.1
    asr_model: str | None = None
    stages: list[str] = field(default_factory=lambda: [CORE_STAGE])
    vae: str | None = None
    omni_model: str | None = None
    emotion_model: str | None = None
    emotion_served_model: str = "default"
    emotion_stride: int = DEFAULT_EMOTION_STRIDE
    text_encoder: str | None = None
    text_encoder_dtype: str = "float32"
    default_emotion: str = "neutral"
    user_video_size: int = 64
    omni_stride: int = DEFAULT_OMNI_STRIDE
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self):
        # Options that are wrong for every clip are refused here, once, before any input is read.
        unknown = set(self.stages) - {CORE_STAGE, *CACHE_STAGES}
        if unknown:
            raise ValueError(
                f"`stages` (--stages) has {sorted(unknown)}, expected a subset of {[CORE_STAGE, *CACHE_STAGES]}."
            )
        for name, allowed in (("face_backend", FACE_BACKENDS), ("text_encoder_dtype", TEXT_ENCODER_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_option(name)} is {getattr(self, name)!r}, expected one of {list(allowed)}.")
        for name, multiple, why in (
            ("size", 16, "the VAE downsamples 8× and the generator patches 2×"),
            ("user_video_size", 8, "the VAE downsamples 8×"),
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < multiple or value % multiple:
                raise ValueError(f"{_option(name)} is {value!r}, expected a positive multiple of {multiple} ({why}).")
        for name in ("clip_seconds", "min_clip_seconds"):
            # `not (a >= b)` also refuses NaN.
            if not getattr(self, name) * FPS >= 0.5:
                raise ValueError(
                    f"{_option(name)} is {getattr(self, name)}, expected at least one frame ({1 / FPS:g} s at "
                    f"{FPS} fps)."
                )
        if not self.min_clip_seconds <= self.clip_seconds:
            raise ValueError(
                f"{_option('clip_seconds')} = {self.clip_seconds} and {_option('min_clip_seconds')} = "
                f"{self.min_clip_seconds}, expected min_clip_seconds ≤ clip_seconds."
            )
        if not self.crop_scale > 0:
            raise ValueError(f"{_option('crop_scale')} is {self.crop_scale}, expected a positive factor.")
        for name in ("smooth_half_life", "av_tolerance"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_option(name)} is {getattr(self, name)}, expected a value ≥ 0.")
        if not 0.0 <= self.min_face_ratio <= 1.0:
            raise ValueError(f"{_option('min_face_ratio')} is {self.min_face_ratio}, expected a fraction in [0, 1].")
        for name in ("omni_stride", "emotion_stride", "detect_max_side", "threads"):
            if not isinstance(getattr(self, name), numbers.Integral) or getattr(self, name) < 1:
                raise ValueError(f"{_option(name)} is {getattr(self, name)!r}, expected a positive integer.")
        for stage, needed in STAGE_NEEDS:
            if stage in self.stages and getattr(self, needed) is None:
                raise ValueError(f"Stage {stage!r} needs {_option(needed)}.")

    def recorded(self) -> dict:
        """The options that shape the outputs, as `record_options` stores them in ``prep_options.json``:
        ``{"clips": {CLIP_OPTIONS}, "stages": {stage: {STAGE_OPTIONS[stage]} for each requested cache stage}}``.
        Model paths that exist are recorded resolved."""
        return {
            "clips": {name: _normalised(name, getattr(self, name)) for name in CLIP_OPTIONS},
            "stages": {
                stage: {name: _normalised(name, getattr(self, name)) for name in STAGE_OPTIONS[stage]}
                for stage in CACHE_STAGES
                if stage in self.stages
            },
        }

    @property
    def clip_frames(self) -> int:
        return max(1, int(round(self.clip_seconds * FPS)))

    @property
    def min_clip_frames(self) -> int:
        return max(1, int(round(self.min_clip_seconds * FPS)))


class OptionsMismatch(ValueError):
    """An output folder prepared with other output-shaping options than this run's; ``differences`` lists
    ``(option, recorded, this run)``."""

    def __init__(self, path: Path, differences: list[tuple[str, object, object]]):
        self.path, self.differences = path, differences
        listed = ", ".join(f"{_option(name)} was {old!r}, now {new!r}" for name, old, new in differences)
        super().__init__(
            f"{str(path)!r} was prepared with other options than this run's: {listed}. Reusing its outputs would mix "
            "the two. Rerun with the recorded values, write to a new --out folder, or pass --overwrite to delete "
            "its prepared clips and prepare them again."
        )


def _recorded_in_clips(out_dir: Path) -> dict | None:
    """``{"clips": ...}`` from the ``meta.json`` of a clip folder, for a folder of an echo-prep that wrote no
    ``prep_options.json``; `None` when it holds no clip folder."""
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / clip_format.META).is_file():
            options = clip_format.read_meta(folder).get("options", {})
            return {"clips": {name: options[name] for name in CLIP_OPTIONS if name in options}, "stages": {}}
    return None


def record_options(out_dir: str | Path, options: PrepOptions) -> dict:
    """Compare ``options`` with the options ``out_dir`` was prepared with, then record the union in
    ``<out_dir>/prep_options.json``; returns the record.

    The clip options (`CLIP_OPTIONS`) are compared on every run; a cache stage's options (`STAGE_OPTIONS`) when that
    stage was run before (a stage run for the first time is added). A folder of an older echo-prep without the record
    is compared with the ``options`` of one of its clips' ``meta.json``.

    Raises:
        `OptionsMismatch`: an option differs; the message names each one with both values and the ways on.
    """
    out_dir = Path(out_dir)
    path = out_dir / PREP_OPTIONS
    current = options.recorded()
    recorded = clip_format.read_json(path) if path.is_file() else _recorded_in_clips(out_dir)
    if recorded is not None:
        if not isinstance(recorded, dict) or not isinstance(recorded.get("clips"), dict):
            reason = "is not an echo-prep options record; use a new --out or --overwrite"
            raise clip_format.ClipFormatError(path, reason)
        stages = recorded.get("stages") if isinstance(recorded.get("stages"), dict) else {}
        pairs = [(name, recorded["clips"], current["clips"]) for name in CLIP_OPTIONS]
        for stage, values in current["stages"].items():
            before = stages.get(stage)
            pairs += [(name, before, values) for name in STAGE_OPTIONS[stage]] if isinstance(before, dict) else []
        differences = [
            (name, old[name], new[name])
            for name, old, new in pairs
            if name in old and _normalised(name, old[name]) != new[name]
        ]
        # A clip option that no longer exists shaped the outputs another way (``smooth_sigma``: a look-ahead Gaussian)
        differences += [
            (name, value, "(no longer an option)")
            for name, value in recorded["clips"].items()
            if name not in CLIP_OPTIONS
        ]
        if differences:
            raise OptionsMismatch(out_dir, differences)
        current["stages"] = {**stages, **current["stages"]}
    clip_format.write_json(path, current)
    return current


@dataclass
class ConversationResult:
    conversation: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


_MODELS: dict = {}


def _wav2vec2(options: PrepOptions):
    key = ("wav2vec2", options.wav2vec2, options.device, options.threads)
    if key not in _MODELS:
        _MODELS[key] = Wav2Vec2Features(options.wav2vec2, device=options.device, num_threads=options.threads)
    return _MODELS[key]


def _asr(options: PrepOptions):
    key = ("asr", options.asr_model, options.device)
    if key not in _MODELS:
        _MODELS[key] = WhisperTranscriber(options.asr_model, device=options.device)
    return _MODELS[key]


def tool_versions(options: PrepOptions) -> dict:
    import av
    import mediapipe
    import torch
    import transformers

    return {
        "echo": echo.__version__,
        "mediapipe": mediapipe.__version__,
        "av": av.__version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "face_backend": options.face_backend,
        "wav2vec2": Path(options.wav2vec2).name,
    }


#: How the ``*_w2v.npy`` rows were computed (recorded in ``meta.json``; older echo-prep encoded each clip's audio alone).
AUDIO_ROWS = (
    f"echo.audio.audio_frame_features: whole track, {AUDIO_BLOCK_FRAMES}-frame blocks from frame 0, "
    f"{AUDIO_CONTEXT_FRAMES} frames of context each side"
)

clip_id = clip_format.clip_id


def clip_ranges(num_frames: int, options: PrepOptions) -> list[tuple[int, int]]:
    """``[start, end)`` frame ranges of the clips of a conversation of ``num_frames`` frames."""
    ranges = []
    for start in range(0, num_frames, options.clip_frames):
        end = min(num_frames, start + options.clip_frames)
        if end - start >= options.min_clip_frames:
            ranges.append((start, end))
    return ranges


# ----------------------------------------------------------------------------------------------------------------
# Reading a conversation
# ----------------------------------------------------------------------------------------------------------------


def read_text(conversation: Conversation, audio: dict[str, np.ndarray], options: PrepOptions):
    """Steps 1: ``(segments per participant, vad per participant, source)``; ASR needs the decoded audio."""
    ids = [p.id for p in conversation.participants]
    segments = {i: [] for i in ids}
    vad = {i: [] for i in ids}
    source = "none"
    if conversation.transcript is not None:
        segments = read_pairs_transcript(conversation.transcript, ids)
        source = "dataset"
    for participant in conversation.participants:
        if participant.metadata is not None:
            segments[participant.id], vad[participant.id] = read_seamless_json(participant.metadata)
            source = "dataset"
    if source == "none" and options.asr_model is not None and audio:
        segments = {i: _asr(options)(audio[i]) for i in ids}
        source = "asr"
    for i in ids:
        if not vad[i]:
            vad[i] = [{"start": s["start"], "end": s["end"]} for s in segments[i]]
    return segments, vad, source


def detect_crop_boxes(frames, name: str, options: PrepOptions) -> np.ndarray:
    """Step 4 for one participant: `(T, 4)` square crop boxes in source pixels of its 25 fps frames (an iterable of
    `(H, W, 3)` uint8 RGB), framed by `echo.framing.FaceFramer` (the framing the pipeline applies to raw inputs); a
    `PrepError` starting with ``name`` when a face is found in fewer than ``min_face_ratio`` of the frames."""
    framer = FaceFramer(options.face_backend, options.crop_scale, options.smooth_half_life, options.detect_max_side)
    with framer:
        boxes, found, _ = framer.track(frames)
    if found.mean() < options.min_face_ratio:
        raise PrepError(
            f"{name}: a face was found in {int(found.sum())} of {len(found)} frames, fewer than the "
            f"required {options.min_face_ratio:.0%}"
        )
    return boxes


# ----------------------------------------------------------------------------------------------------------------
# One conversation
# ----------------------------------------------------------------------------------------------------------------


def prepare_conversation(
    conversation: Conversation, out_dir: str | Path, options: PrepOptions, on_clip=None
) -> ConversationResult:
    """Write every missing clip folder of ``conversation`` under ``out_dir`` (see the module docstring).

    Torch runs with ``options.threads`` CPU threads meanwhile (the process pool provides the parallelism).

    Args:
        on_clip (`callable`, *optional*): called as ``on_clip(clip_id, tmp_dir)`` when a clip folder is complete,
            just before its atomic rename (progress reporting; tests use it to interrupt a run part-way).
    """
    with torch_threads(options.threads):
        return _prepare_conversation(conversation, Path(out_dir), options, on_clip)


def _prepare_conversation(
    conversation: Conversation, out_dir: Path, options: PrepOptions, on_clip=None
) -> ConversationResult:
    result = ConversationResult(conversation.id)
    done_marker = out_dir / ".done" / f"{conversation.id}.json"
    if done_marker.exists():
        listed = json.loads(done_marker.read_text())["clips"]
        if all((out_dir / c).is_dir() for c in listed):
            result.skipped = listed
            run_caches(out_dir, listed, options)
            return result
    ids = [p.id for p in conversation.participants]

    # 1-2. Text and audio. Dataset transcripts are read first (cheap checks before any decoding); ASR needs audio.
    has_text = conversation.transcript is not None or any(p.metadata for p in conversation.participants)
    if has_text:
        segments, vad, text_source = read_text(conversation, {}, options)
    audio = {p.id: load_audio(p.audio or p.video) for p in conversation.participants}
    if not has_text:
        segments, vad, text_source = read_text(conversation, audio, options)

    # 3. Video timing: the common 25 fps frame count; audio must cover it.
    probes = {p.id: probe_video(p.video) for p in conversation.participants}
    num_frames = min(int(np.floor(probe["duration"] * FPS + 1e-6)) for probe in probes.values())
    for participant in conversation.participants:
        seconds = len(audio[participant.id]) / SAMPLE_RATE
        if seconds + options.av_tolerance < num_frames / FPS:
            name = (participant.audio or participant.video).name
            raise PrepError(
                f"{name}: audio is {seconds:.2f} s long, shorter than its video ({num_frames / FPS:.2f} s) by more "
                f"than {options.av_tolerance} s"
            )
        video_seconds = probes[participant.id]["duration"]
        allowed = max(AUDIO_OVERRUN_S, AUDIO_OVERRUN_RATIO * video_seconds)
        if seconds > video_seconds + allowed:
            name = (participant.audio or participant.video).name
            raise PrepError(
                f"{name}: audio is {seconds:.2f} s long, longer than its video {participant.video.name} "
                f"({video_seconds:.2f} s) by more than {allowed:.2f} s (the larger of {AUDIO_OVERRUN_S:g} s and "
                f"{AUDIO_OVERRUN_RATIO:.0%} of the video), so it would be cut to the video. Check that they are the "
                "same recording, or trim the audio to the video"
            )
    ranges = clip_ranges(num_frames, options)
    if not ranges:
        raise PrepError(
            f"{conversation.participants[0].video.name}: {num_frames} frames at 25 fps, shorter than one clip "
            f"({options.min_clip_frames} frames)"
        )
    all_clips = [clip_id(conversation.id, i, k) for k in range(len(ranges)) for i in ids]
    indices = {i: resample_indices(probes[i]["times"], num_frames) for i in ids}

    # 4. Faces: one tracked, smoothed crop box per frame and participant.
    if CORE_STAGE in options.stages and not all((out_dir / c).is_dir() for c in all_clips):
        boxes = {
            p.id: detect_crop_boxes(
                (image for _, image in iter_resampled_frames(p.video, indices[p.id])), p.video.name, options
            )
            for p in conversation.participants
        }
        frames = {p.id: iter_resampled_frames(p.video, indices[p.id]) for p in conversation.participants}

        # 5. Clips.
        for k, (start, end) in enumerate(ranges):
            crops = {
                i: np.stack([crop_frame(next(frames[i])[1], boxes[i][t], options.size) for t in range(start, end)])
                for i in ids
            }
            targets = {i: clip_id(conversation.id, i, k) for i in ids}
            if all((out_dir / c).is_dir() for c in targets.values()):
                result.skipped += list(targets.values())
                continue
            streams = {}
            for i in ids:
                with FaceMesh() as mesh:
                    landmarks = np.stack([mesh(image) for image in crops[i]])
                samples = audio[i][int(round(start * SAMPLE_RATE / FPS)) : int(round(end * SAMPLE_RATE / FPS))]
                samples = np.pad(samples, (0, (end - start) * SAMPLE_RATE // FPS - len(samples)))
                streams[i] = {
                    "frames": crops[i],
                    "landmarks": landmarks.astype(np.float32),
                    "audio": samples.astype(np.float32),
                    # the rows of the whole conversation track (`echo.audio.audio_frame_features`), not of the clip's
                    # audio: a row reads at most 49 frames ahead, across the clip's end, as at inference
                    "w2v": _wav2vec2(options)(audio[i], start, end),
                    "boxes": boxes[i][start:end],
                }
            for a, u in (ids, ids[::-1]):
                if (out_dir / targets[a]).is_dir():
                    result.skipped.append(targets[a])
                    continue
                transcript = clip_transcript(segments, vad, a, u, start / FPS, end / FPS, text_source)
                write_clip(out_dir, targets[a], conversation, a, u, streams, start, transcript, options, on_clip)
                result.written.append(targets[a])
    if all((out_dir / c).is_dir() for c in all_clips):
        done_marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(done_marker, json.dumps({"clips": all_clips}, indent=1))

    # 6. Optional caches on the finished clip folders.
    run_caches(out_dir, all_clips, options)
    return result


def run_caches(out_dir: Path, clips: list[str], options: PrepOptions) -> None:
    """Step 6: the optional cache stages on every existing clip folder of a conversation (see `data_prep.caches`)."""
    stages = [stage for stage in CACHE_STAGES if stage in options.stages]
    if not stages:
        return
    for clip in clips:
        if (out_dir / clip).is_dir():
            for stage in stages:
                caches.run_stage(stage, out_dir / clip, options)


def write_clip(
    out_dir: Path,
    clip: str,
    conversation: Conversation,
    avatar: str,
    user: str,
    streams: dict,
    start: int,
    transcript: dict,
    options: PrepOptions,
    on_clip=None,
) -> Path:
    """Write one clip folder atomically: ``.tmp-<clip>-<pid>`` → ``<clip>``."""
    tmp = out_dir / f".tmp-{clip}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    participants = {p.id: p for p in conversation.participants}
    for role, who in (("avatar", avatar), ("user", user)):
        stream = streams[who]
        cached = stream.get("mp4")
        video = tmp / clip_format.video_name(role)
        if cached is not None and cached.exists():
            shutil.copyfile(cached, video)
        else:
            write_video(video, stream["frames"])
        stream["mp4"] = video
        clip_format.write_wav(tmp / clip_format.wav_name(role), stream["audio"])
        clip_format.write_w2v(tmp, role, stream["w2v"])
        clip_format.write_landmarks(tmp, role, stream["landmarks"])
    num_frames = len(streams[avatar]["frames"])
    clip_format.write_transcript(tmp, transcript)
    meta = {
        "clip_id": clip,
        "source": {
            "layout": conversation.layout,
            "conversation": conversation.id,
            **conversation.source,
            "avatar_video": participants[avatar].video.name,
            "user_video": participants[user].video.name,
            "avatar_audio": (participants[avatar].audio or participants[avatar].video).name,
            "user_audio": (participants[user].audio or participants[user].video).name,
        },
        "fps": FPS,
        "num_frames": num_frames,
        "sample_rate": SAMPLE_RATE,
        "size": options.size,
        "avatar": {"participant": avatar, "crop_boxes": np.round(streams[avatar]["boxes"], 3).tolist()},
        "user": {"participant": user, "crop_boxes": np.round(streams[user]["boxes"], 3).tolist()},
        "start_frame": start,
        "audio_features": {
            "num_layers": int(streams[avatar]["w2v"].shape[1]),
            "dim": int(streams[avatar]["w2v"].shape[2]),
            "rows": AUDIO_ROWS,
        },
        "options": {k: v for k, v in asdict(options).items() if k not in ("device", "stages", "threads")},
        "tool_versions": tool_versions(options),
    }
    clip_format.write_meta(tmp, meta)
    if on_clip is not None:
        on_clip(clip, tmp)
    final = out_dir / clip
    os.rename(tmp, final)
    # The next writer of the same stream copies from the final folder (the tmp one is gone).
    for role, who in (("avatar", avatar), ("user", user)):
        streams[who]["mp4"] = final / clip_format.video_name(role)
    return final


def write_atomic_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename: a failed write (disk full) leaves the old file, or
    none, never a truncated one."""
    write_text_atomic(path, text)
