"""Cost of SDCM: one Echo block against one plain Wan block of the same width, in one run.

Forward + backward wall time (best of timed repetitions after warm-up, the two blocks alternating), parameters and FLOPs
(`torch.utils.flop_counter.FlopCounterMode`, forward + backward) of

- a diffusers `WanTransformerBlock` (self-attention with 3D RoPE, text cross-attention, feed-forward), and
- an `EchoTransformerBlock` (the same, plus SDCM: user-context and frame-aligned audio cross-attentions, gate),

fed the same tokens. With a GPU the blocks have the Wan2.1-T2V-1.3B width (1536, 12 heads, ffn 8960) in bfloat16 on
21 × 32 × 32 tokens (81 frames at 512²). On CPU they are tiny (width 256, 1k tokens, float32), CPU FLOPs leave out the
attention products (FlopCounterMode has no formula for the CPU flash-attention kernel), and the real-width FLOPs are
counted on the meta device (shapes only, attention included).

    python benchmarks/generator.py [--size tiny|wan1.3b] [--repeats N]

The last line holds the headline figures as `name=value` pairs; the goal is `echo_over_wan_time` ≤ 1.3.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
from torch.utils.flop_counter import FlopCounterMode

from echo.transformer_echo import EchoTransformerBlock

SIZES = {
    # width, heads, ffn inner size, token grid (latent frames, H', W'), text tokens, user-context tokens
    "tiny": dict(dim=256, heads=2, ffn_dim=1536, grid=(4, 16, 16), text_len=512, context_len=64),
    "wan1.3b": dict(dim=1536, heads=12, ffn_dim=8960, grid=(21, 32, 32), text_len=512, context_len=256),
}
AUDIO_TOKENS_PER_LATENT_FRAME = 4 * 5  # 4 video frames × L_w = 5 window rows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="Defaults to wan1.3b on GPU, tiny on CPU.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 keeps CPU timings stable on a shared machine)."
    )
    return parser.parse_args()


def build_blocks(size: dict, device: torch.device, dtype: torch.dtype):
    block_args = (size["dim"], size["ffn_dim"], size["heads"], "rms_norm_across_heads", True, 1e-6)
    with torch.device(device):
        wan = WanTransformerBlock(*block_args).to(dtype)
        echo = EchoTransformerBlock(*block_args, use_sdcm=True).to(dtype)
    if device.type != "meta":
        echo.load_state_dict({**echo.state_dict(), **wan.state_dict()}, strict=True)  # the same Wan weights
    return wan, echo


def make_inputs(size: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    num_frames, height, width = size["grid"]
    dim, tokens = size["dim"], num_frames * height * width
    rope = WanRotaryPosEmbed(dim // size["heads"], (1, 2, 2), 1024)
    rotary_emb = rope(torch.empty(1, 1, num_frames, 2 * height, 2 * width))
    regions = torch.randint(0, 3, (1, tokens, 1), generator=g)  # 0 background, 1 lip, 2 face
    return dict(
        hidden_states=torch.randn(1, tokens, dim, generator=g).to(device, dtype).requires_grad_(True),
        encoder_hidden_states=torch.randn(1, size["text_len"], dim, generator=g).to(device, dtype),
        temb=torch.randn(1, 6, dim, generator=g).to(device, dtype),
        rotary_emb=tuple(r.to(device) for r in rotary_emb),
        audio_tokens=torch.randn(1, num_frames, AUDIO_TOKENS_PER_LATENT_FRAME, dim, generator=g).to(device, dtype),
        context=torch.randn(1, size["context_len"], dim, generator=g).to(device, dtype),
        lip_mask=(regions == 1).to(device, dtype),
        face_mask=(regions == 2).to(device, dtype),
        grid=size["grid"],
    )


def run_block(block, inputs: dict, echo: bool) -> torch.Tensor:
    args = (inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["temb"], inputs["rotary_emb"])
    if echo:
        extra = (inputs["audio_tokens"], inputs["context"], None, inputs["lip_mask"], inputs["face_mask"])
        out = block(*args, *extra, inputs["grid"])
    else:
        out = block(*args)
    out.float().square().mean().backward()
    return out


def count_flops(block, inputs: dict, echo: bool) -> float:
    """Forward + backward FLOPs of one block call."""
    with FlopCounterMode(display=False) as counter:
        run_block(block, inputs, echo)
    counts = counter.get_flop_counts()["Global"]
    flops = sum(counts.values())
    # FlopCounterMode's convolution_backward formula ignores `groups` (it counts the gate's grouped convolutions as
    # dense); their backward (input and weight gradients) costs twice the forward.
    conv_backward = [op for op in counts if "convolution_backward" in str(op)]
    conv_forward = [op for op in counts if str(op).endswith("convolution")]
    if conv_backward:
        flops += 2 * sum(counts[op] for op in conv_forward) - sum(counts[op] for op in conv_backward)
    return flops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_blocks(blocks: dict, inputs: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Best-of-`repeats` forward + backward milliseconds per block; the blocks alternate, so a busy machine slows
    both alike."""
    for _ in range(warmup):
        for block, is_echo in blocks.values():
            run_block(block, inputs, is_echo)
    times = {name: [] for name in blocks}
    for _ in range(repeats):
        for name, (block, is_echo) in blocks.items():
            block.zero_grad(set_to_none=True)
            inputs["hidden_states"].grad = None
            sync(device)
            start = time.perf_counter()
            run_block(block, inputs, is_echo)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * min(values) for name, values in times.items()}


def peak_memory_gib(block, inputs: dict, is_echo: bool, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    run_block(block, inputs, is_echo)
    return torch.cuda.max_memory_allocated(device) / 2**30


def main(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size_name = args.size or ("wan1.3b" if device.type == "cuda" else "tiny")
    size = SIZES[size_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    # 1. Time, parameters and FLOPs at the chosen size
    torch.manual_seed(0)
    wan, echo = build_blocks(size, device, dtype)
    inputs = make_inputs(size, device, dtype)
    blocks = {"wan": (wan, False), "echo": (echo, True)}
    times = time_blocks(blocks, inputs, device, args.repeats, args.warmup)
    results = {
        name: dict(
            ms=times[name],
            params=sum(p.numel() for p in block.parameters()),
            gflops=count_flops(block, inputs, is_echo) / 1e9,
            peak_gib=peak_memory_gib(block, inputs, is_echo, device),
        )
        for name, (block, is_echo) in blocks.items()
    }
    tokens = size["grid"][0] * size["grid"][1] * size["grid"][2]
    print(
        f"device={device.type} size={size_name} dtype={str(dtype).removeprefix('torch.')} dim={size['dim']} "
        f"heads={size['heads']} ffn={size['ffn_dim']} tokens={tokens} grid={size['grid']}"
    )
    print(f"{'block':<8}{'fwd+bwd ms':>12}{'params (M)':>12}{'GFLOPs':>12}{'peak GiB':>10}")
    for name, r in results.items():
        print(f"{name:<8}{r['ms']:>12.2f}{r['params'] / 1e6:>12.3f}{r['gflops']:>12.2f}{r['peak_gib']:>10.2f}")

    # 2. FLOPs at the real width on the meta device when the run itself was not at that width
    extra = ""
    if size_name != "wan1.3b":
        meta = torch.device("meta")
        wan_meta, echo_meta = build_blocks(SIZES["wan1.3b"], meta, torch.bfloat16)
        meta_inputs = make_inputs(SIZES["wan1.3b"], meta, torch.bfloat16)
        wan_flops, echo_flops = count_flops(wan_meta, meta_inputs, False), count_flops(echo_meta, meta_inputs, True)
        print(
            f"wan1.3b width, 21x32x32 tokens, meta device: wan {wan_flops / 1e12:.2f} TFLOPs, "
            f"echo {echo_flops / 1e12:.2f} TFLOPs (forward + backward, attention included)"
        )
        extra = f"echo_over_wan_flops_wan1.3b={echo_flops / wan_flops:.3f} "

    wan_r, echo_r = results["wan"], results["echo"]
    print(
        f"echo_over_wan_time={echo_r['ms'] / wan_r['ms']:.3f} "
        f"echo_over_wan_flops={echo_r['gflops'] / wan_r['gflops']:.3f} "
        f"echo_over_wan_params={echo_r['params'] / wan_r['params']:.3f} {extra}"
        f"wan_ms={wan_r['ms']:.2f} echo_ms={echo_r['ms']:.2f} size={size_name} device={device.type}"
    )


if __name__ == "__main__":
    main(parse_args())
