"""Memory table of ECHO at the real sizes, computed on the meta device (no weights, no GPU, seconds on a CPU).

For the Wan2.1-T2V-1.3B and Wan2.1-I2V-14B-480P generators (their published transformer configs, written below, with
the ECHO options of configs/models/wan2.1-t2v-1.3b.yaml and wan2.1-i2v-14b-480p.yaml) and the other components of a
rendering pipeline (UMT5-XXL text encoder, Wan VAE, wav2vec2-base, the LCU of the model description, and for I2V the
CLIP ViT-H/14 image encoder):

- parameter bytes in the dtype the model description loads each component in (bfloat16; the VAE, and I2V's image
  encoder, in float32; each class's float32 modules kept in float32, as `from_pretrained(torch_dtype=...)` does) and,
  for the generator, with fp8 weight storage (`enable_layerwise_casting`, with the generator's own skip patterns);
- activation memory: the peak bytes of tensors alive at once during one generator pass (batch 1, bfloat16, all
  conditions: audio, user context, masks) at 480×832 × 81 frames, and during the VAE decode of that clip. Tensors are
  tracked on the meta device as the real code creates and frees them; attention is counted as a flash-attention
  kernel holds it (its output, not the L × L scores);
- FLOPs of one pass (`torch.utils.flop_counter`, attention included) and the three passes of a guided denoising step;
- the GPU memory each way of running needs: everything on the GPU (bf16, or fp8 transformer storage), diffusers'
  model offload (`enable_model_cpu_offload`: one component on the GPU at a time) and group offload (block level, one
  block per group, with the next one prefetched on a CUDA stream), and the host memory they need.

These are estimates from shapes: measured figures come from `benchmarks/gpu_check.py` on a GPU (docs/benchmarks.md).
The CUDA context and allocator overhead (typically 0.5-1 GiB) are not included.

    python benchmarks/memory_table.py [--models wan2.1-t2v-1.3b wan2.1-i2v-14b-480p] [--frames 81 --height 480 --width 832]

The last line holds the figures as `name=value` pairs (GiB, TFLOP); `summary_table` turns them into the short table
the README shows (printed before them).
"""

from __future__ import annotations

import argparse
import math
import sys
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from echo.components import _cast, load_model_config
from echo.lcu import LongRangeContextEncoder
from echo.transformer_echo import EchoTransformer3DModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30

# Published diffusers transformer configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-I2V-14B-480P-Diffusers).
WAN_BASES = {
    "wan2.1-t2v-1.3b": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    ),
    "wan2.1-i2v-14b-480p": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=36,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=1280,
        added_kv_proj_dim=5120,
        rope_max_seq_len=1024,
    ),
}
# The model descriptions whose ECHO options, LCU and component dtypes the table follows (their pretrained folders are
# not read: the Wan configs above stand for them).
DESCRIPTIONS = {
    "wan2.1-t2v-1.3b": ROOT / "configs/models/wan2.1-t2v-1.3b.yaml",
    "wan2.1-i2v-14b-480p": ROOT / "configs/models/wan2.1-i2v-14b-480p.yaml",
}
# google/umt5-xxl encoder, CLIP ViT-H/14 vision tower (the Wan I2V image encoder), facebook/wav2vec2-base-960h.
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
CLIP_VIT_H = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)

TEXT_TOKENS = 512  # Wan pads the text to 512 tokens
CONTEXT_TOKENS = 256  # f_pu tokens of one chunk (the LCU's output length is set by its config; 256 is generous)
IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224²: 16 × 16 patches + the class token
GUIDED_PASSES = 3  # uncond, audio, full (pipelines.EchoPipeline with audio and user guidance)


def description(base: str) -> dict:
    """The model description (``configs/models/*.yaml``) of a Wan base."""

    return load_model_config(DESCRIPTIONS[base])


def section_dtype(spec: dict, section: str) -> torch.dtype:
    """The dtype a description loads a section in: its own ``torch_dtype``, else the top-level one."""
    return getattr(torch, spec[section].get("torch_dtype", spec.get("torch_dtype", "float32")))


def echo_config(base: str) -> dict:
    """The `EchoTransformer3DModel` config of the Echo generator on a Wan base: the published Wan config with the
    description's ECHO options (its input takes the noisy latents and the condition channels)."""
    wan = dict(WAN_BASES[base])
    echo = description(base)["transformer"]["config"]
    wan["in_channels"] = wan["out_channels"] + echo["condition_channels"]
    return dict(wan, **echo)


def meta_generator(base: str, dtype: torch.dtype = torch.bfloat16):
    """The Echo generator on the meta device in `dtype` (its float32 modules kept in float32)."""

    with torch.device("meta"):
        model = EchoTransformer3DModel(**echo_config(base))
    return cast(model, dtype).eval()


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast as `from_pretrained(torch_dtype=dtype)` loads: diffusers' `_keep_in_fp32_modules` stay float32."""

    return _cast(model, dtype)


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def nparams(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors alive at once while code runs on the meta device.

    Every tensor an operation returns is tracked by its storage (views share their base's); a storage counts until the
    last tracked tensor on it is freed. Storages of `exclude` (weights, inputs) and their views are not counted."""

    def __init__(self, exclude=()):
        super().__init__()
        self.ignored = {t.untyped_storage()._cdata for t in exclude}
        self.storages: dict[int, list[int]] = {}  # storage → [bytes, tracked tensors]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return output

    def _track(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self.ignored:
            return
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [tensor.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.storages[key]


class FlashAttentionMemory(TorchFunctionMode):
    """`F.scaled_dot_product_attention` as a flash-attention kernel holds it: its output only (no L × L scores)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value"), args), **kwargs)
            query, value = named["query"], named["value"]
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        return func(*args, **kwargs)


def generator_inputs(model, frames: int, height: int, width: int, dtype: torch.dtype, device="meta") -> dict:
    """All conditions of one pass (batch 1): latents, condition, text, avatar audio, user context, lip and face masks."""
    config = model.config
    latent_frames = (frames - 1) // 4 + 1
    h, w = height // 8, width // 8
    grid = (1, latent_frames, h // 2, w // 2)
    inputs = dict(
        hidden_states=torch.zeros(1, config.out_channels, latent_frames, h, w, dtype=dtype, device=device),
        timestep=torch.full((1,), 500.0, device=device),
        encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, config.text_dim, dtype=dtype, device=device),
        condition=torch.zeros(1, config.condition_channels, latent_frames, h, w, dtype=dtype, device=device),
        audio_embeds=torch.zeros(
            1, frames, config.audio_window, config.audio_num_layers, config.audio_dim, dtype=dtype, device=device
        ),
        context_embeds=torch.zeros(1, CONTEXT_TOKENS, model.context_proj.in_features, dtype=dtype, device=device),
        lip_mask=torch.zeros(grid, device=device),
        face_mask=torch.zeros(grid, device=device),
    )
    if config.image_dim is not None:
        inputs["encoder_hidden_states_image"] = torch.zeros(
            1, IMAGE_TOKENS, config.image_dim, dtype=dtype, device=device
        )
    return inputs


def activation_peak(module, run, inputs: dict) -> int:
    """Peak activation bytes of `run(module, inputs)` on the meta device (weights and inputs excluded)."""
    exclude = list(module.parameters()) + list(module.buffers()) + [v for v in inputs.values() if torch.is_tensor(v)]
    tracker = PeakMemory(exclude)
    with torch.no_grad(), FlashAttentionMemory(), tracker:
        output = run(module, inputs)
        del output
    return tracker.peak


def pass_flops(model, inputs: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def components(base: str) -> dict[str, torch.nn.Module]:
    """Every weight-bearing component of the pipeline on the meta device, in its inference dtype."""
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    spec = description(base)
    generator = meta_generator(base, section_dtype(spec, "transformer"))
    with torch.device("meta"):
        parts = {
            "transformer": generator,
            "text_encoder": cast(UMT5EncoderModel(UMT5Config(**UMT5_XXL)), section_dtype(spec, "text_encoder")),
            "vae": cast(AutoencoderKLWan(), section_dtype(spec, "vae")),
            "audio_encoder": cast(Wav2Vec2Model(Wav2Vec2Config()), section_dtype(spec, "audio_encoder")),
            "context_encoder": cast(
                LongRangeContextEncoder(**spec["context_encoder"]["config"]), section_dtype(spec, "context_encoder")
            ),
        }
        if generator.config.image_dim is not None:
            image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))
            parts["image_encoder"] = cast(image_encoder, section_dtype(spec, "image_encoder"))
    return {name: part.eval() for name, part in parts.items()}


def fp8_storage_bytes(model) -> int:
    """Bytes of the generator with `enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)`."""
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return nbytes(model)


def block_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes outside the repeated blocks, bytes of the largest block) for group offload at block level."""
    blocks = None
    for name in ("blocks", "encoder.block", "encoder.layers", "vision_model.encoder.layers"):
        try:
            blocks = module.get_submodule(name)
            break
        except AttributeError:
            continue
    if blocks is None:  # no repeated blocks: offloaded as one group
        return 0, nbytes(module)
    largest = max(nbytes(block) for block in blocks)
    return nbytes(module) - sum(nbytes(block) for block in blocks), largest


def main_dtype(module: torch.nn.Module) -> str:
    """The dtype holding most of a module's parameters (its float32 modules aside)."""
    counts: dict[torch.dtype, int] = {}
    for parameter in module.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def measure(base: str, frames: int, height: int, width: int) -> dict:
    parts = components(base)
    generator = parts["transformer"]
    inputs = generator_inputs(generator, frames, height, width, torch.bfloat16)
    result = {"params": {n: nparams(p) for n, p in parts.items()}, "bytes": {n: nbytes(p) for n, p in parts.items()}}
    result["dtype"] = {n: main_dtype(p) for n, p in parts.items()}

    # 1. Activations of one generator pass and of the VAE decode of the whole clip
    result["act_transformer"] = activation_peak(generator, lambda m, x: m(**x, return_dict=False), inputs)
    vae = parts["vae"]
    latents = {"z": torch.zeros_like(inputs["hidden_states"], dtype=torch.float32)}
    result["act_vae_decode"] = activation_peak(vae, lambda m, x: m.decode(x["z"]).sample, latents)
    result["flops_pass"] = pass_flops(generator, inputs)

    # 2. Group offload: what stays on the GPU per component (non-block weights + two blocks: the one running and the
    # one prefetched)
    result["group"] = {}
    for name, part in parts.items():
        rest, block = block_bytes(part)
        result["group"][name] = rest + min(2 * block, nbytes(part) - rest)
    result["bytes_fp8_transformer"] = fp8_storage_bytes(generator)
    return result


def variants(result: dict) -> list[tuple[str, float, float]]:
    """(variant, GPU GiB, host GiB) of a render: weights on the GPU + the largest activation of a stage."""
    weights = result["bytes"]
    total = sum(weights.values())
    fp8_delta = weights["transformer"] - result["bytes_fp8_transformer"]
    act_t, act_v = result["act_transformer"], result["act_vae_decode"]
    stage_act = {"transformer": act_t, "vae": act_v}
    # Model offload: one component and its activations at a time.
    model_offload = max(weights[n] + stage_act.get(n, 0) for n in weights)
    model_offload_fp8 = max(
        (result["bytes_fp8_transformer"] if n == "transformer" else weights[n]) + stage_act.get(n, 0) for n in weights
    )
    group = result["group"]
    group_offload = max(group[n] + stage_act.get(n, 0) for n in group)
    rows = [
        ("bf16, all on the GPU", total + max(act_t, act_v), 0.0),
        ("fp8 transformer storage, all on the GPU", total - fp8_delta + max(act_t, act_v), 0.0),
        ("model offload (enable_model_cpu_offload)", model_offload, total),
        ("model offload + fp8 transformer storage", model_offload_fp8, total - fp8_delta),
        ("group offload (block level, 1 block/group, stream prefetch)", group_offload, total),
    ]
    return [(name, gpu / GIB, host / GIB) for name, gpu, host in rows]


SHORT = {"wan2.1-t2v-1.3b": "t2v1.3b", "wan2.1-i2v-14b-480p": "i2v14b"}
H100_BF16_FLOPS = 989.4e12  # dense bf16 peak of an H100 SXM (and H200)


def summary_table(figures: dict[str, str]) -> str:
    """The short table of the README, from the figures `main` prints last (``name=value`` pairs): per base, the
    generator's size, the GPU memory of each way of running and the compute of a guided step. Every figure is
    computed from shapes on the meta device, none measured."""
    lines = [
        "| Echo on | generator params | weights bf16 / fp8 | all on GPU, bf16 | all on GPU, fp8 generator "
        "| model offload (+ fp8) | group offload | host RAM when offloading | TFLOP per guided step "
        "| s per step at H100 peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for base, short in SHORT.items():
        if f"{short}_transformer_params_b" not in figures:
            continue
        model = {key.removeprefix(f"{short}_"): value for key, value in figures.items() if key.startswith(f"{short}_")}
        (step_key,) = [key for key in model if key.startswith("tflop_per_step_")]
        tflop = float(model[step_key])
        lines.append(
            f"| {base} | {float(model['transformer_params_b']):.2f} B | {model['transformer_bf16_gib']} / "
            f"{model['transformer_fp8_gib']} GiB | {model['bf16_all_gpu_gib']} GiB | {model['fp8_all_gpu_gib']} GiB | "
            f"{model['model_offload_gpu_gib']} ({model['model_offload_fp8_gpu_gib']}) GiB | "
            f"{model['group_offload_gpu_gib']} GiB | {model['offload_host_gib']} GiB | {tflop:,.0f} | "
            f"{tflop * 1e12 / H100_BF16_FLOPS:.2f} |"
        )
    return "\n".join(lines)


def main(args) -> None:
    figures = []
    clip = f"{args.height}x{args.width}x{args.frames}"
    for base in args.models:
        result = measure(base, args.frames, args.height, args.width)
        short = SHORT.get(base, base)
        print(f"\n## {base} (Echo generator and pipeline components), clip {clip}\n")
        print("| component | parameters | inference dtype | weights GiB | fp8 storage GiB |")
        print("|---|---:|---|---:|---:|")
        for name, count in result["params"].items():
            fp8 = f"{result['bytes_fp8_transformer'] / GIB:.2f}" if name == "transformer" else ""
            dtype = result["dtype"][name]
            print(f"| {name} | {count / 1e6:,.0f} M | {dtype} | {result['bytes'][name] / GIB:.2f} | {fp8} |")
        steps_flops = GUIDED_PASSES * result["flops_pass"]
        print(
            f"\nActivations (peak, batch 1): generator pass {result['act_transformer'] / GIB:.2f} GiB, VAE decode "
            f"{result['act_vae_decode'] / GIB:.2f} GiB. Generator: {result['flops_pass'] / 1e12:.1f} TFLOP per pass, "
            f"{steps_flops / 1e12:.1f} TFLOP per guided step ({GUIDED_PASSES} passes); at the 989 TFLOP/s dense bf16 "
            f"peak of an H100 SXM a step takes at least {steps_flops / H100_BF16_FLOPS:.2f} s.\n"
        )
        print("| variant | GPU GiB (weights + activations) | host GiB (offloaded weights) |")
        print("|---|---:|---:|")
        for name, gpu, host in variants(result):
            print(f"| {name} | {gpu:.1f} | {host:.1f} |")
        figures += [
            f"{short}_transformer_params_b={result['params']['transformer'] / 1e9:.3f}",
            f"{short}_transformer_bf16_gib={result['bytes']['transformer'] / GIB:.2f}",
            f"{short}_transformer_fp8_gib={result['bytes_fp8_transformer'] / GIB:.2f}",
            f"{short}_act_pass_{clip}_gib={result['act_transformer'] / GIB:.2f}",
            f"{short}_act_vae_decode_{clip}_gib={result['act_vae_decode'] / GIB:.2f}",
            f"{short}_tflop_per_step_{clip}={steps_flops / 1e12:.1f}",
        ]
        keys = ("bf16_all", "fp8_all", "model_offload", "model_offload_fp8", "group_offload")
        figures += [f"{short}_{key}_gpu_gib={gpu:.1f}" for key, (_, gpu, _) in zip(keys, variants(result))]
        figures.append(f"{short}_offload_host_gib={variants(result)[2][2]:.1f}")
    print("\n## Summary (the README's table; computed from shapes, not measured)\n")
    print(summary_table(dict(figure.split("=", 1) for figure in figures)) + "\n")
    print(" ".join(figures))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(WAN_BASES), default=list(WAN_BASES))
    parser.add_argument("--frames", type=int, default=81, help="video frames of the clip (4k + 1)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        parser.error(
            f"expected frames = 4k + 1 and sizes divisible by 16, got {args.frames}, {args.height}×{args.width}"
        )
    return args


if __name__ == "__main__":
    torch.set_num_threads(1)
    assert math.isfinite(GIB)
    main(parse_args())
