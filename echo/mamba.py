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
"""

from __future__ import annotations

import math
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
) -> torch.Tensor:
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

    Returns:
        `torch.Tensor` of shape `(batch, length, d_inner)` in the dtype of ``u``.
    """
    dtype = u.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
    u, delta, A, B, C, D = (t.to(compute_dtype) for t in (u, delta, A, B, C, D))
    # Independent sequences are scanned in groups whose state tensors stay under SCAN_MAX_STATE_ELEMENTS.
    batch_size, length, d_inner = u.shape
    group = max(1, SCAN_MAX_STATE_ELEMENTS // (min(length, chunk_size) * d_inner * A.shape[-1]))
    if batch_size > group:
        pieces = zip(*(t.split(group, dim=0) for t in (u, delta, B, C)))
        y = torch.cat([_chunked_scan(u_g, delta_g, A, B_g, C_g, chunk_size) for u_g, delta_g, B_g, C_g in pieces])
    else:
        y = _chunked_scan(u, delta, A, B, C, chunk_size)
    y = y + u * D
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    return y.to(dtype)


def _chunked_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``y_t = C_t h_t`` of the recurrence, one parallel scan per chunk of ``chunk_size`` steps."""
    # `split`, not repeated slicing: a slice's backward fills a full-length gradient per chunk (quadratic in length).
    outputs, state = [], None
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
    return torch.cat(outputs, dim=1)


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
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
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

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, length, d_model)`): input sequence.
            mask (`torch.Tensor` of shape `(batch, length)`, *optional*): ``True`` = valid frame. Invalid frames are
                removed from the recurrence (their outputs are meaningless and should be ignored).

        Returns:
            `torch.Tensor` of shape `(batch, length, d_model)`.
        """
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"`hidden_states` must have shape (batch, length, {self.d_model}), got {tuple(hidden_states.shape)}."
            )
        batch_size, length, _ = hidden_states.shape
        if mask is not None and mask.shape != (batch_size, length):
            raise ValueError(f"`mask` must have shape {(batch_size, length)}, got {tuple(mask.shape)}.")
        keep = None if mask is None else mask.to(hidden_states.dtype).unsqueeze(-1)  # batch, length, 1

        # 1. Input projection: x (scan branch) and z (gate branch)
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # batch, length, d_inner
        if keep is not None:
            x = x * keep

        # 2. Causal depth-wise convolution along time
        x = self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)  # batch, length, d_inner
        x = F.silu(x)
        if keep is not None:
            x = x * keep

        # 3. Input-dependent Δ, B, C
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # batch, length, d_inner (bias added inside the scan)
        A = -torch.exp(self.A_log.float() if self.A_log.dtype != torch.float64 else self.A_log)  # d_inner, d_state

        # 4. Selective scan
        if self._resolve_kernel(x):
            y = selective_scan_fn(
                x.transpose(1, 2).contiguous(),
                dt.transpose(1, 2).contiguous(),
                A,
                B.transpose(1, 2).contiguous(),
                C.transpose(1, 2).contiguous(),
                self.D.float(),
                z=z.transpose(1, 2).contiguous(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            ).transpose(1, 2)
        else:
            compute_dtype = torch.promote_types(dt.dtype, torch.float32)
            delta = F.softplus(dt.to(compute_dtype) + self.dt_proj.bias.to(compute_dtype))
            y = selective_scan_pytorch(x, delta, A, B, C, self.D, z=z, chunk_size=self.scan_chunk_size)

        # 5. Output projection
        return self.out_proj(y.to(hidden_states.dtype))


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
