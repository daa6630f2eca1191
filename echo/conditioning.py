"""The generator's condition input: reference image / motion-frame latents and the mask of given frames (Eq. 1).

Wan I2V layout: ``condition = cat([mask, latents], channels)`` with 4 mask channels (one per video frame a latent
frame covers, latent frame 0 covering video frame 0 repeated) and the VAE's latent channels. The generator then reads
``cat([noisy latents, condition], channels)``.
"""

from __future__ import annotations

import torch


def build_condition(
    reference_latents: torch.Tensor | None,
    motion_latents: torch.Tensor | None,
    num_latent_frames: int,
    vae_scale_factor_temporal: int = 4,
) -> torch.Tensor:
    r"""
    Build the condition `(B, 4 + C, F, h, w)` of one chunk.

    Args:
        reference_latents (`torch.Tensor` of shape `(B, C, 1, h, w)`, *optional*): the reference image's VAE latent.
            It fills latent frame 0 of a first chunk.
        motion_latents (`torch.Tensor` of shape `(B, C, m, h, w)`, *optional*): the VAE encoding of the previous
            chunk's last 4(m − 1) + 1 frames. In a continuation chunk they fill latent frames 0 … m − 1 and take the
            place of the reference (a chunk's given frames are the motion frames).
        num_latent_frames (`int`): F, the chunk's latent frames.
        vae_scale_factor_temporal (`int`, defaults to 4): mask channels, i.e. video frames per latent frame.

    Returns:
        `torch.Tensor` of shape `(B, vae_scale_factor_temporal + C, F, h, w)`: channels `[mask, latents]`; the mask is
        1 on given latent frames (all its channels) and 0 elsewhere; latents are zero on frames that are not given.
    """
    given = motion_latents if motion_latents is not None else reference_latents
    if given is None:
        raise ValueError(
            "`build_condition` needs `reference_latents` (B, C, 1, h, w) or `motion_latents` (B, C, m, h, w)."
        )
    name = "motion_latents" if motion_latents is not None else "reference_latents"
    if given.ndim != 5:
        raise ValueError(f"`{name}` has shape {tuple(given.shape)}, expected (batch, channels, frames, height, width).")
    if reference_latents is not None and reference_latents.shape[2] != 1:
        raise ValueError(
            f"`reference_latents` has shape {tuple(reference_latents.shape)}, expected one latent frame "
            f"({reference_latents.shape[0]}, {reference_latents.shape[1]}, 1, h, w)."
        )
    batch_size, channels, num_given, height, width = given.shape
    if num_given > num_latent_frames:
        raise ValueError(
            f"`{name}` has shape {tuple(given.shape)}: {num_given} latent frames, expected at most "
            f"num_latent_frames = {num_latent_frames}."
        )
    if motion_latents is not None and reference_latents is not None:
        expected = (batch_size, channels, 1, height, width)
        if tuple(reference_latents.shape) != expected:
            raise ValueError(f"`reference_latents` has shape {tuple(reference_latents.shape)}, expected {expected}.")

    latents = given.new_zeros(batch_size, channels, num_latent_frames, height, width)
    latents[:, :, :num_given] = given
    mask = given.new_zeros(batch_size, vae_scale_factor_temporal, num_latent_frames, height, width)
    mask[:, :, :num_given] = 1
    return torch.cat([mask, latents], dim=1)
