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

Incremental inference (a conversation encoded chunk by chunk at a cost that does not grow with its length): of
Eq. 5-9, only the Mamba scans carry information across frames, and they are causal recurrences, so they continue from
an [`LCUState`] (per audio layer and per temporal vision layer, a [`MambaState`]). Everything else reads one frame or
one window at a time: the layer mix and LayerNorms, the face-token pooling, the spatial vision scan (within a frame),
Eq. 6's modulation, F_int, and Eq. 9 (the cross-attention reads the understanding tokens, not the history). Two things
read more than the frame itself, and set what the state may hold:

- the audio window looks ``radius`` frames ahead and is clamped at the history's last frame, so the window (hence
  every Mamba input) of the last ``radius`` frames changes when the history grows: a state may fold in frames
  ``0 … T − radius − 1`` only, and a later call re-reads the ``radius`` frames before the state's end for the windows;
- the clip is the last ``clip_frames`` frames of the history, so the next call's clip must start at or after the
  state's end (the caller passes ``save_state_at``, e.g. ``min(T − radius, next clip start)``).

``forward(..., state=…, save_state_at=…)`` takes the same full-history tensors as the offline call (so training and
inference build identical inputs) but reads only frames ``state.num_frames − radius … T − 1`` of them, and the
left-padding mask must be all valid there. The state is saved at the last multiple of the temporal Mamba layers'
parallel-scan block (``TEMPORAL_SCAN_BLOCK`` = 16 frames, `scan_block`) at or before ``save_state_at``: there the
full-history forward also starts a block from the carried state, so each call re-runs the open block from the saved
state, the same scans on the same values, and the result is bit-identical to the full-history forward (the LCU as
trained) on the PyTorch path. A call encodes at most 16 frames + its new frames, whatever the conversation's length.
The block is 16 frames rather than `echo.mamba`'s 256 for that bound, in training too (the grids must match): on the
PyTorch path the forward costs the same per frame, forward + backward ~25% more (tiny LCU, 1,000 frames, one CPU
thread: 0.36 s against 0.28 s), and a GPU without mamba-ssm launches more kernels; mamba-ssm's kernels ignore the
block. On the kernel path (mamba-ssm, CUDA) the continuation adds the initial state's contribution in closed form:
equal up to float rounding (~1e-6 relative in float32). The full-history forward is the training path.
"""

from __future__ import annotations

import math
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
from .devices import execution_device
from .mamba import MambaState, ResidualMambaLayer

logger = logging.get_logger(__name__)

TEMPORAL_SCAN_BLOCK = 16  # frames per parallel-scan block of the temporal Mamba layers (see the module docstring)


@dataclass
class LCUOutput(BaseOutput):
    r"""
    Args:
        context (`torch.Tensor` of shape `(batch_size, num_frames_cur, context_dim)`):
            ``f_pu``, the perception-understanding representation fed to the generator's SDCM (Eq. 9).
        context_mask (`torch.Tensor` of shape `(batch_size, num_frames_cur)`, `bool`): ``True`` = valid token.
        perception (`torch.Tensor` of shape `(batch_size, num_frames_cur, context_dim)`):
            ``P_usr``, the low-level perception features before the understanding fusion.
        state ([`LCUState`], *optional*): when ``save_state_at`` was given, the state for the next call: after the
            last multiple of ``scan_block`` frames at or before ``save_state_at`` (`None` when that is frame 0).

    The fields after the first default to `None` as in diffusers' outputs, so that ``LCUOutput({name: tensor})``
    rebuilds an output from its items (accelerate's ``send_to_device`` does, returning a hooked model's output to its
    input's device under ``enable_sequential_cpu_offload``); the LCU always fills ``context_mask`` and ``perception``.
    """

    context: torch.Tensor
    context_mask: torch.Tensor = None
    perception: torch.Tensor = None
    state: Optional["LCUState"] = None


@dataclass
class LCUState:
    r"""The LCU's recurrent state after the first ``num_frames`` frames of a conversation (see the module docstring).

    Args:
        num_frames (`int`): frames folded into the state (frames ``0 … num_frames − 1``).
        audio (`list[MambaState]`): one per audio Mamba layer (Eq. 5), batch ``B``.
        vision (`list[MambaState]`): one per temporal vision Mamba layer (Eq. 7), batch ``B · G`` (one sequence per
            grid cell); empty without the vision branch.
    """

    num_frames: int
    audio: list[MambaState]
    vision: list[MambaState]

    @property
    def batch_size(self) -> int:
        return self.audio[0].batch_size


ALPHA_INIT = 0.1  # the understanding gate α of Eq. 9 at initialisation (tanh(0.1) ≈ 0.1)


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
        for layer in [*self.audio_layers, *(self.vision_temporal_layers if use_visual else [])]:
            layer.mixer.scan_chunk_size = TEMPORAL_SCAN_BLOCK  # bounds the incremental re-run (module docstring)
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
            # α starts at ALPHA_INIT, not 0: the LCU reaches the generator only through SDCM's zero-initialised user
            # gate, so a zero α too would put the understanding tokens behind two zeros in series (no gradient from
            # them at step 0). 1-element, not 0-dim: FSDP flattens parameters.
            self.alpha = nn.Parameter(torch.full((1,), ALPHA_INIT))
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

    @property
    def scan_block(self) -> int:
        """Frames per parallel-scan block of the temporal Mamba layers (the least common multiple of their
        ``scan_chunk_size``): incremental states are saved at multiples of it (see the module docstring)."""
        layers = list(self.audio_layers) + (list(self.vision_temporal_layers) if self.config.use_visual else [])
        return math.lcm(*(layer.mixer.scan_chunk_size for layer in layers))

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
        frames = self._audio_frames(user_audio)  # B, T, audio_dim
        if user_audio_mask is not None:
            frames = frames * user_audio_mask.unsqueeze(-1).to(frames.dtype)
        # 2. Context windows (radius L_w // 2, clamped to each sample's valid span) and f_audio
        windows = self._windows(frames, user_audio_mask)  # B, T, L_w, audio_dim
        states = self.f_audio(windows.flatten(2))  # B, T, dim
        # 3. K pre-norm residual Mamba layers
        for layer in self.audio_layers:
            states = self._scan(layer, states, user_audio_mask)
        return windows, self.audio_out_norm(states)

    def _audio_frames(self, user_audio: torch.Tensor) -> torch.Tensor:
        """Layer mix and per-frame LayerNorm: `(B, T, NL, audio_dim)` → `(B, T, audio_dim)`."""
        weights = self.audio_layer_weights.softmax(0).to(user_audio.dtype)
        return self.audio_norm(torch.einsum("btld,l->btd", user_audio, weights))

    def _video_tokens(self, user_video: torch.Tensor, user_face_mask: torch.Tensor) -> torch.Tensor:
        """Eq. 7's face-masked token selection per frame: `(B, T, C_v, h_v, w_v)` → `(B·T, G, D)`."""
        batch_size, num_frames, channels, height, width = user_video.shape
        grid = tuple(self.config.video_grid)
        # Non-face tokens are excluded from the per-cell average
        keep = (user_face_mask > 0).to(user_video.dtype).reshape(batch_size * num_frames, 1, height, width)
        tokens = user_video.reshape(batch_size * num_frames, channels, height, width)
        summed = F.adaptive_avg_pool2d(tokens * keep, grid)  # B·T, C_v, g_h, g_w
        count = F.adaptive_avg_pool2d(keep, grid)  # B·T, 1, g_h, g_w
        pooled = summed / count.clamp_min(torch.finfo(count.dtype).tiny)
        pooled = pooled.flatten(2).transpose(1, 2)  # B·T, G, C_v
        has_face = (count.flatten(1) > 0).unsqueeze(-1)  # B·T, G, 1
        hidden = torch.where(has_face, self.video_proj(pooled), self.video_empty_token.to(pooled.dtype))
        return hidden + self.video_pos_embed.to(hidden.dtype)  # B·T, G, D

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
        batch_size, num_frames = user_video.shape[:2]
        # 1. Face-token selection
        hidden = self._video_tokens(user_video, user_face_mask)  # B·T, G, D
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

    def encode_history_incremental(
        self,
        user_audio: torch.Tensor,
        user_video: Optional[torch.Tensor] = None,
        user_face_mask: Optional[torch.Tensor] = None,
        state: Optional[LCUState] = None,
        save_state_at: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[LCUState]]:
        r"""Eq. 5 and 7 over the frames ``p … T − 1`` of a history whose first ``p = state.num_frames`` frames are in
        ``state`` (``p = 0`` without one); reads ``user_audio`` from frame ``p − radius`` (the windows), the video from
        frame ``p``, and moves only those rows to the model's device.

        Args:
            user_audio (`torch.Tensor` of shape `(batch_size, T, audio_num_layers, audio_dim)`): the whole history.
            user_video (`torch.Tensor` of shape `(batch_size, T, video_channels, h_v, w_v)`, *optional*),
            user_face_mask (`torch.Tensor` of shape `(batch_size, T, h_v, w_v)`, *optional*): with the vision branch.
            state ([`LCUState`], *optional*): the state after frame ``p − 1``.
            save_state_at (`int`, *optional*): return the state after the first ``save_state_at`` frames
                (``p ≤ save_state_at ≤ T − radius``) rounded down to a multiple of `scan_block`, but not below ``p``
                (`None` for 0 frames).

        Returns:
            `(windows, states, vision, state)` of frames ``p … T − 1``: `(B, T − p, L_w, audio_dim)`,
            `(B, T − p, D)`, `(B, T − p, G, D)` or `None`, and the [`LCUState`] or `None`.
        """
        radius = self.config.audio_window // 2
        batch_size, num_frames = user_audio.shape[:2]
        first = 0 if state is None else state.num_frames
        saved = None if save_state_at is None else max(first, save_state_at // self.scan_block * self.scan_block)
        split = None if saved is None else saved - first
        device, dtype = execution_device(self), self.dtype

        # 1. Audio (Eq. 5): frames from `first − radius` for the windows; the Mamba layers continue from the state
        lowest = max(0, first - radius)
        frames = self._audio_frames(user_audio[:, lowest:].to(device, dtype))  # B, T − lowest, audio_dim
        offsets = torch.arange(-radius, radius + 1, device=device)
        rows = (torch.arange(first, num_frames, device=device)[:, None] + offsets).clamp(0, num_frames - 1) - lowest
        windows = frames[:, rows]  # B, T − p, L_w, audio_dim
        states = self.f_audio(windows.flatten(2))  # B, T − p, D
        audio_states = []
        for index, layer in enumerate(self.audio_layers):
            states, layer_state = _step_and_save(layer, states, None if state is None else state.audio[index], split)
            audio_states.append(layer_state)
        states = self.audio_out_norm(states)

        # 2. Vision (Eq. 7): per-frame tokens and spatial scans of the new frames, temporal scans from the state
        vision, vision_states = None, []
        if self.config.use_visual:
            hidden = self._video_tokens(user_video[:, first:].to(device, dtype), user_face_mask[:, first:].to(device))
            num_new, num_cells = num_frames - first, hidden.shape[1]
            for index, (spatial, temporal) in enumerate(zip(self.vision_spatial_layers, self.vision_temporal_layers)):
                hidden = spatial(hidden)  # B·T', G, D
                hidden = hidden.reshape(batch_size, num_new, num_cells, -1).transpose(1, 2)
                hidden = hidden.reshape(batch_size * num_cells, num_new, -1)  # B·G, T', D
                layer_state = None if state is None else state.vision[index]
                hidden, layer_state = _step_and_save(temporal, hidden, layer_state, split)
                vision_states.append(layer_state)
                hidden = hidden.reshape(batch_size, num_cells, num_new, -1).transpose(1, 2)
                hidden = hidden.reshape(batch_size * num_new, num_cells, -1)  # B·T', G, D
            vision = self.vision_out_norm(hidden).reshape(batch_size, num_new, num_cells, -1)

        new_state = None
        if saved:  # the state after 0 frames is no state (zeros)
            new_state = LCUState(num_frames=int(saved), audio=audio_states, vision=vision_states)
        return windows, states, vision, new_state

    def _check_incremental(self, num_frames, clip_frames, user_audio_mask, state, save_state_at, batch_size):
        radius = self.config.audio_window // 2
        first = 0 if state is None else int(state.num_frames)
        if state is not None:
            num_vision = len(self.vision_temporal_layers) if self.config.use_visual else 0
            if len(state.audio) != len(self.audio_layers) or len(state.vision) != num_vision:
                raise ValueError(
                    f"`state` holds {len(state.audio)} audio and {len(state.vision)} vision layer states, expected "
                    f"{len(self.audio_layers)} and {num_vision} (a state of another LCU configuration)."
                )
            if state.batch_size != batch_size:
                raise ValueError(f"`state` is for a batch of {state.batch_size}, got a batch of {batch_size}.")
        if num_frames - clip_frames < first:
            raise ValueError(
                f"`clip_frames` = {clip_frames} starts the clip at frame {num_frames - clip_frames}, before the end of "
                f"the frames `state` holds ({first}): a state can only be continued. Save it earlier "
                "(`save_state_at` ≤ the next clip's first frame)."
            )
        if save_state_at is not None and not first <= save_state_at <= num_frames - radius:
            raise ValueError(
                f"`save_state_at` is {save_state_at}, expected {first} ≤ save_state_at ≤ T − radius = "
                f"{num_frames - radius}: the audio windows of the last {radius} frames are not final until the "
                "history grows."
            )
        if user_audio_mask is not None and not bool(user_audio_mask[:, max(0, first - radius) :].all()):
            raise ValueError(
                "`user_audio_mask` marks padded frames, but the incremental path (`state` / `save_state_at`) encodes "
                "one unpadded conversation from its first frame: pass all-valid masks or use the full-history call."
            )

    def _check_inputs(
        self, user_audio, clip_frames, user_audio_mask, user_video, user_face_mask, understanding, understanding_mask
    ):
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
            if (
                understanding.ndim != 3
                or understanding.shape[0] != batch_size
                or (understanding.shape[2] != config.understanding_dim)
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
                n
                for n, v in (("understanding", understanding), ("understanding_mask", understanding_mask))
                if v is not None
            ]
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
        state: Optional[LCUState] = None,
        save_state_at: Optional[int] = None,
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
            state ([`LCUState`], *optional*): incremental inference: the state of the first ``state.num_frames``
                frames of this same history (from an earlier call's ``save_state_at``); those frames are not encoded
                again (see the module docstring). The inputs may live on the CPU: only the rows read are moved.
            save_state_at (`int`, *optional*): incremental inference: the latest frame the next call's clip may start
                at (at most ``T_hist − audio_window // 2``); ``state`` holds the state after the last multiple of
                `scan_block` at or before it.
            return_dict (`bool`, defaults to `True`): return an [`LCUOutput`] instead of a tuple.

        Returns:
            [`LCUOutput`]: ``context`` f_pu and ``perception`` P_usr of shape `(batch_size, clip_frames,
            context_dim)`, ``context_mask`` `(batch_size, clip_frames)`, and ``state`` when ``save_state_at`` is
            given. As a tuple: ``(context, context_mask, perception)``, plus ``state`` when ``save_state_at`` is given.
        """
        # 1. Check inputs
        self._check_inputs(
            user_audio, clip_frames, user_audio_mask, user_video, user_face_mask, understanding, understanding_mask
        )
        clip_frames = int(clip_frames)
        batch_size, num_frames = user_audio.shape[:2]
        if user_audio_mask is not None:
            user_audio_mask = user_audio_mask.bool()
        incremental = state is not None or save_state_at is not None
        new_state = vision = None
        if incremental:
            self._check_incremental(num_frames, clip_frames, user_audio_mask, state, save_state_at, batch_size)

        # 2. Audio history (Eq. 5): windows (B, T, L_w, audio_dim), states (B, T, D); incremental: frames p … T − 1
        if incremental:
            windows, states, vision, new_state = self.encode_history_incremental(
                user_audio, user_video, user_face_mask, state, save_state_at
            )
        else:
            user_audio = user_audio.to(self.dtype)
            windows, states = self.encode_audio_history(user_audio, user_audio_mask)

        # 3. Gated residual modulation of the current clip's windows (Eq. 6)
        current = windows[:, -clip_frames:]  # B, T_cur, L_w, audio_dim
        broadcast = states[:, -clip_frames:, None].expand(-1, -1, current.shape[2], -1)  # B, T_cur, L_w, D
        gate = torch.sigmoid(self.audio_gate(torch.cat([current, broadcast], dim=-1)))
        modulated = current + gate * torch.tanh(self.f_proj(broadcast))  # B, T_cur, L_w, audio_dim
        audio_tokens = self.audio_tokens(modulated.flatten(2))  # B, T_cur, D

        # 4. Vision history (Eq. 7) and F_int → P_usr
        if self.config.use_visual:
            if vision is None:
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
            user_audio_mask[:, -clip_frames:].to(context.device)
            if user_audio_mask is not None
            else torch.ones(batch_size, clip_frames, dtype=torch.bool, device=context.device)
        )
        if not return_dict:
            return (context, context_mask, perception) + ((new_state,) if save_state_at is not None else ())
        return LCUOutput(context=context, context_mask=context_mask, perception=perception, state=new_state)


def _step_and_save(
    layer: ResidualMambaLayer, hidden_states: torch.Tensor, state: Optional[MambaState], split: Optional[int]
) -> tuple[torch.Tensor, Optional[MambaState]]:
    """Steps ``layer`` over ``hidden_states`` `(B, k, D)` from ``state``; returns the outputs and the state after the
    first ``split`` frames (`None` when ``split`` is `None`)."""
    length = hidden_states.shape[1]
    if split is None or split == length:
        outputs, last = layer.step(hidden_states, state)
        return outputs, None if split is None else last
    if split == 0:
        return layer.step(hidden_states, state)[0], state
    head, saved = layer.step(hidden_states[:, :split], state)
    tail, _ = layer.step(hidden_states[:, split:], saved)
    return torch.cat([head, tail], dim=1), saved
