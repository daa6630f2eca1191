"""The prepared clip-folder format: file names, ``meta.json`` keys, readers, writers and conventions, in one place.

`data_prep` writes clip folders through this module and `echo.data` / ``training.validation`` read them through it,
so a name, a dtype or a convention is written down once. A clip folder holds one segment of ``T`` frames (25 fps) of
one conversation for one avatar/user assignment (``docs/interfaces.md`` lists every file):

- ``meta.json`` (`read_meta` / `write_meta`): ``clip_id``, ``source`` (``layout``, ``conversation`` and the source
  file names), ``fps`` (25), ``num_frames`` (T), ``sample_rate`` (16 kHz), ``size`` (side of the square crops),
  ``avatar`` / ``user`` (``participant`` and per-frame ``crop_boxes``), ``start_frame`` (the clip's first frame in
  the conversation), ``audio_features``, ``options``, ``tool_versions``.
- per role (``"avatar"``, ``"user"``): ``<role>.mp4`` (size², T frames), ``<role>.wav`` (16 kHz mono 16-bit PCM),
  ``<role>_w2v.npy`` (`(T, NL, D)` float16, exactly T rows), ``<role>_landmarks.npy`` (`(T, 478, 2)` float32,
  pixels of the crop, NaN on frames without a face).
- ``transcript.json``; caches ``emotion.json``, ``emotion_embeds.safetensors``, ``user_tokens.safetensors``
  (**normalised** per-frame VAE tokens, `echo.encoding.encode_user_video`'s output) and ``user_omni.safetensors``
  (understanding tokens S_usr per stride of the conversation, see `write_understanding`).

Conversations: the clips of one conversation and avatar assignment are ``<conversation>_<avatar>_c<k>`` with
``meta["source"]["conversation"]``, ``meta["avatar"]["participant"]`` and ``meta["start_frame"]``; `group_clips`
collects them in time order and `contiguous_run` gives the clips a window's history may read (from the
conversation's start, across clip boundaries; a missing clip cuts the history at the gap).

Errors name the offending file and, where one exists, the command that fixes it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, write_text_atomic
from .audio import FPS, SAMPLE_RATE

# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------

ROLES = ("avatar", "user")
META = "meta.json"
TRANSCRIPT = "transcript.json"
EMOTION = "emotion.json"
EMOTION_EMBEDS = "emotion_embeds.safetensors"
USER_TOKENS = "user_tokens.safetensors"
USER_OMNI = "user_omni.safetensors"

#: Which cached arrays hold generator-space (normalised) values: ``user_tokens`` are `encode_user_video`'s normalised
#: tokens (the window latents of `training.latent_cache`, outside clip folders, are normalised too).
STORED_NORMALISED = {USER_TOKENS: True}

CLIP_ID_PATTERN = re.compile(r"^(?P<prefix>.+)_c(?P<index>\d+)$")


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"`role` is {role!r}, expected one of {ROLES}.")
    return role


def video_name(role: str) -> str:
    """``avatar.mp4`` / ``user.mp4``."""
    return f"{_check_role(role)}.mp4"


def wav_name(role: str) -> str:
    """``avatar.wav`` / ``user.wav``."""
    return f"{_check_role(role)}.wav"


def w2v_name(role: str) -> str:
    """``avatar_w2v.npy`` / ``user_w2v.npy``."""
    return f"{_check_role(role)}_w2v.npy"


def landmarks_name(role: str) -> str:
    """``avatar_landmarks.npy`` / ``user_landmarks.npy``."""
    return f"{_check_role(role)}_landmarks.npy"


REQUIRED_FILES = (
    META,
    video_name("avatar"),
    wav_name("avatar"),
    w2v_name("avatar"),
    landmarks_name("avatar"),
    w2v_name("user"),
)


def clip_id(conversation: str, avatar: str, index: int) -> str:
    """``<conversation>_<avatar>_c<k>`` with four digits, the name of a clip folder."""
    return f"{conversation}_{avatar}_c{index:04d}"


class ClipFormatError(ValueError):
    """A prepared file that cannot be read; ``path`` is the file, ``reason`` what is wrong with it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{str(self.path)!r}: {reason}")


def open_safetensors(path: str | os.PathLike):
    """`safetensors.safe_open` of a prepared cache file; an unreadable file (corrupt, truncated, not safetensors) raises
    a `ClipFormatError` naming it and the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ClipFormatError(
            path,
            f"is not a readable safetensors file ({error}); delete it and rerun the echo-prep stage that writes it",
        ) from error


def read_json(path: str | os.PathLike):
    """A JSON file; a missing file is a `FileNotFoundError` and bad JSON a `ClipFormatError`, both naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClipFormatError(path, f"is not valid JSON ({error}); delete it and rerun echo-prep") from error


def write_json(path: str | os.PathLike, value, atomic: bool = True) -> Path:
    """Write ``value`` as indented JSON (`echo.atomic.write_text_atomic` when ``atomic``)."""
    path = Path(path)
    if atomic:
        return write_text_atomic(path, json.dumps(value, indent=1))
    path.write_text(json.dumps(value, indent=1))
    return path


# ----------------------------------------------------------------------------------------------------------------
# meta.json and conversations
# ----------------------------------------------------------------------------------------------------------------


def read_meta(clip_dir: str | os.PathLike) -> dict:
    """``meta.json`` of a clip folder, checked for the keys every reader needs (``num_frames``).

    Raises:
        `FileNotFoundError`: no ``meta.json``; `ClipFormatError` (a `ValueError`): malformed JSON, not an object, or
        a missing / bad ``num_frames``; the message names the file.
    """
    path = Path(clip_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"clip folder {str(Path(clip_dir))!r} has no {META!r}.")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ClipFormatError(path, f"holds a {type(meta).__name__}, expected a JSON object")
    if "num_frames" not in meta:
        raise ClipFormatError(path, "has no 'num_frames' key")
    if not isinstance(meta["num_frames"], int) or meta["num_frames"] < 1:
        raise ClipFormatError(path, f"'num_frames' is {meta['num_frames']!r}, expected a positive integer")
    for key, expected in (("fps", FPS), ("sample_rate", SAMPLE_RATE)):
        if key in meta and meta[key] != expected:
            raise ClipFormatError(path, f"{key!r} is {meta[key]!r}, expected {expected} (prepared clips are resampled)")
    return meta


def write_meta(folder: str | os.PathLike, meta: dict) -> Path:
    """Write ``meta.json`` into ``folder`` (see the module docstring for the keys)."""
    if "num_frames" not in meta:
        raise ValueError("`meta` has no 'num_frames' key.")
    return write_json(Path(folder) / META, meta)


@dataclass(frozen=True)
class ClipRecord:
    """A clip folder and the place of its frames in its conversation.

    Args:
        path (`Path`): the clip folder.
        meta (`dict`): its ``meta.json``.
        num_frames (`int`): T.
        conversation (`str`), avatar (`str`): the conversation id and the avatar participant; a clip whose meta has
            neither (hand-made folders) is a conversation of its own, keyed by its path.
        start_frame (`int`): the clip's first frame in the conversation (``meta["start_frame"]``, 0 if absent).
    """

    path: Path
    meta: dict
    num_frames: int
    conversation: str
    avatar: str
    start_frame: int

    @property
    def end_frame(self) -> int:
        """One past the clip's last frame, in conversation frames."""
        return self.start_frame + self.num_frames

    @property
    def key(self) -> tuple[str, str]:
        """``(conversation, avatar)``: the clips of one key share one avatar track and one user history."""
        return self.conversation, self.avatar

    @property
    def size(self) -> int | None:
        """Side of the square crops (``meta["size"]``), the pixels the landmarks are in."""
        return int(self.meta["size"]) if "size" in self.meta else None


def read_clip(clip_dir: str | os.PathLike) -> ClipRecord:
    """`read_meta` as a `ClipRecord`."""
    path = Path(clip_dir)
    meta = read_meta(path)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    avatar = meta.get("avatar") if isinstance(meta.get("avatar"), dict) else {}
    conversation, participant = source.get("conversation"), avatar.get("participant")
    if conversation is None or participant is None:
        conversation, participant = str(path.resolve()), ""
    start = meta.get("start_frame", 0)
    if not isinstance(start, int) or start < 0:
        raise ClipFormatError(path / META, f"'start_frame' is {start!r}, expected a non-negative integer")
    return ClipRecord(path, meta, int(meta["num_frames"]), str(conversation), str(participant), start)


def list_clip_folders(root: str | os.PathLike) -> list[Path]:
    """The clip folders of a data root (or ``[root]`` when ``root`` is itself a clip folder), sorted by name.

    Every non-hidden sub-folder must be a clip folder: one without ``meta.json`` is reported, not skipped (hidden
    folders, such as ``.done`` or the ``.tmp-*`` folders of an interrupted echo-prep run, are ignored).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist or is not a folder.")
    if (root / META).is_file():
        return [root]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [p.name for p in folders if not (p / META).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data root {str(root)!r} holds folders without {META!r}: {missing[:5]}{' …' if len(missing) > 5 else ''}. "
            "Every non-hidden folder of a data root must be a prepared clip folder: remove or move them (or rerun "
            "echo-prep for an interrupted clip), or pass an explicit list of clip folders."
        )
    if not folders:
        raise FileNotFoundError(f"data root {str(root)!r} holds no prepared clip folder (no */{META}).")
    return folders


def conversation_siblings(record: ClipRecord, cache: dict | None = None) -> list[ClipRecord]:
    """The clips of ``record``'s conversation and avatar stored beside it (same parent folder, clip ids
    ``<conversation>_<avatar>_c<k>``), ``record`` included, in time order (see `group_clips`).

    Args:
        cache (`dict`, *optional*): memo of parent listings and records, shared across calls.
    """
    cache = {} if cache is None else cache
    found = [record]
    if record.avatar:
        parent = record.path.parent
        listing = cache.get(("listing", parent))
        if listing is None:
            listing = cache[("listing", parent)] = sorted(
                p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        prefix = f"{record.conversation}_{record.avatar}_c"
        for name in listing:
            match = CLIP_ID_PATTERN.match(name)
            if not name.startswith(prefix) or match is None or match["prefix"] != prefix[:-2]:
                continue
            path = parent / name
            if path == record.path or not (path / META).is_file():
                continue
            other = cache.get(("record", path))
            if other is None:
                other = cache[("record", path)] = read_clip(path)
            if other.key == record.key:
                found.append(other)
    return group_clips(found)[record.key]


def group_clips(records: Sequence[ClipRecord]) -> dict[tuple[str, str], list[ClipRecord]]:
    """``(conversation, avatar)`` → its clips sorted by ``start_frame``; overlapping clips of one key are an error."""
    groups: dict[tuple[str, str], list[ClipRecord]] = {}
    for record in records:
        groups.setdefault(record.key, [])
        if all(r.path != record.path for r in groups[record.key]):
            groups[record.key].append(record)
    for key, group in groups.items():
        group.sort(key=lambda r: r.start_frame)
        for before, after in zip(group, group[1:]):
            if after.start_frame < before.end_frame:
                raise ClipFormatError(
                    after.path / META,
                    f"'start_frame' {after.start_frame} overlaps clip {before.path.name!r} (frames "
                    f"{before.start_frame}…{before.end_frame - 1}) of the same conversation and avatar {key}",
                )
    return groups


def contiguous_run(group: Sequence[ClipRecord], record: ClipRecord) -> list[ClipRecord]:
    """The clips of ``group`` (time-ordered) from the latest gap up to and including ``record``: the clips whose
    frames a window of ``record`` may read as its history (a missing clip cuts the history at the gap)."""
    index = next((i for i, r in enumerate(group) if r.path == record.path), None)
    if index is None:
        raise ValueError(f"clip {str(record.path)!r} is not in the given conversation group.")
    first = index
    while first > 0 and group[first - 1].end_frame == group[first].start_frame:
        first -= 1
    return list(group[first : index + 1])


def history_segments(
    run: Sequence[ClipRecord], stop: int, max_frames: int | None = None
) -> list[tuple[ClipRecord, int, int]]:
    """The history of a window ending at conversation frame ``stop − 1`` as clip-local ranges.

    Args:
        run (`list[ClipRecord]`): `contiguous_run` of the window's clip.
        stop (`int`): one past the window's last frame, in conversation frames.
        max_frames (`int`, *optional*): keep only the last ``max_frames`` frames.

    Returns:
        `list` of ``(record, lo, hi)``: frames ``lo … hi − 1`` of ``record``, in time order; together they cover
        conversation frames ``max(run start, stop − max_frames) … stop − 1``.
    """
    start = run[0].start_frame if max_frames is None else max(run[0].start_frame, stop - int(max_frames))
    segments = []
    for record in run:
        lo, hi = max(start, record.start_frame), min(stop, record.end_frame)
        if lo < hi:
            segments.append((record, lo - record.start_frame, hi - record.start_frame))
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Video and audio
# ----------------------------------------------------------------------------------------------------------------


def read_video_frames(path: str | os.PathLike, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Read the given frames of a video file as `(N, H, W, 3)` uint8 (decord, PyAV fallback); errors name the file."""
    indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError(f"no frame indices given for {str(path)!r}.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        if indices.min() < 0 or indices.max() >= len(reader):
            raise ClipFormatError(path, f"frames {indices.min()}…{indices.max()} asked, the video has {len(reader)}")
        return reader.get_batch(indices.tolist()).asnumpy()

    import av

    wanted = set(indices.tolist())
    frames = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= indices.max():
                break
    missing = wanted - set(frames)
    if missing:
        raise ClipFormatError(
            path, f"frames {sorted(missing)[:5]} are beyond the end of the video ({len(frames)} read)"
        )
    return np.stack([frames[i] for i in indices.tolist()])


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A WAV file (PCM 8/16/24/32-bit or float) as mono float32 in [−1, 1] and its sample rate (channels averaged).

    Raises:
        `FileNotFoundError` or `ClipFormatError` naming the file.
    """
    import warnings

    from scipy.io import wavfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks (LIST, …) are skipped
            rate, data = wavfile.read(str(path))
    except (ValueError, EOFError, OSError) as error:
        raise ClipFormatError(path, f"cannot read WAV ({error})") from error
    if data.dtype == np.uint8:
        samples = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        samples = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    elif data.dtype.kind == "f":
        samples = data.astype(np.float32)
    else:
        raise ClipFormatError(path, f"unsupported WAV sample type {data.dtype}")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio in [−1, 1] as 16-bit PCM WAV (the format of ``<role>.wav``)."""
    import wave

    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    pcm = (np.clip(waveform, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(int(sample_rate))
        handle.writeframes(pcm.tobytes())


def read_clip_wav(clip_dir: str | os.PathLike, role: str) -> np.ndarray:
    """``<role>.wav`` of a clip folder as float32 16 kHz mono; another rate is an error naming the file."""
    path = Path(clip_dir) / wav_name(role)
    samples, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        raise ClipFormatError(path, f"has {rate} Hz audio, expected {SAMPLE_RATE} Hz; rerun echo-prep")
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Per-frame arrays
# ----------------------------------------------------------------------------------------------------------------


def _load_npy(path: Path, num_frames: int | None, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ClipFormatError(path, f"is not a readable .npy array ({error}); rerun echo-prep") from error
    if num_frames is not None and array.shape[0] != num_frames:
        raise ClipFormatError(path, f"has {array.shape[0]} rows, expected num_frames = {num_frames}")
    return array


def read_w2v(clip_dir: str | os.PathLike, role: str, num_frames: int | None = None, mmap: bool = True) -> np.ndarray:
    """``<role>_w2v.npy``: `(T, NL, D)` float16 wav2vec2 hidden states, one row per frame (memory-mapped)."""
    array = _load_npy(Path(clip_dir) / w2v_name(role), num_frames, mmap)
    if array.ndim != 3:
        raise ClipFormatError(Path(clip_dir) / w2v_name(role), f"has shape {array.shape}, expected (T, NL, D)")
    return array


def write_w2v(folder: str | os.PathLike, role: str, features: np.ndarray) -> Path:
    """Write ``<role>_w2v.npy`` as float16 `(T, NL, D)`."""
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"`features` has shape {features.shape}, expected (T, NL, D).")
    path = Path(folder) / w2v_name(role)
    np.save(path, features.astype(np.float16))
    return path


def read_landmarks(clip_dir: str | os.PathLike, role: str, num_frames: int | None = None) -> np.ndarray:
    """``<role>_landmarks.npy``: `(T, 478, 2)` float32 face-mesh points in pixels of the crop (NaN: no face)."""
    path = Path(clip_dir) / landmarks_name(role)
    array = _load_npy(path, num_frames, mmap=False)
    if array.ndim != 3 or array.shape[1:] != (478, 2):
        raise ClipFormatError(path, f"has shape {array.shape}, expected (T, 478, 2)")
    return array.astype(np.float32, copy=False)


def write_landmarks(folder: str | os.PathLike, role: str, landmarks: np.ndarray) -> Path:
    """Write ``<role>_landmarks.npy`` as float32 `(T, 478, 2)`."""
    landmarks = np.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (478, 2):
        raise ValueError(f"`landmarks` has shape {landmarks.shape}, expected (T, 478, 2).")
    path = Path(folder) / landmarks_name(role)
    np.save(path, landmarks.astype(np.float32))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reasoning frames: when understanding (S_usr) and emotion texts are computed, for training and inference alike
# ----------------------------------------------------------------------------------------------------------------


def reasoning_frame(last_frame: int, stride: int) -> int | None:
    """The frame whose understanding tokens / emotion text a window or chunk ending at ``last_frame`` reads.

    The one rule both sides follow: understanding (Φ, HBCU) and the emotion reasoner (LAU) run only at the reasoning
    frames ``k·stride − 1`` (``k ≥ 1``) of the conversation, on the user's media / the dialogue up to that frame
    inclusive; a window of the dataset and a chunk of the session ending at ``last_frame`` read the result of the
    latest reasoning frame at or before it (so a chunk ending between two reasoning frames reuses the older one).
    Before the first reasoning frame nothing is known: no understanding tokens, and ``default_emotion``.

    Args:
        last_frame (`int`): the window's or chunk's last frame (inclusive), counted from the conversation's start.
        stride (`int`): ``EchoSettings.understanding_stride`` or ``EchoSettings.emotion_stride``.

    Returns:
        `int` or `None`: the reasoning frame, or `None` when ``last_frame < stride − 1``.
    """
    if stride < 1:
        raise ValueError(f"`stride` is {stride}, expected at least 1 frame.")
    frame = (int(last_frame) + 1) // stride * stride - 1
    return frame if frame >= 0 else None


def reasoning_frames(start_frame: int, end_frame: int, stride: int) -> list[int]:
    """The reasoning frames (`reasoning_frame`) in the conversation frames ``[start_frame, end_frame)``: where
    echo-prep writes a clip's understanding entries and emotion windows."""
    if stride < 1:
        raise ValueError(f"`stride` is {stride}, expected at least 1 frame.")
    first = -(-(start_frame + 1) // stride) * stride - 1  # the first k·stride − 1 ≥ start_frame
    return list(range(first, end_frame, stride))


def check_reasoning_frames(path: str | os.PathLike, frames, start_frame: int, stride: int) -> None:
    """Refuse a cache whose entries (clip frames ``frames`` of a clip starting at conversation frame ``start_frame``)
    are not reasoning frames of ``stride`` (a hand-written or foreign file: the rule would not find them)."""
    off = [int(f) for f in frames if (start_frame + int(f) + 1) % stride]
    if off:
        raise ClipFormatError(
            path,
            f"has entries at clip frames {off} (clip starting at conversation frame {start_frame}), which are not "
            f"reasoning frames k·{stride} − 1 of its stride {stride}; delete it and rerun its echo-prep stage",
        )


# ----------------------------------------------------------------------------------------------------------------
# Transcript and emotion texts
# ----------------------------------------------------------------------------------------------------------------


def write_transcript(folder: str | os.PathLike, transcript: dict) -> Path:
    """Write ``transcript.json`` (``{"clip_start", "clip_end", "transcript_source", "segments", "vad"}``)."""
    return write_json(Path(folder) / TRANSCRIPT, transcript)


def read_transcript(clip_dir: str | os.PathLike) -> dict:
    """``transcript.json``; segment times are seconds from the clip's first frame (earlier dialogue negative)."""
    path = Path(clip_dir) / TRANSCRIPT
    transcript = read_json(path)
    if not isinstance(transcript, dict) or not isinstance(transcript.get("segments"), list):
        raise ClipFormatError(path, "expected an object with a 'segments' list")
    return transcript


def read_emotion_stride(clip_dir: str | os.PathLike) -> int | None:
    """The ``"stride"`` of ``emotion.json`` (its windows end at the reasoning frames ``k·stride − 1`` of the
    conversation), or `None` when the clip has no ``emotion.json``. A file of an older echo-prep (windows every 81
    frames of the clip and at its last frame, no ``"stride"``) is refused: its texts were reasoned at other frames
    than the session reasons at."""
    path = Path(clip_dir) / EMOTION
    if not path.is_file():
        return None
    value = read_json(path)
    stride = value.get("stride") if isinstance(value, dict) else None
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ClipFormatError(
            path,
            "has no positive integer 'stride': it was written by an older echo-prep, on windows of the clip rather "
            "than on the conversation's reasoning frames. Delete it (and emotion_embeds.safetensors) and rerun "
            "`echo-prep ... --stages emotion,emotion_embeds --emotion-stride <stride>`",
        )
    return stride


def read_emotion_windows(clip_dir: str | os.PathLike) -> list[dict] | None:
    """``emotion.json`` windows ``[{"end_frame", "text"}]`` sorted by ``end_frame`` (clip frames, inclusive), or
    `None` when the clip has no ``emotion.json``."""
    path = Path(clip_dir) / EMOTION
    if not path.is_file():
        return None
    value = read_json(path)
    windows = value.get("windows") if isinstance(value, dict) else None
    if not isinstance(windows, list):
        raise ClipFormatError(path, "expected an object with a 'windows' list; delete it and rerun --stages emotion")
    for window in windows:
        if not (
            isinstance(window, dict)
            and isinstance(window.get("end_frame"), int)
            and isinstance(window.get("text"), str)
        ):
            raise ClipFormatError(path, f"window {window!r} is not {{'end_frame': int, 'text': str}}")
    return sorted(windows, key=lambda w: w["end_frame"])


def write_emotion_windows(clip_dir: str | os.PathLike, windows: list[dict], stride: int) -> Path:
    """Write ``emotion.json`` atomically: ``{"stride": stride, "windows": [{"end_frame", "text"}]}``.

    Window ``{"end_frame": e, "text"}`` is the reasoner's text on the dialogue up to clip frame ``e`` inclusive, a
    reasoning frame (`reasoning_frame`) of ``stride``. A reasoning frame before anyone spoke has no window: a window
    reading it gets ``default_emotion``, as the session does.
    """
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"`stride` is {stride!r}, expected a positive integer.")
    return write_json(Path(clip_dir) / EMOTION, {"stride": stride, "windows": [dict(w) for w in windows]})


def emotion_window_at(windows: Sequence[dict] | None, frame: int) -> dict | None:
    """The latest emotion window whose ``end_frame`` ≤ ``frame`` (the one in force at ``frame``), or `None`."""
    known = [w for w in windows or () if w["end_frame"] <= frame]
    return max(known, key=lambda w: w["end_frame"]) if known else None


def emotion_text_at(windows: Sequence[dict] | None, frame: int, default_emotion: str) -> str:
    """The emotion text in force at ``frame``: the text of the latest window whose ``end_frame`` ≤ ``frame``, else
    ``default_emotion``. A frame before the first window gets the default, never a later window's text: that text
    was reasoned from dialogue after the frame."""
    window = emotion_window_at(windows, frame)
    return default_emotion if window is None else window["text"]


def emotion_texts(clip_dir: str | os.PathLike, default_emotion: str = "neutral") -> list[str]:
    """The distinct emotion texts a dataset window can take from this clip: ``""``, ``default_emotion``, then the
    texts of ``emotion.json`` (the rows of ``emotion_embeds.safetensors``)."""
    texts = ["", default_emotion] + [w["text"] for w in read_emotion_windows(clip_dir) or []]
    return list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------------------------------------------
# Caches (safetensors)
# ----------------------------------------------------------------------------------------------------------------


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) to a safetensors file atomically: a temporary file beside it, then
    `os.replace` (`echo.atomic`); a killed writer leaves the old file or none, never a partial one. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_write(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def _user_tokens_command(user_video_size: int) -> str:
    return (
        f"`echo-prep --input ... --layout ... --out <data root> --stages user_tokens --vae <VAE folder> "
        f"--user-video-size {user_video_size}`"
    )


def write_user_tokens(
    clip_dir: str | os.PathLike, tokens: torch.Tensor, face_mask: torch.Tensor, user_video_size: int
) -> Path:
    """Write ``user_tokens.safetensors``: ``"tokens"`` `(T, z_dim, h, w)` float32 (normalised, `encode_user_video`)
    and ``"face_mask"`` `(T, h, w)` float {0, 1}; metadata ``"user_video_size"``."""
    if tokens.ndim != 4 or tuple(face_mask.shape) != (tokens.shape[0], *tokens.shape[2:]):
        raise ValueError(
            f"`tokens` {tuple(tokens.shape)} and `face_mask` {tuple(face_mask.shape)}, expected (T, C, h, w) and "
            "(T, h, w)."
        )
    return write_safetensors(
        Path(clip_dir) / USER_TOKENS,
        {"tokens": tokens.float(), "face_mask": face_mask.float()},
        metadata={"user_video_size": str(int(user_video_size))},
    )


def check_user_tokens(clip_dir: str | os.PathLike, user_video_size: int, num_frames: int) -> None:
    """Raise a clear error unless ``user_tokens.safetensors`` of the clip folder holds ``num_frames`` frames encoded
    at ``user_video_size``² (see `data_prep.caches.cache_user_tokens`)."""
    path = Path(clip_dir) / USER_TOKENS
    command = _user_tokens_command(user_video_size)
    if not path.is_file():
        raise FileNotFoundError(
            f"clip folder {str(Path(clip_dir))!r} has no {USER_TOKENS!r} (`use_cached_user_tokens` is set). "
            f"Write it with {command}, or turn the option off to encode the user frames during training."
        )
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        frames = f.get_slice("tokens").get_shape()[0] if "tokens" in f.keys() else None
        has_mask = "face_mask" in f.keys()
    size = metadata.get("user_video_size")
    if size is None or frames is None or not has_mask:
        raise ValueError(f"{str(path)!r} has no 'tokens' / 'face_mask' / 'user_video_size'; rewrite it with {command}.")
    if int(size) != user_video_size:
        raise ValueError(
            f"{str(path)!r} holds user tokens of {size}² frames but `user_video_size` (data.user_video_size) is "
            f"{user_video_size}. Delete it and rerun {command}, or set the size it was written with."
        )
    if frames != num_frames:
        raise ValueError(
            f"{str(path)!r} holds {frames} frames, expected the clip's num_frames = {num_frames}. Delete it and rerun "
            f"{command}."
        )


def read_user_tokens(clip_dir: str | os.PathLike, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``start … stop − 1`` of ``user_tokens.safetensors``: `(n, z_dim, h, w)` tokens and `(n, h, w)` mask."""
    with open_safetensors(Path(clip_dir) / USER_TOKENS) as f:
        return f.get_slice("tokens")[start:stop], f.get_slice("face_mask")[start:stop]


def write_emotion_embeds(
    clip_dir: str | os.PathLike, texts: list[str], embeds: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> Path:
    """Write ``emotion_embeds.safetensors``: ``"embeds"`` `(N, L_max, D)` (each text's hidden states, zero past its
    tokens), ``"lengths"`` `(N,)`; metadata ``"texts"`` (JSON list, row order) and ``"max_length"`` (L_txt)."""
    if embeds.ndim != 3 or embeds.shape[0] != len(texts) or tuple(lengths.shape) != (len(texts),):
        raise ValueError(
            f"`embeds` {tuple(embeds.shape)} / `lengths` {tuple(lengths.shape)} do not match {len(texts)} texts."
        )
    return write_safetensors(
        Path(clip_dir) / EMOTION_EMBEDS,
        {"embeds": embeds, "lengths": lengths.long()},
        metadata={"texts": json.dumps(list(texts)), "max_length": str(int(max_length))},
    )


def load_emotion_embeds(clip_dir: str | os.PathLike, text: str) -> torch.Tensor:
    """The cached embedding of ``text`` in ``emotion_embeds.safetensors``, zero-padded to its ``max_length``.

    Returns:
        `torch.Tensor` of shape `(L_txt, D)` in the cached dtype: what `EmotionTextEncoder.encode(text)[0]` gives.
    """
    path = Path(clip_dir) / EMOTION_EMBEDS
    if not path.is_file():
        raise FileNotFoundError(
            f"clip folder {str(Path(clip_dir))!r} has no {EMOTION_EMBEDS!r} (`use_cached_emotion_embeds` is set). "
            "Write it with `echo-prep --input ... --layout ... --out <data root> --stages emotion_embeds "
            "--text-encoder <T5/UMT5 folder>`, or turn the option off to encode the emotion text during training."
        )
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        if "texts" not in metadata or "max_length" not in metadata:
            raise ValueError(f"{str(path)!r} has no 'texts' / 'max_length' metadata; rewrite it with echo-prep.")
        texts = json.loads(metadata["texts"])
        if text not in texts:
            raise ValueError(
                f"{str(path)!r} has no embedding of the emotion text {text!r} (it holds {len(texts)} texts; "
                "emotion.json or `default_emotion` changed after it was written). Delete it and rerun "
                "`echo-prep --stages emotion_embeds --default-emotion <data.default_emotion> ...`."
            )
        row = f.get_slice("embeds")[texts.index(text)]  # L_max, D
    out = row.new_zeros(int(metadata["max_length"]), row.shape[-1])
    out[: row.shape[0]] = row
    return out


@dataclass(frozen=True)
class UnderstandingIndex:
    """Where the entries of a ``user_omni.safetensors`` are (read once per clip; the tokens are read per entry).

    Args:
        path (`Path`): the file.
        end_frames (`np.ndarray` of shape `(E,)`): clip frame (inclusive) of the last user frame each entry saw.
        offsets (`np.ndarray` of shape `(E,)`), lengths (`np.ndarray` of shape `(E,)`): rows of each entry in the
            concatenated ``"hidden_states"``.
        dim (`int`): D_s.
        legacy (`bool`): a file of an older echo-prep, one entry over the whole clip (``end_frames = [T − 1]``).
        stride (`int`, *optional*): the stride of the entries' reasoning frames (`None` for a legacy file).
    """

    path: Path
    end_frames: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    dim: int
    legacy: bool = False
    stride: int | None = None


def _omni_command() -> str:
    return "`echo-prep --input ... --layout ... --out <data root> --stages omni --omni-model <Qwen-Omni folder>`"


def write_understanding(
    clip_dir: str | os.PathLike,
    end_frames: Sequence[int],
    tokens: Sequence[torch.Tensor],
    stride: int,
    hidden_size: int | None = None,
) -> Path:
    """Write ``user_omni.safetensors`` with one entry of understanding tokens per stride of the conversation.

    Entry ``e`` is S_usr = Φ(user frames and audio from the conversation's start up to clip frame
    ``end_frames[e]``, inclusive): what the pipeline computes for a chunk ending at that frame.

    Tensors: ``"hidden_states"`` `(Σ N_e, D_s)` float32 (the entries concatenated), ``"lengths"`` `(E,)`,
    ``"end_frames"`` `(E,)` (clip frames, increasing); metadata ``"stride"`` and ``"history"`` = ``"conversation"``.
    A clip may hold no entry (it ends before the conversation's first stride); ``hidden_size`` (D_s) then gives the
    width of its empty ``"hidden_states"``.
    """
    if len(end_frames) != len(tokens):
        raise ValueError(f"{len(end_frames)} `end_frames` for {len(tokens)} `tokens` entries, expected equal counts.")
    if list(end_frames) != sorted(set(int(e) for e in end_frames)):
        raise ValueError(f"`end_frames` {list(end_frames)} must be strictly increasing.")
    if any(t.ndim != 2 for t in tokens) or len({t.shape[-1] for t in tokens}) > 1:
        raise ValueError(f"`tokens` have shapes {[tuple(t.shape) for t in tokens]}, expected (N_e, D_s) each.")
    if tokens:
        hidden = torch.cat([t.float() for t in tokens])
    elif hidden_size is not None:
        hidden = torch.zeros(0, int(hidden_size))
    else:
        raise ValueError("`tokens` is empty: pass `hidden_size` (D_s) for the empty entry list.")
    return write_safetensors(
        Path(clip_dir) / USER_OMNI,
        {
            "hidden_states": hidden,
            "lengths": torch.tensor([int(t.shape[0]) for t in tokens], dtype=torch.int64),
            "end_frames": torch.tensor([int(e) for e in end_frames], dtype=torch.int64),
        },
        metadata={"stride": str(int(stride)), "history": "conversation"},
    )


def read_understanding_index(clip_dir: str | os.PathLike, num_frames: int) -> UnderstandingIndex:
    """The entries of ``user_omni.safetensors`` (see `write_understanding`).

    A file written by an older echo-prep (only ``"hidden_states"`` `(N_s, D_s)`, Φ over the whole clip) is read as
    one entry ending at the clip's last frame: causal, but only windows ending there can use it; rerun the
    ``omni`` stage for per-stride entries.
    """
    path = Path(clip_dir) / USER_OMNI
    if not path.is_file():
        raise FileNotFoundError(
            f"clip folder {str(Path(clip_dir))!r} has no {USER_OMNI!r} (understanding is on). Write it with "
            f"{_omni_command()}, or train with `ablation.use_understanding: false`."
        )
    with open_safetensors(path) as f:
        keys = set(f.keys())
        if "hidden_states" not in keys:
            raise ClipFormatError(path, f"has no 'hidden_states' tensor; delete it and rerun {_omni_command()}")
        shape = f.get_slice("hidden_states").get_shape()
        if len(shape) != 2:
            raise ClipFormatError(path, f"'hidden_states' has shape {tuple(shape)}, expected (N, D_s)")
        if "end_frames" not in keys:  # legacy: one entry over the whole clip
            return UnderstandingIndex(
                path, np.array([num_frames - 1]), np.array([0]), np.array([shape[0]]), int(shape[1]), legacy=True
            )
        end_frames = f.get_tensor("end_frames").numpy().astype(np.int64)
        lengths = f.get_tensor("lengths").numpy().astype(np.int64)
        stride = (f.metadata() or {}).get("stride", "")
    if not stride.isdigit() or int(stride) < 1:
        raise ClipFormatError(path, f"has no positive 'stride' in its metadata; delete it and rerun {_omni_command()}")
    if len(end_frames) != len(lengths) or int(lengths.sum()) != shape[0]:
        raise ClipFormatError(path, f"'lengths' {lengths.tolist()} do not add up to the {shape[0]} token rows")
    if len(end_frames) and (np.any(np.diff(end_frames) <= 0) or end_frames[0] < 0 or end_frames[-1] >= num_frames):
        raise ClipFormatError(
            path, f"'end_frames' {end_frames.tolist()} must increase within the clip's {num_frames} frames"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    return UnderstandingIndex(path, end_frames, offsets, lengths, int(shape[1]), stride=int(stride))


def read_understanding_entry(index: UnderstandingIndex, entry: int) -> torch.Tensor:
    """Entry ``entry`` of an `UnderstandingIndex`: `(N_e, D_s)` float32."""
    offset, length = int(index.offsets[entry]), int(index.lengths[entry])
    with open_safetensors(index.path) as f:
        return f.get_slice("hidden_states")[offset : offset + length].float()
