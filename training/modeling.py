"""Model set-up of both training stages: components, LoRA adapters, trainable modules, f_ref and checkpoint files.

Stage 1 (paper Sec. 3.3): the generator is frozen, a LoRA adapter (``stage1``) is added on ``lora.target_modules``
and the new modules matched by ``lora.trainable_modules`` (audio projection, SDCM audio branch) are trained in full.

Stage 2: the stage-1 adapter is loaded and *fused* into the base weights together with the stage-1 new modules; a
frozen deep copy of that generator is ``f_ref``; a new adapter (``stage2``) is added on the stage-2 targets (text
cross-attention by default), and the SDCM user branch, the user-context projection and the LCU are trained in full.

Files of a trained state (a checkpoint or the final output), all safetensors or JSON:

- ``transformer_lora/``: the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``, whose
  header also carries the config as diffusers' ``save_lora_adapter`` writes it);
- ``transformer_modules.safetensors``: the fully trained generator parameters, under their base-model names;
- ``context_encoder/``: the LCU (stage 2), `save_pretrained` format;
- ``echo_settings.json`` and ``training_config.yaml`` (written by `training.train`): what the state was trained with.
- ``stage1.json`` (stage 2, written by `training.train`): the stage-1 state it was trained on, its folder and the
  SHA-256 of its trained weights (`stage1_identity`); echo-export checks the stage-1 output it fuses against it.

Adapters go through diffusers' `PeftAdapterMixin` on the generator: `load_lora_adapter` to add a saved one,
`fuse_lora` + `unload_lora` to fuse it; the saved weights are peft's `get_peft_model_state_dict`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from echo.components import load_components, load_model_config
from echo.settings import SETTINGS_NAME, EchoSettings

from .config import TrainConfig, settings_from_config

logger = logging.getLogger(__name__)

LORA_DIR = "transformer_lora"
MODULES_FILE = "transformer_modules.safetensors"
CONTEXT_ENCODER_DIR = "context_encoder"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's file names
LCU_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' file name, so `from_pretrained` reads it
STAGE1_RECORD = "stage1.json"  # stage 2: which stage-1 state it was trained on (`stage1_identity`)


class EchoTrainingModule(nn.Module):
    """The trainable part of a stage as one module (one DDP/FSDP wrapper): the generator and, in stage 2, the LCU.

    Args:
        transformer (`EchoTransformer3DModel`): the generator with its LoRA adapter.
        context_encoder (`LongRangeContextEncoder`, *optional*): the LCU (stage 2); `None` in stage 1.
    """

    def __init__(self, transformer: nn.Module, context_encoder: nn.Module | None = None):
        super().__init__()
        self.transformer = transformer
        self.context_encoder = context_encoder

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor,
        audio_embeds: torch.Tensor,
        lip_mask: torch.Tensor,
        face_mask: torch.Tensor,
        user_inputs: dict | None = None,
        return_block_features: list[int] | None = None,
        audio_mask: torch.Tensor | None = None,
        user_keep: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ):
        """Run the LCU on ``user_inputs`` (stage 2) and the generator; returns an `EchoTransformerOutput`.

        ``user_inputs`` holds the `LongRangeContextEncoder.forward` arguments (``user_audio`` `(B, T_hist, NL, D_a)`,
        ``clip_frames``, ``user_audio_mask``, ``user_video`` `(B, T_hist, C_v, h_v, w_v)`, ``user_face_mask``,
        ``understanding``, ``understanding_mask``). ``audio_mask`` / ``user_keep`` `(B,)` bool drop a sample's avatar
        audio / user context (condition dropout; the user context is dropped through its ``context_mask``).
        ``encoder_hidden_states_image`` `(B, N_img, image_dim)`: the reference's CLIP tokens (I2V bases).
        """
        context_embeds = context_mask = None
        if self.context_encoder is not None:
            if user_inputs is None:
                raise ValueError(
                    "`user_inputs` is required when the training module holds a context encoder (stage 2)."
                )
            lcu = self.context_encoder(**user_inputs)
            context_embeds, context_mask = lcu.context, lcu.context_mask  # B, T_cur, context_dim
            if user_keep is not None:
                context_mask = context_mask.bool() & user_keep[:, None]
        return self.transformer(
            hidden_states,
            timestep,
            encoder_hidden_states,
            condition=condition,
            audio_embeds=audio_embeds,
            context_embeds=context_embeds,
            context_mask=context_mask,
            lip_mask=lip_mask,
            face_mask=face_mask,
            return_block_features=return_block_features,
            audio_mask=audio_mask,
            encoder_hidden_states_image=encoder_hidden_states_image,
        )


@dataclass
class TrainingModels:
    """Everything a training step needs besides the data."""

    module: EchoTrainingModule
    vae: nn.Module
    text_encoder: nn.Module | None  # None with `data.use_cached_emotion_embeds`
    tokenizer: object | None
    ref_transformer: nn.Module | None
    scheduler: object
    adapter_name: str
    trainable_pattern: str
    image_encoder: nn.Module | None = None  # I2V bases: the frozen CLIP vision encoder of the reference
    image_processor: object | None = None
    stage1: dict | None = None  # stage 2: `stage1_identity` of the stage-1 state fused into the generator


def _apply_ablation(description: dict, config: TrainConfig) -> dict:
    """Write the ablation switches into the model description (they change which modules exist)."""
    switches = config.ablation
    transformer = description.get("transformer")
    if transformer is None:
        raise ValueError(f"model config {config.model.config!r} has no 'transformer' section.")
    if "pretrained" in transformer:
        raise ValueError(
            "model config section 'transformer' loads a saved ECHO generator ('pretrained'); training builds the "
            "generator from a Wan base ('from_wan') or a 'config' so that ablation switches and adapters apply."
        )
    transformer.setdefault("config", {})["use_sdcm"] = switches.use_sdcm
    if config.stage == 2:
        lcu = description.get("context_encoder")
        if lcu is None:
            raise ValueError(
                f"model config {config.model.config!r} has no 'context_encoder' section (needed in stage 2)."
            )
        if "pretrained" not in lcu:
            lcu.setdefault("config", {}).update(
                use_visual=switches.use_visual,
                use_understanding=switches.use_understanding,
                use_emotion=switches.use_emotion,
            )
    return description


def _match(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name.replace(".base_layer", "")) is not None


def base_name(name: str) -> str:
    """A parameter name without PEFT's ``.base_layer`` (the name in the base model)."""
    return name.replace(".base_layer", "")


def trainable_module_state(transformer: nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    """Fully trained generator parameters (matching ``pattern``), keyed by their base-model names."""
    return {
        base_name(name): param.detach()
        for name, param in transformer.named_parameters()
        if "lora_" not in name and _match(pattern, name)
    }


def load_module_state(transformer: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (base-model names) into the generator; every key must exist with the same shape."""
    params = {base_name(n): p for n, p in transformer.named_parameters() if "lora_" not in n}
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{source}: parameters {unknown[:5]} do not exist in the generator.")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{source}: parameter {name!r} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}."
                )
            params[name].copy_(value)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a format that holds tensors only: reading it runs no code); a missing,
    truncated or corrupt file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:  # safetensors' own message names no file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({error}).") from error


def add_lora(transformer: nn.Module, config: TrainConfig, adapter_name: str) -> None:
    """Freeze the generator, add a LoRA adapter on ``lora.target_modules`` and unfreeze ``lora.trainable_modules``."""
    from peft import LoraConfig

    lora = config.lora
    transformer.requires_grad_(False)
    lora_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        lora_dropout=lora.dropout,
        init_lora_weights=True,
        target_modules=lora.target_modules,
    )
    try:
        transformer.add_adapter(lora_config, adapter_name=adapter_name)
    except ValueError as error:
        raise ValueError(f"config key 'lora.target_modules' = {lora.target_modules!r}: {error}") from error
    transformer.set_adapter(adapter_name)
    matched = 0
    for name, param in transformer.named_parameters():
        if f"lora_A.{adapter_name}." in name or f"lora_B.{adapter_name}." in name:
            param.requires_grad_(True)
        elif "lora_" not in name and _match(lora.trainable_modules, name):
            param.requires_grad_(True)
            matched += 1
    if lora.trainable_modules and matched == 0:
        raise ValueError(
            f"config key 'lora.trainable_modules' = {lora.trainable_modules!r} matches no generator parameter."
        )


def fuse_adapter(transformer: nn.Module, adapter_name: str) -> None:
    """Merge a LoRA adapter into the base weights and remove every PEFT layer (the model becomes a plain one):
    diffusers' `fuse_lora` then `unload_lora` (`PeftAdapterMixin`)."""
    if adapter_name not in getattr(transformer, "peft_config", {}):
        loaded = list(getattr(transformer, "peft_config", {}))
        raise ValueError(f"adapter {adapter_name!r} is not loaded; loaded: {loaded}.")
    transformer.fuse_lora(adapter_names=[adapter_name])
    transformer.unload_lora()


def resolve_trained_dir(path: str | os.PathLike, what: str = "stage-1 output (config key 'model.stage1_dir')") -> Path:
    """A stage output: the folder itself if it holds an adapter, else its ``final/``, else (no ``final/``: a run
    still training or stopped) its latest ``checkpoint-N``, with a warning naming it. A ``final/`` without its adapter
    (a save that was stopped) is an error, not a reason to take a checkpoint instead."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    if (path / LORA_DIR).is_dir():
        return path
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / LORA_DIR).is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    final = path / "final"
    if (final / LORA_DIR).is_dir():
        return final
    if final.exists():
        newest = f"; its newest checkpoint is {str(checkpoints[-1])!r}" if checkpoints else ""
        raise FileNotFoundError(
            f"{what} {str(path)!r}: its final/ has no {LORA_DIR}/, so it is incomplete (a save that was stopped, or a "
            f"deleted file). Finish or rerun the training, or name one of its checkpoint-N/ folders instead{newest}."
        )
    if not checkpoints:
        raise FileNotFoundError(f"{what} {str(path)!r} holds no {LORA_DIR}/, final/ or checkpoint-N/ folder.")
    logger.warning(
        "%s %s has no final/ (still training, or stopped): using its newest checkpoint, %s",
        what,
        path,
        checkpoints[-1].name,
    )
    return checkpoints[-1]


def stage1_identity(trained_dir: str | os.PathLike) -> dict:
    """What identifies a stage-1 state (stage 2 records it, echo-export checks it): ``{"dir": its folder,
    "weights_sha256": the SHA-256 of its adapter weights followed by its trained modules}``."""
    trained_dir = Path(trained_dir)
    digest = hashlib.sha256()
    for file in (trained_dir / LORA_DIR / ADAPTER_WEIGHTS_NAME, trained_dir / MODULES_FILE):
        if not file.is_file():
            raise FileNotFoundError(f"stage-1 state {str(trained_dir)!r} has no {file.relative_to(trained_dir)}.")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"dir": str(trained_dir.resolve()), "weights_sha256": digest.hexdigest()}


def check_stage1_identity(stage2_dir: str | os.PathLike, stage1_dir: str | os.PathLike, given: str) -> None:
    """Refuse to fuse ``stage1_dir`` with the stage-2 state ``stage2_dir`` unless it is the stage-1 state stage 2 was
    trained on: a stage-1 output (its ``training_config.yaml`` says ``stage: 1``) whose `stage1_identity` equals the
    one stage 2 recorded in its ``stage1.json``. ``given`` names where ``stage1_dir`` came from, for the message. A
    stage-2 state from before ``stage1.json`` existed cannot be checked: a warning says so."""
    import yaml

    stage1_dir, stage2_dir = Path(stage1_dir), Path(stage2_dir)
    config_file = stage1_dir / "training_config.yaml"
    if config_file.is_file():
        stage = (yaml.safe_load(config_file.read_text()) or {}).get("stage")
        if stage != 1:
            raise ValueError(
                f"{given} {str(stage1_dir)!r} is a stage-{stage} output, not a stage-1 one ({str(config_file)!r}); "
                f"pass the stage-1 run that {str(stage2_dir)!r} was trained on."
            )
    record_file = stage2_dir / STAGE1_RECORD
    if not record_file.is_file():
        logger.warning(
            "%s has no %s (trained before it was recorded): cannot check that %s %s is the stage-1 state "
            "it was trained on",
            stage2_dir,
            STAGE1_RECORD,
            given,
            stage1_dir,
        )
        return
    recorded = json.loads(record_file.read_text())
    found = stage1_identity(stage1_dir)
    if found["weights_sha256"] != recorded.get("weights_sha256"):
        raise ValueError(
            f"{given} {str(stage1_dir)!r} is not the stage-1 state {str(stage2_dir)!r} was trained on: its weights' "
            f"SHA-256 is {found['weights_sha256'][:16]}…, while stage 2 recorded {str(recorded.get('weights_sha256'))[:16]}… "
            f"of {recorded.get('dir')!r} ({str(record_file)!r}). Fusing another stage 1 would give a generator that was "
            "never trained; pass the stage-1 run stage 2 was trained on (--stage1-dir)."
        )


def save_adapter(folder: str | os.PathLike, transformer: nn.Module, adapter_name: str, state: dict | None = None):
    """Write one LoRA adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The weights are peft's `get_peft_model_state_dict` of the adapter (what diffusers' `save_lora_adapter` writes,
    with the same ``lora_adapter_metadata`` header, so `load_lora_adapter` reads the file on its own too). ``state``
    (the generator's full state dict, e.g. gathered from FSDP shards) replaces the module's own tensors when given.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(transformer, state_dict=state, adapter_name=adapter_name)
    if not weights:
        raise ValueError(f"the generator holds no weight of the LoRA adapter {adapter_name!r}.")
    config = transformer.peft_config[adapter_name]
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config.to_dict(), default=sorted, sort_keys=True)}
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    save_file(weights, str(folder / ADAPTER_WEIGHTS_NAME), metadata=metadata)
    config.save_pretrained(str(folder))


def load_adapter(transformer: nn.Module, folder: str | os.PathLike, adapter_name: str) -> None:
    """Add the PEFT-folder adapter ``folder`` to a generator under ``adapter_name`` (diffusers' `load_lora_adapter`,
    configured by the folder's ``adapter_config.json``); every saved weight must land in the model."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    weights_file = folder / ADAPTER_WEIGHTS_NAME
    for required in (weights_file, folder / "adapter_config.json"):
        if not required.is_file():
            raise FileNotFoundError(f"adapter folder {str(folder)!r} has no {required.name}.")
    config = LoraConfig.from_pretrained(str(folder))
    weights = read_safetensors(weights_file)
    # A state dict, not the folder: diffusers would take the config from the file's header (absent in files written
    # by peft itself) instead of `metadata`.
    transformer.load_lora_adapter(dict(weights), prefix=None, adapter_name=adapter_name, metadata=config.to_dict())
    saved = set(weights)
    loaded = set(get_peft_model_state_dict(transformer, adapter_name=adapter_name))
    if saved != loaded:
        raise ValueError(
            f"{str(weights_file)!r} does not match the generator: weights without a layer "
            f"{sorted(saved - loaded)[:5]}, layers without a weight {sorted(loaded - saved)[:5]}."
        )


def save_trained(
    output_dir: str | os.PathLike,
    state: dict[str, torch.Tensor],
    module: EchoTrainingModule,
    adapter_name: str,
    trainable_pattern: str,
) -> None:
    """Write the adapter (PEFT format), the fully trained generator modules and the LCU (safetensors).

    Args:
        output_dir (`str` or `os.PathLike`): the checkpoint or output folder.
        state (`dict[str, torch.Tensor]`): the full state dict of the [`EchoTrainingModule`] (keys ``transformer.*``
            and ``context_encoder.*``), e.g. ``accelerator.get_state_dict(module)``, which gathers FSDP shards.
        module ([`EchoTrainingModule`]): the unwrapped module (its adapter config and the LCU's config).
        adapter_name (`str`): the adapter to save.
        trainable_pattern (`str`): regex of the fully trained generator parameters (base-model names).
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generator, modules, lcu = {}, {}, {}
    for key, value in state.items():
        if key.startswith("transformer."):
            name = key[len("transformer.") :]
            generator[name] = value
            if "lora_" not in name and _match(trainable_pattern, name):
                modules[base_name(name)] = value.detach().contiguous().cpu()
        elif key.startswith("context_encoder."):
            lcu[key[len("context_encoder.") :]] = value.detach().contiguous().cpu()
    save_adapter(output_dir / LORA_DIR, module.transformer, adapter_name, state=generator)
    save_file(modules, str(output_dir / MODULES_FILE))
    if module.context_encoder is not None:
        (output_dir / CONTEXT_ENCODER_DIR).mkdir(exist_ok=True)
        module.context_encoder.save_config(output_dir / CONTEXT_ENCODER_DIR)
        save_file(lcu, str(output_dir / CONTEXT_ENCODER_DIR / LCU_WEIGHTS_NAME))


def load_context_encoder_weights(context_encoder: nn.Module, input_dir: str | os.PathLike) -> None:
    """Load the LCU weights of a trained state (``context_encoder/``, safetensors) strictly."""
    weights = Path(input_dir) / CONTEXT_ENCODER_DIR / LCU_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(input_dir)!r} has no {CONTEXT_ENCODER_DIR}/{LCU_WEIGHTS_NAME}.")
    context_encoder.load_state_dict(read_safetensors(weights), strict=True)


def load_trained(
    input_dir: str | os.PathLike, transformer: nn.Module, context_encoder: nn.Module | None, adapter_name: str
) -> None:
    """Load what `save_trained` wrote into models that already hold the adapter ``adapter_name`` (resume: the
    optimizer holds the adapter's parameters, so they are filled in place with peft's `set_peft_model_state_dict`,
    as diffusers' training examples do in their load hooks)."""
    from peft.utils import set_peft_model_state_dict

    input_dir = Path(input_dir)
    adapter_file = input_dir / LORA_DIR / ADAPTER_WEIGHTS_NAME
    if not adapter_file.is_file():
        raise FileNotFoundError(f"checkpoint {str(input_dir)!r} has no {LORA_DIR}/{ADAPTER_WEIGHTS_NAME}.")
    result = set_peft_model_state_dict(transformer, read_safetensors(adapter_file), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f"lora_A.{adapter_name}." in k or f"lora_B.{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{str(adapter_file)!r} does not match the model: unexpected {sorted(result.unexpected_keys)[:5]}, "
            f"missing {sorted(missing)[:5]}."
        )
    load_module_state(transformer, read_safetensors(input_dir / MODULES_FILE), str(input_dir / MODULES_FILE))
    if context_encoder is not None:
        load_context_encoder_weights(context_encoder, input_dir)


def load_fused(transformer: nn.Module, trained_dir: str | os.PathLike, adapter_name: str) -> None:
    """Load a trained state's fully trained modules and adapter into a generator and fuse the adapter into its
    weights (the generator ends without PEFT layers)."""
    trained_dir = Path(trained_dir)
    modules_file = trained_dir / MODULES_FILE
    if not modules_file.is_file():
        raise FileNotFoundError(f"{str(trained_dir)!r} has no {MODULES_FILE}.")
    load_module_state(transformer, read_safetensors(modules_file), str(modules_file))
    load_adapter(transformer, trained_dir / LORA_DIR, adapter_name)
    fuse_adapter(transformer, adapter_name)


def load_stage1_into(transformer: nn.Module, stage1_dir: str | os.PathLike) -> Path:
    """Load the stage-1 modules and adapter into a fresh generator and fuse the adapter into its weights."""
    trained = resolve_trained_dir(stage1_dir)
    load_fused(transformer, trained, "stage1")
    return trained


def check_stage1_settings(config: TrainConfig, trained_dir: str | os.PathLike) -> None:
    """Stage 2 continues stage 1 at the same frame size and chunk length: compare the stage-1 output's saved
    ``echo_settings.json`` with this run's config and refuse a mismatch, naming both values."""
    saved = EchoSettings.load(trained_dir)
    own = settings_from_config(config)
    for field, key in (("resolution", "data.resolution"), ("num_frames_per_chunk", "data.num_frames")):
        if getattr(saved, field) != getattr(own, field):
            raise ValueError(
                f"stage 1 was trained with {field} = {getattr(saved, field)} ({str(Path(trained_dir) / SETTINGS_NAME)!r}) "
                f"but this stage-2 config has {key} = {getattr(own, field)}; set {key}={getattr(saved, field)} or "
                "point model.stage1_dir at a stage-1 run trained at this value."
            )


def build_training_models(config: TrainConfig) -> TrainingModels:
    """Build every model of the configured stage (frozen parts in eval mode, trainable parts set up).

    Returns:
        [`TrainingModels`]; ``ref_transformer`` is ``f_ref`` in stage 2 and `None` in stage 1; ``text_encoder`` and
        ``tokenizer`` are `None` (never built) with ``data.use_cached_emotion_embeds``.
    """
    # 1. Components from the model description, with the ablation switches applied
    description = _apply_ablation(load_model_config(config.model.config), config)
    sections = ["vae", "transformer", "scheduler"]
    if not config.data.use_cached_emotion_embeds:
        sections += ["text_encoder", "tokenizer"]
    if config.stage == 2:
        sections.append("context_encoder")
    sections += [name for name in ("image_encoder", "image_processor") if name in description]
    components = load_components(
        description, torch_dtype=torch.float32, only=sections
    )  # fp32 master weights: the accelerate config sets the compute precision
    vae = components["vae"].requires_grad_(False).eval()
    image_encoder = components.get("image_encoder")
    image_dim = components["transformer"].config.image_dim
    if image_dim is not None and (image_encoder is None or "image_processor" not in components):
        raise ValueError(
            f"model config {config.model.config!r}: the transformer reads CLIP image tokens of the reference "
            f"(image_dim = {image_dim}: an I2V base) but the description has no 'image_encoder' and 'image_processor' "
            "sections; add them (the I2V base's `image_encoder` / `image_processor` subfolders, see "
            "configs/models/wan2.1-i2v-14b-480p.yaml)."
        )
    if image_encoder is not None:
        image_encoder = image_encoder.requires_grad_(False).eval()
    text_encoder = components.get("text_encoder")
    if text_encoder is not None:
        text_encoder = text_encoder.requires_grad_(False).eval()
    transformer = components["transformer"]

    # 2. Stage 2: fuse stage 1 into the base; f_ref is a frozen copy of it
    ref_transformer = None
    context_encoder = None
    stage1 = None
    if config.stage == 2:
        check_stage1_settings(config, resolve_trained_dir(config.model.stage1_dir))
        stage1 = stage1_identity(load_stage1_into(transformer, config.model.stage1_dir))
        ref_transformer = copy.deepcopy(transformer).requires_grad_(False).eval()
        context_encoder = components["context_encoder"].requires_grad_(True).train()

    # 3. LoRA adapter and fully trained modules
    adapter_name = f"stage{config.stage}"
    add_lora(transformer, config, adapter_name)
    transformer.train()
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if context_encoder is not None:
            context_encoder.enable_gradient_checkpointing()
    return TrainingModels(
        module=EchoTrainingModule(transformer, context_encoder),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=components.get("tokenizer"),
        ref_transformer=ref_transformer,
        scheduler=components["scheduler"],
        adapter_name=adapter_name,
        trainable_pattern=config.lora.trainable_modules,
        image_encoder=image_encoder,
        image_processor=components.get("image_processor"),
        stage1=stage1,
    )


def parameter_groups(module: EchoTrainingModule, config: TrainConfig) -> list[dict]:
    """AdamW groups: LoRA weights at ``optim.lora_lr``, the fully trained modules and the LCU at ``optim.base_lr``."""
    lora, base = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (lora if "lora_" in name else base).append(param)
    groups = [{"params": lora, "lr": config.optim.lora_lr, "name": "lora"}]
    if base:
        groups.append({"params": base, "lr": config.optim.base_lr, "name": "modules"})
    return groups


def fsdp_auto_wrap_policy(module: nn.Module, block_classes: tuple[type, ...] | None = None):
    """FSDP-1 wrap policy for frozen base weights next to trainable ones (with ``fsdp_use_orig_params: false``).

    A flat parameter must be uniformly trainable or frozen, so, as peft's ``fsdp_auto_wrap_policy`` does, every
    sub-module whose parameters are all trainable (LoRA ``lora_A`` / ``lora_B`` layers, the fully trained new modules,
    the LCU) becomes its own FSDP unit, and every generator block another one (holding the block's frozen weights).
    """
    import functools

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    if block_classes is None:
        # import here: import time (diffusers' and transformers' model stack, seconds, for this FSDP-only helper)
        from echo.transformer_echo import EchoTransformerBlock

        block_classes = (EchoTransformerBlock,)

    def all_trainable(sub: nn.Module) -> bool:
        if sub is module or isinstance(sub, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward to hook
            return False
        params = list(sub.parameters())
        return bool(params) and all(p.requires_grad for p in params)

    return functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=all_trainable),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(block_classes)),
        ],
    )
