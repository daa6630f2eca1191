"""Training objectives of ECHO beyond plain flow matching (paper Sec. 3.3, Eq. 12).

- `pixel_loss`: the stage-1 auxiliary reconstruction loss ``L_pixel``. The predicted clean latents ``x̂0`` of a
  random contiguous run of latent frames are decoded by the (frozen) VAE and compared with the ground-truth frames.
- `speech_weights`: the frame weights ``w(i)`` of Eq. 12 from the avatar audio's short-time RMS, normalised over the
  avatar's whole track (not per window).
- `latent_frame_weights`: maps per-video-frame weights to latent frames (the resolution of the generator features).
- `lip_loss_weights`: per-element weights of the flow-matching loss that count the lip region's latents more.
- `hfa_loss`: the stage-2 hierarchical feature alignment ``L_align`` (Eq. 12) between the adapted generator and the
  frozen stage-1 reference ``f_ref``.

Latent normalisation follows the Wan pipelines: the generator works on ``(z − mean) / std`` with ``mean`` and ``std``
read from ``vae.config.latents_mean`` / ``vae.config.latents_std`` (`echo.components.normalize_latents`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunks import check_frame_count
from .encoding import normalize_latents


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Generator-space latents `(B, 16, F, h, w)` → VAE latents ``z·std + mean`` (`normalize_latents` inverted)."""
    return normalize_latents(vae, latents, inverse=True)


def latent_to_video_frames(start: int, num_latent_frames: int, temporal_compression: int = 4) -> list[int]:
    """Video-frame indices that a causal VAE decodes from latent frames ``start … start + n − 1`` run on their own.

    Decoded on its own, the run's first latent frame gives one frame and every further latent frame gives
    ``temporal_compression`` frames (Wan's causal VAE). Latent frame ``j ≥ 1`` covers video frames ``4j − 3 … 4j``;
    the single frame decoded from the run's first latent frame is matched to the *last* video frame that latent
    frame covers (``4·start``; frame 0 for ``start = 0``), the frames after it to their own video frames.
    """
    first = temporal_compression * start
    return [first] + list(range(first + 1, first + 1 + temporal_compression * (num_latent_frames - 1)))


def pixel_loss(
    vae,
    pred_latents: torch.Tensor,
    video: torch.Tensor,
    num_latent_frames: int = 2,
    generator: torch.Generator | None = None,
    loss_type: str = "mse",
    start: int | None = None,
) -> torch.Tensor:
    """Stage-1 pixel-space reconstruction loss ``L_pixel`` on a random run of latent frames.

    Args:
        vae (`AutoencoderKLWan`): the frozen VAE; gradients flow through its decoder into ``pred_latents`` only.
        pred_latents (`torch.Tensor` of shape `(B, 16, F, h, w)`): predicted clean latents ``x̂0`` in the generator's
            normalised space (see `echo.flow_matching.predict_x0`).
        video (`torch.Tensor` of shape `(B, 3, T, H, W)`): ground-truth frames in [−1, 1], ``T = 4(F − 1) + 1``.
        num_latent_frames (`int`, defaults to 2): length of the decoded run (clamped to ``F``); the memory of the
            decoder's activations grows with it.
        generator (`torch.Generator`, *optional*): draws the run's start.
        loss_type (`str`, defaults to `"mse"`): `"mse"` or `"l1"`.
        start (`int`, *optional*): fixed start latent frame instead of a random one.

    Returns:
        A scalar tensor: the mean per-pixel error over the decoded frames (see `latent_to_video_frames` for the
        frame correspondence).
    """
    if pred_latents.ndim != 5:
        raise ValueError(f"`pred_latents` has shape {tuple(pred_latents.shape)}, expected (B, C, F, h, w).")
    if video.ndim != 5 or video.shape[0] != pred_latents.shape[0]:
        raise ValueError(f"`video` has shape {tuple(video.shape)}, expected (B={pred_latents.shape[0]}, 3, T, H, W).")
    num_frames = pred_latents.shape[2]
    if video.shape[2] != 4 * (num_frames - 1) + 1:
        raise ValueError(
            f"`video` has {video.shape[2]} frames, expected 4·(F − 1) + 1 = {4 * (num_frames - 1) + 1} for "
            f"`pred_latents` with F = {num_frames} latent frames."
        )
    if loss_type not in ("mse", "l1"):
        raise ValueError(f"`loss_type` is {loss_type!r}, expected 'mse' or 'l1'.")

    # 1. Pick the run of latent frames
    length = max(1, min(num_latent_frames, num_frames))
    if start is None:
        start = int(torch.randint(0, num_frames - length + 1, (1,), generator=generator).item())
    elif not 0 <= start <= num_frames - length:
        raise ValueError(f"`start` is {start}, expected 0 ≤ start ≤ {num_frames - length}.")

    # 2. Decode the run through the frozen VAE (gradients reach `pred_latents`)
    latents = denormalize_latents(vae, pred_latents[:, :, start : start + length])
    latents = latents.to(next(vae.parameters()).dtype)
    decoded = vae.decode(latents, return_dict=False)[0]  # B, 3, 1 + 4(length − 1), H, W

    # 3. Compare with the matching ground-truth frames
    index = torch.tensor(latent_to_video_frames(start, length), device=video.device)
    target = video.index_select(2, index).to(decoded.dtype)
    if decoded.shape != target.shape:
        raise ValueError(f"decoded frames have shape {tuple(decoded.shape)}, expected {tuple(target.shape)}.")
    if loss_type == "mse":
        return F.mse_loss(decoded.float(), target.float())
    return F.l1_loss(decoded.float(), target.float())


def speech_weights(rms: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """Frame weights ``w(i)`` of Eq. 12 from the avatar audio's track-normalised short-time RMS energy.

    ``w(i) = floor + (1 − floor)·clamp(r̂(i), 0, 1)``, where ``r̂`` is the per-frame RMS already divided by the reference
    level of the avatar's **whole track** (`echo.data.track_rms_reference`; batch key ``avatar_rms``): a frame of
    speech weighs ≈ 1 and a frame of microphone noise ≈ ``floor``. Nothing is normalised per window, so a window of
    pure listening gets the floor weight (listening frames are down-weighted, not ignored) instead of having its
    noise stretched to 1.

    Args:
        rms (`torch.Tensor` of shape `(B, T)`): per-video-frame track-normalised RMS.
        floor (`float`, defaults to 0.1): the weight of a silent frame, in [0, 1].

    Returns:
        `torch.Tensor` of shape `(B, T)` in ``[floor, 1]``, float32.
    """
    if rms.ndim != 2:
        raise ValueError(f"`rms` has shape {tuple(rms.shape)}, expected (B, T).")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"`floor` is {floor}, expected a value in [0, 1].")
    return floor + (1.0 - floor) * rms.float().clamp(0.0, 1.0)


def latent_frame_weights(weights: torch.Tensor, temporal_compression: int = 4) -> torch.Tensor:
    """Per-video-frame weights `(B, T)` → per-latent-frame weights `(B, F)`, ``T = 4(F − 1) + 1``.

    Latent frame 0 takes the weight of video frame 0; latent frame ``j ≥ 1`` takes the mean weight of the video
    frames it covers, ``4j − 3 … 4j`` (the same grouping as `echo.masks.masks_to_token_grid`).
    """
    if weights.ndim != 2:
        raise ValueError(f"`weights` has shape {tuple(weights.shape)}, expected (B, T).")
    batch_size, num_frames = weights.shape
    check_frame_count(num_frames, "`weights`", temporal_compression)
    first = weights[:, :1]
    rest = weights[:, 1:].reshape(batch_size, -1, temporal_compression).mean(dim=2)
    return torch.cat([first, rest], dim=1)


def lip_loss_weights(lip_mask: torch.Tensor, latent_shape: torch.Size | tuple, lip_weight: float) -> torch.Tensor:
    """Per-element weights `(B, 1, F, h, w)` of the flow-matching loss: ``lip_weight`` on the latents under SDCM's
    lip tokens, 1 elsewhere (`echo.flow_matching.flow_loss` ``mask``: a weighted mean, so the loss keeps its scale).

    The mouth covers a few per cent of a chunk's latents, so the plain mean spends almost all of the loss on the head
    and background: a generator learns *that* the mouth opens in speech long before it learns *how far*, frame by
    frame. The weights use the token masks the generator is conditioned on (the reference's lip region, held for
    every latent frame, `echo.masks.reference_token_masks`), each token spread over the latent pixels of its patch.

    Args:
        lip_mask (`torch.Tensor` of shape `(B, F, H', W')`): {0, 1} lip tokens.
        latent_shape (`torch.Size`): the latents' `(B, C, F, h, w)`; ``h`` and ``w`` are multiples of ``H'``, ``W'``.
        lip_weight (`float`): the weight of a lip latent, ≥ 1 (1: the plain loss).
    """
    batch_size, _, num_frames, height, width = latent_shape
    if lip_mask.ndim != 4 or lip_mask.shape[:2] != (batch_size, num_frames):
        raise ValueError(
            f"`lip_mask` has shape {tuple(lip_mask.shape)}, expected ({batch_size}, {num_frames}, H', W')."
        )
    if height % lip_mask.shape[2] or width % lip_mask.shape[3]:
        raise ValueError(
            f"the {height}x{width} latents are no whole number of {tuple(lip_mask.shape[2:])} token patches."
        )
    if lip_weight < 1:
        raise ValueError(f"`lip_weight` is {lip_weight}, expected a weight >= 1.")
    mask = F.interpolate(lip_mask.float(), size=(height, width), mode="nearest")  # each token over its patch
    return (1.0 + (lip_weight - 1.0) * mask)[:, None]


def sample_blocks(num_layers: int, num_blocks: int, generator: torch.Generator | None = None) -> list[int]:
    """The random block subset ``S`` of Eq. 12: ``num_blocks`` distinct indices in ``[0, num_layers)``, sorted."""
    if not 1 <= num_blocks <= num_layers:
        raise ValueError(f"`num_blocks` is {num_blocks}, expected 1 ≤ num_blocks ≤ num_layers = {num_layers}.")
    return sorted(torch.randperm(num_layers, generator=generator)[:num_blocks].tolist())


def hfa_loss(
    features: dict[int, torch.Tensor],
    ref_features: dict[int, torch.Tensor],
    frame_weights: torch.Tensor,
    num_frames: int,
    distance: str = "mse",
) -> torch.Tensor:
    """Hierarchical feature alignment ``L_align`` (Eq. 12) between the adapted generator and ``f_ref``.

    ``L_align = 1/|S| Σ_{ℓ∈S} 1/F Σ_i w(i)·mean_tokens d(h_ℓ(i), h_ℓ^ref(i))``, averaged over the batch. Frames are
    latent frames (the generator's resolution); ``w`` comes from `latent_frame_weights(speech_weights(rms))`. The sum
    over frames of Eq. 12 is divided by ``F`` so that γ does not depend on the clip length.

    Args:
        features (`dict[int, torch.Tensor]`): block index → `(B, F·H'·W', D)` hidden states of the adapted generator
            (``return_block_features``); its keys are the subset ``S``.
        ref_features (`dict[int, torch.Tensor]`): the same blocks of ``f_ref`` (no gradient needed).
        frame_weights (`torch.Tensor` of shape `(B, F)`): ``w(i)`` per latent frame.
        num_frames (`int`): ``F``, the number of latent frames (tokens are laid out frame-major).
        distance (`str`, defaults to `"mse"`): per-token distance, `"mse"` (mean squared difference over channels)
            or `"cosine"` (1 − cosine similarity).

    Returns:
        A scalar tensor, 0 exactly when the features of every block in ``S`` equal the reference.
    """
    if not features:
        raise ValueError("`features` is empty, expected at least one block of the subset S.")
    if set(features) != set(ref_features):
        raise ValueError(
            f"`features` has blocks {sorted(features)} but `ref_features` has {sorted(ref_features)}; expected the same."
        )
    if distance not in ("mse", "cosine"):
        raise ValueError(f"`distance` is {distance!r}, expected 'mse' or 'cosine'.")
    losses = []
    for index in sorted(features):
        h, h_ref = features[index], ref_features[index].detach()
        if h.shape != h_ref.shape or h.ndim != 3:
            raise ValueError(
                f"block {index}: `features` has shape {tuple(h.shape)} and `ref_features` {tuple(h_ref.shape)}, "
                "expected equal shapes (B, F·H'·W', D)."
            )
        batch_size, seq_len, dim = h.shape
        if seq_len % num_frames:
            raise ValueError(f"block {index}: {seq_len} tokens is not a multiple of F = {num_frames} frames.")
        if frame_weights.shape != (batch_size, num_frames):
            raise ValueError(
                f"`frame_weights` has shape {tuple(frame_weights.shape)}, expected (B={batch_size}, F={num_frames})."
            )
        h = h.float().reshape(batch_size, num_frames, -1, dim)  # B, F, H'W', D
        h_ref = h_ref.float().reshape(batch_size, num_frames, -1, dim)
        if distance == "mse":
            per_token = (h - h_ref).pow(2).mean(dim=-1)  # B, F, H'W'
        else:
            per_token = 1.0 - F.cosine_similarity(h, h_ref, dim=-1)
        per_frame = per_token.mean(dim=-1)  # B, F  (spatial average)
        losses.append((frame_weights.float() * per_frame).mean(dim=1))  # B
    return torch.stack(losses, dim=0).mean()
