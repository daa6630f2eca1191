"""The generator's condition input (Eq. 1): the mask of given frames, the given latents and the reference plane.

Layout ``condition = cat([mask, given latents, reference plane], channels)``, ``4 + 2C`` channels (36 for the Wan
VAE's C = 16):

- ``mask`` (4 channels, Wan I2V's): one channel per video frame a latent frame covers (latent frame 0 covers video
  frame 0 repeated); 1 on the given latent frames, 0 elsewhere;
- ``given latents`` (C channels, Wan I2V's): the Wan-normalised VAE encoding of the chunk's *condition video*
  (`condition_video`): the given frames followed by zero (mid-grey) pixel frames up to the chunk's length, encoded
  as one video. The given frames are the reference image in a first chunk and the previous chunk's last
  ``4(m − 1) + 1`` frames (the motion frames, latent frames ``0 … m − 1``) in a continuation chunk. The latent frames
  after the given ones are therefore the encoding of zero pixels after the given frames, not zeros;
- ``reference plane`` (C channels, ECHO's): the reference image's latent (encoded alone) broadcast to every latent
  frame, in every chunk. Eq. 1 conditions every chunk on ``I_ref`` and the previous frames: a continuation chunk's
  given frames are the motion frames, so without this plane the identity would reach it only through the motion
  frames and drift.

The first ``4 + C`` channels of a first chunk are exactly the condition diffusers' `WanImageToVideoPipeline` builds
for the reference image (``prepare_latents`` without ``last_image``, ``expand_timesteps=False``): the same condition
video, VAE posterior mode, ``(z − latents_mean)·(1 / latents_std)`` (`echo.encoding.normalize_latents`) and mask. A
continuation chunk applies the same construction to its motion frames: with one motion frame (``m = 1``) it is Wan
I2V's condition of that frame. An I2V base therefore keeps its own input weights for these channels;
`EchoTransformer3DModel.from_wan` zero-initialises the input weights of the channels a base does not have. The
generator reads ``cat([noisy latents, condition], channels)``.
"""

from __future__ import annotations

import torch


def condition_video(given_video: torch.Tensor, num_frames: int) -> torch.Tensor:
    r"""
    Wan I2V's condition video: the given frames followed by zero pixel frames (mid-grey in [−1, 1]).

    Args:
        given_video (`torch.Tensor` of shape `(B, 3, T_g, H, W)`): the given frames in [−1, 1] (the reference image
            as one frame, or the motion frames).
        num_frames (`int`): the chunk's video frames ``4(F − 1) + 1``, at least ``T_g``.

    Returns:
        `torch.Tensor` of shape `(B, 3, num_frames, H, W)`.
    """
    if given_video.ndim != 5 or given_video.shape[1] != 3:
        raise ValueError(f"`given_video` has shape {tuple(given_video.shape)}, expected (B, 3, T_g, H, W).")
    num_given = given_video.shape[2]
    if num_given > num_frames:
        raise ValueError(f"`given_video` has {num_given} frames, expected at most num_frames = {num_frames}.")
    zeros = given_video.new_zeros(*given_video.shape[:2], num_frames - num_given, *given_video.shape[3:])
    return torch.cat([given_video, zeros], dim=2)  # B, 3, num_frames, H, W


def build_condition(
    reference_latents: torch.Tensor,
    given_latents: torch.Tensor,
    num_given: int,
    vae_scale_factor_temporal: int = 4,
) -> torch.Tensor:
    r"""
    Lay out the condition `(B, 4 + 2C, F, h, w)` of one chunk.

    Args:
        reference_latents (`torch.Tensor` of shape `(B, C, 1, h, w)`): the reference image's VAE latent (encoded
            alone). It fills the reference plane of every latent frame.
        given_latents (`torch.Tensor` of shape `(B, C, F, h, w)`): the normalised VAE latents of the chunk's
            condition video (`condition_video`): given latent frames first, then the encoding of the zero frames.
        num_given (`int`): the given latent frames: 1 in a first chunk (the reference image), ``m`` in a continuation
            chunk (the motion frames).
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
    if (
        given_latents.ndim != 5
        or given_latents.shape[:2] != (batch_size, channels)
        or given_latents.shape[3:] != (height, width)
    ):
        raise ValueError(
            f"`given_latents` has shape {tuple(given_latents.shape)}, expected ({batch_size}, {channels}, F, {height}, "
            f"{width}) like `reference_latents` {tuple(reference_latents.shape)}."
        )
    num_latent_frames = given_latents.shape[2]
    if not 1 <= num_given <= num_latent_frames:
        raise ValueError(f"`num_given` is {num_given}, expected 1 … {num_latent_frames} (the given latent frames).")

    mask = given_latents.new_zeros(batch_size, vae_scale_factor_temporal, num_latent_frames, height, width)
    mask[:, :, :num_given] = 1
    reference = reference_latents.to(given_latents.dtype).expand(-1, -1, num_latent_frames, -1, -1)
    return torch.cat([mask, given_latents, reference], dim=1)  # B, 4 + 2C, F, h, w
