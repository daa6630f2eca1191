"""The generator's condition input (Eq. 1): the mask of given frames, the given latents and the reference plane.

Layout ``condition = cat([mask, given latents, reference plane], channels)``, ``4 + 2C`` channels (36 for the Wan
VAE's C = 16):

- ``mask`` (4 channels, Wan I2V's): one channel per video frame a latent frame covers (latent frame 0 covers video
  frame 0 repeated); 1 on the given latent frames, 0 elsewhere;
- ``given latents`` (C channels, Wan I2V's): the reference image's latent at latent frame 0 of a first chunk, the
  motion frames' latents at latent frames ``0 … m − 1`` of a continuation chunk; zeros elsewhere;
- ``reference plane`` (C channels, ECHO's): the reference image's latent broadcast to every latent frame, in every
  chunk. Eq. 1 conditions every chunk on ``I_ref`` and the previous frames: a continuation chunk's given frames are
  the motion frames, so without this plane the identity would reach it only through the motion frames and drift.

The first ``4 + C`` channels are exactly Wan I2V's condition, so an I2V base keeps its own input weights for them;
`EchoTransformer3DModel.from_wan` zero-initialises the input weights of the channels a base does not have. The
generator reads ``cat([noisy latents, condition], channels)``.
"""

from __future__ import annotations

import torch


def build_condition(
    reference_latents: torch.Tensor,
    motion_latents: torch.Tensor | None,
    num_latent_frames: int,
    vae_scale_factor_temporal: int = 4,
) -> torch.Tensor:
    r"""
    Build the condition `(B, 4 + 2C, F, h, w)` of one chunk.

    Args:
        reference_latents (`torch.Tensor` of shape `(B, C, 1, h, w)`): the reference image's VAE latent. It fills the
            reference plane of every chunk and latent frame 0 of a first chunk.
        motion_latents (`torch.Tensor` of shape `(B, C, m, h, w)`, *optional*): the VAE encoding of the previous
            chunk's last ``4(m − 1) + 1`` frames. In a continuation chunk they are the given latent frames
            ``0 … m − 1`` (the reference stays in the reference plane).
        num_latent_frames (`int`): F, the chunk's latent frames.
        vae_scale_factor_temporal (`int`, defaults to 4): mask channels, i.e. video frames per latent frame.

    Returns:
        `torch.Tensor` of shape `(B, vae_scale_factor_temporal + 2C, F, h, w)`: channels ``[mask, given, reference]``.
    """
    if reference_latents is None:
        raise ValueError(
            "`reference_latents` (B, C, 1, h, w) is required: every chunk is conditioned on the reference image (Eq. 1)."
        )
    if reference_latents.ndim != 5 or reference_latents.shape[2] != 1:
        raise ValueError(
            f"`reference_latents` has shape {tuple(reference_latents.shape)}, expected (batch, channels, 1, height, "
            "width): one latent frame."
        )
    batch_size, channels, _, height, width = reference_latents.shape
    given = reference_latents
    if motion_latents is not None:
        if (
            motion_latents.ndim != 5
            or motion_latents.shape[:2] != (batch_size, channels)
            or motion_latents.shape[3:] != (height, width)
        ):
            raise ValueError(
                f"`motion_latents` has shape {tuple(motion_latents.shape)}, expected ({batch_size}, {channels}, m, "
                f"{height}, {width}) like `reference_latents` {tuple(reference_latents.shape)}."
            )
        given = motion_latents
    num_given = given.shape[2]
    if num_given > num_latent_frames:
        name = "motion_latents" if motion_latents is not None else "reference_latents"
        raise ValueError(
            f"`{name}` has shape {tuple(given.shape)}: {num_given} latent frames, expected at most "
            f"num_latent_frames = {num_latent_frames}."
        )

    mask = given.new_zeros(batch_size, vae_scale_factor_temporal, num_latent_frames, height, width)
    mask[:, :, :num_given] = 1
    latents = given.new_zeros(batch_size, channels, num_latent_frames, height, width)
    latents[:, :, :num_given] = given
    reference = reference_latents.to(given.dtype).expand(-1, -1, num_latent_frames, -1, -1)
    return torch.cat([mask, latents, reference], dim=1)  # B, 4 + 2C, F, h, w
