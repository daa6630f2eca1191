"""Optional caches added to finished clip folders
(``echo-prep --stages clips,omni,emotion,emotion_embeds,user_tokens``).

Each stage reads a complete clip folder, skips it when its output exists, and writes its file atomically through
`echo.clip_format` (the one owner of the file names and layouts):

- ``omni`` → ``user_omni.safetensors``: understanding tokens S_usr per stride of the conversation, so that a training
  window sees Φ only of the user's media up to its own end, as the pipeline does. For every conversation frame
  ``e = k·omni_stride − 1`` inside the clip, `echo.understanding.OmniUnderstanding` (``--omni-model``) is run on
  the user's frames and audio from the conversation's start (across the earlier clips of the conversation) up to
  frame ``e`` inclusive: exactly ``understanding_model(frames[:e + 1], audio[:(e + 1)·640])`` of the pipeline (the
  thinker keeps ``max_frames`` evenly spaced frames; only those are decoded). One thinker call per stride and clip.
  A file of an older echo-prep (one whole-clip entry) is replaced.
- ``emotion`` → ``emotion.json`` ``{"stride", "windows": [{"end_frame", "text"}]}``: `echo.emotion.EmotionReasoner`
  on the dialogue history (``transcript.json``) up to every reasoning frame ``k·emotion_stride − 1`` of the
  conversation inside the clip (`echo.clip_format.reasoning_frame`, the frames the session reasons at), none before
  anyone spoke. ``--emotion-model`` is a local causal-LM folder, or an OpenAI-compatible endpoint
  ``http(s)://host:port/v1`` whose served model name is ``--emotion-served-model``.
- ``emotion_embeds`` → ``emotion_embeds.safetensors``: `echo.emotion.EmotionTextEncoder` (``--text-encoder``, in
  ``--text-encoder-dtype``) on every distinct text the dataset can take from the clip (`echo.clip_format.emotion_texts`:
  the empty prompt ``""``, ``--default-emotion`` and the texts of ``emotion.json``). Tensors ``"embeds"``
  `(N, L_max, D)` and ``"lengths"`` `(N,)`; metadata ``"texts"`` and ``"max_length"`` (the encoder's padded length
  L_txt, ``min(tokenizer.model_max_length, 512)`` as in training).
- ``user_tokens`` → ``user_tokens.safetensors``: `echo.encoding.encode_user_video` (the Wan VAE of ``--vae``) on
  every user frame of the clip, read and resized to ``--user-video-size``² exactly as the dataset reads them
  (`echo.data.read_user_frames`). Tensors ``"tokens"`` `(T, z_dim, h, w)` (normalised, float32) and ``"face_mask"``
  `(T, h, w)`; metadata ``"user_video_size"``.

This module imports nothing from `data_prep.stages` (which runs the stages); `torch_threads` and `CACHE_STAGES`
live here for both.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from echo import clip_format
from echo.data import read_user_frames
from echo.emotion import EmotionReasoner, EmotionTextEncoder, reason_emotion
from echo.encoding import encode_user_video
from echo.settings import EchoSettings
from echo.understanding import OmniUnderstanding, history_frame_indices

CACHE_STAGES = ("omni", "emotion", "emotion_embeds", "user_tokens")
# The reasoning strides' defaults are the model settings' (training takes the strides from the caches it reads)
DEFAULT_OMNI_STRIDE = EchoSettings.understanding_stride  # 25: one understanding entry per second of conversation
DEFAULT_EMOTION_STRIDE = EchoSettings.emotion_stride  # 50: one emotion text per two seconds

_LOADED: dict = {}


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run a block with ``num_threads`` torch CPU threads (`None`: unchanged), restoring the previous count."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _vae(options):
    from diffusers import AutoencoderKLWan

    key = ("vae", options.vae, options.device)
    if key not in _LOADED:
        subfolder = "vae" if (Path(options.vae) / "vae" / "config.json").exists() else None
        vae = AutoencoderKLWan.from_pretrained(options.vae, subfolder=subfolder, use_safetensors=True)
        _LOADED[key] = vae.to(options.device).eval()
    return _LOADED[key]


def omni_entry_ends(record: clip_format.ClipRecord, stride: int) -> list[int]:
    """Clip frames (inclusive) ending the clip's understanding entries (or emotion windows): its reasoning frames
    ``k·stride − 1`` of the conversation (`echo.clip_format.reasoning_frames`)."""
    return [e - record.start_frame for e in clip_format.reasoning_frames(record.start_frame, record.end_frame, stride)]


def cache_omni(clip_dir: str | Path, understanding, stride: int = DEFAULT_OMNI_STRIDE) -> Path:
    """Write ``user_omni.safetensors`` with one S_usr entry per ``stride`` frames of the conversation (see the module
    docstring); returns its path.

    Args:
        understanding (`OmniUnderstanding` or a callable ``(frames (N, H, W, 3) uint8, audio (S,)) -> (N_s, D_s)``
            with ``max_frames`` and ``hidden_size`` attributes).
        stride (`int`, defaults to 25): frames between entries.
    """

    clip_dir = Path(clip_dir)
    path = clip_dir / clip_format.USER_OMNI
    record = clip_format.read_clip(clip_dir)
    if path.exists() and clip_format.read_understanding_index(clip_dir, record.num_frames).stride == stride:
        return path  # (a file of an older echo-prep, or of another stride, is replaced)
    run = clip_format.contiguous_run(clip_format.conversation_siblings(record), record)
    origin = run[0].start_frame  # the history's first frame (the conversation's start unless a clip is missing)
    ends = omni_entry_ends(record, stride)
    spf = clip_format.SAMPLE_RATE // clip_format.FPS  # audio samples per frame

    # 1. Which history frames the thinker keeps for each entry, and those frames decoded once
    selections = [
        origin + history_frame_indices(record.start_frame + e + 1 - origin, understanding.max_frames) for e in ends
    ]
    needed = sorted(set(np.concatenate(selections).tolist())) if selections else []
    frames = {}
    for other in run:
        local = [g - other.start_frame for g in needed if other.start_frame <= g < other.end_frame]
        if local:
            decoded = clip_format.read_video_frames(other.path / clip_format.video_name("user"), local)
            frames.update({other.start_frame + i: image for i, image in zip(local, decoded)})

    # 2. The user's audio from the history's start, clip after clip (each wav holds exactly T·640 samples)
    audio = []
    for other in run:
        wave = clip_format.read_clip_wav(other.path, "user")
        if len(wave) != other.num_frames * spf:
            raise clip_format.ClipFormatError(
                other.path / clip_format.wav_name("user"),
                f"has {len(wave)} samples, expected num_frames × {spf} = {other.num_frames * spf}",
            )
        audio.append(wave)
    audio = np.concatenate(audio)

    # 3. One thinker call per entry, on the media up to the entry's end
    tokens = []
    for end, selection in zip(ends, selections):
        count = record.start_frame + end + 1 - origin
        tokens.append(understanding(np.stack([frames[g] for g in selection.tolist()]), audio[: count * spf]))
    return clip_format.write_understanding(clip_dir, ends, tokens, stride, hidden_size=understanding.hidden_size)


def cache_emotion(clip_dir: str | Path, reasoner, stride: int = DEFAULT_EMOTION_STRIDE) -> Path:
    """Write ``emotion.json`` (see the module docstring): the reasoner's text at every reasoning frame ``k·stride − 1``
    of the conversation inside the clip, on the dialogue up to that frame (`echo.emotion.reason_emotion`, what the
    session computes); a reasoning frame before anyone spoke has no window (``default_emotion`` then applies on both
    sides). A file of an older echo-prep or of another stride is replaced, its stale ``emotion_embeds.safetensors``
    removed."""

    clip_dir = Path(clip_dir)
    path = clip_dir / clip_format.EMOTION
    if path.exists():
        try:
            if clip_format.read_emotion_stride(clip_dir) == stride:
                return path
        except clip_format.ClipFormatError:
            pass  # an older echo-prep's windows: replaced below
        (clip_dir / clip_format.EMOTION_EMBEDS).unlink(missing_ok=True)  # embeds of the replaced texts
    record = clip_format.read_clip(clip_dir)
    history = clip_format.read_transcript(clip_dir)["segments"]  # seconds from the clip's first frame
    windows = []
    for end_frame in omni_entry_ends(record, stride):
        text = reason_emotion(reasoner, history, end_frame)
        if text is not None:
            windows.append({"end_frame": end_frame, "text": text})
    return clip_format.write_emotion_windows(clip_dir, windows, stride)


def cache_emotion_embeds(clip_dir: str | Path, encoder, default_emotion: str = "neutral") -> Path:
    """Write ``emotion_embeds.safetensors`` (see the module docstring) with an `EmotionTextEncoder`."""
    clip_dir = Path(clip_dir)
    path = clip_dir / clip_format.EMOTION_EMBEDS
    if path.exists():
        return path
    texts = clip_format.emotion_texts(clip_dir, default_emotion)
    hidden, mask = encoder.encode(texts, return_mask=True)  # N, L_txt, D and N, L_txt
    lengths = mask.sum(dim=1).long().cpu()
    longest = max(int(lengths.max()), 1)
    return clip_format.write_emotion_embeds(clip_dir, texts, hidden[:, :longest].cpu(), lengths, hidden.shape[1])


@torch.no_grad()
def cache_user_tokens(clip_dir: str | Path, vae, user_video_size: int = 64, chunk_frames: int = 1024) -> Path:
    """Write ``user_tokens.safetensors`` (see the module docstring); returns its path.

    The frames are read and encoded ``chunk_frames`` at a time (a multiple of `encode_user_video`'s 64-frame VAE
    batches, so the result is the same as one call on the whole clip) to bound the memory of long clips.
    """

    if chunk_frames < 64 or chunk_frames % 64:
        raise ValueError(f"`chunk_frames` is {chunk_frames}, expected a positive multiple of 64.")
    clip_dir = Path(clip_dir)
    path = clip_dir / clip_format.USER_TOKENS
    if path.exists():
        return path
    record = clip_format.read_clip(clip_dir)
    if record.size is None:
        raise clip_format.ClipFormatError(clip_dir / clip_format.META, "has no 'size' key")
    tokens, masks = [], []
    for start in range(0, record.num_frames, chunk_frames):
        stop = min(start + chunk_frames, record.num_frames)
        frames, face_mask = read_user_frames(clip_dir, start, stop, user_video_size, record.size)
        chunk_tokens, chunk_mask = encode_user_video(vae, frames[None], face_mask[None])  # 1, n, C, h, w and 1, n, h, w
        tokens.append(chunk_tokens[0].float().cpu())
        masks.append(chunk_mask[0].float().cpu())
    return clip_format.write_user_tokens(clip_dir, torch.cat(tokens), torch.cat(masks), user_video_size)


def _text_encoder(options):

    key = ("text_encoder", options.text_encoder, options.text_encoder_dtype, options.device)
    if key not in _LOADED:
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if options.text_encoder_dtype not in dtypes:
            raise ValueError(
                f"`text_encoder_dtype` is {options.text_encoder_dtype!r}, expected one of {sorted(dtypes)}."
            )
        encoder = EmotionTextEncoder.from_pretrained(
            options.text_encoder, torch_dtype=dtypes[options.text_encoder_dtype]
        )
        # Training's `echo.encoding.PromptEncoder` pads to min(data.max_sequence_length (512 by default), the tokenizer's
        # model_max_length): the cache must match it.
        encoder.max_length = min(int(encoder.tokenizer.model_max_length), 512)
        encoder.text_encoder.to(options.device)
        _LOADED[key] = encoder
    return _LOADED[key]


def run_stage(stage: str, clip_dir: str | Path, options) -> Path:
    """Run one cache ``stage`` on a finished clip folder, loading its model once per process."""
    with torch_threads(options.threads):
        return _run_stage(stage, clip_dir, options)


def _run_stage(stage: str, clip_dir: str | Path, options) -> Path:
    if stage == "omni":
        if options.omni_model is None:
            raise ValueError("Stage 'omni' needs `--omni-model`, a Qwen2.5-Omni / Qwen3-Omni folder.")
        key = ("omni", options.omni_model, options.device)
        if key not in _LOADED:
            _LOADED[key] = OmniUnderstanding.from_pretrained(options.omni_model, device=options.device)
        return cache_omni(clip_dir, _LOADED[key], options.omni_stride)
    if stage == "emotion":
        if options.emotion_model is None:
            raise ValueError("Stage 'emotion' needs `--emotion-model`, a causal-LM folder or an http(s) endpoint.")
        key = ("emotion", options.emotion_model, options.device)
        if key not in _LOADED:
            if str(options.emotion_model).startswith(("http://", "https://")):
                reasoner = EmotionReasoner(
                    backend="openai",
                    model=options.emotion_served_model,
                    base_url=options.emotion_model,
                    on_error="raise",
                )
            else:
                reasoner = EmotionReasoner(
                    backend="transformers", model=options.emotion_model, device=options.device, on_error="raise"
                )
            _LOADED[key] = reasoner
        return cache_emotion(clip_dir, _LOADED[key], options.emotion_stride)
    if stage == "emotion_embeds":
        if options.text_encoder is None:
            raise ValueError("Stage 'emotion_embeds' needs `--text-encoder`, a T5/UMT5 encoder or pipeline folder.")
        return cache_emotion_embeds(clip_dir, _text_encoder(options), options.default_emotion)
    if stage == "user_tokens":
        if options.vae is None:
            raise ValueError("Stage 'user_tokens' needs `--vae`, a Wan VAE folder or a pipeline folder with vae/.")
        return cache_user_tokens(clip_dir, _vae(options), options.user_video_size)
    raise ValueError(f"`stage` is {stage!r}, expected one of {CACHE_STAGES}.")
