"""MambaBlock: the parallel-scan path against a plain sequential recurrence, masking, causality, kernel parity."""

import pytest
import torch
import torch.nn.functional as F

from echo.mamba import SCAN_CHUNK_SIZE, MambaBlock, kernel_available, selective_scan_pytorch


def sequential_mamba(block: MambaBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    """Reference: the Mamba recurrence written step by step from the block's own parameters (float64)."""
    p = {name: param.double() for name, param in block.named_parameters()}
    u = hidden_states.double()
    batch, length, _ = u.shape
    xz = u @ p["in_proj.weight"].t()
    x, z = xz.chunk(2, dim=-1)
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
    return y @ p["out_proj.weight"].t()


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
