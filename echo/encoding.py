"""Every encoding that training, data-prep caches, validation and `EchoPipeline` share, written once.

Training and inference must build the generator's and the LCU's inputs identically, or a trained model sees at
inference conditions it never saw in training. Each function here is the only implementation of its encoding:

- `normalize_latents`, `encode_latents`, `decode_latents`: VAE encode / decode with Wan's latent normalisation;
- `frames_to_tensor`: uint8 frames → `(T, 3, size, size)` in [−1, 1] (antialiased resize);
- `encode_user_video`: the LCU's per-frame user video tokens with their face masks;
- `PromptEncoder`: the emotion text embedding (Wan's prompt encoding), its length clamp and a per-text cache;
- `detect_face_landmarks`: MediaPipe face-mesh landmarks; `echo.masks.reference_token_masks`: SDCM's token masks;
- `chunk_condition`: a chunk's condition (reference image + motion frames, Eq. 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .masks import NUM_LANDMARKS


def normalize_latents(vae, latents: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Wan's latent normalisation ``(z − latents_mean) / latents_std`` (``inverse=True``: ``z·std + mean``).

    Args:
        vae (`AutoencoderKLWan`): supplies ``config.latents_mean`` / ``config.latents_std`` (``z_dim`` values each).
        latents (`torch.Tensor` of shape `(B, z_dim, F, h, w)`).
    """
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents * std + mean if inverse else (latents - mean) / std


def encode_user_video(
    vae, user_video: torch.Tensor, user_face_mask: torch.Tensor, batch_frames: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The LCU's per-frame user video tokens: every frame encoded alone by the VAE (a one-frame video, distribution
    mode, Wan-normalised), and the face mask reduced to the latent grid with an any-pixel rule.

    Args:
        vae (`AutoencoderKLWan`): the generator's VAE (``video_channels`` of the LCU = ``vae.config.z_dim``).
        user_video (`torch.Tensor` of shape `(B, T, 3, H_u, W_u)`): frames in [−1, 1] (``H_u``, ``W_u`` multiples of
            the VAE's spatial factor).
        user_face_mask (`torch.Tensor` of shape `(B, T, H_u, W_u)`): {0, 1} face pixels.
        batch_frames (`int`, defaults to 64): frames per VAE call.

    Returns:
        `(tokens, mask)`: `(B, T, z_dim, H_u/8, W_u/8)` in the VAE's dtype and `(B, T, H_u/8, W_u/8)` float {0, 1}.
    """
    factor = vae.config.scale_factor_spatial
    if user_video.ndim != 5 or user_video.shape[2] != 3 or user_video.shape[-1] % factor or user_video.shape[-2] % factor:
        raise ValueError(
            f"`user_video` has shape {tuple(user_video.shape)}, expected (B, T, 3, H_u, W_u) with H_u, W_u multiples "
            f"of {factor}."
        )
    if tuple(user_face_mask.shape) != (*user_video.shape[:2], *user_video.shape[3:]):
        raise ValueError(
            f"`user_face_mask` has shape {tuple(user_face_mask.shape)}, expected "
            f"{(*user_video.shape[:2], *user_video.shape[3:])}."
        )
    batch_size, num_frames = user_video.shape[:2]
    frames = user_video.reshape(batch_size * num_frames, 3, 1, *user_video.shape[3:])
    tokens = []
    for chunk in frames.split(batch_frames):
        latents = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mode()  # n, z, 1, h, w
        tokens.append(normalize_latents(vae, latents)[:, :, 0])
    tokens = torch.cat(tokens).reshape(batch_size, num_frames, vae.config.z_dim, *tokens[0].shape[-2:])
    mask = torch.nn.functional.max_pool2d(user_face_mask.float().flatten(0, 1)[:, None], factor)[:, 0]
    return tokens, mask.reshape(batch_size, num_frames, *mask.shape[-2:]).to(tokens.device)

@torch.no_grad()
def encode_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """`(B, 3, T, H, W)` frames in [−1, 1] → normalised latents `(B, z_dim, (T − 1)/4 + 1, H/8, W/8)` float32
    (the posterior mode, ``(z − latents_mean) / latents_std`` as in Wan)."""
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, latents.float())


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents `(B, z_dim, F, h, w)` → frames `(B, 3, 4(F − 1) + 1, 8h, 8w)` in [−1, 1]."""
    latents = normalize_latents(vae, latents.to(vae.device, vae.dtype), inverse=True)
    return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)


def frames_to_tensor(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 → `(T, 3, h, w)` float in [−1, 1], resized (bilinear, antialiased) when needed."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tuple(video.shape[-2:]) != size:
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    return video.clamp(-1, 1)


def detect_face_landmarks(images: np.ndarray) -> np.ndarray:
    r"""MediaPipe face-mesh landmarks (478 points, refined) of the most prominent face, in pixels.

    Args:
        images (`np.ndarray`): one RGB uint8 image `(H, W, 3)` or frames `(T, H, W, 3)`.

    Returns:
        `np.ndarray` float32: `(478, 2)` for one image (a `ValueError` when no face is found), or `(T, 478, 2)` for
        frames, NaN on frames without a face (as in prepared data, they give empty masks).
    """
    try:
        import mediapipe as mp
    except ImportError as error:
        raise ImportError(
            "Detecting faces needs MediaPipe (`pip install 'echo-ihg[prep]'`); alternatively pass "
            "`reference_landmarks` (478, 2) / `user_landmarks` (T, 478, 2), or `lip_mask` / `face_mask`."
        ) from error
    images = np.asarray(images)
    single = images.ndim == 3
    frames = images[None] if single else images
    if frames.ndim != 4 or frames.shape[-1] < 3:
        raise ValueError(f"`images` has shape {images.shape}, expected (H, W, 3) or (T, H, W, 3) RGB.")
    height, width = frames.shape[1:3]
    landmarks = np.full((len(frames), NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as mesh:
        for t, frame in enumerate(frames):
            result = mesh.process(np.ascontiguousarray(frame[..., :3].astype(np.uint8)))
            if result.multi_face_landmarks:
                points = result.multi_face_landmarks[0].landmark
                landmarks[t] = [[p.x * width, p.y * height] for p in points]
    if single:
        if np.isnan(landmarks[0]).any():
            raise ValueError(
                "MediaPipe found no face in `reference_image`; pass `reference_landmarks` or `lip_mask` / `face_mask`."
            )
        return landmarks[0]
    return landmarks


class PromptEncoder:
    """Emotion text → `(B, L, text_dim)` with `echo.emotion.EmotionTextEncoder` (Wan's prompt encoding), cached per
    distinct text; ``L = min(max_sequence_length, tokenizer.model_max_length)``."""

    def __init__(self, text_encoder, tokenizer, max_sequence_length: int = 512):
        from .emotion import EmotionTextEncoder

        self.max_length = min(int(max_sequence_length), int(tokenizer.model_max_length))
        self.encoder = EmotionTextEncoder(text_encoder, tokenizer, max_length=self.max_length)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: str | list[str], device=None, dtype=None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, state in zip(missing, self.encoder.encode(missing)):
                self.cache[text] = state.detach()
        return torch.stack([self.cache[t] for t in texts]).to(device=device, dtype=dtype)
