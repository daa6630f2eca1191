# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""What passes between an `EchoSession` and its `EchoPipeline` when a chunk is rendered.

The pipeline prepares a [`RenderContext`] once per render (`EchoPipeline.prepare_render`: the framed reference, its
SDCM masks and image tokens, the prompt encoder); the session buffers the conversation and, for each chunk, gathers a
[`ChunkInputs`] from its buffers (emotion text, user context from the LCU's carried state, avatar audio windows, the
previous chunk's last frames) and asks `EchoPipeline.render_chunk` to denoise and decode it. Neither module imports
the other's class: this one is their common vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from echo.encoding import PromptEncoder
from echo.settings import EchoSettings

from .inputs import RenderOptions


@dataclass(frozen=True)
class RenderContext:
    r"""
    What every chunk of one render shares, prepared once by `EchoPipeline.prepare_render`.

    Args:
        settings ([`~echo.settings.EchoSettings`]): the resolved settings of the render.
        options ([`~pipelines.inputs.RenderOptions`]): the checked options of the render.
        reference (`torch.Tensor` of shape `(1, 3, H, W)`): the (framed) reference in [−1, 1], on the device.
        reference_frame (`np.ndarray` `(H_r, W_r, 3)` uint8 or `torch.Tensor`): the reference as framed, before
            resizing (what the landmarks refer to).
        image_embeds (`torch.Tensor` of shape `(1, N_img, image_dim)`, *optional*): CLIP tokens of an I2V base.
        lip_mask (`torch.Tensor`), face_mask (`torch.Tensor`) of shape `(1, F, H', W')`: SDCM's token-grid masks.
        prompt_encoder ([`~echo.encoding.PromptEncoder`]): encodes each chunk's emotion text.
        device (`torch.device`), dtype (`torch.dtype`): of the transformer's inputs.
        num_latent_frames (`int`): ``F`` latent frames per chunk.
        avatar_radius (`int`): frames of avatar audio on either side of a frame in its window.
        feature_shape (`tuple[int, int]`): ``(NL, D)`` of a wav2vec2 row.
    """

    settings: EchoSettings
    options: RenderOptions
    reference: torch.Tensor
    image_embeds: torch.Tensor | None
    lip_mask: torch.Tensor
    face_mask: torch.Tensor
    prompt_encoder: PromptEncoder
    device: torch.device
    dtype: torch.dtype
    num_latent_frames: int
    avatar_radius: int
    feature_shape: tuple[int, int]


@dataclass(frozen=True)
class ChunkInputs:
    r"""
    The per-chunk inputs of `EchoPipeline.render_chunk`, gathered by the session from its buffers.

    Args:
        index (`int`): the chunk's index in the schedule.
        emotion (`str`): the emotion text of the chunk (LAU).
        audio_embeds (`torch.Tensor` of shape `(1, N, L_w, NL, D)`): the avatar's audio windows of its frames.
        context_embeds (`torch.Tensor` of shape `(1, N_c, C)`, *optional*), context_mask (`torch.Tensor`
            `(1, N_c)`, *optional*): the LCU's user context ``f_pu``; `None` without the user branch.
        motion_video (`torch.Tensor` of shape `(1, 3, T_prev, H, W)`, *optional*): the previous chunk's last
            ``motion_frames`` frames in [−1, 1]; `None` for the first chunk.
    """

    index: int
    emotion: str
    audio_embeds: torch.Tensor
    context_embeds: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    motion_video: torch.Tensor | None = None
