"""MambaBlock: the parallel-scan path against a plain sequential recurrence, masking, causality, kernel parity, and
the recurrent step (a sequence stepped piece by piece equals the full scan, outputs and state)."""

import pytest
import torch
import torch.nn.functional as F

from echo.mamba import (
    SCAN_CHUNK_SIZE,
    MambaBlock,
    MambaState,
    ResidualMambaLayer,
    kernel_available,
    selective_scan_pytorch,
)


def sequential_mamba(block: MambaBlock, hidden_states: torch.Tensor, return_state: bool = False):
    """Reference: the Mamba recurrence written step by step from the block's own parameters (float64); with
    ``return_state`` also the state after the last frame: the last ``d_conv`` convolution inputs (zeros before the
    first frame) and ``h``."""
    p = {name: param.double() for name, param in block.named_parameters()}
    u = hidden_states.double()
    batch, length, _ = u.shape
    xz = u @ p["in_proj.weight"].t()
    x, z = xz.chunk(2, dim=-1)
    conv_inputs = torch.cat([x.new_zeros(batch, block.d_conv, block.d_inner), x], dim=1)[:, -block.d_conv :]
    # causal depth-wise convolution, written as a sum over past frames
    weight = p["conv1d.weight"][:, 0]  # d_inner, d_conv
    k = weight.shape[1]
    conv = torch.zeros_like(x) + p["conv1d.bias"]
    for t in range(length):
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                conv[:, t] += weight[:, j] * x[:, s]
    x = F.silu(conv)
    dt, B, C = torch.split(x @ p["x_proj.weight"].t(), [block.dt_rank, block.d_state, block.d_state], dim=-1)
    delta = F.softplus(dt @ p["dt_proj.weight"].t() + p["dt_proj.bias"])
    A = -torch.exp(p["A_log"])
    state = torch.zeros(batch, block.d_inner, block.d_state, dtype=torch.float64)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, t, :, None] * A) * state + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((state * C[:, t, None, :]).sum(-1) + p["D"] * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    out = y @ p["out_proj.weight"].t()
    return (out, MambaState(conv_inputs.transpose(1, 2), state)) if return_state else out


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    # large steps so that the state mixes strongly over a short sequence
    return MambaBlock(d_model=16, d_state=8, d_conv=4, expand=2, dt_min=0.05, dt_max=0.5, use_kernel=False).double()


@pytest.mark.parametrize(
    "length, chunk_size, max_state",
    [(1, 256, None), (7, 256, None), (16, 256, None), (37, 256, None), (37, 8, None), (37, 1, None), (37, 8, 1)],
)
def test_parallel_scan_matches_sequential_recurrence_outputs_and_gradients(
    block, length, chunk_size, max_state, monkeypatch
):
    """Outputs and gradients of the parallel scan: in one chunk, chunked in time with the state carried across chunks,
    and with the batch scanned one sequence at a time (``max_state=1``)."""
    if max_state is not None:
        monkeypatch.setattr("echo.mamba.SCAN_MAX_STATE_ELEMENTS", max_state)
    torch.manual_seed(length)
    x = torch.randn(2, length, 16, dtype=torch.float64, requires_grad=True)
    block.scan_chunk_size = chunk_size
    try:
        out = block(x)
    finally:
        block.scan_chunk_size = SCAN_CHUNK_SIZE
    ref = sequential_mamba(block, x)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)

    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *block.parameters()])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [x, *block.parameters()])
    names = ["input"] + [name for name, _ in block.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_pytorch_path_is_a_parallel_scan_per_chunk(block, monkeypatch):
    """The PyTorch path runs mambapy's parallel scan once per chunk of ``scan_chunk_size`` steps (forward and
    backward), never a per-step loop: 37 steps in chunks of 8 are 5 scans whatever the length within a chunk."""
    import echo.mamba

    calls = []
    pscan = echo.mamba.pscan
    monkeypatch.setattr(echo.mamba, "pscan", lambda a, x: (calls.append(a.shape[1]), pscan(a, x))[1])
    x = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    block.scan_chunk_size = 8
    try:
        torch.autograd.grad(block(x).sum(), x)
    finally:
        block.scan_chunk_size = SCAN_CHUNK_SIZE
    assert calls == [8, 8, 8, 8, 5]


def test_scan_is_causal_and_mixes_the_past(block):
    torch.manual_seed(1)
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    y = block(x)
    x2 = x.clone()
    x2[:, 15] += 1.0
    y2 = block(x2)
    torch.testing.assert_close(y2[:, :15], y[:, :15], atol=0, rtol=0)
    # the perturbation reaches frames far beyond the convolution width through the state
    assert (y2[:, 20:] - y[:, 20:]).abs().amax() > 1e-6


def test_left_padding_mask_equals_unpadded_sequence(block):
    torch.manual_seed(2)
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    padded = torch.cat([100 * torch.randn(1, 6, 16, dtype=torch.float64), x], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 13, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(block(padded, mask=mask)[:, 6:], block(x), atol=1e-10, rtol=1e-10)
    # without the mask the garbage leaks into the valid frames
    assert (block(padded)[:, 6:] - block(x)).abs().amax() > 1e-3


def test_selective_scan_runs_in_float32_for_half_inputs():
    torch.manual_seed(3)
    u, delta = torch.randn(1, 9, 4), torch.rand(1, 9, 4)
    A, B, C, D = -torch.rand(4, 3) - 0.5, torch.randn(1, 9, 3), torch.randn(1, 9, 3), torch.randn(4)
    ref = selective_scan_pytorch(u, delta, A, B, C, D)
    half = selective_scan_pytorch(u.bfloat16(), delta.bfloat16(), A, B, C, D)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=0.1, rtol=0.05)


def test_kernel_request_without_kernel_or_cuda_explains_how_to_install():
    block = MambaBlock(d_model=8, use_kernel=True)
    if kernel_available() and torch.cuda.is_available():
        pytest.skip("the kernel is available here")
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        block(torch.randn(1, 4, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason="needs CUDA and mamba_ssm")
def test_kernel_path_matches_pytorch_path():
    torch.manual_seed(4)
    block = MambaBlock(d_model=64, d_state=16).cuda()
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[0, :50] = False
    block.use_kernel = True
    out_k = block(x, mask=mask)
    grads_k = torch.autograd.grad(out_k.square().sum(), [x, *block.parameters()])
    block.use_kernel = False
    out_p = block(x, mask=mask)
    grads_p = torch.autograd.grad(out_p.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(out_k, out_p, atol=1e-4, rtol=1e-3)
    for g_k, g_p in zip(grads_k, grads_p):
        torch.testing.assert_close(g_k, g_p, atol=1e-3, rtol=1e-2)


def _step_in_pieces(module, x, piece):
    """Steps ``module`` over ``x`` in pieces of ``piece`` frames from the zero state: `(outputs, last state)`."""
    outputs, state = [], None
    for part in x.split(piece, dim=1):
        out, state = module.step(part, state)
        outputs.append(out)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("piece", [1, 7, 37], ids=["one_frame", "seven_frames", "whole"])
def test_step_in_pieces_equals_the_full_scan_outputs_and_state(block, piece):
    """The recurrent step (PyTorch path, float64) continues the recurrence exactly: stepping 37 frames in pieces of 1,
    7 or all at once gives the full scan's outputs, and its state is the sequential recurrence's state after frame 37
    (the last ``d_conv`` convolution inputs and ``h``)."""
    torch.manual_seed(5)
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    with torch.no_grad():
        full = block(x)
        outputs, state = _step_in_pieces(block, x, piece)
        _, ref_state = sequential_mamba(block, x, return_state=True)
    torch.testing.assert_close(outputs, full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state.conv_state, ref_state.conv_state, atol=1e-12, rtol=0)
    torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=1e-10, rtol=1e-10)
    assert state.ssm_state.abs().max() > 1e-2 and state.conv_state.abs().max() > 1e-2


def test_step_state_carries_the_past_and_a_short_start_pads_with_zeros(block):
    """The state is what makes the continuation right: continuing from a zero state instead gives other outputs; a
    first piece shorter than the convolution keeps zeros for the frames before the sequence."""
    torch.manual_seed(6)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        full = block(x)
        head, state = block.step(x[:, :2], None)
        assert state.conv_state[..., : block.d_conv - 2].eq(0).all()  # 2 frames < d_conv = 4
        tail, _ = block.step(x[:, 2:], state)
        torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-10, rtol=1e-10)
        fresh, _ = block.step(x[:, 2:], None)
        no_conv, _ = block.step(x[:, 2:], MambaState(torch.zeros_like(state.conv_state), state.ssm_state))
        no_ssm, _ = block.step(x[:, 2:], MambaState(state.conv_state, torch.zeros_like(state.ssm_state)))
    for wrong in (fresh, no_conv, no_ssm):
        assert (wrong - full[:, 2:]).abs().max() > 1e-4


@pytest.mark.parametrize("block_size", [8, SCAN_CHUNK_SIZE])
def test_step_at_scan_block_boundaries_is_bit_identical_to_the_full_scan(block_size):
    """Pieces that start where the full scan starts a parallel-scan block (multiples of ``scan_chunk_size``) give the
    full scan's outputs bit for bit, in float32, through a residual layer (the LCU's incremental path relies on it)."""
    torch.manual_seed(10)
    layer = ResidualMambaLayer(32, d_state=16, dt_min=1e-4, dt_max=0.1, use_kernel=False)
    layer.mixer.scan_chunk_size = block_size
    x = torch.randn(3, 3 * block_size + 5, 32)
    with torch.no_grad():
        full = layer(x)
        outputs, _ = _step_in_pieces(layer, x, block_size)
        two, _ = _step_in_pieces(layer, x, 2 * block_size)
    assert torch.equal(outputs, full) and torch.equal(two, full)


@pytest.mark.parametrize("piece", [1, 7, 40])
def test_step_in_float32_stays_within_1e5_of_the_full_scan(piece):
    """float32 (the LCU's dtype): the split changes only the parallel scan's summation order, < 1e-5. Long memories
    (small steps) as in the LCU, and a residual layer as the LCU stacks them."""
    torch.manual_seed(7)
    layer = ResidualMambaLayer(32, d_state=16, dt_min=1e-4, dt_max=0.1, use_kernel=False)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = layer(x)
        outputs, _ = _step_in_pieces(layer, x, piece)
    torch.testing.assert_close(outputs, full, atol=1e-5, rtol=1e-5)


def _reference_selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """mamba-ssm's ``selective_scan_fn`` signature and layouts (`(batch, d_inner, length)`, B/C `(batch, d_state,
    length)`), computed by a sequential float32 recurrence from a zero state: the kernel path's glue runs on CPU."""
    delta = delta.float() + (0 if delta_bias is None else delta_bias.float()[:, None])
    delta = F.softplus(delta) if delta_softplus else delta
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + delta[..., t, None] * B[:, None, :, t] * u[..., t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) + (0 if D is None else D[:, None] * u)
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


@pytest.mark.parametrize("piece", [1, 7, 37])
def test_kernel_path_step_continues_from_the_state(piece, monkeypatch):
    """The kernel path's step (mamba-ssm's scan starts from zeros; the initial state's contribution is added in closed
    form) against the PyTorch path, with a reference of the kernel's signature standing in for the CUDA kernel."""
    import echo.mamba

    monkeypatch.setattr(echo.mamba, "selective_scan_fn", _reference_selective_scan_fn)
    torch.manual_seed(8)
    block = MambaBlock(d_model=16, d_state=8, dt_min=0.05, dt_max=0.5, use_kernel=False)
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        expected, expected_state = _step_in_pieces(block, x, piece)
        monkeypatch.setattr(MambaBlock, "_resolve_kernel", lambda self, x: True)
        full = block(x)
        outputs, state = _step_in_pieces(block, x, piece)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.ssm_state, expected_state.ssm_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.conv_state, expected_state.conv_state, atol=0, rtol=0)


def test_step_rejects_a_state_of_another_shape(block):
    _, state = block.step(torch.randn(2, 3, 16, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="state.ssm_state"):
        block.step(
            torch.randn(3, 2, 16, dtype=torch.float64),
            MambaState(state.conv_state[:1].expand(3, -1, -1), state.ssm_state),
        )
    with pytest.raises(ValueError, match="hidden_states"):
        block.step(torch.randn(2, 0, 16, dtype=torch.float64), state)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason="needs CUDA and mamba_ssm")
@pytest.mark.parametrize("piece", [1, 7, 300])
def test_kernel_step_in_pieces_equals_the_kernel_full_scan(piece):
    torch.manual_seed(9)
    block = MambaBlock(d_model=64, d_state=16, use_kernel=True).cuda()
    x = torch.randn(2, 300, 64, device="cuda")
    with torch.no_grad():
        full = block(x)
        outputs, state = _step_in_pieces(block, x, piece)
        block.use_kernel = False
        _, pytorch_state = _step_in_pieces(block, x, 300)
    torch.testing.assert_close(outputs, full, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(state.ssm_state, pytorch_state.ssm_state, atol=1e-4, rtol=1e-3)
