"""Every encoding that training, data-prep caches, validation and `EchoPipeline` share, written once.

Training and inference must build the generator's and the LCU's inputs identically, or a trained model sees at
inference conditions it never saw in training. Each function here is the only implementation of its encoding:

- `normalize_latents`, `encode_latents`, `decode_latents`: VAE encode / decode with Wan's latent normalisation;
- `frames_to_tensor`: uint8 frames → `(T, 3, size, size)` in [−1, 1] (antialiased resize), for the avatar's frames
  and reference image and the user's frames;
- `prepare_user_video`, `encode_user_video`: the user's frames and face masks, then the LCU's per-frame video tokens;
- `PromptEncoder`: the emotion text embedding (Wan's prompt encoding), its length clamp and a per-text cache;
- `detect_face_landmarks`: MediaPipe face-mesh landmarks; `echo.masks.reference_token_masks`: SDCM's token masks;
- `chunk_condition`: a chunk's condition, built as Wan I2V builds its condition (the reference image in every
  chunk, plus the motion frames of a continuation chunk, Eq. 1; layout in `echo.conditioning`);
- `encode_reference_image`: the CLIP image tokens of the reference that an I2V base (Wan2.1-I2V) reads in its text
  cross-attention.

Things the two sides legitimately do differently stay outside: the pipeline's motion frames are its own generated
frames, training's are the window's ground truth; both go through `chunk_condition`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .conditioning import build_condition, condition_video
from .devices import execution_device
from .emotion import EmotionTextEncoder
from .faces import MediaPipeGraph
from .masks import NUM_LANDMARKS, rasterize_masks


def normalize_latents(vae, latents: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Wan's latent normalisation ``(z − latents_mean)·(1 / latents_std)`` (``inverse=True``:
    ``z / (1 / latents_std) + latents_mean``), written as diffusers' Wan pipelines write it (the reciprocal taken in
    float32, then cast), so that the results are bit-identical to theirs.

    Args:
        vae (`AutoencoderKLWan`): supplies ``config.latents_mean`` / ``config.latents_std`` (``z_dim`` values each).
        latents (`torch.Tensor` of shape `(B, z_dim, F, h, w)`).
    """
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = (1.0 / torch.tensor(vae.config.latents_std).view(shape)).to(latents.device, latents.dtype)
    return latents / inv_std + mean if inverse else (latents - mean) * inv_std


def encode_user_video(
    vae, user_video: torch.Tensor, user_face_mask: torch.Tensor, batch_frames: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The LCU's per-frame user video tokens: every frame encoded alone by the VAE (a one-frame video, distribution
    mode, Wan-normalised), and the face mask reduced to the latent grid with an any-pixel rule.

    Every VAE call gets exactly ``batch_frames`` frames in a freshly allocated batch (the last one padded with zero
    frames that are dropped): convolution kernels round differently for different batch sizes and buffer alignments,
    so with a fixed batch a frame's tokens do not depend on how many frames are encoded with it. The data-prep cache (whole clip), the training step (a window's
    history) and the pipeline (the conversation so far) therefore give every frame bit-identical tokens.

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
    if (
        user_video.ndim != 5
        or user_video.shape[2] != 3
        or user_video.shape[-1] % factor
        or user_video.shape[-2] % factor
    ):
        raise ValueError(
            f"`user_video` has shape {tuple(user_video.shape)}, expected (B, T, 3, H_u, W_u) with H_u, W_u multiples "
            f"of {factor}."
        )
    if tuple(user_face_mask.shape) != (*user_video.shape[:2], *user_video.shape[3:]):
        raise ValueError(
            f"`user_face_mask` has shape {tuple(user_face_mask.shape)}, expected "
            f"{(*user_video.shape[:2], *user_video.shape[3:])}."
        )
    if batch_frames < 1:
        raise ValueError(f"`batch_frames` is {batch_frames}, expected at least 1.")
    batch_size, num_frames = user_video.shape[:2]
    frames = user_video.reshape(batch_size * num_frames, 3, 1, *user_video.shape[3:])
    tokens = []
    for chunk in frames.split(batch_frames):
        count = chunk.shape[0]
        # A fixed batch size in a fresh buffer (zero frames pad the last batch): the same kernels and the same memory
        # alignment, hence the same rounding, for every frame wherever it sits in the video.
        batch = frames.new_zeros(batch_frames, *chunk.shape[1:])
        batch[:count] = chunk
        latents = vae.encode(batch.to(execution_device(vae), vae.dtype)).latent_dist.mode()[:count]  # n, z, 1, h, w
        tokens.append(normalize_latents(vae, latents)[:, :, 0])
    tokens = torch.cat(tokens).reshape(batch_size, num_frames, vae.config.z_dim, *tokens[0].shape[-2:])
    mask = F.max_pool2d(user_face_mask.float().flatten(0, 1)[:, None], factor)[:, 0]
    return tokens, mask.reshape(batch_size, num_frames, *mask.shape[-2:]).to(tokens.device)


def prepare_user_video(frames: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The user's frames as the LCU's visual branch reads them, before `encode_user_video`.

    Args:
        frames (`np.ndarray` of shape `(T, H, W, 3)`): uint8 RGB frames.
        landmarks (`np.ndarray` of shape `(T, 478, 2)`): face-mesh points in pixels of ``frames`` (NaN rows: no face).
        size (`int`): square side ``h_u = w_u`` (``EchoSettings.user_video_size``), a multiple of the VAE's factor.

    Returns:
        `(video, face_mask)`: `(T, 3, size, size)` float in [−1, 1] (`frames_to_tensor`) and `(T, size, size)` float
        {0, 1}: the whole face, lips included (the lip and face regions of `echo.masks.rasterize_masks`).
    """

    frames = np.asarray(frames)
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"`frames` has shape {frames.shape}, expected (T, H, W, 3) uint8 RGB.")
    if landmarks.shape != (len(frames), NUM_LANDMARKS, 2):
        raise ValueError(
            f"`landmarks` has shape {landmarks.shape}, expected ({len(frames)}, {NUM_LANDMARKS}, 2): one face mesh per "
            "frame, in pixels of the frames."
        )
    lip, face = rasterize_masks(landmarks, size, size, source_size=frames.shape[1:3])
    return frames_to_tensor(frames, size), torch.from_numpy(lip | face).float()


@torch.no_grad()
def encode_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """`(B, 3, T, H, W)` frames in [−1, 1] → normalised latents `(B, z_dim, (T − 1)/4 + 1, H/8, W/8)` float32
    (the posterior mode, ``(z − latents_mean) / latents_std`` as in Wan)."""
    latents = vae.encode(video.to(execution_device(vae), vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, latents.float())


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents `(B, z_dim, F, h, w)` → frames `(B, 3, 4(F − 1) + 1, 8h, 8w)` in [−1, 1]."""
    latents = normalize_latents(vae, latents.to(execution_device(vae), vae.dtype), inverse=True)
    return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)


@torch.no_grad()
def chunk_condition(
    vae, reference: torch.Tensor, motion_video: torch.Tensor | None, num_latent_frames: int
) -> torch.Tensor:
    r"""The condition of one chunk (Eq. 1), built as Wan I2V builds its condition and laid out by
    `echo.conditioning.build_condition`: the given frames (the reference image in a first chunk, the motion frames in
    a continuation chunk) followed by zero pixel frames up to the chunk's length are VAE-encoded as one video and
    normalised (`echo.conditioning.condition_video`, `encode_latents`); the reference image, encoded alone, fills the
    reference plane. The training step and `EchoPipeline` (its session) both call this function.

    Args:
        vae (`AutoencoderKLWan`): the generator's VAE.
        reference (`torch.Tensor` of shape `(B, 3, H, W)`): the reference image in [−1, 1].
        motion_video (`torch.Tensor` of shape `(B, 3, T_m, H, W)`, *optional*): in [−1, 1], the ``T_m = 4(m − 1) + 1``
            frames a continuation chunk shares with the previous one (the pipeline: the previous chunk's last
            generated frames; training: the window's first ground-truth frames). `None` for a first chunk.
        num_latent_frames (`int`): F, the chunk's latent frames (``4(F − 1) + 1`` video frames).

    Returns:
        `torch.Tensor` of shape `(B, 4 + 2·z_dim, F, H/8, W/8)` float32: ``[mask, given latents, reference plane]``.
    """

    if reference.ndim != 4 or reference.shape[1] != 3:
        raise ValueError(f"`reference` has shape {tuple(reference.shape)}, expected (B, 3, H, W) in [-1, 1].")
    if motion_video is not None and (
        motion_video.ndim != 5
        or motion_video.shape[:2] != reference.shape[:2]
        or motion_video.shape[3:] != reference.shape[2:]
    ):
        raise ValueError(
            f"`motion_video` has shape {tuple(motion_video.shape)}, expected ({reference.shape[0]}, 3, T_m, "
            f"{reference.shape[2]}, {reference.shape[3]}) like `reference` {tuple(reference.shape)}."
        )
    factor = vae.config.scale_factor_temporal
    num_frames = factor * (num_latent_frames - 1) + 1
    given = reference[:, :, None] if motion_video is None else motion_video  # B, 3, T_g, H, W
    if (given.shape[2] - 1) % factor or given.shape[2] > num_frames:
        raise ValueError(
            f"`motion_video` has {given.shape[2]} frames, expected {factor}(m − 1) + 1 frames, at most the chunk's "
            f"{num_frames} frames (num_latent_frames = {num_latent_frames})."
        )
    reference_latents = encode_latents(vae, reference[:, :, None])  # B, z, 1, h, w
    given_latents = encode_latents(vae, condition_video(given, num_frames))  # B, z, F, h, w
    num_given = (given.shape[2] - 1) // factor + 1
    return build_condition(reference_latents, given_latents, num_given, vae_scale_factor_temporal=factor)


@torch.no_grad()
def encode_reference_image(image_encoder, image_processor, reference: torch.Tensor) -> torch.Tensor:
    r"""The CLIP image tokens of the reference image, as Wan2.1-I2V encodes its image (diffusers'
    `WanImageToVideoPipeline.encode_image`): the image processor's pixel values through the vision encoder, whose
    penultimate hidden state is the transformer's ``encoder_hidden_states_image``.

    Both sides encode the reference as the generator sees it, at the video size (the training window's reference
    frame; the pipeline's reference resized to ``height`` × ``width``, as diffusers' Wan I2V example resizes its image
    before the call), quantised to uint8 like an image file, so that the processor's own defaults (resize, crop,
    rescale, CLIP normalisation) apply to it as to the PIL image Wan is given.

    Args:
        image_encoder (`transformers.CLIPVisionModel`): the I2V base's image encoder (``image_encoder`` subfolder).
        image_processor (`transformers.CLIPImageProcessor`): its processor (``image_processor`` subfolder).
        reference (`torch.Tensor` of shape `(B, 3, H, W)`): the reference image in [−1, 1].

    Returns:
        `torch.Tensor` of shape `(B, N_img, hidden_size)` (257 × 1280 for Wan2.1-I2V's ViT-H/14 at 224²), in the
        encoder's dtype on its device.
    """
    if reference.ndim != 4 or reference.shape[1] != 3:
        raise ValueError(f"`reference` has shape {tuple(reference.shape)}, expected (B, 3, H, W) in [-1, 1].")
    pixels = ((reference.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    images = list(pixels.permute(0, 2, 3, 1).numpy())  # B × (H, W, 3) uint8, as a PIL image reads
    inputs = image_processor(images=images, return_tensors="pt").to(execution_device(image_encoder))
    inputs["pixel_values"] = inputs["pixel_values"].to(image_encoder.dtype)
    return image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]


def frames_to_tensor(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 → `(T, 3, h, w)` float in [−1, 1], resized (bilinear, antialiased) when needed."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    video = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
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
    options = dict(static_image_mode=True, max_num_faces=1, refine_landmarks=True)
    with MediaPipeGraph(lambda: mp.solutions.face_mesh.FaceMesh(**options)) as mesh:  # start-up noise dropped
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
