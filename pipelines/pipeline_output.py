"""Output of `EchoPipeline`."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class EchoPipelineOutput(BaseOutput):
    r"""
    Output class for the ECHO interactive head generation pipeline.

    Args:
        frames (`torch.Tensor`, `np.ndarray`, or `list[list[PIL.Image.Image]]`):
            The generated avatar video, ``num_frames`` frames at 25 fps: a `torch.Tensor` of shape
            `(batch_size, num_frames, channels, height, width)` in [0, 1] (``output_type="pt"``), a NumPy array of
            shape `(batch_size, num_frames, height, width, channels)` in [0, 1] (``output_type="np"``), a list of
            lists of PIL images (``output_type="pil"``), or the denoised latents of each chunk, not decoded, a
            `torch.Tensor` of shape `(num_chunks, z_dim, latent_frames, height / 8, width / 8)`
            (``output_type="latent"``; `EchoPipeline.__call__` tells how they decode to the frames).
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]
