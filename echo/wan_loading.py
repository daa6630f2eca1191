# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""Loading a diffusers Wan2.1 transformer into `EchoTransformer3DModel` (`EchoTransformer3DModel.from_wan` and
`load_wan_state_dict`): the model file holds the model, this module the loading beside it.

- **Sources**: a `WanTransformer3DModel` module, a local folder in its ``save_pretrained`` layout, or a hub id
  (``owner/name``, fetched with ``snapshot_download``: the config and safetensors files only).
- **Weights**: safetensors only, one file or shards named by ``diffusion_pytorch_model.safetensors.index.json``, read
  one tensor at a time straight into its final dtype. Pickled ``*.bin`` weights are refused (their loading can run
  code).
- **Checks**: every Wan key names an Echo parameter of the same shape, and every Echo parameter outside the added
  modules (`ECHO_ONLY_KEYS`) is given; the patch embedding may be narrower (a T2V or I2V base), its missing input
  channels zero-initialised.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from safetensors import safe_open

WAN_CONFIG_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "image_dim",
    "added_kv_proj_dim",
    "rope_max_seq_len",
    "pos_embed_seq_len",
)

# Parameters that exist in Echo but not in Wan: every other Echo key is a Wan key of the same name.
ECHO_ONLY_KEYS = re.compile(r"^(audio_proj\.|context_proj\.|blocks\.\d+\.sdcm\.)")


def base_input_channels(latent_channels: int, vae_scale_factor_temporal: int = 4) -> tuple[int, int]:
    """Input channels of the Wan bases `from_wan` accepts: T2V (noisy latents) and I2V (+ mask + given latents)."""
    return latent_channels, 2 * latent_channels + vae_scale_factor_temporal


WAN_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WAN_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def resolve_wan_folder(source: str | os.PathLike, subfolder: str | None, local_files_only: bool) -> Path:
    """The local folder of a Wan transformer: `source[/subfolder]`, or a hub id's snapshot (config and safetensors
    files only)."""
    path = Path(source)
    if not path.is_dir():
        if path.is_absolute() or path.exists() or str(source).startswith(".") or str(source).count("/") != 1:
            raise FileNotFoundError(f"{str(source)!r} is not a folder nor a hub id (`owner/name`) of a Wan model.")
        from huggingface_hub import snapshot_download

        prefix = f"{subfolder}/" if subfolder else ""
        patterns = [f"{prefix}config.json", f"{prefix}*.safetensors", f"{prefix}*.safetensors.index.json"]
        path = Path(snapshot_download(str(source), allow_patterns=patterns, local_files_only=local_files_only))
    folder = path / subfolder if subfolder else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; expected a `WanTransformer3DModel` folder.")
    return folder


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers model folder: one file, or the shards its index names. Safetensors only."""
    index = folder / WAN_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WAN_WEIGHTS_NAME).is_file():
        return [folder / WAN_WEIGHTS_NAME]
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise OSError(
            f"{str(folder)!r} holds model weights only as {pickled}, a pickle format whose loading can run code; "
            "ECHO loads safetensors only. Convert them once from a source you trust (load the model there and "
            "`save_pretrained(..., safe_serialization=True)`)."
        )
    raise OSError(f"{str(folder)!r} has neither {WAN_WEIGHTS_NAME} nor {WAN_WEIGHTS_INDEX_NAME}.")


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor in `files`, read from their headers only."""
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def read_safetensors(files: list[Path], dtype_of):
    """Yield `(key, tensor)` for every tensor of `files`, each a private copy in `dtype_of(key, stored tensor)`.

    Each tensor is read through its own mapping of the file, closed before the next one is read: the file pages it
    touched leave the process with it, so reading holds at most one stored tensor beyond what was yielded."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(file, framework="pt") as f:
                stored = f.get_tensor(key)
            tensor = stored.to(dtype_of(key, stored), copy=True)
            del stored
            yield key, tensor


def build_from_wan(
    cls,
    wan_transformer: WanTransformer3DModel | str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    local_files_only: bool = False,
    **echo_config,
):
    """`EchoTransformer3DModel.from_wan` (which documents the arguments): ``cls`` built from a Wan transformer."""
    unknown_args = sorted(set(echo_config) & set(WAN_CONFIG_KEYS))
    if unknown_args:
        raise ValueError(f"`echo_config` sets Wan arguments {unknown_args}; these come from the Wan model's config.")

    # 1. The Wan config, the shapes of its weights and a reader that yields them one at a time
    if isinstance(wan_transformer, (str, os.PathLike)):
        folder = resolve_wan_folder(wan_transformer, subfolder, local_files_only)
        with init_empty_weights():  # the config with its defaults, at no memory cost
            wan_config = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder)).config
        files = safetensors_files(folder)
        shapes = safetensors_shapes(files)
        source_dtype = torch.float32

        def read(dtype_of):
            return read_safetensors(files, dtype_of)

    else:
        wan_config = wan_transformer.config
        wan_state_dict = wan_transformer.state_dict()
        shapes = {key: tuple(value.shape) for key, value in wan_state_dict.items()}
        source_dtype = wan_transformer.dtype

        def read(dtype_of):
            for key, value in wan_state_dict.items():
                yield key, value.to(dtype_of(key, value), copy=True)

    dtype = torch_dtype or source_dtype

    def dtype_of(name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        return torch.float32 if any(m in name.split(".") for m in cls._keep_in_fp32_modules) else dtype

    # 2. Config: Wan's arguments + Echo's
    config = {key: wan_config[key] for key in WAN_CONFIG_KEYS if key in wan_config}
    default_channels = inspect.signature(cls.__init__).parameters["condition_channels"].default
    condition_channels = echo_config.get("condition_channels", default_channels)
    out_channels = config.get("out_channels") or config["in_channels"]
    config["out_channels"] = out_channels
    vae_scale_factor_temporal = echo_config.get("vae_scale_factor_temporal", 4)
    base_channels = base_input_channels(out_channels, vae_scale_factor_temporal)
    if config["in_channels"] not in base_channels or config["in_channels"] > out_channels + condition_channels:
        raise ValueError(
            f"Wan `in_channels` is {config['in_channels']}, expected {base_channels[0]} (T2V) or "
            f"{base_channels[1]} (I2V: latents + mask + given latents), at most out_channels + condition_channels "
            f"= {out_channels + condition_channels}."
        )
    config["in_channels"] = out_channels + condition_channels  # the base's channels, then zero-initialised ones
    config["patch_size"] = tuple(config["patch_size"])

    # 3. The model on the meta device (buffers, i.e. the RoPE tables, are computed as usual); keys checked
    with init_empty_weights(include_buffers=False):
        model = cls(**config, **echo_config)
    wan_keys = check_wan_shapes(model, shapes)

    # 4. The added modules, built and initialised as `__init__` does, one at a time, then cast
    for name in model._added_module_names():
        module = model._build_added_module(name)
        for param_name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            tensor.data = tensor.data.to(dtype_of(f"{name}.{param_name}", tensor))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    state_dict = {key: value for key, value in model.state_dict().items() if ECHO_ONLY_KEYS.match(key)}

    # 5. Every Wan tensor under its own name, read straight into its dtype
    wanted = set(wan_keys)
    for key, value in read(dtype_of):
        if key in wanted:
            state_dict[key] = wan_tensor(model, key, value)
    model.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"`from_wan` left {left_on_meta} on the meta device; this is a bug.")
    return model


def check_wan_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """
    Check the keys and shapes of a `WanTransformer3DModel` state dict against the Echo model ``model``: every Wan key must name
    an Echo parameter of the same shape, and every Echo parameter outside the added modules must be given. The
    patch embedding may be narrower (a T2V or I2V base). Returns the keys to load (ignored keys left out).
    """
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = {key for key in own if not ECHO_ONLY_KEYS.match(key)}
    given = {key for key in shapes if not any(ignored in key for ignored in model._keys_to_ignore_on_load_unexpected)}
    unknown = sorted(given - expected)
    missing = sorted(expected - given)
    if unknown:
        raise ValueError(
            f"The Wan state dict has unknown keys {unknown} (shapes {[tuple(shapes[k]) for k in unknown]}); "
            f"expected only keys of `WanTransformer3DModel` with this config ({len(expected)} keys)."
        )
    if missing:
        raise ValueError(f"The Wan state dict misses keys {missing} (expected shapes {[own[k] for k in missing]}).")
    for key in sorted(given):
        shape, target = tuple(shapes[key]), own[key]
        if key == "patch_embedding.weight" and shape != target:
            bases = base_input_channels(model.config.out_channels, model.config.vae_scale_factor_temporal)
            allowed = [channels for channels in bases if channels < target[1]]
            same_kernel = shape[:1] + shape[2:] == target[:1] + target[2:]
            if not same_kernel or shape[1] not in allowed:
                raise ValueError(
                    f"`patch_embedding.weight` of the Wan model has shape {shape}, expected {target}, or "
                    f"{allowed} input channels (T2V / I2V base) of {(target[0], '…', *target[2:])}."
                )
        elif shape != target:
            raise ValueError(f"Wan parameter `{key}` has shape {shape}, expected {target}.")
    return sorted(given)


def wan_tensor(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """A checked Wan tensor as the Echo model ``model`` holds it: a narrower patch embedding (T2V / I2V base) fills the first
    input channels and the condition channels it lacks get zero weights."""
    if key == "patch_embedding.weight" and value.shape[1] != model.config.in_channels:
        grown = value.new_zeros(value.shape[0], model.config.in_channels, *value.shape[2:])
        grown[:, : value.shape[1]] = value
        return grown
    return value
