"""Selective state-space (Mamba) block with one set of weights and two execution paths.

The block follows ``mamba_ssm.modules.mamba_simple.Mamba`` (same parameter names: ``in_proj``, ``conv1d``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so weights move freely between the two paths:

- **kernel path**: ``mamba_ssm``'s fused CUDA ``selective_scan_fn``, used when ``mamba_ssm`` is importable and the
  input lives on a CUDA device;
- **PyTorch path**: a parallel (Blelloch) scan from ``mambapy`` over the discretised recurrence
  ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t``, ``y_t = C_t h_t + D x_t``. Its cost is linear in the sequence
  length and its backward pass is a second scan (no per-step Python loop, whose backward is quadratic in time).

Both paths run the scan in float32 whatever the parameter dtype (as the CUDA kernel does).

Left-padded sequences are supported through a ``mask`` (``True`` = valid): padded positions are zeroed before the
causal convolution and before the scan, so the recurrent state is exactly zero when the first valid frame arrives and
a padded sequence yields the same outputs on its valid frames as the same sequence without padding.

Recurrent inference: `MambaBlock.step` continues a sequence from a `MambaState` (the convolution's last ``d_conv``
inputs and the SSM state ``h_t``, what mamba-ssm's ``InferenceParams`` holds per layer) over ``k ≥ 1`` new frames
and returns their outputs and the new state, so a stream is encoded at a cost per frame that does not depend on how
long it has run. Stepping a sequence in pieces that start at multiples of ``scan_chunk_size`` (from the sequence's
first frame) is bit-identical to the full scan on the PyTorch path: the full scan also runs one parallel scan per such
block from the carried state, on the same values (the convolution is a fixed-order sum over its taps for that
reason). Split elsewhere, or on the kernel path, it equals the full scan up to float rounding: the parallel scan's
summation tree depends on where the sequence is split (float64: ~1e-12; float32: ~1e-6 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional fused CUDA kernels (pip install mamba-ssm causal-conv1d)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:  # pragma: no cover - depends on the installation
    selective_scan_fn = None

from mambapy.pscan import pscan

SCAN_CHUNK_SIZE = 256  # steps per parallel scan of the PyTorch path
# Largest (batch · chunk · d_inner · d_state) state tensor of one scan: small tensors are reused by the allocator and
# stay in cache, large ones are fresh, page-faulted memory every call (the cost per frame would grow with the length).
SCAN_MAX_STATE_ELEMENTS = 1 << 21

MAMBA_KERNEL_INSTALL_HINT = (
    "The fused Mamba kernels need the `mamba-ssm` package and a CUDA device. Install them with "
    "`pip install mamba-ssm causal-conv1d --no-build-isolation` (or `pip install echo-ihg[mamba]`), or build the "
    "block with `use_kernel=None`/`False` to use the PyTorch parallel scan."
)


def kernel_available() -> bool:
    """Whether ``mamba_ssm``'s fused selective-scan kernel is importable."""
    return selective_scan_fn is not None


def selective_scan_pytorch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    chunk_size: int = SCAN_CHUNK_SIZE,
    initial_state: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Selective scan with a parallel scan, computed in float32 (float64 inputs stay float64).

    The sequence is scanned in chunks of ``chunk_size`` steps, each a parallel scan started from the previous chunk's
    last state (``h_0`` enters as ``exp(Δ_1 A) h_0`` added to the first input), and a large batch of independent
    sequences in groups. The result is the same recurrence; keeping each scan's working set small keeps the cost per
    step constant, so the total stays linear in the length.

    Args:
        u (`torch.Tensor` of shape `(batch, length, d_inner)`): scan input x.
        delta (`torch.Tensor` of shape `(batch, length, d_inner)`): positive step sizes Δ (after softplus).
        A (`torch.Tensor` of shape `(d_inner, d_state)`): negative state matrix (diagonal per channel).
        B (`torch.Tensor` of shape `(batch, length, d_state)`): input matrix B_t.
        C (`torch.Tensor` of shape `(batch, length, d_state)`): output matrix C_t.
        D (`torch.Tensor` of shape `(d_inner,)`): skip connection.
        z (`torch.Tensor` of shape `(batch, length, d_inner)`, *optional*): gate, the output is multiplied by
            ``silu(z)``.
        chunk_size (`int`, defaults to `SCAN_CHUNK_SIZE`): steps per parallel scan.
        initial_state (`torch.Tensor` of shape `(batch, d_inner, d_state)`, *optional*): ``h_0``, the state before
            the first step (zeros when omitted).
        return_last_state (`bool`, defaults to `False`): also return ``h_length`` (in the compute dtype).

    Returns:
        `torch.Tensor` of shape `(batch, length, d_inner)` in the dtype of ``u``, and with ``return_last_state`` the
        last state `(batch, d_inner, d_state)`.
    """
    dtype = u.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
    u, delta, A, B, C, D = (t.to(compute_dtype) for t in (u, delta, A, B, C, D))
    if initial_state is not None:
        initial_state = initial_state.to(compute_dtype)
    # Independent sequences are scanned in groups whose state tensors stay under SCAN_MAX_STATE_ELEMENTS.
    batch_size, length, d_inner = u.shape
    group = max(1, SCAN_MAX_STATE_ELEMENTS // (min(length, chunk_size) * d_inner * A.shape[-1]))
    if batch_size > group:
        states = [None] * len(range(0, batch_size, group)) if initial_state is None else initial_state.split(group)
        pieces = zip(*(t.split(group, dim=0) for t in (u, delta, B, C)), states)
        results = [_chunked_scan(u_g, delta_g, A, B_g, C_g, chunk_size, h_g) for u_g, delta_g, B_g, C_g, h_g in pieces]
        y, last_state = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
    else:
        y, last_state = _chunked_scan(u, delta, A, B, C, chunk_size, initial_state)
    y = y + u * D
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    if return_last_state:
        return y.to(dtype), last_state
    return y.to(dtype)


def _chunked_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_t = C_t h_t`` of the recurrence from ``h_0 = state`` (zeros when `None`), one parallel scan per chunk of
    ``chunk_size`` steps; returns the outputs and ``h_length``."""
    # `split`, not repeated slicing: a slice's backward fills a full-length gradient per chunk (quadratic in length).
    outputs = []
    for u_c, delta_c, B_c, C_c in zip(*(t.split(chunk_size, dim=1) for t in (u, delta, B, C))):
        # batch, chunk, d_inner, d_state
        delta_a = torch.exp(delta_c.unsqueeze(-1) * A)
        delta_b_u = (delta_c * u_c).unsqueeze(-1) * B_c.unsqueeze(2)
        if state is not None:  # carry h_0 of this chunk: h_1 = exp(Δ_1 A) h_0 + Δ_1 B_1 x_1
            first, rest = delta_b_u.split([1, delta_b_u.shape[1] - 1], dim=1)
            delta_b_u = torch.cat([first + delta_a[:, :1] * state[:, None], rest], dim=1)
        states = pscan(delta_a, delta_b_u)
        state = states[:, -1]  # batch, d_inner, d_state
        outputs.append((states @ C_c.unsqueeze(-1)).squeeze(-1))  # batch, chunk, d_inner
    return torch.cat(outputs, dim=1), state


def _continue_from_state(
    y: torch.Tensor, last_state: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Adds the contribution of an initial state ``h_0`` to a scan started from zeros (the kernel path: mamba-ssm's
    ``selective_scan_fn`` has no initial-state input). The recurrence is linear in ``h``, and with a diagonal ``A``
    ``h_t = exp(A · Σ_{s≤t} Δ_s) ⊙ h_0 + h_t^{(0)}``, so ``y_t += C_t · exp(A · Σ_{s≤t} Δ_s) h_0``.

    Args:
        y (`torch.Tensor` of shape `(batch, length, d_inner)`): outputs of the zero-state scan, before the gate.
        last_state (`torch.Tensor` of shape `(batch, d_inner, d_state)`): its last state.
        delta (`torch.Tensor` of shape `(batch, length, d_inner)`): the step sizes (after the bias and softplus).
        A (`torch.Tensor` of shape `(d_inner, d_state)`), C (`torch.Tensor` of shape `(batch, length, d_state)`).
        h0 (`torch.Tensor` of shape `(batch, d_inner, d_state)`).

    Returns:
        `(y, last_state)` of the scan started from ``h0``.
    """
    decay = torch.exp(delta.cumsum(dim=1).unsqueeze(-1) * A)  # batch, length, d_inner, d_state
    y = y + torch.einsum("bldn,bdn,bln->bld", decay, h0, C)
    return y, last_state + decay[:, -1] * h0


class CausalDepthwiseConv1d(nn.Conv1d):
    r"""mamba-ssm's ``conv1d`` (a depth-wise ``nn.Conv1d`` with ``padding = kernel_size − 1``: the same parameters and
    names) whose forward is the causal convolution of a sequence continued from its previous inputs.

    The output is written as a sum over the taps in a fixed order: each output is computed by the same operations
    wherever a sequence is split, so stepping at the scan's block boundaries reproduces the full scan bit for bit (a
    convolution kernel's arithmetic depends on the input's length and layout). It is a module call, so a hook on it
    (accelerate's offload) sees its weights used.

    Args:
        channels (`int`): number of channels (one filter each).
        kernel_size (`int`): number of taps.
        bias (`bool`, defaults to `True`): whether the convolution has a bias.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(
            channels, channels, kernel_size=kernel_size, groups=channels, padding=kernel_size - 1, bias=bias
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            inputs (`torch.Tensor` of shape `(batch, channels, kernel_size − 1 + length)`): the previous
                ``kernel_size − 1`` inputs (zeros before a sequence's first frame), then the new ones.

        Returns:
            `torch.Tensor` of shape `(batch, channels, length)`: the outputs at the new frames.
        """
        length = inputs.shape[-1] - (self.kernel_size[0] - 1)
        weight = self.weight[:, 0].to(inputs.dtype)  # channels, kernel_size
        conv = inputs[..., :length] * weight[:, :1]
        for tap in range(1, self.kernel_size[0]):
            conv = conv + inputs[..., tap : tap + length] * weight[:, tap : tap + 1]
        if self.bias is not None:
            conv = conv + self.bias.to(inputs.dtype)[:, None]
        return conv  # batch, channels, length


class DeltaProjection(nn.Linear):
    r"""mamba-ssm's ``dt_proj`` (an ``nn.Linear`` with a bias: the same parameters and names) whose forward returns the
    projection and the bias apart: the bias is added in float32 by the scan (mamba-ssm's ``delta_bias``), not in the
    input's dtype. It is a module call, so a hook on it (accelerate's offload) sees its weights used.

    Args:
        dt_rank (`int`): input width (rank of the Δ projection).
        d_inner (`int`): output width.
    """

    def __init__(self, dt_rank: int, d_inner: int):
        super().__init__(dt_rank, d_inner, bias=True)

    def forward(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            dt (`torch.Tensor` of shape `(batch, length, dt_rank)`).

        Returns:
            `(projection, bias)`: ``dt Wᵀ`` `(batch, length, d_inner)` in the input's dtype, and the bias `(d_inner,)`
            in float32 (float64 for a float64 input).
        """
        return dt @ self.weight.t(), self.bias.to(torch.promote_types(dt.dtype, torch.float32))


@dataclass
class MambaState:
    r"""The recurrent state of a [`MambaBlock`] after frame ``t`` of a sequence (per layer, what mamba-ssm's
    ``InferenceParams.key_value_memory_dict`` holds).

    Args:
        conv_state (`torch.Tensor` of shape `(batch, d_inner, d_conv)`): the inputs of the causal convolution at frames
            ``t − d_conv + 1 … t`` (zeros before the sequence's first frame), in the block's dtype.
        ssm_state (`torch.Tensor` of shape `(batch, d_inner, d_state)`): ``h_t``, float32 (float64 for a float64
            block).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[0]


class MambaBlock(nn.Module):
    r"""A Mamba (S6) mixer: ``(batch, length, d_model) → (batch, length, d_model)``, causal along ``length``.

    Args:
        d_model (`int`): input and output width.
        d_state (`int`, defaults to 16): SSM state size N.
        d_conv (`int`, defaults to 4): width of the causal depth-wise convolution.
        expand (`int`, defaults to 2): inner width ``d_inner = expand · d_model``.
        dt_rank (`int` or `"auto"`, defaults to `"auto"`): rank of the Δ projection (``ceil(d_model / 16)``).
        dt_min (`float`, defaults to 0.001), dt_max (`float`, defaults to 0.1): range of the initial step sizes;
            small steps keep a long memory (``exp(-Δ)`` per frame).
        dt_init_floor (`float`, defaults to 1e-4): lower bound of the initial step sizes.
        conv_bias (`bool`, defaults to `True`), bias (`bool`, defaults to `False`): biases of the convolution and of
            the input/output projections.
        use_kernel (`bool` or `None`, defaults to `None`): ``None`` picks the CUDA kernel when available and the
            input is on CUDA; ``True`` requires the kernel (a clear error otherwise); ``False`` always uses the
            PyTorch parallel scan.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_kernel: Optional[bool] = None,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.use_kernel = use_kernel
        self.scan_chunk_size = SCAN_CHUNK_SIZE  # PyTorch path: steps per parallel scan

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = CausalDepthwiseConv1d(self.d_inner, kernel_size=d_conv, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = DeltaProjection(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-real initialisation of ``A_log``, ``D`` and the Δ projection (as in ``mamba_simple``)."""
        # 1. Δ projection weight: uniform with std dt_rank^-0.5
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        # 2. Δ bias: softplus^-1 of a log-uniform sample in [dt_min, dt_max]
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # 3. A = -[1, 2, …, N] per channel, D = 1
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)

    def _resolve_kernel(self, x: torch.Tensor) -> bool:
        if self.use_kernel is None:
            return kernel_available() and x.is_cuda
        if self.use_kernel:
            if not kernel_available() or not x.is_cuda:
                raise RuntimeError(
                    f"MambaBlock(use_kernel=True) got an input on {x.device} with mamba_ssm "
                    f"{'installed' if kernel_available() else 'not installed'}. {MAMBA_KERNEL_INSTALL_HINT}"
                )
            return True
        return False

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        state: Optional[MambaState] = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, MambaState]:
        r"""
        Every computation of the block runs here and calls its submodules (``conv1d`` and ``dt_proj`` included)
        rather than reading their parameters, so per-module hooks see each use of their weights (accelerate's
        ``cpu_offload``, which diffusers' ``enable_sequential_cpu_offload`` installs, moves a module's weights off
        the ``meta`` device for its own forward only). [`step`] comes through here too.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, length, d_model)`): input sequence.
            mask (`torch.Tensor` of shape `(batch, length)`, *optional*): ``True`` = valid frame. Invalid frames are
                removed from the recurrence (their outputs are meaningless and should be ignored). Only for a
                sequence from its first frame (no ``state``).
            state (`MambaState`, *optional*): continue a sequence from this state ([`step`] checks its shapes).
            return_state (`bool`, defaults to `False`): also return the [`MambaState`] after the last frame.

        Returns:
            `torch.Tensor` of shape `(batch, length, d_model)`, and with ``return_state`` the [`MambaState`] after the
            last frame.
        """
        self._check_hidden_states(hidden_states, min_length=0)
        batch_size, length, _ = hidden_states.shape
        if mask is not None and mask.shape != (batch_size, length):
            raise ValueError(f"`mask` must have shape {(batch_size, length)}, got {tuple(mask.shape)}.")
        if mask is not None and state is not None:
            raise ValueError(
                "`mask` (left padding) applies to a sequence from its first frame; a continued sequence (`state`) has "
                "no padding: pass one or the other."
            )
        outputs, new_state = self._mix(hidden_states, mask=mask, state=state, return_state=return_state)
        return (outputs, new_state) if return_state else outputs

    def step(self, hidden_states: torch.Tensor, state: Optional[MambaState] = None) -> tuple[torch.Tensor, MambaState]:
        r"""Continues a sequence from ``state`` over ``k ≥ 1`` new frames (recurrent inference, no mask).

        ``step(x[:, :a], None)`` then ``step(x[:, a:], state)`` gives the outputs of ``forward(x)`` and the state after
        the last frame (up to float rounding, see the module docstring); ``state=None`` starts a sequence.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, k, d_model)`): the new frames.
            state (`MambaState`, *optional*): the state after the frames before them.

        Returns:
            `(outputs, state)`: `(batch, k, d_model)` and the [`MambaState`] after the last new frame.
        """
        self._check_hidden_states(hidden_states)
        if state is not None:
            expected = {
                "conv_state": (hidden_states.shape[0], self.d_inner, self.d_conv),
                "ssm_state": (hidden_states.shape[0], self.d_inner, self.d_state),
            }
            for name, shape in expected.items():
                if tuple(getattr(state, name).shape) != shape:
                    raise ValueError(
                        f"`state.{name}` has shape {tuple(getattr(state, name).shape)}, expected {shape} for "
                        f"`hidden_states` {tuple(hidden_states.shape)}."
                    )
        return self(hidden_states, state=state, return_state=True)  # through `forward`, seen by module hooks

    def _check_hidden_states(self, hidden_states: torch.Tensor, min_length: int = 1) -> None:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model or hidden_states.shape[1] < min_length:
            raise ValueError(
                f"`hidden_states` must have shape (batch, length >= {min_length}, {self.d_model}), got "
                f"{tuple(hidden_states.shape)}."
            )

    def _mix(
        self,
        hidden_states: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        state: Optional[MambaState] = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, Optional[MambaState]]:
        """The block over ``hidden_states`` `(batch, length, d_model)`, from ``state`` (zeros when `None`); the new
        state when ``return_state``."""
        keep = None if mask is None else mask.to(hidden_states.dtype).unsqueeze(-1)  # batch, length, 1

        # 1. Input projection: x (scan branch) and z (gate branch)
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # batch, length, d_inner
        if keep is not None:
            x = x * keep

        # 2. Causal depth-wise convolution along time, over the state's last inputs when continuing a sequence
        x_t = x.transpose(1, 2)  # batch, d_inner, length
        if state is None:
            inputs = F.pad(x_t, (self.d_conv - 1, 0))  # batch, d_inner, d_conv − 1 + length (zeros before frame 0)
        else:
            inputs = torch.cat([state.conv_state[..., 1:].to(x_t.dtype), x_t], dim=-1)
        conv = self.conv1d(inputs)  # batch, d_inner, length
        conv_state = inputs[..., -self.d_conv :] if return_state else None
        x = F.silu(conv.transpose(1, 2))  # batch, length, d_inner
        if keep is not None:
            x = x * keep

        # 3. Input-dependent Δ, B, C
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, delta_bias = self.dt_proj(dt)  # batch, length, d_inner (its bias, float32, is added inside the scan)
        A = -torch.exp(self.A_log.float() if self.A_log.dtype != torch.float64 else self.A_log)  # d_inner, d_state
        h0 = None if state is None else state.ssm_state

        # 4. Selective scan
        ssm_state = None
        if self._resolve_kernel(x):
            scan_inputs = (
                x.transpose(1, 2).contiguous(),
                dt.transpose(1, 2).contiguous(),
                A,
                B.transpose(1, 2).contiguous(),
                C.transpose(1, 2).contiguous(),
                self.D.float(),
            )
            scan_kwargs = dict(delta_bias=delta_bias.float(), delta_softplus=True)
            if h0 is None:
                y = selective_scan_fn(
                    *scan_inputs, z=z.transpose(1, 2).contiguous(), return_last_state=return_state, **scan_kwargs
                )
                if return_state:
                    y, ssm_state = y
                y = y.transpose(1, 2)
            else:  # the kernel starts from zeros: add h0's contribution, then the gate
                y, ssm_state = selective_scan_fn(*scan_inputs, z=None, return_last_state=True, **scan_kwargs)
                delta = F.softplus(dt.float() + delta_bias.float())
                y, ssm_state = _continue_from_state(
                    y.transpose(1, 2).float(), ssm_state, delta, A, C.float(), h0.float()
                )
                y = y * F.silu(z.float())
        else:
            compute_dtype = torch.promote_types(dt.dtype, torch.float32)
            delta = F.softplus(dt.to(compute_dtype) + delta_bias.to(compute_dtype))
            y = selective_scan_pytorch(
                x,
                delta,
                A,
                B,
                C,
                self.D,
                z=z,
                chunk_size=self.scan_chunk_size,
                initial_state=h0,
                return_last_state=return_state,
            )
            if return_state:
                y, ssm_state = y

        # 5. Output projection
        new_state = MambaState(conv_state=conv_state, ssm_state=ssm_state) if return_state else None
        return self.out_proj(y.to(hidden_states.dtype)), new_state


class ResidualMambaLayer(nn.Module):
    r"""Pre-norm residual Mamba layer: ``x + Mamba(LayerNorm(x))`` (paper Eq. 5, one of the K layers).

    Args:
        dim (`int`): width. Remaining keyword arguments go to [`MambaBlock`].
    """

    def __init__(self, dim: int, **mamba_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = MambaBlock(dim, **mamba_kwargs)

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return hidden_states + self.mixer(self.norm(hidden_states), mask=mask)

    def step(self, hidden_states: torch.Tensor, state: Optional[MambaState] = None) -> tuple[torch.Tensor, MambaState]:
        """[`MambaBlock.step`] of the residual layer: `(outputs, state)` over ``k`` new frames."""
        outputs, state = self.mixer.step(self.norm(hidden_states), state)
        return hidden_states + outputs, state
