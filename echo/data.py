"""`ConversationDataset`: training windows over prepared clip folders, and `collate_conversations`.

A prepared clip folder (written by `data_prep`, read through `echo.clip_format`, format in ``docs/interfaces.md``)
holds one segment of a conversation for one avatar/user assignment; the clips of one conversation and assignment
(``<conversation>_<avatar>_c<k>``) form its *track*. Every item is a window of ``num_frames = 4k + 1`` consecutive
frames of one clip, with what the pipeline could have seen at the window's last frame:

- ``video`` `(3, T, H, W)` in [−1, 1] and ``reference`` `(3, H, W)` from ``avatar.mp4``; the reference is a frame
  with a face drawn uniformly from the avatar's frames **outside the window** (`ConversationDataset.draw_reference`):
  the clip's frames before and after it, or, when the window is the whole clip, the frames of the track's other
  clips (``reference_frame`` of clip ``reference_clip``). At inference the reference is never a frame of the output,
  so in training it is never a frame of the target;
- ``avatar_audio`` `(T, L_w, NL, 768)`: the avatar's wav2vec2 rows with their ±``audio_radius`` context windows taken
  from the conversation (`avatar_audio_windows`): a window at a clip's edge reads the neighbouring clip's rows, and
  the rows are clamped only at the conversation's edges (the first and last frames of the contiguous clips), the rule
  the pipeline applies (`echo.audio.window_indices`);
- ``avatar_rms`` `(T,)`: the avatar's per-frame short-time RMS divided by the reference level of the avatar's whole
  track (`track_rms_reference`): ≈ 1 on loud speech, ≈ 0 on microphone noise, comparable across windows, so that
  `echo.losses.speech_weights` gives a window of pure listening the floor weight;
- ``lip_mask`` / ``face_mask`` `(F, H', W')`: SDCM's token masks of the **reference frame**, held for every latent
  frame (`echo.masks.reference_token_masks`, the rule of the pipeline: the target frames' landmarks would tell the
  generator where the face it is generating will be, which the pipeline cannot know);
- the user's history from the **conversation's start** (across clip boundaries; the last ``max_history_frames``
  frames when set) to the window end: ``user_audio`` `(T_hist, NL, 768)`, optionally ``user_video``
  `(T_hist, 3, h_u, w_u)` with ``user_face_mask`` `(T_hist, h_u, w_u)` (or, with ``use_cached_user_tokens``, their
  VAE tokens ``user_tokens`` `(T_hist, C, h, w)` with ``user_token_mask`` `(T_hist, h, w)` from
  ``user_tokens.safetensors``, ``echo-prep --stages user_tokens``);
- ``understanding`` `(N_s, D_s)`: the cached S_usr entry of the window's reasoning frame
  (`echo.clip_format.reasoning_frame` of its last frame and the caches' stride: the latest ``k·stride − 1`` at or
  before it; ``user_omni.safetensors``, Φ on the user's media from the conversation's start to that frame), or
  `(0, D_s)` before the first (the batch then masks it out);
- ``emotion_text``: the text of the window's emotion reasoning frame, by the same rule (``emotion.json``), else
  ``default_emotion`` (``""`` with ``drop_emotion``); with ``use_cached_emotion_embeds``
  also its embedding ``emotion_embeds`` `(L_txt, D)` and the empty prompt's ``empty_embeds`` `(L_txt, D)` (f_ref's
  text in stage 2) (``emotion_embeds.safetensors``);
- with a ``latent_cache`` (`training.latent_cache.WindowLatentCache`): ``latent_key``, the window's key in it, and
  ``latents`` `(16, F, h, w)` (normalised, as `echo.encoding.encode_latents` returns them) once the window is cached;
- ``clip_id``, ``window_start`` (the window's first frame in the clip) and ``conversation_frame`` (its first frame in
  the conversation), for logging and data-sharding checks.

Randomness (window start, reference frame) is a pure function of ``(seed, epoch, index)``, so the data of a step
does not depend on worker processes or on whether training was resumed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging
from torch.utils.data import Dataset

from . import clip_format
from .audio import frame_rms, window_indices
from .chunks import check_frame_count
from .clip_format import ClipRecord, check_user_tokens, load_emotion_embeds, read_video_frames  # noqa: F401
from .encoding import frames_to_tensor, prepare_user_video
from .masks import reference_token_masks

logger = logging.get_logger(__name__)

REQUIRED_FILES = clip_format.REQUIRED_FILES

#: Percentile of a track's per-frame RMS taken as its speech level, and the lowest level taken as speech
#: (−40 dBFS): a track whose loudest frames are quieter holds no speech and is not normalised up to 1.
TRACK_RMS_PERCENTILE = 99.0
MIN_SPEECH_RMS = 0.01


def track_rms_reference(
    rms: np.ndarray, percentile: float = TRACK_RMS_PERCENTILE, min_level: float = MIN_SPEECH_RMS
) -> float:
    """The level a track's per-frame RMS is divided by: ``max(percentile_p(rms), min_level)``.

    Args:
        rms (`np.ndarray` of shape `(T_track,)`): per-frame RMS of the avatar's whole track (`echo.audio.frame_rms`
            of every clip of the conversation and avatar, concatenated).
        percentile (`float`, defaults to 99): a high percentile, robust to a few clipped frames; a participant who
            speaks for more than ~1 % of the conversation sets it with their speech.
        min_level (`float`, defaults to 0.01, −40 dBFS): floor of the reference, so that microphone noise of a track
            without speech stays well below 1.
    """
    rms = np.asarray(rms, dtype=np.float64).reshape(-1)
    level = float(np.percentile(rms, percentile)) if rms.size else 0.0
    return max(level, float(min_level))


def read_user_frames(
    clip_dir: str | os.PathLike, start: int, stop: int, size: int, source_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's frames ``start … stop − 1`` of a clip folder as the LCU's visual branch reads them.

    Args:
        clip_dir (`str` or `os.PathLike`): a prepared clip folder with ``user.mp4`` and ``user_landmarks.npy``.
        start (`int`), stop (`int`): the frame range (``stop`` exclusive).
        size (`int`): square output size ``h_u = w_u`` (``data.user_video_size``).
        source_size (`int`): side of the prepared crop the landmarks are in (``meta.json`` ``"size"``).

    Returns:
        `(frames, face_mask)`: `(T, 3, size, size)` float in [−1, 1] and `(T, size, size)` float {0, 1} (the whole
        face, lips included).
    """
    clip_dir = Path(clip_dir)
    frames = read_video_frames(clip_dir / clip_format.video_name("user"), list(range(start, stop)))
    if frames.shape[1:3] != (source_size, source_size):
        raise ValueError(
            f"{str(clip_dir / clip_format.video_name('user'))!r} has {frames.shape[2]}x{frames.shape[1]} frames, "
            f"expected the prepared size {source_size}x{source_size} of its meta.json."
        )
    return prepare_user_video(frames, clip_format.read_landmarks(clip_dir, "user")[start:stop], size)


class ConversationDataset(Dataset):
    """Windows of ``num_frames`` frames over prepared clip folders (see the module docstring for the items).

    Args:
        clips (`str`, `Path` or list of them): a data root holding clip folders (every non-hidden sub-folder must be
            one), or an explicit list of clip folders. A window's history and understanding tokens also read the
            clips of its conversation stored beside its clip, listed or not.
        num_frames (`int`, defaults to 9): video frames per window, ``4k + 1``.
        resolution (`int`, defaults to 512): square output size of ``video`` / ``reference`` (frames are resized).
        token_patch (`int`, defaults to 16): pixels per generator token (VAE stride 8 × transformer patch 2).
        temporal_compression (`int`, defaults to 4): video frames per latent frame.
        audio_radius (`int`, defaults to 2): context radius of the avatar audio windows (L_w = 2·radius + 1).
        windows_per_clip (`int`, defaults to 1): items per clip folder per epoch.
        max_history_frames (`int`, *optional*): keep only the last frames of the user history (default: from the
            conversation's start).
        use_user_video (`bool`, defaults to `False`): read the user's history frames (LCU visual branch, LPE).
        user_video_size (`int`, defaults to 64): square size of the user's history frames.
        use_understanding (`bool`, defaults to `False`): read ``user_omni.safetensors`` (HBCU); required then.
        window_stride (`int`, defaults to 1): window starts are multiples of it (`window_starts`); with a
            ``latent_cache``, a stride above 1 makes the windows a small set that later epochs draw again.
        latent_cache (`training.latent_cache.WindowLatentCache`, *optional*): also return ``latent_key`` and, when
            the window is cached, its exact ``latents`` (the training step then skips the VAE encode).
        default_emotion (`str`, defaults to `"neutral"`): emotion text of windows before the track's first emotion
            window, and of clips without ``emotion.json``.
        drop_emotion (`bool`, defaults to `False`): every window's emotion text is the empty prompt ``""`` (training
            with ``ablation.use_emotion: false``).
        use_cached_emotion_embeds (`bool`, defaults to `False`): also return ``emotion_embeds`` `(L_txt, D)`, the
            cached `EmotionTextEncoder` embedding of ``emotion_text`` (``emotion_embeds.safetensors``; required then).
        use_cached_user_tokens (`bool`, defaults to `False`): with ``use_user_video``, return the user history's cached
            VAE tokens ``user_tokens`` `(T_hist, C, h, w)` and ``user_token_mask`` `(T_hist, h, w)` (the output of
            `echo.encoding.encode_user_video`, from ``user_tokens.safetensors`` written at ``user_video_size``;
            required then) instead of ``user_video`` / ``user_face_mask``.
        seed (`int`, defaults to 0): seed of the per-item randomness.
    """

    def __init__(
        self,
        clips,
        num_frames: int = 9,
        resolution: int = 512,
        token_patch: int = 16,
        temporal_compression: int = 4,
        audio_radius: int = 2,
        windows_per_clip: int = 1,
        max_history_frames: int | None = None,
        use_user_video: bool = False,
        user_video_size: int = 64,
        use_understanding: bool = False,
        window_stride: int = 1,
        latent_cache=None,
        default_emotion: str = "neutral",
        drop_emotion: bool = False,
        use_cached_emotion_embeds: bool = False,
        use_cached_user_tokens: bool = False,
        seed: int = 0,
    ):
        check_frame_count(num_frames, "`num_frames`", temporal_compression)
        if resolution % token_patch:
            raise ValueError(f"`resolution` is {resolution}, expected a multiple of `token_patch` = {token_patch}.")
        if max_history_frames is not None and max_history_frames < num_frames:
            raise ValueError(
                f"`max_history_frames` is {max_history_frames}, expected None or at least num_frames = {num_frames} "
                "(the history always holds the window)."
            )
        self.num_frames = num_frames
        self.resolution = resolution
        self.token_patch = token_patch
        self.temporal_compression = temporal_compression
        self.audio_radius = audio_radius
        self.windows_per_clip = windows_per_clip
        self.max_history_frames = max_history_frames
        self.use_user_video = use_user_video
        self.user_video_size = user_video_size
        self.use_understanding = use_understanding
        if window_stride < 1:
            raise ValueError(f"`window_stride` is {window_stride}, expected at least 1 frame.")
        self.window_stride = window_stride
        self.latent_cache = latent_cache
        self.default_emotion = default_emotion
        self.drop_emotion = drop_emotion
        self.use_cached_emotion_embeds = use_cached_emotion_embeds
        self.use_cached_user_tokens = use_cached_user_tokens
        self.seed = seed
        self.epoch = 0

        # 1. The listed clips, each validated with the files the options need
        # (a clip shorter than a window is no window source, e.g. the short last clip of a conversation, but still
        # serves as the user history of the clips after it)
        listed = [self._validate(clip_format.read_clip(self._check_folder(p))) for p in self._list_clips(clips)]
        self.clips = [clip for clip in listed if clip.num_frames >= num_frames]
        self.short_clips = [clip.path for clip in listed if clip.num_frames < num_frames]
        if not self.clips:
            raise ValueError(
                f"every clip is shorter than the training window of num_frames = {num_frames} frames (the longest, "
                f"{str(max(listed, key=lambda c: c.num_frames).path)!r}, has "
                f"{max(c.num_frames for c in listed)}); lower data.num_frames or prepare longer clips."
            )
        if self.short_clips:
            logger.info(
                f"{len(self.short_clips)} clips shorter than num_frames = {num_frames} are used as user history only "
                f"(e.g. {str(self.short_clips[0])!r})."
            )
        # 2. Each clip's track (its conversation's clips beside it) and the clips its history may read
        cache = {("record", c.path): c for c in self.clips}
        self._tracks: dict[Path, list[ClipRecord]] = {}
        self._runs: dict[Path, list[ClipRecord]] = {}
        self._spans: dict[Path, list[ClipRecord]] = {}  # the contiguous clips around a clip (its avatar audio windows)
        records = {c.path: c for c in self.clips}
        for clip in self.clips:
            track = clip_format.conversation_siblings(clip, cache)
            for other in track:
                if other.path not in records:
                    records[other.path] = self._validate(other)
            self._tracks[clip.path] = track
            self._runs[clip.path] = clip_format.contiguous_run(track, clip)
            self._spans[clip.path] = _contiguous_span(track, clip)
        # 3. Lazily filled per-process caches (small: per-frame RMS, understanding indices, emotion windows)
        self._rms: dict[Path, np.ndarray] = {}
        self._rms_reference: dict[tuple, float] = {}
        self._understanding: dict[Path, clip_format.UnderstandingIndex] = {}
        self._emotion: dict[Path, list[dict] | None] = {}
        # 4. The reasoning strides the caches were written with (`echo.clip_format.reasoning_frame`): one per data
        # root, saved with the model (`EchoSettings`) so that the session reasons at the frames training read
        self.understanding_stride = self._understanding_stride(records.values()) if use_understanding else None
        self.emotion_stride = None if drop_emotion else self._emotion_stride(records.values())

    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _list_clips(clips) -> list[Path]:
        if isinstance(clips, (str, os.PathLike)):
            return clip_format.list_clip_folders(clips)
        clips = [Path(c) for c in clips]
        if not clips:
            raise ValueError("`clips` is an empty list, expected at least one prepared clip folder.")
        return clips

    @staticmethod
    def _check_folder(path: Path) -> Path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"clip folder {str(path)!r} does not exist.")
        return Path(path)

    def _validate(self, clip: ClipRecord) -> ClipRecord:
        required = list(clip_format.REQUIRED_FILES)
        if self.use_user_video:
            required += [clip_format.video_name("user"), clip_format.landmarks_name("user")]
        if self.use_understanding:
            required.append(clip_format.USER_OMNI)
        for name in required:
            if not (clip.path / name).is_file():
                raise FileNotFoundError(f"clip folder {str(clip.path)!r} has no {name!r}.")
        if self.use_cached_emotion_embeds and not (clip.path / clip_format.EMOTION_EMBEDS).is_file():
            raise FileNotFoundError(
                f"clip folder {str(clip.path)!r} has no {clip_format.EMOTION_EMBEDS!r} (`use_cached_emotion_embeds` "
                "is set). Write it with `echo-prep --input ... --layout ... --out <data root> --stages emotion_embeds "
                "--text-encoder <T5/UMT5 folder>`, or turn the option off to encode the emotion text during training."
            )
        if self.use_user_video and self.use_cached_user_tokens:
            check_user_tokens(clip.path, self.user_video_size, clip.num_frames)
        return clip

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose window starts and reference frames `__getitem__` draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips) * self.windows_per_clip

    # ----------------------------------------------------------------------------------------------------------------
    def window_starts(self, clip: ClipRecord) -> range:
        """Every start frame the sampler can draw in ``clip``: multiples of ``window_stride`` up to the last window."""
        return range(0, clip.num_frames - self.num_frames + 1, self.window_stride)

    def window_video(self, clip: ClipRecord, start: int) -> torch.Tensor:
        """The avatar frames of the window starting at ``start``, `(3, T, H, W)` in [−1, 1], read as `__getitem__`
        reads its ``video``."""
        frames = read_video_frames(
            clip.path / clip_format.video_name("avatar"), list(range(start, start + self.num_frames))
        )
        return frames_to_tensor(frames, self.resolution).permute(1, 0, 2, 3).contiguous()  # 3, T, H, W

    def _window(self, clip: ClipRecord, rng: np.random.Generator) -> tuple[int, tuple[ClipRecord, int]]:
        starts = self.window_starts(clip)
        start = starts[int(rng.integers(0, len(starts)))]
        return start, self.draw_reference(clip, start, rng)

    def draw_reference(self, clip: ClipRecord, start: int, rng: np.random.Generator) -> tuple[ClipRecord, int]:
        """The reference frame of the window ``[start, start + num_frames)`` of ``clip``: drawn uniformly from the
        avatar's frames with a face outside the window (the clip's frames before and after it; when it has none, the
        frames of the track's other clips), never from the window itself.

        Returns:
            `(record, frame)`: the clip folder the frame is read from and its clip frame.
        """
        stop = start + self.num_frames
        frames = np.arange(clip.num_frames)
        has_face = np.isfinite(clip_format.read_landmarks(clip.path, "avatar", clip.num_frames)).all(axis=(1, 2))
        candidates = [(clip, int(i)) for i in frames[has_face & ((frames < start) | (frames >= stop))]]
        if not candidates:
            for record in self._tracks[clip.path]:
                if record.path != clip.path:
                    landmarks = clip_format.read_landmarks(record.path, "avatar", record.num_frames)
                    candidates += [(record, int(i)) for i in np.nonzero(np.isfinite(landmarks).all(axis=(1, 2)))[0]]
        if not candidates:
            raise clip_format.ClipFormatError(
                clip.path / clip_format.landmarks_name("avatar"),
                f"has no frame with a face outside the window [{start}, {stop}), nor has any other clip of its "
                "conversation and avatar: the reference is never a frame of the target; use a shorter data.num_frames "
                "or remove the clip folder",
            )
        return candidates[int(rng.integers(0, len(candidates)))]

    def avatar_audio_windows(self, clip: ClipRecord, start: int, stop: int) -> torch.Tensor:
        """`(stop − start, L_w, NL, D)` float32: the avatar's wav2vec2 windows of the clip's frames ``[start, stop)``,
        rows ``t ± audio_radius`` of the conversation (read from the neighbouring clips where they cross the clip's
        edges) clamped to the frames of the contiguous clips around it (`echo.audio.window_indices`), as the pipeline
        clamps them to the conversation's frames."""
        span = self._spans[clip.path]
        first, end = span[0].start_frame, span[-1].end_frame  # conversation frames of the contiguous clips
        radius = self.audio_radius
        lo = max(first, clip.start_frame + start - radius)
        hi = min(end, clip.start_frame + stop + radius)
        rows = np.concatenate(
            [
                clip_format.read_w2v(record.path, "avatar", record.num_frames)[a:b]
                for record, a, b in clip_format.history_segments(span, hi, hi - lo)
            ]
        )  # hi − lo, NL, D: conversation frames lo … hi − 1
        index = window_indices(clip.start_frame + start - first, clip.start_frame + stop - first, radius, end - first)
        index = index + first - lo  # T, L_w, into `rows`
        return torch.from_numpy(np.asarray(rows[index.numpy()], dtype=np.float32))

    def avatar_rms(self, clip: ClipRecord) -> np.ndarray:
        """`(T,)` per-frame RMS of the clip's avatar audio over its track's reference level (see the module
        docstring); computed once per track and process."""
        track = self._tracks[clip.path]
        key = tuple(r.path for r in track)
        if key not in self._rms_reference:
            for record in track:
                if record.path not in self._rms:
                    wave = clip_format.read_clip_wav(record.path, "avatar")
                    self._rms[record.path] = frame_rms(wave, record.num_frames)
            self._rms_reference[key] = track_rms_reference(np.concatenate([self._rms[r.path] for r in track]))
        return (self._rms[clip.path] / self._rms_reference[key]).astype(np.float32)

    def _understanding_index(self, record: ClipRecord) -> clip_format.UnderstandingIndex:
        if record.path not in self._understanding:
            self._understanding[record.path] = clip_format.read_understanding_index(record.path, record.num_frames)
        return self._understanding[record.path]

    def _understanding_stride(self, records) -> int:
        """The stride of every ``user_omni.safetensors`` (all equal, entries on its reasoning frames); a whole-clip
        file of an older echo-prep is refused (its tokens saw no history before the clip, and end at no reasoning
        frame)."""
        strides = {}
        for record in records:
            index = self._understanding_index(record)
            if index.legacy:
                raise clip_format.ClipFormatError(
                    index.path,
                    "is in the whole-clip format of an older echo-prep (no per-stride entries). Delete "
                    "the files and rerun `echo-prep ... --stages omni --omni-stride <stride>`",
                )
            clip_format.check_reasoning_frames(index.path, index.end_frames, record.start_frame, index.stride)
            strides.setdefault(index.stride, index.path)
        if len(strides) > 1:
            raise ValueError(
                f"the clips' user_omni.safetensors have different strides {sorted(strides)} (e.g. "
                f"{[str(p) for p in strides.values()]}): a model reads one understanding stride. Rerun "
                "`echo-prep --stages omni` with one `--omni-stride` for the whole data root."
            )
        return next(iter(strides), None)

    def _emotion_stride(self, records) -> int | None:
        """The stride of every ``emotion.json`` (all equal, windows on its reasoning frames), `None` when no clip has
        one; each file's windows are read once here."""
        strides = {}
        for record in records:
            stride = clip_format.read_emotion_stride(record.path)
            self._emotion[record.path] = clip_format.read_emotion_windows(record.path)
            if stride is None:
                continue
            frames = [w["end_frame"] for w in self._emotion[record.path]]
            clip_format.check_reasoning_frames(record.path / clip_format.EMOTION, frames, record.start_frame, stride)
            strides.setdefault(stride, record.path)
        if len(strides) > 1:
            raise ValueError(
                f"the clips' emotion.json have different strides {sorted(strides)} (e.g. "
                f"{[str(p) for p in strides.values()]}): a model reads one emotion stride. Rerun "
                "`echo-prep --stages emotion,emotion_embeds` with one `--emotion-stride` for the whole data root."
            )
        return next(iter(strides), None)

    @property
    def reasoning_strides(self) -> dict[str, int]:
        """The `EchoSettings` fields ``understanding_stride`` / ``emotion_stride`` this data fixes (those it reads)."""
        strides = {"understanding_stride": self.understanding_stride, "emotion_stride": self.emotion_stride}
        return {name: value for name, value in strides.items() if value is not None}

    def _record_at(self, clip: ClipRecord, frame: int) -> ClipRecord | None:
        """The clip of ``clip``'s history run holding conversation frame ``frame`` (`None`: before the run)."""
        for record in self._runs[clip.path]:
            if record.start_frame <= frame < record.end_frame:
                return record
        return None

    def understanding_at(self, clip: ClipRecord, last_frame: int) -> torch.Tensor:
        """The S_usr entry a window ending at clip frame ``last_frame`` reads: the one of its reasoning frame
        (`echo.clip_format.reasoning_frame` of the conversation frame and the understanding stride), `(N_s, D_s)`;
        `(0, D_s)` before the first reasoning frame (or one in a clip missing from the history run)."""
        dim = self._understanding_index(clip).dim
        frame = clip_format.reasoning_frame(clip.start_frame + last_frame, self.understanding_stride)
        record = None if frame is None else self._record_at(clip, frame)
        if record is None:
            return torch.zeros(0, dim)
        index = self._understanding_index(record)
        entry = np.nonzero(record.start_frame + index.end_frames == frame)[0]
        if not len(entry):
            raise clip_format.ClipFormatError(
                index.path,
                f"has no entry at clip frame {frame - record.start_frame}, a reasoning frame of its stride "
                f"{index.stride}; delete it and rerun `echo-prep --stages omni`",
            )
        return clip_format.read_understanding_entry(index, int(entry[0]))

    def emotion_at(self, clip: ClipRecord, last_frame: int) -> tuple[str, Path]:
        """The emotion text a window ending at clip frame ``last_frame`` reads, and the clip folder whose
        ``emotion.json`` (and ``emotion_embeds.safetensors``) holds it: the window of its reasoning frame
        (`echo.clip_format.reasoning_frame` of the conversation frame and the emotion stride), else
        ``default_emotion`` (before the first reasoning frame, before anyone spoke, or in a clip without
        ``emotion.json``)."""
        if self.drop_emotion:
            return "", clip.path
        frame = None
        if self.emotion_stride is not None:
            frame = clip_format.reasoning_frame(clip.start_frame + last_frame, self.emotion_stride)
        record = None if frame is None else self._record_at(clip, frame)
        if record is not None:
            for window in self._emotion[record.path] or ():
                if record.start_frame + window["end_frame"] == frame:
                    return window["text"], record.path
        return self.default_emotion, clip.path

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items.")
        clip = self.clips[index // self.windows_per_clip]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start, (ref_clip, ref_index) = self._window(clip, rng)
        stop = start + self.num_frames  # exclusive; the window ends at frame stop − 1
        item = {
            "clip_id": str(clip.meta.get("clip_id", clip.path.name)),
            "window_start": start,
            "conversation_frame": clip.start_frame + start,
        }

        # 1. Reference frame (drawn outside the window, with a face: `draw_reference`) and its landmarks
        ref_landmarks = clip_format.read_landmarks(ref_clip.path, "avatar", ref_clip.num_frames)[ref_index]

        # 2. Avatar video window and reference frame
        if ref_clip.path == clip.path:
            frames = read_video_frames(clip.path / clip_format.video_name("avatar"), [*range(start, stop), ref_index])
        else:  # the window is the whole clip: the reference comes from another clip of the track
            frames = np.concatenate(
                [
                    read_video_frames(clip.path / clip_format.video_name("avatar"), list(range(start, stop))),
                    read_video_frames(ref_clip.path / clip_format.video_name("avatar"), [ref_index]),
                ]
            )
        frames = frames_to_tensor(frames, self.resolution)  # T+1, 3, H, W
        item["video"] = frames[:-1].permute(1, 0, 2, 3).contiguous()  # 3, T, H, W
        item["reference"] = frames[-1]
        item["reference_frame"] = ref_index
        item["reference_clip"] = str(ref_clip.meta.get("clip_id", ref_clip.path.name))

        # 3. Avatar audio windows (context from the conversation, across clip edges) and track-normalised RMS
        item["avatar_audio"] = self.avatar_audio_windows(clip, start, stop)  # T, L_w, NL, D
        item["avatar_rms"] = torch.from_numpy(self.avatar_rms(clip)[start:stop].copy())

        # 4. SDCM lip / face token masks: the reference frame's, held for every latent frame
        num_latent_frames = (self.num_frames - 1) // self.temporal_compression + 1
        ref_size = ref_clip.size or self.resolution
        item["lip_mask"], item["face_mask"] = reference_token_masks(
            ref_landmarks,
            self.resolution,
            self.resolution,
            num_latent_frames,
            source_size=(ref_size, ref_size),
            patch_size=(self.token_patch, self.token_patch),
        )  # F, H', W' each

        # 5. User history: conversation frames from the track's start (or the last max_history_frames) to the window end
        segments = clip_format.history_segments(self._runs[clip.path], clip.start_frame + stop, self.max_history_frames)
        item["user_audio"] = torch.cat(
            [
                torch.from_numpy(
                    np.asarray(clip_format.read_w2v(r.path, "user", r.num_frames)[lo:hi], dtype=np.float32)
                )
                for r, lo, hi in segments
            ]
        )
        if self.use_user_video and self.use_cached_user_tokens:
            parts = [clip_format.read_user_tokens(r.path, lo, hi) for r, lo, hi in segments]
            item["user_tokens"] = torch.cat([p[0] for p in parts])  # T_hist, C, h, w
            item["user_token_mask"] = torch.cat([p[1] for p in parts])  # T_hist, h, w
        elif self.use_user_video:
            parts = [
                read_user_frames(r.path, lo, hi, self.user_video_size, r.size or self.resolution)
                for r, lo, hi in segments
            ]
            item["user_video"] = torch.cat([p[0] for p in parts])  # T_hist, 3, h_u, w_u
            item["user_face_mask"] = torch.cat([p[1] for p in parts])  # T_hist, h_u, w_u
        if self.use_understanding:
            item["understanding"] = self.understanding_at(clip, stop - 1)  # N_s, D_s (N_s may be 0)

        # 6. Emotion text and optional cached embeddings / window latents
        item["emotion_text"], emotion_source = self.emotion_at(clip, stop - 1)
        if self.use_cached_emotion_embeds:
            item["emotion_embeds"] = load_emotion_embeds(emotion_source, item["emotion_text"])
            item["empty_embeds"] = load_emotion_embeds(clip.path, "")  # f_ref's stage-1 prompt (training.step)
        if self.latent_cache is not None:
            item["latent_key"] = self.latent_cache.window_key(clip.path, start)
            latents = self.latent_cache.read(item["latent_key"])
            if latents is not None:
                item["latents"] = latents  # 16, F, h, w
        return item


def _contiguous_span(track: list[ClipRecord], clip: ClipRecord) -> list[ClipRecord]:
    """The clips of ``track`` (time-ordered) that are contiguous with ``clip``, before and after it (a missing clip
    cuts the span at the gap): the conversation's frames whose avatar audio rows the clip's windows may read."""
    span = clip_format.contiguous_run(track, clip)
    index = next(i for i, record in enumerate(track) if record.path == clip.path)
    for record in track[index + 1 :]:
        if record.start_frame != span[-1].end_frame:
            break
        span.append(record)
    return span


def _left_pad(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `(T_i, ...)` tensors left-padded with zeros to `(B, T_max, ...)`, with a `(B, T_max)` validity mask."""
    length = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    mask = torch.zeros(len(tensors), length, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, length - t.shape[0] :] = t
        mask[i, length - t.shape[0] :] = True
    return out, mask


def collate_conversations(items: list[dict]) -> dict:
    """Batch `ConversationDataset` items.

    Window tensors are stacked; user histories (``user_audio``, ``user_video``, ``user_face_mask`` or the cached
    ``user_tokens``, ``user_token_mask``) are **left-padded** to the longest history (the window always ends at the
    last index) with ``user_audio_mask`` True on valid frames; ``understanding`` is right-padded to the longest entry
    (at least one row) with ``understanding_mask`` (all False for a sample without a known entry);
    ``emotion_text``, ``clip_id`` and ``reference_clip`` stay lists of strings, ``window_start``, ``conversation_frame`` and
    ``reference_frame`` lists of ints. ``latents`` (cached window latents) are stacked only when every item has them
    (otherwise the step encodes the whole batch), ``latent_key`` stays a list of strings. ``emotion_embeds`` and ``empty_embeds`` are right-padded with zeros to the longest `L_txt` (as `EmotionTextEncoder` pads),
    `(B, L_txt, D)`.
    """
    if not items:
        raise ValueError("`items` is empty, expected at least one dataset item.")
    batch = {}
    for key in ("video", "reference", "avatar_audio", "avatar_rms", "lip_mask", "face_mask"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    if all("latents" in item for item in items):  # cached window latents: only when every window is cached
        batch["latents"] = torch.stack([item["latents"] for item in items])
    batch["user_audio"], batch["user_audio_mask"] = _left_pad([item["user_audio"] for item in items])
    for key in ("user_video", "user_face_mask", "user_tokens", "user_token_mask"):
        if key in items[0]:
            batch[key], _ = _left_pad([item[key] for item in items])
    if "understanding" in items[0]:
        tokens = [item["understanding"] for item in items]
        length = max(1, max(t.shape[0] for t in tokens))
        batch["understanding"] = tokens[0].new_zeros(len(tokens), length, tokens[0].shape[-1])
        batch["understanding_mask"] = torch.zeros(len(tokens), length, dtype=torch.bool)
        for i, t in enumerate(tokens):
            batch["understanding"][i, : t.shape[0]] = t
            batch["understanding_mask"][i, : t.shape[0]] = True
    for key in ("emotion_embeds", "empty_embeds"):
        if key in items[0]:
            embeds = [item[key] for item in items]
            length = max(e.shape[0] for e in embeds)
            batch[key] = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
            for i, e in enumerate(embeds):
                batch[key][i, : e.shape[0]] = e
    for key in ("emotion_text", "clip_id", "window_start", "conversation_frame", "reference_frame", "reference_clip"):
        batch[key] = [item[key] for item in items]
    if "latent_key" in items[0]:
        batch["latent_key"] = [item["latent_key"] for item in items]
    return batch
