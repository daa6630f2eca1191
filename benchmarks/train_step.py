"""Throughput, peak memory and model-FLOP utilisation (MFU) of one stage-1 training step.

The step is the real one (`training.step.training_step` + AdamW): VAE encoding of the clip and the reference, the
generator's forward and backward with its LoRA adapter and trained new modules, the pixel loss (VAE decoding of two
latent frames), and the optimizer update. Weights are random (built from configs, nothing is downloaded).

- With a GPU: the Wan2.1-T2V-1.3B generator width (1536, 12 heads × 128, 30 layers, ffn 8960), the Wan VAE, LoRA
  rank 128, bf16 autocast, 512² clips of 33 frames (9 × 32 × 32 = 9216 tokens), batch 1 by default.
- On CPU: the tiny components of ``configs/models/tiny.yaml``, 64² clips of 9 frames, batch 2, float32.
- ``--size demo``: the demo model (``configs/models/demo.yaml``, its VAE built from ``configs/train/demo_vae.yaml``
  with random weights) trained as ``configs/train/demo_stage1.yaml`` trains it (128² windows of 17 frames, batch 1,
  continuation samples with blurred and noised motion frames, L_pixel), float32.

``--latent-cache`` times every step (the same step seeds, hence the same σ, noise and continuation draws) twice in
one run, alternating: the window VAE-encoded in the step, then its exact latents read from a `training.latent_cache`
cache (written and read back through it); the ratio of the mean step times is ``latent_cache_step_speedup``.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over one whole step (forward and backward; on CPU the
counting pass uses the math attention kernel so that attention products are counted too). MFU = counted FLOPs per
second / peak: the dense bf16 peak of the GPU's datasheet (H100 SXM / H200: 989 TFLOP/s), or on CPU the throughput of
a large float32 matmul measured here (the achievable peak of this machine).

    python benchmarks/train_step.py [--size tiny|demo|wan1.3b] [--batch-size N] [--steps N] [--latent-cache]

The last line holds the headline figures as `name=value` pairs (goal on an H100/H200: mfu ≥ 0.45).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from echo.components import load_model_config
from echo.encoding import PromptEncoder, encode_latents
from training.config import load_config
from training.latent_cache import WindowLatentCache
from training.modeling import build_training_models, parameter_groups
from training.step import step_generator, training_step

ROOT = Path(__file__).resolve().parents[1]

# Datasheet dense bf16 peaks (FLOP/s) by device-name fragment, most specific first.
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12), ("L40S", 362e12))

WAN_13B = {
    "vae": {"class": "AutoencoderKLWan", "config": {}},  # diffusers defaults = the Wan2.1 VAE
    "transformer": {
        "class": "EchoTransformer3DModel",
        "config": {
            "patch_size": [1, 2, 2],
            "num_attention_heads": 12,
            "attention_head_dim": 128,
            "in_channels": 52,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 8960,
            "num_layers": 30,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "audio_dim": 768,
            "audio_num_layers": 13,
            "audio_window": 5,
            "context_dim": 1536,
            "use_sdcm": True,
            "condition_channels": 36,
        },
    },
    "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "config": {"shift": 5.0}},
    # The emotion text is encoded once per distinct text (cached), so a one-layer UMT5 of the real width suffices.
    "text_encoder": {
        "class": "UMT5EncoderModel",
        "config": {"vocab_size": 160, "d_model": 4096, "d_kv": 64, "d_ff": 1024, "num_layers": 1, "num_heads": 8},
    },
    "tokenizer": {"class": "PreTrainedTokenizerFast", "config": {"model_max_length": 512}},
}

SIZES = {
    "tiny": dict(
        model=str(ROOT / "configs/models/tiny.yaml"),
        resolution=64,
        num_frames=9,
        batch_size=2,
        rank=4,
        audio_layers=3,
        audio_dim=32,
    ),
    "demo": dict(
        model="demo",
        resolution=128,
        num_frames=17,
        batch_size=1,
        rank=16,
        audio_layers=3,
        audio_dim=32,
        train_config="configs/train/demo_stage1.yaml",
    ),
    "wan1.3b": dict(
        model=WAN_13B, resolution=512, num_frames=33, batch_size=1, rank=128, audio_layers=13, audio_dim=768
    ),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="Defaults to wan1.3b on GPU, tiny on CPU.")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--latent-cache",
        action="store_true",
        help="also time the steps with the window latents read from the cache (data.use_cached_latents)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the generator depth (smoke runs)")
    parser.add_argument("--resolution", type=int, default=None, help="override the clip side")
    parser.add_argument("--num-frames", type=int, default=None, help="override the clip length (4k + 1)")
    return parser.parse_args()


def make_config(size: dict, workdir: Path, gradient_checkpointing: bool):

    model = size["model"]
    if model == "demo":  # the demo description, its VAE (a trained folder there) built from the VAE trainer's config
        model = load_model_config(ROOT / "configs/models/demo.yaml")
        vae = yaml.safe_load((ROOT / "configs/train/demo_vae.yaml").read_text())["vae"]
        model["vae"] = {"class": "AutoencoderKLWan", "config": vae}
    if "train_config" in size:  # the stage's own loss settings (continuation samples, motion blur and noise)
        path = workdir / "model.yaml"
        path.write_text(yaml.safe_dump(model))
        overrides = [f"model.config={path}", f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}"]
        return load_config(ROOT / size["train_config"], overrides)
    if isinstance(model, dict):
        path = workdir / "model.yaml"
        path.write_text(yaml.safe_dump(model))
        model = str(path)
    overrides = [
        f"model.config={model}",
        f"data.num_frames={size['num_frames']}",
        f"data.resolution={size['resolution']}",
        f"lora.rank={size['rank']}",
        f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}",
        "ablation.use_emotion=true",
        "loss.motion_prob=0.0",
    ]
    return load_config(ROOT / "configs/train/stage1.yaml", overrides)


def make_batch(size: dict, batch_size: int, seed: int = 0) -> dict:
    """A synthetic `collate_conversations` batch with the stage-1 keys."""
    g = torch.Generator().manual_seed(seed)
    t, r = size["num_frames"], size["resolution"]
    grid = (batch_size, (t - 1) // 4 + 1, r // 16, r // 16)
    lip = (torch.rand(grid, generator=g) < 0.1).float()
    return {
        "video": torch.rand(batch_size, 3, t, r, r, generator=g) * 2 - 1,
        "reference": torch.rand(batch_size, 3, r, r, generator=g) * 2 - 1,
        "avatar_audio": torch.randn(batch_size, t, 5, size["audio_layers"], size["audio_dim"], generator=g),
        "avatar_rms": torch.rand(batch_size, t, generator=g),
        "lip_mask": lip,
        "face_mask": (torch.rand(grid, generator=g) < 0.4).float() * (1 - lip),
        "emotion_text": ["the avatar looks calm and attentive"] * batch_size,
    }


def cpu_peak_flops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAKS:
            if fragment in name:
                return peak, f"{name} datasheet bf16"
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        a @ a
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        return 2 * 8192**3 * 10 / (time.perf_counter() - start), f"{name} measured bf16 matmul"
    return cpu_peak_flops(), "measured fp32 matmul (CPU)"


def _with_layers(model, num_layers: int) -> dict:

    description = load_model_config(model)
    description["transformer"]["config"]["num_layers"] = num_layers
    return description


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = dict(SIZES[args.size or ("wan1.3b" if cuda else "tiny")])
    if args.num_layers is not None:
        size["model"] = _with_layers(size["model"], args.num_layers)
    size.update({k: v for k, v in (("resolution", args.resolution), ("num_frames", args.num_frames)) if v is not None})
    batch_size = args.batch_size or size["batch_size"]
    weight_dtype = torch.bfloat16 if cuda else torch.float32

    # 1. Models of stage 1 at the chosen width
    with tempfile.TemporaryDirectory() as workdir:
        config = make_config(size, Path(workdir), args.gradient_checkpointing)
        torch.manual_seed(0)
        models = build_training_models(config)
    module = models.module.to(device)
    for frozen in (models.vae, models.text_encoder):
        frozen.to(device) if weight_dtype == torch.float32 else frozen.to(device, weight_dtype)
    optimizer = torch.optim.AdamW(parameter_groups(module, config), weight_decay=config.optim.weight_decay)
    prompt_encoder = PromptEncoder(models.text_encoder, models.tokenizer, config.data.max_sequence_length)
    batch = make_batch(size, batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(index: int, batch: dict = batch) -> dict:
        with autocast:
            terms = training_step(
                models, module, batch, config, prompt_encoder, step_generator(0, 0, index), device, weight_dtype
            )
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return terms

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # 2. FLOPs of one step (attention counted through the math kernel on CPU)
    kernel = contextlib.nullcontext()
    if not cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    counter = FlopCounterMode(display=False)
    with kernel, counter:
        step(0)
    flops = counter.get_total_flops()

    # 3. Timed steps after warm-up
    for index in range(2):
        step(index)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed(index: int, batch: dict) -> tuple[float, dict]:
        sync()
        start = time.perf_counter()
        terms = step(index, batch)
        sync()
        return time.perf_counter() - start, terms

    cached_batch = cached_times = None
    if args.latent_cache:  # the same steps with the window's exact latents read from the cache
        with tempfile.TemporaryDirectory() as folder:
            cache = WindowLatentCache.for_vae(folder, models.vae, size["resolution"], size["num_frames"])
            keys = [f"bench/w{b:05d}.safetensors" for b in range(batch_size)]
            for key, video in zip(keys, batch["video"]):
                cache.write(key, encode_latents(models.vae, video[None].to(device))[0])
            cached_batch = dict(batch, latents=torch.stack([cache.read(key) for key in keys]), latent_key=keys)
        cached_times = []
    times = []
    for index in range(args.steps):  # with the cache: alternated, so that a busy machine slows both alike
        elapsed, terms = timed(index, batch)
        times.append(elapsed)
        if cached_batch is not None:
            elapsed, cached_terms = timed(index, cached_batch)
            cached_times.append(elapsed)
    step_s = min(times)
    peak_mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, peak_source = peak_flops(device)
    achieved = flops / step_s
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())

    rows = [
        ("device", torch.cuda.get_device_name(device) if cuda else "cpu"),
        ("size", args.size or ("wan1.3b" if cuda else "tiny")),
        ("batch x frames x res", f"{batch_size} x {size['num_frames']} x {size['resolution']}²"),
        ("window latents", "VAE-encoded every step"),
        ("generator params (trainable)", f"{total / 1e6:.1f}M ({trainable / 1e6:.2f}M)"),
        ("loss (last step)", f"{float(terms['loss'].detach()):.4f}"),
        ("step time (best of %d)" % args.steps, f"{step_s * 1e3:.1f} ms"),
        ("samples / s", f"{batch_size / step_s:.3f}"),
        ("FLOPs / step", f"{flops / 1e12:.4f} TFLOP"),
        ("achieved", f"{achieved / 1e12:.4f} TFLOP/s"),
        ("peak", f"{peak / 1e12:.2f} TFLOP/s ({peak_source})"),
        ("peak memory", f"{peak_mem / 2**30:.2f} GiB" + ("" if cuda else " (process max RSS)")),
    ]
    speedup = None
    if cached_times is not None:
        mean, cached_mean = sum(times) / len(times), sum(cached_times) / len(cached_times)
        speedup = mean / cached_mean
        rows += [
            ("step time, mean of %d (encoded)" % args.steps, f"{mean * 1e3:.1f} ms"),
            ("step time, mean (latent cache)", f"{cached_mean * 1e3:.1f} ms (best {min(cached_times) * 1e3:.1f} ms)"),
            ("loss (last step, latent cache)", f"{float(cached_terms['loss'].detach()):.4f}"),
            ("latent cache step speedup", f"{speedup:.2f}x (mean / mean, same step seeds)"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(
        f"samples_per_s={batch_size / step_s:.4f} step_ms={step_s * 1e3:.1f} peak_mem_gib={peak_mem / 2**30:.3f} "
        f"tflops={achieved / 1e12:.4f} mfu={achieved / peak:.4f}"
        + ("" if speedup is None else f" latent_cache_step_speedup={speedup:.3f}")
    )


if __name__ == "__main__":
    main()
