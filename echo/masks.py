"""Lip and face masks from MediaPipe face-mesh landmarks, at any resolution and at the generator's token grid.

Prepared clips store the 478 face-mesh landmarks of every cropped avatar frame (``avatar_landmarks.npy``, T × 478 × 2,
in pixels of the saved crop). Masks are rasterised from them on demand, so one prepared set serves any training
resolution. The index rings below are MediaPipe's face-mesh topology (``FACEMESH_LIPS`` outer ring and
``FACEMESH_FACE_OVAL``), written out so that `echo` does not need MediaPipe installed.

Conventions:
- ``lip``: inside the outer lip contour, dilated by ``lip_dilation`` (a fraction of the face height) so that the
  region covers the moving mouth, not just the lips at rest.
- ``face``: inside the face oval *and not lip*; the two masks never overlap.
- At the token grid (latent frames × H' × W'), a token is lip if any pixel it covers, in any video frame it covers,
  is lip; a token is face if any covered pixel is face and the token is not lip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .chunks import check_frame_count

NUM_LANDMARKS = 478

# Outer lip contour, in ring order.
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
# Face oval, in ring order (starting at the forehead, going clockwise in image space).
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.ndim == 2:
        landmarks = landmarks[None]
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(
            f"`landmarks` has shape {tuple(landmarks.shape)}, expected (T, {NUM_LANDMARKS}, 2) face-mesh points in "
            "pixels of the frame they were detected on."
        )
    return landmarks


def rasterize_masks(
    landmarks: np.ndarray,
    height: int,
    width: int,
    source_size: tuple[int, int] | None = None,
    lip_dilation: float = 0.04,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise lip and face masks for every frame.

    Args:
        landmarks (`np.ndarray` of shape `(T, 478, 2)` or `(478, 2)`): face-mesh (x, y) points in pixels of a frame
            of size ``source_size``; frames without a face may hold NaN and give empty masks.
        height (`int`), width (`int`): the output resolution.
        source_size (`tuple[int, int]`, *optional*): (height, width) of the frames the landmarks refer to; defaults
            to the output size.
        lip_dilation (`float`, defaults to 0.04): lip-mask dilation radius as a fraction of the face-oval height.

    Returns:
        `(lip, face)`: two boolean arrays of shape `(T, height, width)`; ``face`` excludes ``lip``.
    """
    landmarks = _check_landmarks(landmarks)
    src_h, src_w = source_size if source_size is not None else (height, width)
    scale = np.array([width / src_w, height / src_h], dtype=np.float32)
    lips = np.zeros((len(landmarks), height, width), dtype=bool)
    faces = np.zeros_like(lips)
    for t, points in enumerate(landmarks):
        if not np.isfinite(points).all():
            continue
        points = points * scale
        oval = [tuple(p) for p in points[list(FACE_OVAL)]]
        lip = [tuple(p) for p in points[list(LIPS_OUTER)]]
        face_height = float(points[list(FACE_OVAL), 1].max() - points[list(FACE_OVAL), 1].min())
        radius = max(0, int(round(lip_dilation * face_height)))

        face_img = Image.new("L", (width, height), 0)
        ImageDraw.Draw(face_img).polygon(oval, fill=1)
        lip_img = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(lip_img)
        draw.polygon(lip, fill=1)
        if radius > 0:
            draw.line(lip + lip[:1], fill=1, width=2 * radius, joint="curve")
        lips[t] = np.asarray(lip_img, dtype=bool)
        faces[t] = np.asarray(face_img, dtype=bool) & ~lips[t]
    return lips, faces


def masks_to_token_grid(
    mask: torch.Tensor,
    patch_size: tuple[int, int] = (16, 16),
    temporal_compression: int = 4,
) -> torch.Tensor:
    """Reduce per-frame pixel masks to the generator's token grid with an any-pixel rule.

    Args:
        mask (`torch.Tensor` of shape `(B, T, H, W)` or `(T, H, W)`, bool or {0, 1}): one mask per video frame,
            T = 4k + 1 for the default temporal compression.
        patch_size (`tuple[int, int]`, defaults to `(16, 16)`): pixels per token in each direction, i.e. the VAE's
            spatial compression times the transformer's spatial patch (8 × 2 for Wan).
        temporal_compression (`int`, defaults to 4): video frames per latent frame; latent frame 0 covers video frame
            0 alone, latent frame j ≥ 1 covers video frames 4j − 3 … 4j.

    Returns:
        `torch.Tensor` of shape `(B, k + 1, H // ph, W // pw)`, float {0, 1}.
    """
    squeeze = mask.ndim == 3
    if squeeze:
        mask = mask[None]
    if mask.ndim != 4:
        raise ValueError(f"`mask` has shape {tuple(mask.shape)}, expected (B, T, H, W) or (T, H, W).")
    batch_size, num_frames, height, width = mask.shape
    ph, pw = patch_size
    check_frame_count(num_frames, "`mask`", temporal_compression)
    if height % ph or width % pw:
        raise ValueError(f"`mask` has spatial size {(height, width)}, expected multiples of the patch {patch_size}.")
    mask = mask.float()
    # Latent frame 0 covers frame 0; pad it to a full group so every latent frame reduces over `temporal_compression`.
    mask = torch.cat([mask[:, :1].expand(-1, temporal_compression - 1, -1, -1), mask], dim=1)
    mask = mask.reshape(batch_size, -1, temporal_compression, height, width).amax(dim=2)  # B, k+1, H, W
    mask = F.max_pool2d(mask, kernel_size=(ph, pw), stride=(ph, pw))  # B, k+1, H', W'
    return mask[0] if squeeze else mask


def token_masks_from_landmarks(
    landmarks: np.ndarray,
    height: int,
    width: int,
    source_size: tuple[int, int] | None = None,
    patch_size: tuple[int, int] = (16, 16),
    temporal_compression: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks (T, 478, 2) → token-grid `(lip, face)` masks of shape `(k + 1, H', W')` with face excluding lip."""
    lip, face = rasterize_masks(landmarks, height, width, source_size=source_size)
    lip_tok = masks_to_token_grid(torch.from_numpy(lip), patch_size, temporal_compression)
    face_tok = masks_to_token_grid(torch.from_numpy(face), patch_size, temporal_compression)
    return lip_tok, face_tok * (1 - lip_tok)


def reference_token_masks(
    landmarks: np.ndarray,
    height: int,
    width: int,
    num_latent_frames: int,
    source_size: tuple[int, int] | None = None,
    patch_size: tuple[int, int] = (16, 16),
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDCM's token masks of a chunk, from the reference image's landmarks, held for every latent frame.

    Training and inference use this one rule: the generator never sees masks of the frames it is generating (the
    ground truth's landmarks would tell it where the target face will be, which the pipeline cannot know), only the
    reference's face and lip regions.

    Args:
        landmarks (`np.ndarray` of shape `(478, 2)`): pixels of an image of ``source_size`` (default ``(height, width)``).
        height (`int`), width (`int`): the generated frames' size.
        num_latent_frames (`int`): F.
        patch_size (`tuple[int, int]`, defaults to `(16, 16)`): pixels per token (VAE stride × transformer patch).

    Returns:
        `(lip, face)`: float {0, 1} tensors `(F, H', W')`, face excluding lip.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"`landmarks` has shape {landmarks.shape}, expected ({NUM_LANDMARKS}, 2).")
    lip, face = token_masks_from_landmarks(
        landmarks[None], height, width, source_size=source_size, patch_size=patch_size, temporal_compression=1
    )  # 1, H', W'
    return lip.expand(num_latent_frames, -1, -1).contiguous(), face.expand(num_latent_frames, -1, -1).contiguous()
