"""Long-range Contextual Understanding (LCU): the user-context encoder of ECHO (paper Eq. 5-9).

Data flow (shapes for one batch, ``T`` = history length, ``T_cur`` = current clip length):

```
user_audio (B, T, NL, 768) ─ layer mix ─ LayerNorm ─ window (L_w) ─ f_audio ─ K × [x + Mamba(LN(x))]   (Eq. 5)
        └─ current-clip windows A (B, T_cur, L_w, 768) + g ⊙ tanh(f_proj(Ā)) ─ flatten L_w·768 → D per frame (Eq. 6)
user_video (B, T, C_v, h_v, w_v) ─ face-token selection + pooling to a G = g_h × g_w grid                 (Eq. 7)
        └─ N_v × [spatial Mamba within each frame, temporal Mamba across frames] ─ V̂ (B, T, G, D)
F_int([Â ; V̂]) per current frame ─ P_usr (B, T_cur, context_dim)
f_m = CrossAttn(P_usr, f_align(S_usr))·tanh(α) + P_usr,  f_pu = FFN(f_m)·tanh(β) + f_m,  α = β = 0       (Eq. 9)
```

Design decisions (the paper leaves them open):

- **Causality.** Every operation is per frame except the Mamba scans, which are causal. The only look-ahead is the
  audio context window (Hallo's scheme, ``radius`` frames); windows are clamped at the last history frame, so the
  output for a clip ending at the last index depends only on frames up to that index.
- **Left padding.** Histories of a batch are left-padded (``user_audio_mask`` False on padding). Padding is zeroed
  before each scan and pooled windows never read padded rows as valid data, so a padded history gives the same
  output as the unpadded one.
- **Tokens.** ``P_usr`` and ``f_pu`` hold one token per current-clip frame (``N_ctx = T_cur``); ``context_mask`` is
  the validity of those frames.
- **Switches.** ``use_visual=False`` (the "w/o LPE" ablation) removes the vision branch and ``F_int``'s visual
  input; ``use_understanding=False`` ("w/o HBCU") removes ``f_align``, the cross-attention and α (the gated FFN of
  Eq. 9 stays, acting on ``f_m = P_usr``). Removed modules have no parameters and their inputs are not needed.
  ``use_emotion`` ("w/o LAU") is carried here for the pipeline: the emotion text is consumed by the generator's
  text cross-attention (see `echo.emotion`), not by this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging

from .audio import window_features
from .mamba import ResidualMambaLayer

logger = logging.get_logger(__name__)


@dataclass
class LCUOutput(BaseOutput):
    r"""
    Args:
        context (`torch.Tensor` of shape `(batch_size, num_frames_cur, context_dim)`):
            ``f_pu``, the perception-understanding representation fed to the generator's SDCM (Eq. 9).
        context_mask (`torch.Tensor` of shape `(batch_size, num_frames_cur)`, `bool`): ``True`` = valid token.
        perception (`torch.Tensor` of shape `(batch_size, num_frames_cur, context_dim)`):
            ``P_usr``, the low-level perception features before the understanding fusion.
    """

    context: torch.Tensor
    context_mask: torch.Tensor
    perception: torch.Tensor


class LongRangeContextEncoder(ModelMixin, ConfigMixin):
    r"""
    The LCU (paper Sec. 3.1): encodes the user's long-range audio-visual history and, optionally, the high-level
    understanding tokens of a multimodal model into ``f_pu``, the user context of the generator.

    Args:
        audio_dim (`int`, defaults to 768): width of the user's wav2vec2 features.
        audio_num_layers (`int`, defaults to 13): wav2vec2 hidden layers per frame (mixed by learned softmax weights).
        audio_window (`int`, defaults to 5): context window L_w (odd; radius ``L_w // 2``).
        dim (`int`, defaults to 1024): inner width D of the Mamba branches.
        num_audio_layers (`int`, defaults to 4): K, the residual Mamba layers of the audio branch (Eq. 5).
        use_visual (`bool`, defaults to `True`): the vision branch (Eq. 7) and ``F_int`` (LPE).
        video_channels (`int`, defaults to 16): channels C_v of the user video tokens (16 for Wan VAE latents of the
            user's crop; the hidden size for a frozen image encoder's patch tokens).
        video_grid (`tuple[int, int]`, defaults to `(4, 4)`): face tokens are pooled to this grid per frame.
        num_vision_layers (`int`, defaults to 2): spatial + temporal Mamba pairs of the vision branch.
        use_understanding (`bool`, defaults to `True`): the understanding fusion of Eq. 9 (HBCU).
        understanding_dim (`int`, defaults to 3584): width of S_usr (Qwen2.5-Omni-7B thinker hidden size).
        num_attention_heads (`int`, defaults to 8): heads of the fusion cross-attention.
        context_dim (`int`, defaults to 1536): output width (= the generator's ``context_dim``).
        use_emotion (`bool`, defaults to `True`): LAU switch, read by the pipeline (no parameter here).
        d_state (`int`, defaults to 16), d_conv (`int`, defaults to 4), expand (`int`, defaults to 2): Mamba sizes.
        dt_min (`float`, defaults to 1e-4), dt_max (`float`, defaults to 0.1): range of the initial Mamba step sizes;
            channels start with memories from ~10 to ~10,000 frames (minutes of conversation at 25 fps).
        ffn_mult (`int`, defaults to 4): hidden width multiplier of ``F_ffn`` (Eq. 9).
    """

    _supports_gradient_checkpointing = True
    # the SSM state matrix and skip stay in float32 under `from_pretrained(torch_dtype=...)` (as in mamba-ssm)
    _keep_in_fp32_modules = ["A_log", "D"]

    @register_to_config
    def __init__(
        self,
        audio_dim: int = 768,
        audio_num_layers: int = 13,
        audio_window: int = 5,
        dim: int = 1024,
        num_audio_layers: int = 4,
        use_visual: bool = True,
        video_channels: int = 16,
        video_grid: tuple[int, int] = (4, 4),
        num_vision_layers: int = 2,
        use_understanding: bool = True,
        understanding_dim: int = 3584,
        num_attention_heads: int = 8,
        context_dim: int = 1536,
        use_emotion: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-4,
        dt_max: float = 0.1,
        ffn_mult: int = 4,
    ):
        super().__init__()
        if audio_window % 2 != 1:
            raise ValueError(f"`audio_window` must be odd (2·radius + 1), got {audio_window}.")
        if use_understanding and context_dim % num_attention_heads != 0:
            raise ValueError(
                f"`context_dim` ({context_dim}) must be divisible by `num_attention_heads` ({num_attention_heads})."
            )
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_min=dt_min, dt_max=dt_max)
        self.gradient_checkpointing = False

        # 1. Audio branch (Eq. 5-6)
        self.audio_layer_weights = nn.Parameter(torch.zeros(audio_num_layers))  # softmax → uniform mix at init
        self.audio_norm = nn.LayerNorm(audio_dim)
        self.f_audio = nn.Linear(audio_window * audio_dim, dim)
        self.audio_layers = nn.ModuleList([ResidualMambaLayer(dim, **mamba_kwargs) for _ in range(num_audio_layers)])
        self.audio_out_norm = nn.LayerNorm(dim)
        self.f_proj = nn.Linear(dim, audio_dim)
        self.audio_gate = nn.Linear(audio_dim + dim, audio_dim)  # gated fusion g_usr = σ(W [A; Ā])
        self.audio_tokens = nn.Linear(audio_window * audio_dim, dim)

        # 2. Vision branch (Eq. 7) and F_int
        grid_tokens = video_grid[0] * video_grid[1]
        if use_visual:
            self.video_proj = nn.Linear(video_channels, dim)
            self.video_empty_token = nn.Parameter(torch.zeros(dim))
            self.video_pos_embed = nn.Parameter(torch.randn(grid_tokens, dim) * 0.02)
            self.vision_spatial_layers = nn.ModuleList(
                [ResidualMambaLayer(dim, **mamba_kwargs) for _ in range(num_vision_layers)]
            )
            self.vision_temporal_layers = nn.ModuleList(
                [ResidualMambaLayer(dim, **mamba_kwargs) for _ in range(num_vision_layers)]
            )
            self.vision_out_norm = nn.LayerNorm(dim)
        fused_in = dim * (1 + grid_tokens) if use_visual else dim
        self.f_int = nn.Sequential(nn.Linear(fused_in, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, context_dim))

        # 3. Understanding fusion (Eq. 9)
        if use_understanding:
            self.f_align = nn.Sequential(
                nn.LayerNorm(understanding_dim),
                nn.Linear(understanding_dim, context_dim),
                nn.GELU(approximate="tanh"),
                nn.Linear(context_dim, context_dim),
            )
            self.cross_attn_norm = nn.LayerNorm(context_dim)
            self.cross_attn = Attention(
                query_dim=context_dim,
                cross_attention_dim=context_dim,
                heads=num_attention_heads,
                dim_head=context_dim // num_attention_heads,
                bias=True,
                out_bias=True,
            )
            self.alpha = nn.Parameter(torch.zeros(1))  # 1-element, not 0-dim: FSDP flattens parameters
        self.ffn_norm = nn.LayerNorm(context_dim)
        self.ffn = FeedForward(context_dim, mult=ffn_mult, activation_fn="gelu-approximate")
        self.beta = nn.Parameter(torch.zeros(1))

        self._warned_unused = set()

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """Names of the `forward` inputs this configuration needs (besides ``clip_frames``)."""
        names = ["user_audio"]
        if self.config.use_visual:
            names += ["user_video", "user_face_mask"]
        if self.config.use_understanding:
            names += ["understanding"]
        return tuple(names)

    def _scan(self, layer: nn.Module, hidden_states: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer, hidden_states, mask)
        return layer(hidden_states, mask=mask)

    def _windows(self, frames: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-frame context windows `(B, T, D)` → `(B, T, L_w, D)`, edges replicated within each valid span.

        Without a mask this is `echo.audio.window_features`. With a left-padding mask the lower edge of sample b is
        its first valid frame, so a padded history gets exactly the windows of the unpadded one.
        """
        radius = self.config.audio_window // 2
        if mask is None:
            return window_features(frames, radius=radius, dim=1)
        batch_size, num_frames = mask.shape
        first_valid = (num_frames - mask.sum(dim=1)).clamp(max=num_frames - 1)  # B (left padding)
        offsets = torch.arange(-radius, radius + 1, device=frames.device)
        rows = torch.arange(num_frames, device=frames.device)[:, None] + offsets  # T, L_w
        rows = torch.maximum(rows[None], first_valid[:, None, None]).clamp(max=num_frames - 1)  # B, T, L_w
        return frames[torch.arange(batch_size, device=frames.device)[:, None, None], rows]

    def encode_audio_history(
        self, user_audio: torch.Tensor, user_audio_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Eq. 5 over the whole history.

        Args:
            user_audio (`torch.Tensor` of shape `(batch_size, num_frames, audio_num_layers, audio_dim)`).
            user_audio_mask (`torch.Tensor` of shape `(batch_size, num_frames)`, *optional*): ``True`` = valid.

        Returns:
            windows (`torch.Tensor` of shape `(batch_size, num_frames, audio_window, audio_dim)`): A_usr per frame.
            states (`torch.Tensor` of shape `(batch_size, num_frames, dim)`): Ã_usr,K (after a final LayerNorm).
        """
        # 1. Layer mix and per-frame normalisation
        weights = self.audio_layer_weights.softmax(0).to(user_audio.dtype)
        frames = self.audio_norm(torch.einsum("btld,l->btd", user_audio, weights))  # B, T, audio_dim
        if user_audio_mask is not None:
            frames = frames * user_audio_mask.unsqueeze(-1).to(frames.dtype)
        # 2. Context windows (radius L_w // 2, clamped to each sample's valid span) and f_audio
        windows = self._windows(frames, user_audio_mask)  # B, T, L_w, audio_dim
        states = self.f_audio(windows.flatten(2))  # B, T, dim
        # 3. K pre-norm residual Mamba layers
        for layer in self.audio_layers:
            states = self._scan(layer, states, user_audio_mask)
        return windows, self.audio_out_norm(states)

    def encode_video_history(
        self,
        user_video: torch.Tensor,
        user_face_mask: torch.Tensor,
        user_audio_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        r"""Eq. 7 and the vision Mamba over the whole history.

        Args:
            user_video (`torch.Tensor` of shape `(batch_size, num_frames, video_channels, height, width)`).
            user_face_mask (`torch.Tensor` of shape `(batch_size, num_frames, height, width)`): {0, 1} face tokens.
            user_audio_mask (`torch.Tensor` of shape `(batch_size, num_frames)`, *optional*): valid frames.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_frames, grid_h · grid_w, dim)`: V̂_usr.
        """
        batch_size, num_frames, channels, height, width = user_video.shape
        grid = tuple(self.config.video_grid)
        # 1. Face-token selection: non-face tokens are excluded from the per-cell average
        keep = (user_face_mask > 0).to(user_video.dtype).reshape(batch_size * num_frames, 1, height, width)
        tokens = user_video.reshape(batch_size * num_frames, channels, height, width)
        summed = F.adaptive_avg_pool2d(tokens * keep, grid)  # B·T, C_v, g_h, g_w
        count = F.adaptive_avg_pool2d(keep, grid)  # B·T, 1, g_h, g_w
        pooled = summed / count.clamp_min(torch.finfo(count.dtype).tiny)
        pooled = pooled.flatten(2).transpose(1, 2)  # B·T, G, C_v
        has_face = (count.flatten(1) > 0).unsqueeze(-1)  # B·T, G, 1
        hidden = torch.where(has_face, self.video_proj(pooled), self.video_empty_token.to(pooled.dtype))
        hidden = hidden + self.video_pos_embed.to(hidden.dtype)  # B·T, G, D
        num_cells = hidden.shape[1]

        # 2. Vision Mamba: a spatial scan within each frame, then a causal temporal scan per grid cell
        temporal_mask = None
        if user_audio_mask is not None:
            temporal_mask = user_audio_mask.repeat_interleave(num_cells, dim=0)  # B·G, T
        for spatial, temporal in zip(self.vision_spatial_layers, self.vision_temporal_layers):
            hidden = self._scan(spatial, hidden, None)  # B·T, G, D
            hidden = hidden.reshape(batch_size, num_frames, num_cells, -1).transpose(1, 2)
            hidden = hidden.reshape(batch_size * num_cells, num_frames, -1)  # B·G, T, D
            hidden = self._scan(temporal, hidden, temporal_mask)
            hidden = hidden.reshape(batch_size, num_cells, num_frames, -1).transpose(1, 2)
            hidden = hidden.reshape(batch_size * num_frames, num_cells, -1)  # B·T, G, D
        return self.vision_out_norm(hidden).reshape(batch_size, num_frames, num_cells, -1)

    def _check_inputs(self, user_audio, clip_frames, user_audio_mask, user_video, user_face_mask, understanding,
                      understanding_mask):  # fmt: skip
        config = self.config
        expected = (config.audio_num_layers, config.audio_dim)
        if user_audio.ndim != 4 or tuple(user_audio.shape[2:]) != expected:
            raise ValueError(
                f"`user_audio` must have shape (batch, T_hist, {expected[0]}, {expected[1]}), "
                f"got {tuple(user_audio.shape)}."
            )
        batch_size, num_frames = user_audio.shape[:2]
        if not 1 <= int(clip_frames) <= num_frames:
            raise ValueError(f"`clip_frames` must be in [1, T_hist={num_frames}], got {clip_frames}.")
        if user_audio_mask is not None and tuple(user_audio_mask.shape) != (batch_size, num_frames):
            raise ValueError(
                f"`user_audio_mask` must have shape {(batch_size, num_frames)}, got {tuple(user_audio_mask.shape)}."
            )
        unused = []
        if config.use_visual:
            if user_video is None or user_face_mask is None:
                raise ValueError("`user_video` and `user_face_mask` are required when `use_visual=True`.")
            if (
                user_video.ndim != 5
                or tuple(user_video.shape[:3]) != (batch_size, num_frames, config.video_channels)
                or tuple(user_face_mask.shape) != (batch_size, num_frames, *user_video.shape[3:])
            ):
                raise ValueError(
                    f"`user_video` must have shape ({batch_size}, {num_frames}, {config.video_channels}, h_v, w_v) "
                    f"and `user_face_mask` ({batch_size}, {num_frames}, h_v, w_v); got {tuple(user_video.shape)} and "
                    f"{tuple(user_face_mask.shape)}."
                )
        else:
            unused += [n for n, v in (("user_video", user_video), ("user_face_mask", user_face_mask)) if v is not None]
        if config.use_understanding:
            if understanding is None:
                raise ValueError("`understanding` (S_usr) is required when `use_understanding=True`.")
            if understanding.ndim != 3 or understanding.shape[0] != batch_size or (
                understanding.shape[2] != config.understanding_dim
            ):
                raise ValueError(
                    f"`understanding` must have shape ({batch_size}, N_s, {config.understanding_dim}), "
                    f"got {tuple(understanding.shape)}."
                )
            if understanding_mask is not None and tuple(understanding_mask.shape) != tuple(understanding.shape[:2]):
                raise ValueError(
                    f"`understanding_mask` must have shape {tuple(understanding.shape[:2])}, "
                    f"got {tuple(understanding_mask.shape)}."
                )
        else:
            unused += [
                n for n, v in (("understanding", understanding), ("understanding_mask", understanding_mask))
                if v is not None
            ]  # fmt: skip
        new = set(unused) - self._warned_unused
        if new:
            logger.warning(f"LongRangeContextEncoder ignores {sorted(new)}: the matching branch is switched off.")
            self._warned_unused |= new

    def forward(
        self,
        user_audio: torch.Tensor,
        clip_frames: int,
        user_audio_mask: Optional[torch.Tensor] = None,
        user_video: Optional[torch.Tensor] = None,
        user_face_mask: Optional[torch.Tensor] = None,
        understanding: Optional[torch.Tensor] = None,
        understanding_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> LCUOutput | tuple:
        r"""
        Args:
            user_audio (`torch.Tensor` of shape `(batch_size, T_hist, audio_num_layers, audio_dim)`):
                per-frame wav2vec2 features of the user, frames 1..t of the conversation (left-padded).
            clip_frames (`int`): T_cur, the current clip is the last ``clip_frames`` frames of the history.
            user_audio_mask (`torch.Tensor` of shape `(batch_size, T_hist)`, *optional*): ``True`` = valid frame.
            user_video (`torch.Tensor` of shape `(batch_size, T_hist, video_channels, h_v, w_v)`, *optional*):
                user video tokens per frame; required iff ``use_visual``.
            user_face_mask (`torch.Tensor` of shape `(batch_size, T_hist, h_v, w_v)`, *optional*): {0, 1} face
                tokens; required iff ``use_visual``.
            understanding (`torch.Tensor` of shape `(batch_size, N_s, understanding_dim)`, *optional*): S_usr;
                required iff ``use_understanding``.
            understanding_mask (`torch.Tensor` of shape `(batch_size, N_s)`, *optional*): ``True`` = valid token.
            return_dict (`bool`, defaults to `True`): return an [`LCUOutput`] instead of a tuple.

        Returns:
            [`LCUOutput`]: ``context`` f_pu and ``perception`` P_usr of shape `(batch_size, clip_frames,
            context_dim)`, ``context_mask`` `(batch_size, clip_frames)`.
        """
        # 1. Check inputs
        self._check_inputs(
            user_audio, clip_frames, user_audio_mask, user_video, user_face_mask, understanding, understanding_mask
        )
        clip_frames = int(clip_frames)
        batch_size, num_frames = user_audio.shape[:2]
        if user_audio_mask is not None:
            user_audio_mask = user_audio_mask.bool()
        user_audio = user_audio.to(self.dtype)

        # 2. Audio history (Eq. 5): windows (B, T, L_w, audio_dim), states (B, T, D)
        windows, states = self.encode_audio_history(user_audio, user_audio_mask)

        # 3. Gated residual modulation of the current clip's windows (Eq. 6)
        current = windows[:, -clip_frames:]  # B, T_cur, L_w, audio_dim
        broadcast = states[:, -clip_frames:, None].expand(-1, -1, current.shape[2], -1)  # B, T_cur, L_w, D
        gate = torch.sigmoid(self.audio_gate(torch.cat([current, broadcast], dim=-1)))
        modulated = current + gate * torch.tanh(self.f_proj(broadcast))  # B, T_cur, L_w, audio_dim
        audio_tokens = self.audio_tokens(modulated.flatten(2))  # B, T_cur, D

        # 4. Vision history (Eq. 7) and F_int → P_usr
        if self.config.use_visual:
            vision = self.encode_video_history(user_video.to(self.dtype), user_face_mask, user_audio_mask)
            fused = torch.cat([audio_tokens, vision[:, -clip_frames:].flatten(2)], dim=-1)  # B, T_cur, (1+G)·D
        else:
            fused = audio_tokens
        perception = self.f_int(fused)  # B, T_cur, context_dim

        # 5. Gated cross-attention fusion with the understanding tokens (Eq. 9)
        fused_context = perception
        if self.config.use_understanding:
            keys = self.f_align(understanding.to(self.dtype))  # B, N_s, context_dim
            attn_mask = None
            has_tokens = None
            if understanding_mask is not None:
                understanding_mask = understanding_mask.bool()
                attn_mask = understanding_mask[:, None, :]  # B, 1, N_s
                has_tokens = understanding_mask.any(dim=1)[:, None, None]  # B, 1, 1
                # a sample without understanding tokens attends to all (its output is discarded below)
                attn_mask = attn_mask | ~has_tokens
            attended = self.cross_attn(
                self.cross_attn_norm(perception), encoder_hidden_states=keys, attention_mask=attn_mask
            )
            if has_tokens is not None:
                attended = torch.where(has_tokens, attended, torch.zeros_like(attended))
            fused_context = attended * torch.tanh(self.alpha) + perception
        context = self.ffn(self.ffn_norm(fused_context)) * torch.tanh(self.beta) + fused_context

        context_mask = (
            user_audio_mask[:, -clip_frames:]
            if user_audio_mask is not None
            else torch.ones(batch_size, clip_frames, dtype=torch.bool, device=context.device)
        )
        if not return_dict:
            return (context, context_mask, perception)
        return LCUOutput(context=context, context_mask=context_mask, perception=perception)
