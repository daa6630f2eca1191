"""`ConversationDataset`: training windows over prepared clip folders, and `collate_conversations`.

A prepared clip folder (written by `data_prep`, format in ``docs/interfaces.md``) holds one conversation segment for
one avatar/user assignment. Every item is a window of ``num_frames = 4k + 1`` consecutive frames of it:

- ``video`` `(3, T, H, W)` in [−1, 1] and ``reference`` `(3, H, W)` (a random frame of the clip) from ``avatar.mp4``;
- ``avatar_audio`` `(T, L_w, NL, 768)`: the avatar's wav2vec2 rows with their ±``audio_radius`` context windows taken
  from the whole clip (the window's border frames see their real neighbours); ``avatar_rms`` `(T,)`;
- ``lip_mask`` / ``face_mask`` `(F, H', W')` rasterised from ``avatar_landmarks.npy`` at the token grid;
- the user's history from the clip's first frame to the window end: ``user_audio`` `(T_hist, NL, 768)`, optionally
  ``user_video`` `(T_hist, 3, h_u, w_u)` with ``user_face_mask`` `(T_hist, h_u, w_u)` (or, with
  ``use_cached_user_tokens``, their VAE tokens ``user_tokens`` `(T_hist, C, h, w)` with ``user_token_mask``
  `(T_hist, h, w)` from ``user_tokens.safetensors``, ``echo-prep --stages user_tokens``), and cached understanding
  tokens ``understanding`` `(N_s, D_s)`;
- ``emotion_text``: the latest emotion description whose window ends at or before the window end (``emotion.json``),
  or ``default_emotion`` (``""`` with ``drop_emotion``); with ``use_cached_emotion_embeds`` also its embedding
  ``emotion_embeds`` `(L_txt, D)` from ``emotion_embeds.safetensors`` (``echo-prep --stages emotion_embeds``);
- ``latents`` `(16, F, h, w)` from ``avatar_latents.safetensors`` when ``use_cached_latents`` is set;
- ``clip_id`` and ``window_start`` (the window's first frame in the clip), for logging and data-sharding checks.

Randomness (window start, reference frame) is a pure function of ``(seed, epoch, index)``, so the data of a step
does not depend on worker processes or on whether training was resumed. Videos are read with decord, or PyAV when
decord is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .audio import frame_rms
from .masks import rasterize_masks, token_masks_from_landmarks

REQUIRED_FILES = ("meta.json", "avatar.mp4", "avatar.wav", "avatar_w2v.npy", "avatar_landmarks.npy", "user_w2v.npy")


def read_video_frames(path: str | os.PathLike, indices: list[int] | np.ndarray) -> np.ndarray:
    """Read the given frames of a video file as `(N, H, W, 3)` uint8 (decord, PyAV fallback)."""
    indices = np.asarray(indices, dtype=np.int64)
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
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
        raise ValueError(f"{path}: frames {sorted(missing)[:5]} are beyond the end of the video ({len(frames)} read).")
    return np.stack([frames[i] for i in indices.tolist()])


def _to_tensor_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """`(N, H, W, 3)` uint8 → `(N, 3, size, size)` float in [−1, 1] (antialiased resize when needed)."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if video.shape[-2:] != (size, size):
        video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return video.clamp(-1, 1)


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
    frames = _to_tensor_frames(read_video_frames(clip_dir / "user.mp4", list(range(start, stop))), size)
    landmarks = np.load(clip_dir / "user_landmarks.npy")[start:stop]
    lip, face = rasterize_masks(landmarks, size, size, source_size=(source_size, source_size))
    return frames, torch.from_numpy(face | lip).float()


@dataclass
class ClipInfo:
    """A validated prepared clip folder."""

    path: Path
    meta: dict
    num_frames: int


class ConversationDataset(Dataset):
    """Windows of ``num_frames`` frames over prepared clip folders.

    Args:
        clips (`str`, `Path` or list of them): a data root holding clip folders (each with a ``meta.json``), or an
            explicit list of clip folders.
        num_frames (`int`, defaults to 9): video frames per window, ``4k + 1``.
        resolution (`int`, defaults to 512): square output size of ``video`` / ``reference`` (frames are resized).
        token_patch (`int`, defaults to 16): pixels per generator token (VAE stride 8 × transformer patch 2).
        temporal_compression (`int`, defaults to 4): video frames per latent frame.
        audio_radius (`int`, defaults to 2): context radius of the avatar audio windows (L_w = 2·radius + 1).
        windows_per_clip (`int`, defaults to 1): items per clip folder per epoch.
        max_history_frames (`int`, *optional*): keep only the last frames of the user history.
        use_user_video (`bool`, defaults to `False`): read the user's history frames (LCU visual branch, LPE).
        user_video_size (`int`, defaults to 64): square size of the user's history frames.
        use_understanding (`bool`, defaults to `False`): load ``user_omni.safetensors`` (HBCU); required then.
        use_cached_latents (`bool`, defaults to `False`): return ``latents`` sliced from ``avatar_latents.safetensors``;
            window starts are then multiples of ``temporal_compression`` (the slice's first latent frame is the
            4-frame group ending at the window start, an approximation of a first-frame latent).
        default_emotion (`str`, defaults to `"neutral"`): emotion text of clips without ``emotion.json``.
        drop_emotion (`bool`, defaults to `False`): every window's emotion text is the empty prompt ``""`` (training
            with ``ablation.use_emotion: false``).
        use_cached_emotion_embeds (`bool`, defaults to `False`): also return ``emotion_embeds`` `(L_txt, D)`, the
            cached `EmotionTextEncoder` embedding of ``emotion_text`` (``emotion_embeds.safetensors``; required then).
        use_cached_user_tokens (`bool`, defaults to `False`): with ``use_user_video``, return the user history's cached
            VAE tokens ``user_tokens`` `(T_hist, C, h, w)` and ``user_token_mask`` `(T_hist, h, w)` (the output of
            `echo.components.encode_user_video`, from ``user_tokens.safetensors`` written at ``user_video_size``;
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
        self.clips = [self._validate(Path(p)) for p in self._list_clips(clips)]

    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _list_clips(clips) -> list[Path]:
        if isinstance(clips, (str, os.PathLike)):
            root = Path(clips)
            if not root.is_dir():
                raise FileNotFoundError(f"data root {str(root)!r} does not exist or is not a folder.")
            if (root / "meta.json").is_file():
                return [root]
            found = sorted(p.parent for p in root.glob("*/meta.json"))
            if not found:
                raise FileNotFoundError(f"data root {str(root)!r} holds no prepared clip folder (no */meta.json).")
            return found
        clips = [Path(c) for c in clips]
        if not clips:
            raise ValueError("`clips` is an empty list, expected at least one prepared clip folder.")
        return clips

    def _validate(self, path: Path) -> ClipInfo:
        if not path.is_dir():
            raise FileNotFoundError(f"clip folder {str(path)!r} does not exist.")
        required = list(REQUIRED_FILES)
        if self.use_user_video:
            required += ["user.mp4", "user_landmarks.npy"]
        if self.use_understanding:
            required.append("user_omni.safetensors")
        if self.use_cached_latents:
            required.append("avatar_latents.safetensors")
        for name in required:
            if not (path / name).is_file():
                raise FileNotFoundError(f"clip folder {str(path)!r} has no {name!r}.")
        if self.use_cached_emotion_embeds and not (path / "emotion_embeds.safetensors").is_file():
            raise FileNotFoundError(
                f"clip folder {str(path)!r} has no 'emotion_embeds.safetensors' (`use_cached_emotion_embeds` is set). "
                "Write it with `echo-prep --input ... --layout ... --out <data root> --stages emotion_embeds "
                "--text-encoder <T5/UMT5 folder>`, or turn the option off to encode the emotion text during training."
            )
        meta = json.loads((path / "meta.json").read_text())
        if "num_frames" not in meta:
            raise ValueError(f"{str(path / 'meta.json')!r} has no 'num_frames' key.")
        num_frames = int(meta["num_frames"])
        if self.use_user_video and self.use_cached_user_tokens:
            check_user_tokens(path, self.user_video_size, num_frames)
        if num_frames < self.num_frames:
            raise ValueError(
                f"clip {str(path)!r} has {num_frames} frames, shorter than the training window of "
                f"num_frames = {self.num_frames} frames."
            )
        return ClipInfo(path=path, meta=meta, num_frames=num_frames)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose window starts and reference frames `__getitem__` draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips) * self.windows_per_clip

    # ----------------------------------------------------------------------------------------------------------------
    def _window(self, clip: ClipInfo, rng: np.random.Generator) -> tuple[int, int]:
        last_start = clip.num_frames - self.num_frames
        if self.use_cached_latents:
            step = self.temporal_compression
            start = step * int(rng.integers(0, last_start // step + 1))
        else:
            start = int(rng.integers(0, last_start + 1))
        reference = int(rng.integers(0, clip.num_frames))
        return start, reference

    def _emotion(self, clip: ClipInfo, end_frame: int) -> str:
        if self.drop_emotion:
            return ""
        path = clip.path / "emotion.json"
        if not path.is_file():
            return self.default_emotion
        windows = sorted(json.loads(path.read_text()).get("windows", []), key=lambda w: w["end_frame"])
        if not windows:
            return self.default_emotion
        known = [w for w in windows if w["end_frame"] <= end_frame]
        return (known[-1] if known else windows[0])["text"]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items.")
        clip = self.clips[index // self.windows_per_clip]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start, ref_index = self._window(clip, rng)
        stop = start + self.num_frames  # exclusive; the window ends at frame stop − 1
        source_size = int(clip.meta.get("size", self.resolution))
        item = {"clip_id": str(clip.meta.get("clip_id", clip.path.name)), "window_start": start}

        # 1. Avatar video window and reference frame
        frames = read_video_frames(clip.path / "avatar.mp4", [*range(start, stop), ref_index])
        frames = _to_tensor_frames(frames, self.resolution)  # T+1, 3, H, W
        item["video"] = frames[:-1].permute(1, 0, 2, 3).contiguous()  # 3, T, H, W
        item["reference"] = frames[-1]

        # 2. Avatar audio windows (context from the whole clip) and short-time RMS
        w2v = np.load(clip.path / "avatar_w2v.npy", mmap_mode="r")
        if w2v.shape[0] != clip.num_frames:
            raise ValueError(
                f"{str(clip.path / 'avatar_w2v.npy')!r} has {w2v.shape[0]} rows, expected num_frames = {clip.num_frames}."
            )
        offsets = np.arange(-self.audio_radius, self.audio_radius + 1)
        rows = np.clip(np.arange(start, stop)[:, None] + offsets, 0, clip.num_frames - 1)  # T, L_w
        item["avatar_audio"] = torch.from_numpy(np.asarray(w2v[rows.reshape(-1)], dtype=np.float32)).reshape(
            self.num_frames, len(offsets), *w2v.shape[1:]
        )
        wave = _read_wav(clip.path / "avatar.wav")
        item["avatar_rms"] = torch.from_numpy(frame_rms(wave, clip.num_frames)[start:stop].copy())

        # 3. Lip / face masks at the token grid
        landmarks = np.load(clip.path / "avatar_landmarks.npy")[start:stop]
        lip, face = token_masks_from_landmarks(
            landmarks,
            self.resolution,
            self.resolution,
            source_size=(source_size, source_size),
            patch_size=(self.token_patch, self.token_patch),
            temporal_compression=self.temporal_compression,
        )
        item["lip_mask"], item["face_mask"] = lip, face

        # 4. User history: frames hist_start … stop − 1
        hist_start = 0 if self.max_history_frames is None else max(0, stop - self.max_history_frames)
        user_w2v = np.load(clip.path / "user_w2v.npy", mmap_mode="r")
        if user_w2v.shape[0] != clip.num_frames:
            raise ValueError(
                f"{str(clip.path / 'user_w2v.npy')!r} has {user_w2v.shape[0]} rows, expected num_frames = "
                f"{clip.num_frames}."
            )
        item["user_audio"] = torch.from_numpy(np.asarray(user_w2v[hist_start:stop], dtype=np.float32))
        if self.use_user_video and self.use_cached_user_tokens:
            from safetensors import safe_open

            with safe_open(str(clip.path / "user_tokens.safetensors"), framework="pt") as f:
                item["user_tokens"] = f.get_slice("tokens")[hist_start:stop]  # T_hist, C, h, w
                item["user_token_mask"] = f.get_slice("face_mask")[hist_start:stop]  # T_hist, h, w
        elif self.use_user_video:
            item["user_video"], item["user_face_mask"] = read_user_frames(
                clip.path, hist_start, stop, self.user_video_size, source_size
            )  # T_hist, 3, h_u, w_u and T_hist, h_u, w_u
        if self.use_understanding:
            from safetensors.torch import load_file

            tokens = load_file(str(clip.path / "user_omni.safetensors"))
            if "hidden_states" not in tokens:
                raise KeyError(f"{str(clip.path / 'user_omni.safetensors')!r} has no 'hidden_states' tensor.")
            hidden = tokens["hidden_states"].float()
            item["understanding"] = hidden.reshape(-1, hidden.shape[-1])  # N_s, D_s

        # 5. Emotion text and optional cached latents
        item["emotion_text"] = self._emotion(clip, stop - 1)
        if self.use_cached_emotion_embeds:
            item["emotion_embeds"] = load_emotion_embeds(clip.path, item["emotion_text"])
        if self.use_cached_latents:
            from safetensors.torch import load_file

            latents = load_file(str(clip.path / "avatar_latents.safetensors"))["latents"]
            first = start // self.temporal_compression
            count = (self.num_frames - 1) // self.temporal_compression + 1
            if latents.shape[1] < first + count:
                raise ValueError(
                    f"{str(clip.path / 'avatar_latents.safetensors')!r} has {latents.shape[1]} latent frames, expected "
                    f"at least {first + count}."
                )
            item["latents"] = latents[:, first : first + count].float()
        return item


def check_user_tokens(clip_dir: str | os.PathLike, user_video_size: int, num_frames: int) -> None:
    """Raise a clear error unless ``user_tokens.safetensors`` of the clip folder holds ``num_frames`` frames encoded at
    ``user_video_size``² (see `data_prep.caches.cache_user_tokens`)."""
    from safetensors import safe_open

    path = Path(clip_dir) / "user_tokens.safetensors"
    command = (
        f"`echo-prep --input ... --layout ... --out <data root> --stages user_tokens --vae <VAE folder> "
        f"--user-video-size {user_video_size}`"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"clip folder {str(Path(clip_dir))!r} has no 'user_tokens.safetensors' (`use_cached_user_tokens` is set). "
            f"Write it with {command}, or turn the option off to encode the user frames during training."
        )
    with safe_open(str(path), framework="pt") as f:
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


def load_emotion_embeds(clip_dir: str | os.PathLike, text: str) -> torch.Tensor:
    """The cached embedding of ``text`` in ``emotion_embeds.safetensors``, zero-padded to its ``max_length``.

    Returns:
        `torch.Tensor` of shape `(L_txt, D)` in the cached dtype: what `EmotionTextEncoder.encode(text)[0]` gives.
    """
    from safetensors import safe_open

    path = Path(clip_dir) / "emotion_embeds.safetensors"
    with safe_open(str(path), framework="pt") as f:
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


def _read_wav(path: Path) -> np.ndarray:
    """A mono 16 kHz wav as float32 in [−1, 1] (PCM 16-bit or float)."""
    from scipy.io import wavfile

    _, data = wavfile.read(str(path))
    if data.dtype == np.int16:
        data = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        data = data.astype(np.float32) / 2147483648.0
    data = np.asarray(data, dtype=np.float32)
    return data.mean(axis=1) if data.ndim == 2 else data


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
    last index) with ``user_audio_mask`` True on valid frames; ``understanding`` is right-padded with
    ``understanding_mask``; ``emotion_text`` and ``clip_id`` stay lists of strings, ``window_start`` a list of ints.
    ``emotion_embeds`` are right-padded with zeros to the longest `L_txt` (as `EmotionTextEncoder` pads),
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
        length = max(t.shape[0] for t in tokens)
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
    batch["emotion_text"] = [item["emotion_text"] for item in items]
    batch["clip_id"] = [item["clip_id"] for item in items]
    batch["window_start"] = [item["window_start"] for item in items]
    return batch
