"""The prepared GPU check: training MFU, sampling speed and peak memory of ECHO at the 1.3B width, in one run.

Meant for one H100/H200 session of at most 8 minutes (about 2-3 minutes of work; a time budget skips what would not
fit). Weights are random (built on the GPU from the published Wan2.1-T2V-1.3B config, nothing is downloaded); only
CUDA torch, transformers, peft, accelerate and the wheels brought along (diffusers, mambapy) are needed: no PyAV, no
video I/O. Checks, each with its peak GPU memory (`torch.cuda.max_memory_allocated`):

1. ``train``: one stage-1 training step of the generator (float32 master weights, bf16 autocast as accelerate's
   ``mixed_precision: bf16``; LoRA rank 128 on the Wan attention and feed-forward layers, the audio projection and
   SDCM trained; flow-matching loss; AdamW) on a 512² × 33-frame clip (9 × 32 × 32 = 9216 tokens). MFU = the step's
   FLOPs (counted once with `torch.utils.flop_counter` on the meta device: forward and backward as autograd runs
   them, attention included) per second over the GPU's dense bf16 datasheet peak (H100 SXM / H200: 989 TFLOP/s).
   Without gradient checkpointing; if that does not fit, again with it (``train_checkpointing=1``).
2. ``sample``: one guided denoising step (the pipeline's three passes: uncond, audio, full, batch 1, bf16 weights)
   for 81 frames at 480×832 and at 512²; also one pass alone (the Wan2.1-1.3B anchor: about 1.04 s per step with
   two passes on one H100).
3. ``mamba``: the LCU's Mamba block (width 1024) forward + backward over 1500 and 15000 frames with mamba-ssm's
   fused kernel against the PyTorch parallel scan, and their largest output difference; skipped, with the reason,
   where mamba-ssm does not import.

    python benchmarks/gpu_check.py            # on the GPU
    python benchmarks/gpu_check.py --dry-run  # on CPU: tiny widths, one step each (what CI runs)

It prints a table, then, last, the figures as `name=value` pairs. docs/benchmarks.md says how to run it and record them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import math
import platform
import sys
import time
from pathlib import Path

from echo.components import _cast
from echo.mamba import MambaBlock, kernel_available
from echo.transformer_echo import EchoTransformer3DModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REQUIRED = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "mambapy")

# Datasheet dense bf16 peaks (FLOP/s) by device-name fragment, most specific first.
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12), ("L40S", 362e12))

LORA_TARGETS = r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*blocks\.\d+\.ffn\.net\.(0\.proj|2)"
TRAINED = r"(audio_proj\..*|blocks\.\d+\.sdcm\.(norm|attn_avt|attn|gate)\..*)"  # configs/train/stage1.yaml

# The checks' sizes: the real width on a GPU, tiny widths for --dry-run.
SIZES = {
    "gpu": dict(
        base="wan2.1-t2v-1.3b",
        rank=128,
        train_clip=(33, 512, 512),
        sample_clips={"480x832x81": (81, 480, 832), "512x512x81": (81, 512, 512)},
        mamba_width=1024,
        mamba_lengths=(1500, 15000),
        warmup=1,
        repeats=3,
    ),
    "dry": dict(
        base="tiny",
        rank=4,
        train_clip=(9, 64, 64),
        sample_clips={"480x832x81": (9, 48, 80), "512x512x81": (9, 64, 64)},
        mamba_width=32,
        mamba_lengths=(64,),
        warmup=0,
        repeats=1,
    ),
}
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=52,
    out_channels=16,
    text_dim=64,
    freq_dim=32,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
    audio_dim=32,
    audio_num_layers=3,
    audio_window=5,
    context_dim=64,
    use_sdcm=True,
    condition_channels=36,
)


def check_environment() -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"gpu_check: missing packages {missing}. Install the wheels brought along with the checkout: "
            f"`pip install --no-index --find-links <wheels folder> {' '.join(missing)}` (docs/benchmarks.md)."
        )


def echo_config(size: dict) -> dict:
    if size["base"] == "tiny":
        return dict(TINY)
    from memory_table import echo_config as real_config

    return real_config(size["base"])


def build_generator(size: dict, device, dtype):
    """The Echo generator with random weights, built directly on `device` in `dtype` (float32 modules kept)."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        model = EchoTransformer3DModel(**echo_config(size))
    return _cast(model, dtype)


def clip_inputs(model, clip: tuple[int, int, int], device, dtype, conditions: str = "full") -> dict:
    """One pass's inputs (batch 1): `conditions` is the pipeline's pass (uncond, audio or full)."""
    import torch
    from memory_table import generator_inputs

    inputs = generator_inputs(model, *clip, dtype, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for name in ("hidden_states", "condition", "encoder_hidden_states", "audio_embeds", "context_embeds"):
        inputs[name] = torch.randn(inputs[name].shape, generator=generator).to(device, dtype)
    grid = inputs["lip_mask"].shape
    regions = torch.randint(0, 10, grid, generator=generator)  # ~10 % lip, ~40 % face
    inputs["lip_mask"] = (regions == 0).float().to(device)
    inputs["face_mask"] = ((regions >= 1) & (regions <= 4)).float().to(device)
    if conditions in ("uncond", "audio"):
        inputs["context_embeds"] = None
    if conditions == "uncond":
        inputs["audio_embeds"] = None
    return inputs


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Best wall time of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_flops(device) -> tuple[float, str]:
    import torch

    if device.type != "cuda":
        return float("nan"), "no GPU: MFU not defined"
    name = torch.cuda.get_device_name(device)
    for fragment, peak in GPU_PEAKS:
        if fragment in name:
            return peak, f"{name} datasheet dense bf16"
    return float("nan"), f"{name}: no datasheet peak known"


# 1. Training step ------------------------------------------------------------------------------------------------------


def prepare_training(model, rank: int):
    """Stage 1: frozen base, LoRA on the Wan layers, the audio projection and SDCM trained (float32 master weights)."""
    import re

    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name="stage1")
    for name, param in model.named_parameters():
        if "lora_" in name or re.fullmatch(TRAINED, name):
            param.requires_grad_(True)
    return model.train()


def training_step(model, inputs: dict, optimizer, autocast) -> None:
    """Flow matching (x_σ = (1 − σ) x0 + σ ε, target ε − x0) + backward + AdamW."""
    import torch

    x0 = inputs["hidden_states"]
    noise = torch.randn_like(x0)
    sigma = torch.rand(x0.shape[0], device=x0.device)
    noisy = ((1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise).to(x0.dtype)
    with autocast:
        prediction = model(**dict(inputs, hidden_states=noisy, timestep=sigma * 1000), return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(prediction.float(), noise - x0)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def train_flops(size: dict) -> int:
    """FLOPs of one training step's forward and backward, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = prepare_training(build_generator(size, "meta", torch.bfloat16), size["rank"])
    inputs = clip_inputs(model, size["train_clip"], torch.device("meta"), torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        training_step(model, inputs, None, contextlib.nullcontext())
    return counter.get_total_flops()


def check_train(size: dict, device, checkpointing: bool) -> dict:
    import torch

    model = prepare_training(build_generator(size, device, torch.float32), size["rank"])
    if checkpointing:
        model.enable_gradient_checkpointing()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = clip_inputs(model, size["train_clip"], device, torch.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    reset_peak(device)
    seconds = timed(lambda: training_step(model, inputs, optimizer, autocast), device, size["warmup"], size["repeats"])
    return {"seconds": seconds, "peak_gib": peak_gib(device), "trainable": sum(p.numel() for p in trainable)}


# 2. Sampling ------------------------------------------------------------------------------------------------------------


def check_sample(model, size: dict, clip_name: str, device, dtype) -> dict:
    import torch

    clip = size["sample_clips"][clip_name]
    passes = [clip_inputs(model, clip, device, dtype, conditions) for conditions in ("uncond", "audio", "full")]

    def step():
        with torch.no_grad():
            for inputs in passes:
                model(**inputs, return_dict=False)

    def one_pass():
        with torch.no_grad():
            model(**passes[-1], return_dict=False)

    reset_peak(device)
    step_seconds = timed(step, device, size["warmup"], size["repeats"])
    pass_seconds = timed(one_pass, device, 0, size["repeats"])
    return {"step_seconds": step_seconds, "pass_seconds": pass_seconds, "peak_gib": peak_gib(device)}


# 3. Mamba: fused kernel against the PyTorch scan ------------------------------------------------------------------------


def check_mamba(size: dict, device) -> dict:
    import torch

    results = {}
    torch.manual_seed(0)
    block = MambaBlock(size["mamba_width"], use_kernel=False).to(device)
    use_kernel = kernel_available() and device.type == "cuda"
    for length in size["mamba_lengths"]:
        x = torch.randn(1, length, size["mamba_width"], device=device, requires_grad=True)

        def run(kernel: bool, x: torch.Tensor = x):
            block.use_kernel = kernel
            output = block(x)
            output.square().mean().backward()
            return output

        entry = {"scan_seconds": timed(lambda: run(False), device, size["warmup"], size["repeats"])}
        if use_kernel:
            entry["kernel_seconds"] = timed(lambda: run(True), device, size["warmup"], size["repeats"])
            with torch.no_grad():
                block.use_kernel = True
                kernel_out = block(x)
                block.use_kernel = False
                scan_out = block(x)
            entry["max_abs_diff"] = float((kernel_out - scan_out).abs().max())
        results[length] = entry
    reason = None if use_kernel else ("mamba-ssm not importable" if not kernel_available() else "no CUDA device")
    return {"lengths": results, "kernel_skipped": reason}


# Run --------------------------------------------------------------------------------------------------------------------


def main(args) -> None:
    check_environment()
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    size = SIZES["dry" if dry else "gpu"]
    device = torch.device("cpu" if dry else "cuda")
    torch.manual_seed(0)
    start = time.perf_counter()
    figures: dict[str, str] = {}
    rows: list[tuple[str, str, str, str]] = []

    def remaining() -> float:
        return args.budget_s - (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(
        f"gpu_check {datetime.date.today().isoformat()} on {name}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}), {'dry run: tiny widths' if dry else 'Wan2.1-1.3B width'}"
    )

    # 1. Training step MFU at 512² × 33 frames
    peak, peak_source = peak_flops(device)
    flops = train_flops(size)
    result = None
    for checkpointing in (False, True):
        if remaining() < 60 and not dry:
            rows.append(("train", "", "skipped: time budget", ""))
            break
        try:
            result = check_train(size, device, checkpointing)
            figures["train_checkpointing"] = str(int(checkpointing))
            break
        except torch.cuda.OutOfMemoryError:
            rows.append(("train", f"checkpointing={checkpointing}", "out of memory", ""))
            torch.cuda.empty_cache()
    if result is not None:
        mfu = flops / result["seconds"] / peak
        frames, height, width = size["train_clip"]
        rows.append(
            (
                f"train step (bf16 autocast, LoRA r{size['rank']})",
                f"{height}×{width}×{frames}",
                f"{result['seconds']:.3f} s, {flops / 1e12:.2f} TFLOP, MFU {mfu:.3f}",
                f"{result['peak_gib']:.2f}",
            )
        )
        figures.update(
            train_mfu=f"{mfu:.3f}",
            train_step_s=f"{result['seconds']:.3f}",
            train_tflop=f"{flops / 1e12:.4g}",
            train_peak_gib=f"{result['peak_gib']:.2f}",
        )

    # 2. Seconds per denoising step (3 guided passes) at 480×832 and 512², 81 frames
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = None
    for clip_name in size["sample_clips"]:
        if remaining() < 45 and not dry:
            rows.append(("sample", clip_name, "skipped: time budget", ""))
            continue
        if model is None:
            model = build_generator(size, device, dtype).eval()
        result = check_sample(model, size, clip_name, device, dtype)
        frames, height, width = size["sample_clips"][clip_name]
        rows.append(
            (
                "denoising step (3 passes, bf16)",
                f"{height}×{width}×{frames}",
                f"{result['step_seconds']:.3f} s/step, {result['pass_seconds']:.3f} s/pass",
                f"{result['peak_gib']:.2f}",
            )
        )
        figures[f"step_s_{clip_name}"] = f"{result['step_seconds']:.3f}"
        figures[f"pass_s_{clip_name}"] = f"{result['pass_seconds']:.3f}"
        figures[f"sample_peak_gib_{clip_name}"] = f"{result['peak_gib']:.2f}"
    del model

    # 3. Mamba kernel against the PyTorch scan
    if remaining() < 20 and not dry:
        rows.append(("mamba", "", "skipped: time budget", ""))
    else:
        result = check_mamba(size, device)
        for length, entry in result["lengths"].items():
            text = f"scan {entry['scan_seconds'] * 1e3:.1f} ms"
            figures[f"mamba_scan_ms_{length}"] = f"{entry['scan_seconds'] * 1e3:.2f}"
            if "kernel_seconds" in entry:
                speedup = entry["scan_seconds"] / entry["kernel_seconds"]
                text += f", kernel {entry['kernel_seconds'] * 1e3:.1f} ms ({speedup:.1f}×), max |Δ| {entry['max_abs_diff']:.2e}"
                figures[f"mamba_kernel_ms_{length}"] = f"{entry['kernel_seconds'] * 1e3:.2f}"
                figures[f"mamba_kernel_speedup_{length}"] = f"{speedup:.2f}"
                figures[f"mamba_max_abs_diff_{length}"] = f"{entry['max_abs_diff']:.2e}"
            rows.append((f"mamba fwd+bwd (width {size['mamba_width']})", f"{length} frames", text, ""))
        if result["kernel_skipped"]:
            figures["mamba_kernel"] = "skipped"
            rows.append(("mamba kernel", "", f"skipped: {result['kernel_skipped']}", ""))

    # Table, then the figures
    print(f"MFU peak: {peak_source}; wall time {time.perf_counter() - start:.0f} s")
    print("| check | setting | result | peak GiB |")
    print("|---|---|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    figures["device"] = "cpu-dry-run" if dry else name.replace(" ", "_")
    print(" ".join(f"{key}={value}" for key, value in figures.items()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, one step each (CI)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip checks that would start after this")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
