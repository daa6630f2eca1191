"""`ConversationDataset`: training windows over prepared clip folders, and `collate_conversations`.

A prepared clip folder (written by `data_prep`, read through `echo.clip_format`, format in ``docs/interfaces.md``)
holds one segment of a conversation for one avatar/user assignment; the clips of one conversation and assignment
(``<conversation>_<avatar>_c<k>``) form its *track*. Every item is a window of ``num_frames = 4k + 1`` consecutive
frames of one clip, with what the pipeline could have seen at the window's last frame:

- ``video`` `(3, T, H, W)` in [−1, 1] and ``reference`` `(3, H, W)` from ``avatar.mp4``; the reference is a random
  frame of the clip with a face (``reference_frame``, the drawn frame or the nearest one with landmarks);
- ``avatar_audio`` `(T, L_w, NL, 768)`: the avatar's wav2vec2 rows with their ±``audio_radius`` context windows taken
  from the whole clip (the window's border frames see their real neighbours);
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
- ``understanding`` `(N_s, D_s)`: the latest cached S_usr entry of the track whose end frame ≤ the window's last frame
  (``user_omni.safetensors``, Φ on the user's media from the conversation's start to that frame), or `(0, D_s)`
  when none is known yet (the batch then masks it out);
- ``emotion_text``: the text of the track's latest emotion window ending at or before the window end
  (``emotion.json``), else ``default_emotion`` (``""`` with ``drop_emotion``); with ``use_cached_emotion_embeds``
  also its embedding ``emotion_embeds`` `(L_txt, D)` (``emotion_embeds.safetensors``);
- ``latents`` `(16, F, h, w)` from ``avatar_latents.safetensors`` when ``use_cached_latents`` is set (not normalised);
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
from .audio import frame_rms
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
        use_cached_latents (`bool`, defaults to `False`): return ``latents`` sliced from ``avatar_latents.safetensors``;
            window starts are then multiples of ``temporal_compression`` (the slice's first latent frame is the
            4-frame group ending at the window start, an approximation of a first-frame latent).
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
        use_cached_latents: bool = False,
        default_emotion: str = "neutral",
        drop_emotion: bool = False,
        use_cached_emotion_embeds: bool = False,
        use_cached_user_tokens: bool = False,
        seed: int = 0,
    ):
        if num_frames < 1 or (num_frames - 1) % temporal_compression:
            raise ValueError(
                f"`num_frames` is {num_frames}, expected 4k + 1 frames for temporal compression {temporal_compression}."
            )
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
        self.use_cached_latents = use_cached_latents
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
        records = {c.path: c for c in self.clips}
        for clip in self.clips:
            track = clip_format.conversation_siblings(clip, cache)
            for other in track:
                if other.path not in records:
                    records[other.path] = self._validate(other)
            self._tracks[clip.path] = track
            self._runs[clip.path] = clip_format.contiguous_run(track, clip)
        # 3. Lazily filled per-process caches (small: per-frame RMS, understanding indices, emotion windows)
        self._rms: dict[Path, np.ndarray] = {}
        self._rms_reference: dict[tuple, float] = {}
        self._understanding: dict[Path, clip_format.UnderstandingIndex] = {}
        self._emotion: dict[Path, list[dict] | None] = {}
        if use_understanding:
            legacy = [r.path.name for r in records.values() if self._understanding_index(r).legacy]
            if legacy:
                logger.warning(
                    f"{len(legacy)} clip folders (e.g. {sorted(legacy)[0]!r}) hold `user_omni.safetensors` in the "
                    "whole-clip format of an older echo-prep: only windows ending at their clip's last frame can "
                    "use those tokens (anything else would see the future). Delete the files and rerun "
                    "`echo-prep --stages omni` for per-stride entries."
                )

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
        if self.use_cached_latents:
            required.append(clip_format.AVATAR_LATENTS)
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
    def _window(self, clip: ClipRecord, rng: np.random.Generator) -> tuple[int, int]:
        last_start = clip.num_frames - self.num_frames
        if self.use_cached_latents:
            step = self.temporal_compression
            start = step * int(rng.integers(0, last_start // step + 1))
        else:
            start = int(rng.integers(0, last_start + 1))
        reference = int(rng.integers(0, clip.num_frames))
        return start, reference

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

    def understanding_at(self, clip: ClipRecord, last_frame: int) -> torch.Tensor:
        """The track's latest S_usr entry whose end frame ≤ ``last_frame`` (clip frame of ``clip``), `(N_s, D_s)`;
        `(0, D_s)` when no entry ends that early."""
        end = clip.start_frame + last_frame  # conversation frame
        for record in reversed(self._runs[clip.path]):
            index = self._understanding_index(record)
            known = np.nonzero(record.start_frame + index.end_frames <= end)[0]
            if len(known):
                return clip_format.read_understanding_entry(index, int(known[-1]))
        return torch.zeros(0, self._understanding_index(clip).dim)

    def emotion_at(self, clip: ClipRecord, last_frame: int) -> tuple[str, Path]:
        """The emotion text in force at clip frame ``last_frame`` and the clip folder whose ``emotion.json`` (and
        ``emotion_embeds.safetensors``) holds it: the track's latest emotion window ending at or before that frame,
        else ``default_emotion`` (a window before the track's first emotion window never gets a later text)."""
        if self.drop_emotion:
            return "", clip.path
        end = clip.start_frame + last_frame
        for record in reversed(self._runs[clip.path]):
            if record.path not in self._emotion:
                self._emotion[record.path] = clip_format.read_emotion_windows(record.path)
            windows = self._emotion[record.path]
            window = clip_format.emotion_window_at(windows, end - record.start_frame)
            if window is not None:
                return window["text"], record.path
        return self.default_emotion, clip.path

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items.")
        clip = self.clips[index // self.windows_per_clip]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start, ref_index = self._window(clip, rng)
        stop = start + self.num_frames  # exclusive; the window ends at frame stop − 1
        source_size = clip.size or self.resolution
        item = {
            "clip_id": str(clip.meta.get("clip_id", clip.path.name)),
            "window_start": start,
            "conversation_frame": clip.start_frame + start,
        }

        # 1. Reference frame: the drawn frame, or the nearest frame with a face (the pipeline needs one)
        landmarks = clip_format.read_landmarks(clip.path, "avatar", clip.num_frames)
        has_face = np.isfinite(landmarks).all(axis=(1, 2))
        if not has_face.any():
            raise clip_format.ClipFormatError(
                clip.path / clip_format.landmarks_name("avatar"), "has no frame with a face; remove the clip folder"
            )
        if not has_face[ref_index]:
            faces = np.nonzero(has_face)[0]
            ref_index = int(faces[np.argmin(np.abs(faces - ref_index))])

        # 2. Avatar video window and reference frame
        frames = read_video_frames(clip.path / clip_format.video_name("avatar"), [*range(start, stop), ref_index])
        frames = frames_to_tensor(frames, self.resolution)  # T+1, 3, H, W
        item["video"] = frames[:-1].permute(1, 0, 2, 3).contiguous()  # 3, T, H, W
        item["reference"] = frames[-1]
        item["reference_frame"] = ref_index

        # 3. Avatar audio windows (context from the whole clip) and track-normalised short-time RMS
        w2v = clip_format.read_w2v(clip.path, "avatar", clip.num_frames)
        offsets = np.arange(-self.audio_radius, self.audio_radius + 1)
        rows = np.clip(np.arange(start, stop)[:, None] + offsets, 0, clip.num_frames - 1)  # T, L_w
        item["avatar_audio"] = torch.from_numpy(np.asarray(w2v[rows.reshape(-1)], dtype=np.float32)).reshape(
            self.num_frames, len(offsets), *w2v.shape[1:]
        )
        item["avatar_rms"] = torch.from_numpy(self.avatar_rms(clip)[start:stop].copy())

        # 4. SDCM lip / face token masks: the reference frame's, held for every latent frame
        num_latent_frames = (self.num_frames - 1) // self.temporal_compression + 1
        item["lip_mask"], item["face_mask"] = reference_token_masks(
            landmarks[ref_index],
            self.resolution,
            self.resolution,
            num_latent_frames,
            source_size=(source_size, source_size),
            patch_size=(self.token_patch, self.token_patch),
        )  # F, H', W' each

        # 5. User history: conversation frames from the track's start (or the last max_history_frames) to the window end
        segments = clip_format.history_segments(self._runs[clip.path], clip.start_frame + stop, self.max_history_frames)
        item["user_audio"] = torch.cat([
            torch.from_numpy(np.asarray(clip_format.read_w2v(r.path, "user", r.num_frames)[lo:hi], dtype=np.float32))
            for r, lo, hi in segments
        ])  # fmt: skip
        if self.use_user_video and self.use_cached_user_tokens:
            parts = [clip_format.read_user_tokens(r.path, lo, hi) for r, lo, hi in segments]
            item["user_tokens"] = torch.cat([p[0] for p in parts])  # T_hist, C, h, w
            item["user_token_mask"] = torch.cat([p[1] for p in parts])  # T_hist, h, w
        elif self.use_user_video:
            parts = [
                read_user_frames(r.path, lo, hi, self.user_video_size, r.size or self.resolution) for r, lo, hi in segments
            ]
            item["user_video"] = torch.cat([p[0] for p in parts])  # T_hist, 3, h_u, w_u
            item["user_face_mask"] = torch.cat([p[1] for p in parts])  # T_hist, h_u, w_u
        if self.use_understanding:
            item["understanding"] = self.understanding_at(clip, stop - 1)  # N_s, D_s (N_s may be 0)

        # 6. Emotion text and optional cached embeddings / latents
        item["emotion_text"], emotion_source = self.emotion_at(clip, stop - 1)
        if self.use_cached_emotion_embeds:
            item["emotion_embeds"] = load_emotion_embeds(emotion_source, item["emotion_text"])
        if self.use_cached_latents:
            first = start // self.temporal_compression
            item["latents"] = clip_format.read_avatar_latents(clip.path, first, num_latent_frames)
        return item


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
    ``emotion_text`` and ``clip_id`` stay lists of strings, ``window_start``, ``conversation_frame`` and
    ``reference_frame`` lists of ints. ``emotion_embeds`` are right-padded with zeros to the longest `L_txt` (as `EmotionTextEncoder` pads),
    `(B, L_txt, D)`.
    """
    if not items:
        raise ValueError("`items` is empty, expected at least one dataset item.")
    batch = {}
    for key in ("video", "reference", "avatar_audio", "avatar_rms", "lip_mask", "face_mask", "latents"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
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
    if "emotion_embeds" in items[0]:
        embeds = [item["emotion_embeds"] for item in items]
        length = max(e.shape[0] for e in embeds)
        batch["emotion_embeds"] = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
        for i, e in enumerate(embeds):
            batch["emotion_embeds"][i, : e.shape[0]] = e
    for key in ("emotion_text", "clip_id", "window_start", "conversation_frame", "reference_frame"):
        batch[key] = [item[key] for item in items]
    return batch
