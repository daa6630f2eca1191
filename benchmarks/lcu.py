"""Forward + backward time of the LCU against the user-history length (1k, 4k, 16k frames in one run).

The LCU's cost must grow linearly with the history (Mamba scans, per-frame pooling): the headline figure
``ratio_16k_over_1k`` (wall clock, best of ``--repeats``) should stay ≤ 20 (16 for a perfectly linear cost). The
table also gives the process CPU time of each step, less disturbed than the wall clock on a shared machine.

CPU: tiny width (the tiny model config), float32. GPU (``torch.cuda.is_available()``): real input widths
(wav2vec2-base 13 × 768, Wan VAE latents 16 × 64 × 64 of a 512² crop, Qwen2.5-Omni-7B hidden size 3584,
context 1536) in bfloat16; the Mamba layers use the mamba-ssm kernels when installed.

Usage: ``python benchmarks/lcu.py [--lengths 1000 4000 16000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import time

import torch

from echo.lcu import LongRangeContextEncoder
from echo.mamba import kernel_available

CPU_CONFIG = dict(
    audio_dim=32,
    audio_num_layers=3,
    audio_window=5,
    dim=32,
    num_audio_layers=2,
    video_channels=16,
    video_grid=(2, 2),
    num_vision_layers=1,
    understanding_dim=32,
    num_attention_heads=4,
    context_dim=32,
)
GPU_CONFIG = dict(
    audio_dim=768,
    audio_num_layers=13,
    audio_window=5,
    dim=512,
    num_audio_layers=4,
    video_channels=16,
    video_grid=(2, 2),
    num_vision_layers=2,
    understanding_dim=3584,
    num_attention_heads=8,
    context_dim=1536,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per length (best is reported)")
    parser.add_argument("--clip_frames", type=int, default=81)
    parser.add_argument("--understanding_tokens", type=int, default=256)
    return parser.parse_args()


def make_inputs(config, num_frames, args, device, dtype):
    video_size = 64 if device.type == "cuda" else 8
    face = torch.zeros(1, num_frames, video_size, video_size, device=device)
    face[..., video_size // 4 : -video_size // 8, video_size // 4 : -video_size // 4] = 1.0
    return dict(
        user_audio=torch.randn(
            1, num_frames, config["audio_num_layers"], config["audio_dim"], device=device, dtype=dtype
        ),
        user_video=torch.randn(
            1, num_frames, config["video_channels"], video_size, video_size, device=device, dtype=dtype
        ),
        user_face_mask=face,
        understanding=torch.randn(
            1, args.understanding_tokens, config["understanding_dim"], device=device, dtype=dtype
        ),
        user_audio_mask=torch.ones(1, num_frames, dtype=torch.bool, device=device),
    )


def step(model, inputs, clip_frames):
    out = model(clip_frames=clip_frames, **inputs)
    out.context.float().square().mean().backward()


def main(args):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = GPU_CONFIG if cuda else CPU_CONFIG
    torch.manual_seed(0)
    model = LongRangeContextEncoder(**config).to(device).train()
    if dtype != torch.float32:
        model.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    scan = "mamba-ssm kernel" if cuda and kernel_available() else "PyTorch parallel scan"
    print(f"device={device.type} dtype={str(dtype).split('.')[-1]} params={params / 1e6:.2f}M scan={scan}")

    rows, times, cpu_times = [], {}, {}
    for index, num_frames in enumerate(args.lengths):
        inputs = make_inputs(config, num_frames, args, device, dtype)
        if index == 0 or cuda:  # warm-up (kernels, allocator); on CPU once is enough
            step(model, inputs, args.clip_frames)
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        samples, cpu_samples = [], []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            step(model, inputs, args.clip_frames)
            if cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
            cpu_samples.append(time.process_time() - cpu_start)
            model.zero_grad(set_to_none=True)
        seconds = min(samples)  # best of N: the least disturbed by other processes
        times[num_frames], cpu_times[num_frames] = seconds, min(cpu_samples)
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-"
        rows.append((num_frames, seconds * 1e3, seconds * 1e3 / (num_frames / 1000), min(cpu_samples), memory))
        del inputs

    print(f"{'frames':>8} {'fwd+bwd ms':>12} {'ms / 1k frames':>15} {'process CPU s':>14} {'peak GiB':>9}")
    for num_frames, ms, per_k, cpu_seconds, memory in rows:
        print(f"{num_frames:>8} {ms:>12.1f} {per_k:>15.1f} {cpu_seconds:>14.2f} {memory:>9}")
    first, last = args.lengths[0], args.lengths[-1]
    names = {n: f"t_{n // 1000}k" if n % 1000 == 0 else f"t_{n}" for n in args.lengths}
    headline = " ".join(f"{names[n]}={times[n]:.3f}" for n in args.lengths)
    ratio_name = f"ratio_{names[last][2:]}_over_{names[first][2:]}"
    # wall-clock ratio (the headline) and the process-CPU-time ratio, which a busy machine disturbs less
    cpu_ratio = cpu_times[last] / max(cpu_times[first], 1e-9)
    print(f"{headline} {ratio_name}={times[last] / times[first]:.2f} cpu_{ratio_name}={cpu_ratio:.2f}")


if __name__ == "__main__":
    main(parse_args())
