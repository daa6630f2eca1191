"""Sampling cost of `EchoPipeline`: seconds of compute per second of generated video, next to the FLOP floor.

One conversation of ``--frames`` frames is rendered chunk by chunk (``--frames-per-chunk``, ``--motion-frames``) with
``--steps`` denoising steps and the full three-pass guidance (audio and user scales ≠ 1). The wall time of a warm
call (everything: audio encoding, LCU, VAE encode/decode, denoising) divided by the video's duration is
``s_per_video_s``. The FLOP floor is the time the denoising passes alone would take at the device's peak:
FLOPs of one transformer forward (`torch.utils.flop_counter.FlopCounterMode`, on the exact inputs of the pipeline)
× forwards per chunk × chunks, divided by the peak FLOP/s (GPU: the datasheet's dense bf16 figure; CPU: the best
measured float32 matmul throughput on this machine, with the threads in use). ``over_floor`` = actual / floor.

- CPU (default when no GPU): the tiny components of ``configs/models/tiny.yaml`` at 128², float32. CPU FLOP counts
  leave out the attention products (FlopCounterMode has no formula for the CPU flash-attention kernel).
- GPU: the generator at Wan2.1-T2V-1.3B width (1536, 12 heads × 128, 30 layers, ffn 8960) with the real Wan VAE and
  wav2vec2-base architectures, built from configs with random weights (no download), at 512², bfloat16. The text
  encoder keeps the tiny depth with UMT5-XXL's width (its cost is one call per chunk).

    python benchmarks/sampling.py [--frames 81] [--steps 4] [--size 128]

The last line holds the headline figures as ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from echo.components import load_components, load_model_config
from pipelines import EchoPipeline, chunk_schedule

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def parse_args():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=81 if cuda else 41, help="frames to generate (25 fps)")
    parser.add_argument("--frames-per-chunk", type=int, default=81 if cuda else 33)
    parser.add_argument("--motion-frames", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4 if not cuda else 10)
    parser.add_argument("--size", type=int, default=512 if cuda else 128)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return parser.parse_args()


def wan13b_description() -> dict:
    """configs/models/tiny.yaml with the generator, VAE, audio encoder and LCU at their real widths."""
    description = load_model_config(TINY)
    description["transformer"]["config"].update(
        num_attention_heads=12,
        attention_head_dim=128,
        ffn_dim=8960,
        num_layers=30,
        text_dim=4096,
        freq_dim=256,
        rope_max_seq_len=1024,
        audio_dim=768,
        audio_num_layers=13,
        context_dim=1536,
    )
    description["vae"]["config"] = {}  # AutoencoderKLWan defaults = the Wan2.1 VAE
    description["audio_encoder"]["config"] = {}  # Wav2Vec2Config defaults = wav2vec2-base (12 layers, 768)
    description["text_encoder"]["config"].update(d_model=4096, d_kv=64, num_heads=64, d_ff=10240)
    description["context_encoder"]["config"].update(
        audio_dim=768, audio_num_layers=13, dim=1024, context_dim=1536, understanding_dim=3584
    )
    return description


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} datasheet dense bf16"
        raise ValueError(f"no peak FLOP/s known for {name!r}; add it to GPU_PEAK_BF16")
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best, f"measured fp32 matmul, {torch.get_num_threads()} threads"


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    description = wan13b_description() if device.type == "cuda" else load_model_config(TINY)
    label = "wan2.1-1.3b width" if device.type == "cuda" else "tiny"

    components = load_components(description, torch_dtype=dtype)
    pipe = EchoPipeline(**components).to(device)
    pipe.set_progress_bar_config(disable=True)

    # inputs: the astronaut photo, a voiced tone for the avatar, noise for the user, a static user face
    from skimage.data import astronaut

    image = astronaut()
    seconds = args.frames / 25
    t = np.arange(int(seconds * 16_000)) / 16_000
    user_frames = np.repeat(image[None, ::8, ::8], args.frames, axis=0)
    landmarks = np.full((478, 2), 256.0, dtype=np.float32)  # a point face: empty masks, the cost is the same
    call = dict(
        reference_image=image,
        avatar_audio=(0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32),
        user_video=user_frames,
        user_audio=(0.05 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32),
        emotion="calm and attentive",
        num_frames=args.frames,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        audio_guidance_scale=4.5,
        user_guidance_scale=2.0,
        num_frames_per_chunk=args.frames_per_chunk,
        motion_frames=args.motion_frames,
        understanding=torch.zeros(8, components["context_encoder"].config.understanding_dim),
        reference_landmarks=landmarks,  # pixels of the 512² reference image
        user_landmarks=np.repeat(landmarks[None] / 8, args.frames, axis=0),
        output_type="np",
    )

    # 1. FLOPs of one transformer forward on the pipeline's own inputs
    captured = {}

    def capture(module, fn_args, kwargs):
        captured.setdefault("kwargs", kwargs)

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    pipe(
        **{**call, "num_frames": args.frames_per_chunk, "num_inference_steps": 1},
        generator=torch.Generator().manual_seed(0),
    )  # warm-up
    handle.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.transformer(**captured["kwargs"])
    flops_per_forward = counter.get_total_flops()
    chunks = len(chunk_schedule(args.frames, args.frames_per_chunk, args.motion_frames))
    forwards = chunks * args.steps * len(pipe._guidance_weights(has_user=True))
    denoise_flops = flops_per_forward * forwards

    # 2. Wall time of a warm call
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = pipe(**call, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    assert output.frames.shape[1] == args.frames

    peak, peak_source = peak_flops(device, dtype)
    s_per_video_s = wall / seconds
    floor_s_per_video_s = denoise_flops / peak / seconds
    over_floor = s_per_video_s / floor_s_per_video_s

    rows = [
        ("model", label),
        ("device", str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)),
        ("dtype", str(dtype).replace("torch.", "")),
        ("video", f"{args.frames} frames ({seconds:.2f} s) at {args.size}x{args.size}"),
        ("chunks x steps x passes", f"{chunks} x {args.steps} x {forwards // (chunks * args.steps)} = {forwards}"),
        ("GFLOPs per transformer forward", f"{flops_per_forward / 1e9:.3f}"),
        ("denoising GFLOPs", f"{denoise_flops / 1e9:.2f}"),
        ("peak FLOP/s", f"{peak / 1e9:.1f} G ({peak_source})"),
        ("wall time (s)", f"{wall:.2f}"),
        ("s per video s", f"{s_per_video_s:.3f}"),
        ("FLOP floor s per video s", f"{floor_s_per_video_s:.5f}"),
        ("actual / floor", f"{over_floor:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("| " + "quantity".ljust(width) + " | value")
    print("|-" + "-" * width + "-|------")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value}")
    print(
        f"s_per_video_s={s_per_video_s:.4f} over_floor={over_floor:.2f} floor_s_per_video_s={floor_s_per_video_s:.6f} "
        f"gflops_per_forward={flops_per_forward / 1e9:.4f} frames={args.frames} size={args.size} steps={args.steps}"
    )


if __name__ == "__main__":
    main()
