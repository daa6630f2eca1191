"""Cost of SDCM: one Echo block against one plain Wan block of the same width, in one run.

Forward + backward wall time (median of timed repetitions after warm-up), parameters and FLOPs
(`torch.utils.flop_counter.FlopCounterMode`, forward + backward) of

- a diffusers `WanTransformerBlock` (self-attention with 3D RoPE, text cross-attention, feed-forward), and
- an `EchoTransformerBlock` (the same, plus SDCM: user-context and frame-aligned audio cross-attentions, gate),

fed the same tokens. FLOPs on CPU leave out the attention products (FlopCounterMode has no formula for the CPU
flash-attention kernel); on a GPU they are counted. On CPU the blocks are tiny (width 256, 1k tokens, float32); with a GPU they have the
Wan2.1-T2V-1.3B width (1536, 12 heads, ffn 8960) in bfloat16 on 21 × 32 × 32 tokens (81 frames at 512²).

    python benchmarks/generator.py [--size tiny|wan1.3b] [--repeats N]

The last line holds the headline figures as `name=value` pairs; the goal is `echo_over_wan_time` ≤ 1.3.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
from torch.utils.flop_counter import FlopCounterMode

from echo.transformer_echo import EchoTransformerBlock

SIZES = {
    # dim, heads, ffn_dim, (latent frames, H', W'), text tokens, context tokens
    "tiny": dict(dim=256, heads=2, ffn_dim=1536, grid=(4, 16, 16), text_len=512, context_len=64),
    "wan1.3b": dict(dim=1536, heads=12, ffn_dim=8960, grid=(21, 32, 32), text_len=512, context_len=256),
}
AUDIO_TOKENS_PER_LATENT_FRAME = 4 * 5  # 4 video frames × L_w = 5 window rows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="Defaults to wan1.3b on GPU, tiny on CPU.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


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
        out = block(*args, inputs["audio_tokens"], inputs["context"], None, inputs["lip_mask"], inputs["face_mask"],
                    inputs["grid"])
    else:
        out = block(*args)
    out.float().square().mean().backward()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(block, inputs: dict, echo: bool, device: torch.device, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        run_block(block, inputs, echo)
    times = []
    for _ in range(repeats):
        block.zero_grad(set_to_none=True)
        inputs["hidden_states"].grad = None
        sync(device)
        start = time.perf_counter()
        run_block(block, inputs, echo)
        sync(device)
        times.append(time.perf_counter() - start)
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
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(
        ms=1000 * statistics.median(times),
        params=sum(p.numel() for p in block.parameters()),
        gflops=flops / 1e9,
        peak_gib=peak,
    )


def main(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size_name = args.size or ("wan1.3b" if device.type == "cuda" else "tiny")
    size = SIZES[size_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    block_args = (size["dim"], size["ffn_dim"], size["heads"], "rms_norm_across_heads", True, 1e-6)
    wan = WanTransformerBlock(*block_args).to(device, dtype)
    echo = EchoTransformerBlock(*block_args, use_sdcm=True).to(device, dtype)
    echo.load_state_dict({**echo.state_dict(), **wan.state_dict()}, strict=True)  # same Wan weights, SDCM its own
    inputs = make_inputs(size, device, dtype)

    results = {}
    for name, block, is_echo in (("wan", wan, False), ("echo", echo, True)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = measure(block, inputs, is_echo, device, args.repeats, args.warmup)

    tokens = size["grid"][0] * size["grid"][1] * size["grid"][2]
    print(f"device={device.type} size={size_name} dtype={str(dtype).removeprefix('torch.')} dim={size['dim']} "
          f"heads={size['heads']} ffn={size['ffn_dim']} tokens={tokens} grid={size['grid']}")
    print(f"{'block':<8}{'fwd+bwd ms':>12}{'params (M)':>12}{'GFLOPs':>12}{'peak GiB':>10}")
    for name, r in results.items():
        print(f"{name:<8}{r['ms']:>12.2f}{r['params'] / 1e6:>12.3f}{r['gflops']:>12.2f}{r['peak_gib']:>10.2f}")
    wan_r, echo_r = results["wan"], results["echo"]
    print(
        f"echo_over_wan_time={echo_r['ms'] / wan_r['ms']:.3f} "
        f"echo_over_wan_flops={echo_r['gflops'] / wan_r['gflops']:.3f} "
        f"echo_over_wan_params={echo_r['params'] / wan_r['params']:.3f} "
        f"wan_ms={wan_r['ms']:.2f} echo_ms={echo_r['ms']:.2f} size={size_name} device={device.type}"
    )


if __name__ == "__main__":
    main(parse_args())
