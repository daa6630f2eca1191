# Copyright 2025 The ECHO-IHG authors. Built on diffusers' Wan transformer (Copyright 2025 The Wan Team and The
# HuggingFace Team), whose building blocks are imported. One function is copied: `EchoTransformerBlock.forward` is
# `WanTransformerBlock.forward` (its Wan 2.1 branch, ``temb`` of shape (B, 6, D)) with the SDCM step inserted between
# the cross-attention and the feed-forward, since a subclass cannot insert a step inside its parent's forward. It is
# marked `# Copied from` and kept exact: tests/test_transformer_echo.py compares its lines with the installed
# diffusers' (the SDCM step and comments aside). Loading from Wan checkpoints lives beside the model, in
# `echo.wan_loading`.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
"""The ECHO generator: a Wan2.1 video DiT with block-wise Spatial-aware Decoupled Cross-attention Modulation (SDCM).

Every Wan parameter keeps its diffusers name (``patch_embedding``, ``condition_embedder.*``, ``blocks.N.attn1.*``,
``blocks.N.attn2.*``, ``blocks.N.ffn.*``, ``blocks.N.scale_shift_table``, ``proj_out``, ``scale_shift_table``), so
:meth:`EchoTransformer3DModel.from_wan` loads a diffusers ``WanTransformer3DModel`` strictly. The added modules are

- ``audio_proj``: wav2vec2 windows of every video frame → audio tokens per latent frame;
- ``context_proj``: the LCU's user context f_pu (``context_dim``) → the inner dimension;
- ``blocks.N.sdcm``: SDCM (Eq. 10-11 of the paper), or, with ``use_sdcm=False``, the direct-fusion ablation (one
  cross-attention over the concatenation of user-context and audio tokens, unmasked);

and their output projections and gate are zero-initialised (:meth:`EchoTransformer3DModel.initialize_weights`), so
that at initialisation the model computes exactly what the Wan model computes.

Decisions written down here:

- Tokens are laid out frames × H' × W' (Wan's order), so a latent frame is a contiguous run of H'·W' tokens.
- The input is ``cat([noisy latents, condition], channels)`` with ``condition = [mask(4), given latents(16),
  reference plane(16)]`` (`echo.conditioning`: Wan I2V's condition, then the reference latent on every latent frame,
  so that every chunk is conditioned on the reference, Eq. 1). ``in_channels`` is the patch embedding's input channel
  count (``out_channels + condition_channels``, 16 + 36 = 52 by default). ``from_wan`` keeps a base's own input
  channels (16 for T2V, 36 for I2V) and zero-initialises the weights of the channels it does not have, so the built
  model computes what the base computes.
- Audio alignment respects the VAE's temporal compression ``r = vae_scale_factor_temporal`` (4): latent frame 0 covers
  video frame 0, latent frame j ≥ 1 covers video frames r(j − 1) + 1 … rj. Frame 0's tokens are repeated r times
  (as Wan's causal VAE pads its first frame), so every latent frame holds r · L_w audio tokens and CrossAttn_2 runs
  per latent frame: queries (B·F, H'·W', D) against keys (B·F, r·L_w, D). It is frame-aligned by construction.
- SDCM reads the hidden states after the text cross-attention through its own LayerNorm. ``M_face`` is applied as
  ``M_face ⊙ (1 − M_lip)`` so the two regions never overlap, whatever the caller passes.
- The gate's convolutional projectors f_conv^1, f_conv^2 are grouped k × k convolutions over the H' × W' grid of
  each latent frame (frames never mix) to ``sdcm_gate_dim`` channels (inner dim / 4 by default); f_g, a linear layer
  over their concatenation, gives an element-wise g. This keeps SDCM cheap next to the block's self-attention.
- Missing inputs: ``context_embeds=None`` gives h_usr = 0 (stage 1), ``audio_embeds=None`` gives h_avt = 0, and
  masks ``None`` are all-zero masks (no SDCM effect; the SDCM branch is skipped).
- Loading (`from_wan`) builds the model on the meta device, materialises only the added modules (as `__init__` makes
  them) and reads the Wan weights one tensor at a time straight into the target dtype, so a float32 Wan folder loads
  into a bfloat16 Echo model within about 1.1-1.3× the Echo model's size in host memory.
- diffusers' memory and speed features apply as to Wan: fp8 weight storage (`enable_layerwise_casting`; the input
  embeddings, norms, SDCM gate and output projection stay in high precision), group and model offload, block caches
  (`CacheMixin`: First Block Cache, Pyramid Attention Broadcast, ...; calls inside ``model.cache_context(name)``) and
  Wan-format LoRAs (`load_lora_adapter(..., prefix="transformer")`: every Wan module keeps its name, so a LoRA made for
  the Wan base adapts exactly the Wan layers it names).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from diffusers.utils import BaseOutput, apply_lora_scale

from .wan_loading import (  # noqa: F401 (WAN_CONFIG_KEYS, ECHO_ONLY_KEYS re-exported)
    ECHO_ONLY_KEYS,
    WAN_CONFIG_KEYS,
    build_from_wan,
    check_wan_shapes,
    wan_tensor,
)

# Names of the `WanTransformer3DModel.__init__` arguments, copied into the Echo config by `from_wan`.
# `[mask(4), given latents(16), reference plane(16)]` (`echo.conditioning.build_condition` with the Wan VAE).
DEFAULT_CONDITION_CHANNELS = 36

ADAPTER_CONFIG_NAME = "adapter_config.json"


def non_finite_weights(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` holding a NaN or infinite value (a model
    that diverged in training): what loading and export refuse."""
    return [
        name
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all()
    ]


@dataclass
class EchoTransformerOutput(BaseOutput):
    """
    Output of [`EchoTransformer3DModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, num_frames, height, width)`):
            The predicted velocity.
        block_features (`dict[int, torch.Tensor]`, *optional*):
            Output hidden states `(batch_size, num_frames * H' * W', inner_dim)` of the blocks asked for with
            `return_block_features`, keyed by block index.
    """

    sample: torch.Tensor
    block_features: dict[int, torch.Tensor] | None = None


def _grid_mask(mask: torch.Tensor | None, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Check a token-grid mask `(B, F, H', W')` and flatten it to `(B, F·H'·W', 1)`."""
    if mask is None:
        return None
    if tuple(mask.shape) != shape:
        raise ValueError(f"`{name}` has shape {tuple(mask.shape)}, expected {shape} (batch, latent frames, H', W').")
    return mask.flatten(1).unsqueeze(-1)


class EchoAudioProjection(nn.Module):
    r"""
    Avatar audio tokens per latent frame from per-frame wav2vec2 windows.

    The hidden layers are mixed by learned softmax weights, each window row is projected to the inner dimension, and
    the video frames covered by each latent frame are grouped (frame 0 repeated to a full group for latent frame 0).

    Args:
        audio_dim (`int`): wav2vec2 feature size (768 for base).
        num_layers (`int`): wav2vec2 hidden layers stored per frame (13 for base).
        window (`int`): rows per frame's context window L_w.
        dim (`int`): the generator's inner dimension.
        frames_per_latent (`int`): the VAE's temporal compression r.
        eps (`float`): LayerNorm epsilon.
    """

    def __init__(self, audio_dim: int, num_layers: int, window: int, dim: int, frames_per_latent: int, eps: float):
        super().__init__()
        self.num_layers = num_layers
        self.window = window
        self.audio_dim = audio_dim
        self.frames_per_latent = frames_per_latent
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))
        self.norm = nn.LayerNorm(audio_dim, eps=eps)
        self.proj_in = nn.Linear(audio_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim, dim)
        # Position of each token inside its latent frame's group: (video frame slot, window row).
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, frames_per_latent * window, dim))

    def forward(self, audio_embeds: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """
        Args:
            audio_embeds (`torch.Tensor` of shape `(B, T, L_w, NL, audio_dim)`): T = r·(F − 1) + 1.
            num_latent_frames (`int`): F.

        Returns:
            `torch.Tensor` of shape `(B, F, r·L_w, dim)`.
        """
        r = self.frames_per_latent
        expected_frames = r * (num_latent_frames - 1) + 1
        if audio_embeds.ndim != 5 or tuple(audio_embeds.shape[1:]) != (
            expected_frames,
            self.window,
            self.num_layers,
            self.audio_dim,
        ):
            raise ValueError(
                f"`audio_embeds` has shape {tuple(audio_embeds.shape)}, expected (batch, {expected_frames}, "
                f"{self.window}, {self.num_layers}, {self.audio_dim}): {expected_frames} = "
                f"{r}·({num_latent_frames} − 1) + 1 video frames for the latents' frames, each with its wav2vec2 "
                "window of every hidden layer."
            )
        batch_size = audio_embeds.shape[0]
        # The compute dtype is the layer weights' (never cast: with fp8 storage `proj_in.weight` may be float8).
        weights = self.layer_weights.softmax(0)
        audio = torch.einsum("btwlc,l->btwc", audio_embeds.to(weights.dtype), weights)  # B, T, L_w, C
        audio = self.proj_out(self.act(self.proj_in(self.norm(audio))))  # B, T, L_w, D
        audio = torch.cat([audio[:, :1].expand(-1, r - 1, -1, -1), audio], dim=1)  # B, r·F, L_w, D
        audio = audio.reshape(batch_size, num_latent_frames, r * self.window, -1)  # B, F, r·L_w, D
        return audio + self.pos_embed


def _cross_attention(dim: int, num_heads: int, eps: float) -> WanAttention:
    """A Wan cross-attention (q/k RMS norm across heads) whose keys and values come from an external sequence."""
    return WanAttention(
        dim=dim,
        heads=num_heads,
        dim_head=dim // num_heads,
        eps=eps,
        cross_attention_dim_head=dim // num_heads,
        processor=WanAttnProcessor(),
    )


class EchoSDCMGate(nn.Module):
    r"""
    The SDCM gate g = σ(f_g([f_conv^1(h_usr); f_conv^2(h_avt)])) of Eq. 11.

    f_conv^1 and f_conv^2 are grouped k × k convolutions over the H' × W' grid of each latent frame (frames never mix)
    from `dim` to `gate_dim` channels (each output channel reads `dim / gate_dim` input channels); f_g is a linear layer
    from the concatenation (2·gate_dim) to `dim`, so g is element-wise. With `gate_dim = dim / 4` the gate costs half
    of one attention projection per token.

    Args:
        dim (`int`): channels of h.
        gate_dim (`int`): output channels of each convolutional projector; divides `dim`.
        kernel_size (`int`): convolution size (odd).
    """

    def __init__(self, dim: int, gate_dim: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"`sdcm_kernel_size` is {kernel_size}, expected an odd size (same-size padding).")
        if dim % gate_dim:
            raise ValueError(f"`sdcm_gate_dim` is {gate_dim}, expected a divisor of the inner dimension {dim}.")
        self.conv_usr = nn.Conv2d(dim, gate_dim, kernel_size, padding=kernel_size // 2, groups=gate_dim)
        self.conv_avt = nn.Conv2d(dim, gate_dim, kernel_size, padding=kernel_size // 2, groups=gate_dim)
        self.proj = nn.Linear(2 * gate_dim, dim)

    @staticmethod
    def _conv(conv: nn.Conv2d, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        batch_size, seq_len, dim = x.shape
        num_frames, height, width = grid
        x = x.reshape(batch_size * num_frames, height, width, dim).permute(0, 3, 1, 2)  # B·F, D, H', W'
        x = conv(x)  # B·F, gate_dim, H', W'
        return x.permute(0, 2, 3, 1).reshape(batch_size, seq_len, -1)

    def forward(self, h_usr: torch.Tensor, h_avt: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`h_usr`, `h_avt`: `(B, F·H'·W', D)`; `grid`: (F, H', W'). Returns g `(B, F·H'·W', D)` in (0, 1)."""
        features = torch.cat([self._conv(self.conv_usr, h_usr, grid), self._conv(self.conv_avt, h_avt, grid)], -1)
        return torch.sigmoid(self.proj(features))


class EchoSDCM(nn.Module):
    r"""
    Spatial-aware Decoupled Cross-attention Modulation (Eq. 10-11). Returns the residual h_lip + h_face.

    Args:
        dim (`int`): inner dimension.
        num_heads (`int`): attention heads of both cross-attentions.
        eps (`float`): norm epsilon.
        gate_dim (`int`): channels of each gate convolution.
        kernel_size (`int`): gate convolution size.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, gate_dim: int, kernel_size: int):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn_usr = _cross_attention(dim, num_heads, eps)
        self.attn_avt = _cross_attention(dim, num_heads, eps)
        self.gate = EchoSDCMGate(dim, gate_dim, kernel_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor | None,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        lip_mask: torch.Tensor,
        face_mask: torch.Tensor,
        grid: tuple[int, int, int],
        audio_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, F·H'·W', D)`): h.
            audio_tokens (`torch.Tensor` of shape `(B, F, r·L_w, D)`, *optional*): A_avt per latent frame.
            context (`torch.Tensor` of shape `(B, N_ctx, D)`, *optional*): projected f_pu.
            context_mask (`torch.Tensor` of shape `(B, N_ctx)`, *optional*): bool, True = valid.
            lip_mask, face_mask (`torch.Tensor` of shape `(B, F·H'·W', 1)`): token-grid masks.
            grid (`tuple[int, int, int]`): (F, H', W').
            audio_mask (`torch.Tensor` of shape `(B,)`, *optional*): bool, False = this sample has no avatar audio
                (h_avt = 0 for it, exactly as ``audio_tokens=None``); used for condition dropout.

        Returns:
            `torch.Tensor` of shape `(B, F·H'·W', D)`: h_lip + h_face.
        """
        batch_size, seq_len, dim = hidden_states.shape
        num_frames = grid[0]
        norm_hidden_states = self.norm(hidden_states.float()).type_as(hidden_states)

        # 1. User stream h_usr = CrossAttn_1(h, f_pu)
        if context is None:
            h_usr = torch.zeros_like(norm_hidden_states)
        else:
            h_usr = _masked_cross_attention(self.attn_usr, norm_hidden_states, context, context_mask)

        # 2. Avatar stream h_avt = CrossAttn_2(h, A_avt), one latent frame against its own audio tokens
        if audio_tokens is None:
            h_avt = torch.zeros_like(norm_hidden_states)
        else:
            query = norm_hidden_states.reshape(batch_size * num_frames, seq_len // num_frames, dim)  # B·F, H'W', D
            keys = audio_tokens.flatten(0, 1).type_as(query)  # B·F, r·L_w, D
            key_mask = _audio_key_mask(audio_mask, keys, num_frames)
            h_avt = _masked_cross_attention(self.attn_avt, query, keys, key_mask).reshape(batch_size, seq_len, dim)

        # 3. Gate and region-wise combination
        g = self.gate(h_usr, h_avt, grid)
        face_mask = face_mask * (1 - lip_mask)
        h_face = torch.lerp(h_usr, h_avt, g) * face_mask  # (g ⊙ h_avt + (1 − g) ⊙ h_usr) ⊙ M_face
        return torch.addcmul(h_face, h_avt, lip_mask)  # h_lip + h_face, h_lip = h_avt ⊙ M_lip


class EchoDirectFusion(nn.Module):
    r"""
    The "w/o SDCM" ablation: one cross-attention per latent frame over [f_pu tokens; that frame's audio tokens],
    applied to every token (no masks, no gate). Returns the residual.
    """

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn = _cross_attention(dim, num_heads, eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor | None,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        grid: tuple[int, int, int],
        audio_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Shapes as in [`EchoSDCM`]; returns `(B, F·H'·W', D)`."""
        batch_size, seq_len, dim = hidden_states.shape
        num_frames = grid[0]
        norm_hidden_states = self.norm(hidden_states.float()).type_as(hidden_states)
        query = norm_hidden_states.reshape(batch_size * num_frames, seq_len // num_frames, dim)  # B·F, H'W', D
        keys, masks = [], []
        if context is not None:
            keys.append(context.type_as(query).repeat_interleave(num_frames, dim=0))  # B·F, N_ctx, D
            valid = context_mask if context_mask is not None else torch.ones_like(context[..., 0], dtype=torch.bool)
            masks.append(valid.bool().repeat_interleave(num_frames, dim=0))
        if audio_tokens is not None:
            keys.append(audio_tokens.flatten(0, 1).type_as(query))  # B·F, r·L_w, D
            audio_key_mask = _audio_key_mask(audio_mask, keys[-1], num_frames)
            masks.append(
                audio_key_mask if audio_key_mask is not None else torch.ones_like(keys[-1][..., 0], dtype=torch.bool)
            )
        masked = (context is not None and context_mask is not None) or (
            audio_tokens is not None and audio_mask is not None
        )
        key_mask = torch.cat(masks, 1) if masked else None
        output = _masked_cross_attention(self.attn, query, torch.cat(keys, 1), key_mask)
        return output.reshape(batch_size, seq_len, dim)


def _audio_key_mask(audio_mask: torch.Tensor | None, keys: torch.Tensor, num_frames: int) -> torch.Tensor | None:
    """Per-sample audio presence `(B,)` → a key mask `(B·F, r·L_w)` for the per-latent-frame audio attention."""
    if audio_mask is None:
        return None
    return audio_mask.bool().repeat_interleave(num_frames, dim=0)[:, None].expand(-1, keys.shape[1])


def _masked_cross_attention(
    attn: WanAttention, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Cross-attention with a key padding mask `(B, N)`; a row without any valid key gives a zero output. No host
    synchronisation: the mask is used as given, with empty rows opened and their output zeroed."""
    if key_mask is None:
        return attn(query, keys)
    key_mask = key_mask.bool()
    has_key = key_mask.any(dim=1)  # B
    key_mask = key_mask | ~has_key[:, None]
    output = attn(query, keys, attention_mask=key_mask)
    return output * has_key[:, None, None].to(output.dtype)


def _build_sdcm(
    dim: int, num_heads: int, eps: float, use_sdcm: bool, gate_dim: int | None, kernel_size: int
) -> EchoSDCM | EchoDirectFusion:
    """A block's added module: [`EchoSDCM`] (gate width `dim / 4` unless given), or the direct-fusion ablation."""
    if use_sdcm:
        return EchoSDCM(dim, num_heads, eps, gate_dim or dim // 4, kernel_size)
    return EchoDirectFusion(dim, num_heads, eps)


def _initialize_added_module(module: nn.Module) -> None:
    """The initialisation of one added module that makes the Echo model compute exactly what the Wan model computes:
    zero output projections and gate, zero layer-mixing weights, small audio token positions."""
    if isinstance(module, EchoSDCM):
        # CrossAttn_1 and CrossAttn_2 output projections: h_usr = h_avt = 0, so h_lip = h_face = 0.
        for attn in (module.attn_usr, module.attn_avt):
            nn.init.zeros_(attn.to_out[0].weight)
            nn.init.zeros_(attn.to_out[0].bias)
        # Gate projection f_g: g = σ(0) = 0.5 everywhere, an even mix once the streams are trained.
        nn.init.zeros_(module.gate.proj.weight)
        nn.init.zeros_(module.gate.proj.bias)
    elif isinstance(module, EchoDirectFusion):
        # Direct fusion output projection.
        nn.init.zeros_(module.attn.to_out[0].weight)
        nn.init.zeros_(module.attn.to_out[0].bias)
    elif isinstance(module, EchoAudioProjection):
        # An even mix of the wav2vec2 layers; token positions start small, as learned position embeddings usually do.
        nn.init.zeros_(module.layer_weights)
        nn.init.normal_(module.pos_embed, std=0.02)


class EchoTransformerBlock(WanTransformerBlock):
    r"""
    A Wan block with SDCM: self-attention → text (+ image) cross-attention → SDCM → feed-forward.

    All Wan sub-modules keep their names; the added module is ``sdcm`` ([`EchoSDCM`], or [`EchoDirectFusion`] with
    ``use_sdcm=False``).
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str = "rms_norm_across_heads",
        cross_attn_norm: bool = False,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        use_sdcm: bool = True,
        sdcm_kernel_size: int = 3,
        sdcm_gate_dim: int | None = None,
    ):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.use_sdcm = use_sdcm
        self.sdcm = _build_sdcm(dim, num_heads, eps, use_sdcm, sdcm_gate_dim, sdcm_kernel_size)

    # Copied from diffusers.models.transformers.transformer_wan.WanTransformerBlock.forward (its Wan 2.1 branch) with
    # step 3 (SDCM) inserted
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio_tokens: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        lip_mask: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        audio_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # batch_size, 6, inner_dim
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        # 1. Self-attention
        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Cross-attention (emotion text c_emo, + reference image tokens for I2V bases)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

        # 3. SDCM: ĥ = h + h_lip + h_face (or the direct-fusion residual)
        if self.use_sdcm:
            if lip_mask is not None or face_mask is not None:
                zeros = torch.zeros_like(hidden_states[..., :1])
                lip_mask = zeros if lip_mask is None else lip_mask.type_as(hidden_states)
                face_mask = zeros if face_mask is None else face_mask.type_as(hidden_states)
                hidden_states = hidden_states + self.sdcm(
                    hidden_states, audio_tokens, context, context_mask, lip_mask, face_mask, grid, audio_mask
                )
        elif audio_tokens is not None or context is not None:
            hidden_states = hidden_states + self.sdcm(
                hidden_states, audio_tokens, context, context_mask, grid, audio_mask
            )

        # 4. Feed-forward
        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)

        return hidden_states


def _register_block_for_caches() -> None:
    """Tell diffusers' block-level caches (First Block Cache, ...) what an [`EchoTransformerBlock`] returns: the hidden
    states alone, as a `WanTransformerBlock`. Done on first use: registering loads diffusers' whole block registry."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        EchoTransformerBlock,
        TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
    )


class EchoTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    r"""
    The ECHO generator: a [`~diffusers.WanTransformer3DModel`] with SDCM in every block, avatar-audio tokens, a
    user-context projection and condition channels (Wan I2V's mask + given frames, plus a reference plane).

    Args:
        patch_size (`tuple[int]`, defaults to `(1, 2, 2)`): 3D patch (t, h, w).
        num_attention_heads (`int`, defaults to `40`): attention heads.
        attention_head_dim (`int`, defaults to `128`): channels per head.
        in_channels (`int`, defaults to `52`): input channels of the patch embedding, `out_channels +
            condition_channels` (Echo always reads the condition).
        out_channels (`int`, defaults to `16`): latent channels (input noisy latents and predicted velocity).
        text_dim (`int`, defaults to `4096`): text-encoder width (UMT5-XXL).
        freq_dim (`int`, defaults to `256`): sinusoidal timestep embedding size.
        ffn_dim (`int`, defaults to `13824`): feed-forward inner size.
        num_layers (`int`, defaults to `40`): blocks.
        cross_attn_norm (`bool`, defaults to `True`): LayerNorm before the text cross-attention.
        qk_norm (`str`, *optional*, defaults to `"rms_norm_across_heads"`): query/key norm.
        eps (`float`, defaults to `1e-6`): norm epsilon.
        image_dim (`int`, *optional*): CLIP image-token width of I2V bases (`None` for T2V).
        added_kv_proj_dim (`int`, *optional*): image key/value projection input of I2V bases.
        rope_max_seq_len (`int`, defaults to `1024`): RoPE table length.
        pos_embed_seq_len (`int`, *optional*): image position embedding length (FLF2V bases).
        audio_dim (`int`, defaults to `768`): wav2vec2 width.
        audio_num_layers (`int`, defaults to `13`): wav2vec2 hidden layers per frame.
        audio_window (`int`, defaults to `5`): L_w, rows of each frame's audio context window.
        context_dim (`int`, *optional*): width of the LCU's f_pu; `None` means the inner dimension.
        use_sdcm (`bool`, defaults to `True`): SDCM in every block; `False` gives the direct-fusion ablation.
        condition_channels (`int`, defaults to `36`): channels of the condition `[mask(4), given latents(16),
            reference plane(16)]` (`echo.conditioning.build_condition`).
        sdcm_kernel_size (`int`, defaults to `3`): gate convolution size.
        sdcm_gate_dim (`int`, *optional*): output channels of each gate convolution; `None` means inner dim / 4.
        vae_scale_factor_temporal (`int`, defaults to `4`): video frames per latent frame (latent frame 0 covers one).
    """

    _supports_gradient_checkpointing = True
    # fp8 storage (`enable_layerwise_casting`) leaves the input embeddings, norms and the SDCM gate in high precision.
    _skip_layerwise_casting_patterns = [
        "patch_embedding",
        "condition_embedder",
        "audio_proj",
        "context_proj",
        "norm",
        r"sdcm\.gate",
    ]
    _no_split_modules = ["EchoTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["EchoTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 52,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        audio_dim: int = 768,
        audio_num_layers: int = 13,
        audio_window: int = 5,
        context_dim: int | None = None,
        use_sdcm: bool = True,
        condition_channels: int = DEFAULT_CONDITION_CHANNELS,
        sdcm_kernel_size: int = 3,
        sdcm_gate_dim: int | None = None,
        vae_scale_factor_temporal: int = 4,
    ) -> None:
        super().__init__()

        inner_dim = num_attention_heads * attention_head_dim
        if out_channels is None or in_channels != out_channels + condition_channels:
            raise ValueError(
                f"`in_channels` is {in_channels}, expected out_channels + condition_channels = {out_channels} + "
                f"{condition_channels}: the patch embedding reads the noisy latents and the condition."
            )
        if patch_size[0] != 1:
            raise ValueError(
                f"`patch_size` is {tuple(patch_size)}, expected a temporal patch of 1 (frame-aligned SDCM)."
            )

        # 1. Patch & position embedding
        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)

        # 2. Condition embeddings: timestep, emotion text (+ image), avatar audio, user context
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.audio_proj = self._build_added_module("audio_proj")
        self.context_proj = self._build_added_module("context_proj")

        # 3. Transformer blocks
        self.blocks = nn.ModuleList(
            [
                EchoTransformerBlock(
                    inner_dim,
                    ffn_dim,
                    num_attention_heads,
                    qk_norm,
                    cross_attn_norm,
                    eps,
                    added_kv_proj_dim,
                    use_sdcm=use_sdcm,
                    sdcm_kernel_size=sdcm_kernel_size,
                    sdcm_gate_dim=sdcm_gate_dim,
                )
                for _ in range(num_layers)
            ]
        )

        # 4. Output norm & projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise the added modules so that the model computes exactly what the Wan model computes."""
        for name in self._added_module_names():
            _initialize_added_module(self.get_submodule(name))

    def _added_module_names(self) -> list[str]:
        """Names of the modules Echo adds to Wan (the parameters `ECHO_ONLY_KEYS` matches)."""
        return ["audio_proj", "context_proj"] + [f"blocks.{index}.sdcm" for index in range(self.config.num_layers)]

    def _build_added_module(self, name: str) -> nn.Module:
        """Construct the added module `name` (see `_added_module_names`) from the config, freshly initialised."""
        config = self.config
        inner_dim = config.num_attention_heads * config.attention_head_dim
        if name == "audio_proj":
            module = EchoAudioProjection(
                config.audio_dim,
                config.audio_num_layers,
                config.audio_window,
                inner_dim,
                config.vae_scale_factor_temporal,
                config.eps,
            )
        elif name == "context_proj":
            module = nn.Linear(config.context_dim or inner_dim, inner_dim)
        elif re.fullmatch(r"blocks\.\d+\.sdcm", name):
            module = _build_sdcm(
                inner_dim,
                config.num_attention_heads,
                config.eps,
                config.use_sdcm,
                config.sdcm_gate_dim,
                config.sdcm_kernel_size,
            )
        else:
            raise ValueError(f"`{name}` is not an added module; expected one of {self._added_module_names()}.")
        _initialize_added_module(module)
        return module

    def enable_cache(self, config) -> None:
        """[`~diffusers.models.cache_utils.CacheMixin.enable_cache`] (First Block Cache, Pyramid Attention Broadcast,
        FasterCache, ...) on the Echo blocks. Calls run inside `with model.cache_context(name):`, one name per
        guidance branch, as diffusers' Wan pipelines do."""
        _register_block_for_caches()
        super().enable_cache(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "EchoTransformer3DModel":
        """diffusers' `ModelMixin.from_pretrained`, strict: a weight the files lack (which diffusers would leave on
        the meta device or at random, with a warning) and a non-finite weight are a `ValueError` naming them."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        where = f"{str(pretrained_model_name_or_path)!r}" + (
            f" ({kwargs['subfolder']}/)" if kwargs.get("subfolder") else ""
        )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"the generator weights in {where} lack {len(missing)} tensors ({', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}): the file is incomplete or belongs to another model. Export "
                "the pipeline again (echo-export) or restore the file."
            )
        bad = non_finite_weights(model)
        if bad:
            raise ValueError(
                f"the generator weights in {where} hold NaN or infinite values ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}): the model that wrote them diverged. Export a checkpoint from "
                "before the divergence."
            )
        return (model, info) if output_loading_info else model

    # ------------------------------------------------------------------------------------------------------------
    # Loading from Wan
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_wan(
        cls,
        wan_transformer: WanTransformer3DModel | str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        **echo_config,
    ) -> "EchoTransformer3DModel":
        r"""
        Build an Echo generator from a diffusers `WanTransformer3DModel` (T2V or I2V).

        Args:
            wan_transformer (`WanTransformer3DModel`, `str` or `os.PathLike`): a model, or a folder (or hub id) in
                `WanTransformer3DModel.save_pretrained`'s layout: `config.json` and safetensors weights (one file or
                shards with an index).
            torch_dtype (`torch.dtype`, *optional*): dtype of the result (`_keep_in_fp32_modules` stay in float32,
                as with `from_pretrained(torch_dtype=...)`); defaults to the module's dtype, or float32 for a folder.
            subfolder (`str`, *optional*): e.g. `"transformer"` when `wan_transformer` is a Wan pipeline folder.
            local_files_only (`bool`, defaults to `False`): resolve a hub id from the local Hugging Face cache only.
            echo_config: the Echo-only config arguments (`audio_dim`, `context_dim`, `use_sdcm`, ...).

        Every Wan parameter is loaded under its own name. The patch embedding keeps the base's own input channels
        (T2V: the 16 noisy-latent channels; I2V: those plus Wan's 20 condition channels, which are the first 20 of
        ECHO's condition) and gets zero weights for the others, so the built model computes exactly what the base
        computes. Unknown or missing Wan keys raise a `ValueError`.

        Memory: the model is built on the meta device and every tensor goes straight into its final dtype, one at a
        time (`load_state_dict(assign=True)`): from a folder, peak host memory is the Echo model plus one stored Wan
        tensor (a float32 file loaded in bfloat16 is never held in float32) plus one added module; a module is
        copied (it is left as it was), so the peak is the Wan module plus the Echo model.
        """
        return build_from_wan(cls, wan_transformer, torch_dtype, subfolder, local_files_only, **echo_config)

    def load_wan_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """
        Copy a `WanTransformer3DModel` state dict into this (materialised) model strictly: every Wan key must name an
        Echo parameter of the same shape, and every Echo parameter outside the added modules must be given. The patch
        embedding may be narrower (a T2V or I2V base): it fills the first input channels and the remaining condition
        channels get zero weights.
        """
        keys = check_wan_shapes(self, {key: tuple(value.shape) for key, value in state_dict.items()})
        own = self.state_dict()
        new_state_dict = dict(own)
        for key in keys:
            new_state_dict[key] = wan_tensor(self, key, state_dict[key]).to(own[key].dtype)
        self.load_state_dict(new_state_dict, strict=True)

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states,
        timestep,
        condition,
        encoder_hidden_states,
        encoder_hidden_states_image,
        context_embeds,
        context_mask,
    ):
        latent_channels = self.config.out_channels
        if hidden_states.ndim != 5 or hidden_states.shape[1] != latent_channels:
            raise ValueError(
                f"`hidden_states` has shape {tuple(hidden_states.shape)}, expected (batch, {latent_channels}, frames, "
                "height, width) noisy latents."
            )
        batch_size, _, num_frames, height, width = hidden_states.shape
        _, p_h, p_w = self.config.patch_size
        if height % p_h or width % p_w:
            raise ValueError(
                f"`hidden_states` has shape {tuple(hidden_states.shape)}, expected height and width divisible by the "
                f"patch {(p_h, p_w)}."
            )
        if timestep.ndim != 1 or timestep.shape[0] != batch_size:
            raise ValueError(
                f"`timestep` has shape {tuple(timestep.shape)}, expected ({batch_size},): σ·1000 per sample."
            )
        if condition is not None:
            expected = (batch_size, self.config.condition_channels, num_frames, height, width)
            if tuple(condition.shape) != expected:
                raise ValueError(
                    f"`condition` has shape {tuple(condition.shape)}, expected {expected} ([mask, given latents, "
                    "reference plane] per latent frame, from `echo.conditioning.build_condition`)."
                )
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch_size
            or (encoder_hidden_states.shape[2] != self.config.text_dim)
        ):
            raise ValueError(
                f"`encoder_hidden_states` has shape {tuple(encoder_hidden_states.shape)}, expected ({batch_size}, "
                f"text_len, {self.config.text_dim})."
            )
        if self.config.added_kv_proj_dim is not None:
            # Wan's attention processor splits image tokens off the front of a 512-token text context.
            if encoder_hidden_states_image is None:
                raise ValueError(
                    "`encoder_hidden_states_image` is None, expected (batch, 257, image_dim) CLIP image tokens: this "
                    "I2V base has image key/value projections (`added_kv_proj_dim`)."
                )
            if encoder_hidden_states.shape[1] != 512:
                raise ValueError(
                    f"`encoder_hidden_states` has shape {tuple(encoder_hidden_states.shape)}, expected ({batch_size}, "
                    f"512, {self.config.text_dim}): I2V bases need the text padded to 512 tokens, as Wan pipelines do."
                )
        if context_embeds is not None:
            context_dim = self.context_proj.in_features
            if (
                context_embeds.ndim != 3
                or context_embeds.shape[0] != batch_size
                or context_embeds.shape[2] != context_dim
            ):
                raise ValueError(
                    f"`context_embeds` has shape {tuple(context_embeds.shape)}, expected ({batch_size}, N_ctx, "
                    f"{context_dim})."
                )
            if context_mask is not None and tuple(context_mask.shape) != tuple(context_embeds.shape[:2]):
                raise ValueError(
                    f"`context_mask` has shape {tuple(context_mask.shape)}, expected {tuple(context_embeds.shape[:2])}."
                )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | None = None,
        context_embeds: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        lip_mask: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        return_block_features: list[int] | None = None,
        audio_mask: torch.Tensor | None = None,
    ) -> EchoTransformerOutput | tuple:
        r"""
        The [`EchoTransformer3DModel`] forward method.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, out_channels, F, h, w)`): noisy latents x_σ.
            timestep (`torch.Tensor` of shape `(B,)`): σ·1000 (diffusers flow-matching convention).
            encoder_hidden_states (`torch.Tensor` of shape `(B, L_txt, text_dim)`): c_emo, the text-encoder states
                of the emotion description.
            condition (`torch.Tensor` of shape `(B, condition_channels, F, h, w)`, *optional*): from
                `echo.conditioning.build_condition`; `None` uses zeros (nothing given).
            audio_embeds (`torch.Tensor` of shape `(B, T, L_w, NL, audio_dim)`, *optional*): avatar wav2vec2 windows,
                T = 4(F − 1) + 1.
            context_embeds (`torch.Tensor` of shape `(B, N_ctx, context_dim)`, *optional*): f_pu from the LCU;
                `None` switches the user stream off (h_usr = 0).
            context_mask (`torch.Tensor` of shape `(B, N_ctx)`, *optional*): bool, True = valid.
            lip_mask, face_mask (`torch.Tensor` of shape `(B, F, H', W')`, *optional*): token-grid {0, 1} masks;
                `None` means all zeros.
            encoder_hidden_states_image (`torch.Tensor` of shape `(B, 257, image_dim)`, *optional*): I2V bases.
            attention_kwargs (`dict`, *optional*): `{"scale": lora_scale}`.
            return_dict (`bool`, defaults to `True`): return an [`EchoTransformerOutput`].
            return_block_features (`list[int]`, *optional*): blocks whose output hidden states to return.
            audio_mask (`torch.Tensor` of shape `(B,)`, *optional*): bool, False drops the avatar audio of that sample
                (the same output as ``audio_embeds=None`` for it). With ``context_mask`` rows all False for the user
                stream, this gives per-sample condition dropout for classifier-free guidance.

        Returns:
            [`EchoTransformerOutput`] or `(sample,)` / `(sample, block_features)`.
        """
        self._check_inputs(
            hidden_states,
            timestep,
            condition,
            encoder_hidden_states,
            encoder_hidden_states_image,
            context_embeds,
            context_mask,
        )
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        post_patch_num_frames = num_frames // p_t
        post_patch_height = height // p_h
        post_patch_width = width // p_w
        grid = (post_patch_num_frames, post_patch_height, post_patch_width)
        grid_shape = (batch_size, *grid)
        lip_mask = _grid_mask(lip_mask, "lip_mask", grid_shape)
        face_mask = _grid_mask(face_mask, "face_mask", grid_shape)
        if return_block_features is not None:
            bad = [i for i in return_block_features if not 0 <= i < len(self.blocks)]
            if bad:
                raise ValueError(f"`return_block_features` has indices {bad}, expected 0 … {len(self.blocks) - 1}.")

        # 1. Input: [noisy latents, condition] → patch & position embedding
        if condition is None:
            condition = hidden_states.new_zeros(batch_size, self.config.condition_channels, num_frames, height, width)
        hidden_states = torch.cat([hidden_states, condition.to(hidden_states.dtype)], dim=1)
        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states)
        hidden_states = hidden_states.flatten(2).transpose(1, 2).contiguous()  # B, F·H'·W', D

        # 2. Condition embeddings
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # B, 6, D
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        audio_tokens = None
        if audio_embeds is not None:
            if audio_embeds.shape[0] != batch_size:
                raise ValueError(f"`audio_embeds` has shape {tuple(audio_embeds.shape)}, expected batch {batch_size}.")
            audio_tokens = self.audio_proj(audio_embeds, post_patch_num_frames)  # B, F, r·L_w, D
            if audio_mask is not None and tuple(audio_mask.shape) != (batch_size,):
                raise ValueError(f"`audio_mask` has shape {tuple(audio_mask.shape)}, expected ({batch_size},).")
        context = None
        if context_embeds is not None:
            context = self.context_proj(context_embeds.to(hidden_states.dtype))  # B, N_ctx, D

        # 3. Transformer blocks
        block_features = {} if return_block_features is not None else None
        for index, block in enumerate(self.blocks):
            args = (
                hidden_states,
                encoder_hidden_states,
                timestep_proj,
                rotary_emb,
                audio_tokens,
                context,
                context_mask,
                lip_mask,
                face_mask,
                grid,
                audio_mask,
            )
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)
            if block_features is not None and index in return_block_features:
                block_features[index] = hidden_states

        # 4. Output norm, projection & unpatchify
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift = shift.to(hidden_states.device)
        scale = scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)

        hidden_states = hidden_states.reshape(
            batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
        )
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,) if block_features is None else (output, block_features)
        return EchoTransformerOutput(sample=output, block_features=block_features)
