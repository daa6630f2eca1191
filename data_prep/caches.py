"""Optional caches added to finished clip folders
(``echo-prep --stages clips,latents,omni,emotion,emotion_embeds,user_tokens``).

Each stage reads a complete clip folder, skips it when its output exists, and writes its file atomically
(temporary name, then `os.replace`):

- ``latents`` → ``avatar_latents.safetensors``, key ``"latents"``, `(16, F_all, h, w)` float32: the posterior mode of
  the Wan VAE (``AutoencoderKLWan`` from ``--vae``, a VAE folder or a pipeline folder with a ``vae/`` subfolder) for
  the first ``F = 4(F_all − 1) + 1`` frames of ``avatar.mp4``, *not* normalised (training applies
  ``vae.config.latents_mean/std``).
- ``omni`` → ``user_omni.safetensors``, key ``"hidden_states"``, `(N_s, D_s)`: `echo.understanding.OmniUnderstanding`
  (``--omni-model``) on the user's frames sampled at ``omni_fps`` (2 fps) and the user's audio.
- ``emotion`` → ``emotion.json`` ``{"windows": [{"end_frame", "text"}]}``: `echo.emotion.EmotionReasoner` on the clip's
  dialogue history (``transcript.json``) at the end of every window of ``emotion_window_frames`` frames and at the
  clip's last frame. ``--emotion-model`` is a local causal-LM folder, or an OpenAI-compatible endpoint
  ``http(s)://host:port/v1`` whose served model name is ``--emotion-served-model``.
- ``emotion_embeds`` → ``emotion_embeds.safetensors``: `echo.emotion.EmotionTextEncoder` (``--text-encoder``, in
  ``--text-encoder-dtype``) on every distinct text the dataset can give the clip: the empty prompt ``""`` (training
  with ``ablation.use_emotion: false``), ``--default-emotion`` (clips without ``emotion.json``) and the texts of
  ``emotion.json``. Tensors ``"embeds"`` `(N, L_max, D)` (each text's hidden states, zero past its own tokens,
  ``L_max`` the longest text of the clip) and ``"lengths"`` `(N,)`; metadata ``"texts"`` (JSON list, row order) and
  ``"max_length"`` (the encoder's padded length L_txt, ``min(tokenizer.model_max_length, 512)`` as in training).
  `echo.data.ConversationDataset(use_cached_emotion_embeds=True)` pads a row back to ``max_length`` with zeros,
  which is exactly the encoder's output for that text.
- ``user_tokens`` → ``user_tokens.safetensors``: `echo.components.encode_user_video` (the Wan VAE of ``--vae``) on
  every user frame of the clip, read and resized to ``--user-video-size``² exactly as the dataset reads them
  (`echo.data.read_user_frames`). Tensors ``"tokens"`` `(T, z_dim, h, w)` (normalised per-frame latents, float32)
  and ``"face_mask"`` `(T, h, w)` (the face mask at the token grid), ``T = meta["num_frames"]``; metadata
  ``"user_video_size"``. `echo.data.ConversationDataset(use_cached_user_tokens=True)` slices the window's history
  from it instead of reading and encoding the frames during training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data_prep.media import read_video, read_wav

_LOADED: dict = {}


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _vae(options):
    from diffusers import AutoencoderKLWan

    key = ("vae", options.vae, options.device)
    if key not in _LOADED:
        subfolder = "vae" if (Path(options.vae) / "vae" / "config.json").exists() else None
        vae = AutoencoderKLWan.from_pretrained(options.vae, subfolder=subfolder)
        _LOADED[key] = vae.to(options.device).eval()
    return _LOADED[key]


@torch.no_grad()
def cache_latents(clip_dir: str | Path, vae, temporal_compression: int = 4) -> Path:
    """Write ``avatar_latents.safetensors`` (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    clip_dir = Path(clip_dir)
    path = clip_dir / "avatar_latents.safetensors"
    if path.exists():
        return path
    frames = read_video(clip_dir / "avatar.mp4")
    usable = (len(frames) - 1) // temporal_compression * temporal_compression + 1
    video = torch.from_numpy(frames[:usable]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # 1, 3, F, H, W
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()[0]  # 16, F_all, h, w
    tmp = _atomic_path(path)
    save_file({"latents": latents.float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


def cache_omni(clip_dir: str | Path, understanding, omni_fps: float = 2.0) -> Path:
    """Write ``user_omni.safetensors`` with `OmniUnderstanding.cache` (frames at ``omni_fps``, all user audio)."""
    clip_dir = Path(clip_dir)
    path = clip_dir / "user_omni.safetensors"
    if path.exists():
        return path
    meta = json.loads((clip_dir / "meta.json").read_text())
    frames = read_video(clip_dir / "user.mp4")
    step = max(1, int(round(meta["fps"] / omni_fps)))
    audio, _ = read_wav(clip_dir / "user.wav")
    understanding.cache(clip_dir, frames=frames[::step], audio=audio)
    return path


def emotion_windows(num_frames: int, window_frames: int) -> list[int]:
    """End frames of the emotion windows: every ``window_frames`` frames and the clip's last frame."""
    ends = list(range(window_frames - 1, num_frames, window_frames))
    if not ends or ends[-1] != num_frames - 1:
        ends.append(num_frames - 1)
    return ends


def cache_emotion(clip_dir: str | Path, reasoner, window_frames: int = 81) -> Path:
    """Write ``emotion.json`` (see the module docstring); windows before anyone spoke get the neutral description."""
    from echo.emotion import format_history

    clip_dir = Path(clip_dir)
    path = clip_dir / "emotion.json"
    if path.exists():
        return path
    meta = json.loads((clip_dir / "meta.json").read_text())
    history = json.loads((clip_dir / "transcript.json").read_text())["segments"]
    windows = []
    for end_frame in emotion_windows(meta["num_frames"], window_frames):
        clip_end = (end_frame + 1) / meta["fps"]
        if format_history(history, clip_end, "avatar"):
            text = reasoner.describe(history, clip_end=clip_end, avatar_speaker="avatar")
        else:  # nothing said yet: the neutral state, not a backend failure
            text = reasoner.neutral_description
        windows.append({"end_frame": end_frame, "text": text})
    tmp = _atomic_path(path)
    tmp.write_text(json.dumps({"windows": windows}, indent=1))
    os.replace(tmp, path)
    return path


def emotion_texts(clip_dir: str | Path, default_emotion: str = "neutral") -> list[str]:
    """The distinct emotion texts a dataset window of the clip can use: ``""``, ``default_emotion``, then ``emotion.json``."""
    texts = ["", default_emotion]
    path = Path(clip_dir) / "emotion.json"
    if path.is_file():
        texts += [str(w["text"]) for w in json.loads(path.read_text()).get("windows", [])]
    return list(dict.fromkeys(texts))


def cache_emotion_embeds(clip_dir: str | Path, encoder, default_emotion: str = "neutral") -> Path:
    """Write ``emotion_embeds.safetensors`` (see the module docstring) with an `EmotionTextEncoder`."""
    from safetensors.torch import save_file

    clip_dir = Path(clip_dir)
    path = clip_dir / "emotion_embeds.safetensors"
    if path.exists():
        return path
    texts = emotion_texts(clip_dir, default_emotion)
    hidden, mask = encoder.encode(texts, return_mask=True)  # N, L_txt, D and N, L_txt
    lengths = mask.sum(dim=1).long().cpu()
    longest = max(int(lengths.max()), 1)
    tensors = {"embeds": hidden[:, :longest].cpu().contiguous(), "lengths": lengths}
    metadata = {"texts": json.dumps(texts), "max_length": str(hidden.shape[1])}
    tmp = _atomic_path(path)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def cache_user_tokens(clip_dir: str | Path, vae, user_video_size: int = 64, chunk_frames: int = 1024) -> Path:
    """Write ``user_tokens.safetensors`` (see the module docstring); returns its path.

    The frames are read and encoded ``chunk_frames`` at a time (a multiple of `encode_user_video`'s 64-frame VAE
    batches, so the result is the same as one call on the whole clip) to bound the memory of long clips.
    """
    from safetensors.torch import save_file

    from echo.encoding import encode_user_video
    from echo.data import read_user_frames

    if chunk_frames < 64 or chunk_frames % 64:
        raise ValueError(f"`chunk_frames` is {chunk_frames}, expected a positive multiple of 64.")
    clip_dir = Path(clip_dir)
    path = clip_dir / "user_tokens.safetensors"
    if path.exists():
        return path
    meta = json.loads((clip_dir / "meta.json").read_text())
    for key in ("num_frames", "size"):
        if key not in meta:
            raise ValueError(f"{str(clip_dir / 'meta.json')!r} has no {key!r} key.")
    num_frames, source_size = int(meta["num_frames"]), int(meta["size"])
    tokens, masks = [], []
    for start in range(0, num_frames, chunk_frames):
        stop = min(start + chunk_frames, num_frames)
        frames, face_mask = read_user_frames(clip_dir, start, stop, user_video_size, source_size)
        chunk_tokens, chunk_mask = encode_user_video(vae, frames[None], face_mask[None])  # 1, n, C, h, w and 1, n, h, w
        tokens.append(chunk_tokens[0].float().cpu())
        masks.append(chunk_mask[0].float().cpu())
    tensors = {"tokens": torch.cat(tokens).contiguous(), "face_mask": torch.cat(masks).contiguous()}
    tmp = _atomic_path(path)
    save_file(tensors, str(tmp), metadata={"user_video_size": str(user_video_size)})
    os.replace(tmp, path)
    return path


def _text_encoder(options):
    from echo.emotion import EmotionTextEncoder

    key = ("text_encoder", options.text_encoder, options.text_encoder_dtype, options.device)
    if key not in _LOADED:
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if options.text_encoder_dtype not in dtypes:
            raise ValueError(
                f"`text_encoder_dtype` is {options.text_encoder_dtype!r}, expected one of {sorted(dtypes)}."
            )
        encoder = EmotionTextEncoder.from_pretrained(options.text_encoder, torch_dtype=dtypes[options.text_encoder_dtype])
        # Training's `TextEmbedder` pads to min(tokenizer.model_max_length, 512): the cache must match it.
        encoder.max_length = min(int(encoder.tokenizer.model_max_length), 512)
        encoder.text_encoder.to(options.device)
        _LOADED[key] = encoder
    return _LOADED[key]


def run_stage(stage: str, clip_dir: str | Path, options) -> Path:
    """Run one cache ``stage`` on a finished clip folder, loading its model once per process."""
    from data_prep.stages import torch_threads

    with torch_threads(options.threads):
        return _run_stage(stage, clip_dir, options)


def _run_stage(stage: str, clip_dir: str | Path, options) -> Path:
    if stage == "latents":
        if options.vae is None:
            raise ValueError("Stage 'latents' needs `--vae`, an AutoencoderKLWan folder.")
        return cache_latents(clip_dir, _vae(options))
    if stage == "omni":
        if options.omni_model is None:
            raise ValueError("Stage 'omni' needs `--omni-model`, a Qwen2.5-Omni / Qwen3-Omni folder.")
        key = ("omni", options.omni_model, options.device)
        if key not in _LOADED:
            from echo.understanding import OmniUnderstanding

            _LOADED[key] = OmniUnderstanding.from_pretrained(options.omni_model, device=options.device)
        return cache_omni(clip_dir, _LOADED[key])
    if stage == "emotion":
        if options.emotion_model is None:
            raise ValueError("Stage 'emotion' needs `--emotion-model`, a causal-LM folder or an http(s) endpoint.")
        key = ("emotion", options.emotion_model, options.device)
        if key not in _LOADED:
            from echo.emotion import EmotionReasoner

            if str(options.emotion_model).startswith(("http://", "https://")):
                reasoner = EmotionReasoner(
                    backend="openai", model=options.emotion_served_model, base_url=options.emotion_model,
                    on_error="raise",
                )
            else:
                reasoner = EmotionReasoner(
                    backend="transformers", model=options.emotion_model, device=options.device, on_error="raise"
                )
            _LOADED[key] = reasoner
        return cache_emotion(clip_dir, _LOADED[key], options.emotion_window_frames)
    if stage == "emotion_embeds":
        if options.text_encoder is None:
            raise ValueError("Stage 'emotion_embeds' needs `--text-encoder`, a T5/UMT5 encoder or pipeline folder.")
        return cache_emotion_embeds(clip_dir, _text_encoder(options), options.default_emotion)
    if stage == "user_tokens":
        if options.vae is None:
            raise ValueError("Stage 'user_tokens' needs `--vae`, a Wan VAE folder or a pipeline folder with vae/.")
        return cache_user_tokens(clip_dir, _vae(options), options.user_video_size)
    raise ValueError(f"`stage` is {stage!r}, expected 'latents', 'omni', 'emotion', 'emotion_embeds' or 'user_tokens'.")

