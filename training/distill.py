"""Few-step distillation: a LoRA that turns a trained ECHO into a 1-4 step generator with guidance folded in.

    accelerate launch --config_file configs/accelerate/cpu_1proc.yaml -m training.distill \\
        --config configs/train/demo_distill.yaml [--set train.max_train_steps=400] [--overwrite]

Method (docs/few_step.md): trajectory distillation of the teacher's own guided Euler sampler, in the family of
progressive distillation (Salimans & Ho 2022) and consistency/shortcut models, applied as a flow-matching "average
velocity" regression. For each training window:

1. the window's conditions are built as the pipeline builds a chunk's (reference and motion-frame condition, avatar
   audio rows, SDCM masks, the LCU's user context, the prompt embedding);
2. the **teacher** (the base generator, adapter off) runs its full sampler from noise ε: ``teacher_steps`` Euler
   steps of its three guided passes (``uncond + s_a (audio − uncond) + s_u (full − audio)``), the trajectory stored.
   An Euler path is a straight line between its σ points, so `trajectory_at` reads the teacher's state at any σ
   exactly;
3. the **student** (base + LoRA, one pass with every condition, no guidance) is asked, at each segment
   ``σ_a → σ_b`` of its 1-, 2- and 4-step schedules (`pipelines.few_step.few_step_sigmas`), from the teacher's state
   at ``σ_a``, for the velocity that lands on the teacher's state at ``σ_b``:
   ``v* = (x_T(σ_b) − x_T(σ_a)) / (σ_b − σ_a)``; the loss is ``mean ‖v_student − v*‖²`` over all segments.

A student Euler step ``x_a + (σ_b − σ_a)·v_student`` then equals the teacher's state at ``σ_b`` when the loss is zero.
The base stays frozen: only the LoRA trains, so the student loads onto the shipped base with ``load_lora_weights``.

Checkpoints (``<output_dir>/checkpoint-N``: adapter, AdamW moments, step; safetensors and JSON) resume exactly:
every random draw of step ``s`` comes from ``(seed, rank, s)`` and the window order from ``(seed, epoch)``. The
final student is ``<output_dir>/final`` (``pytorch_lora_weights.safetensors`` + ``few_step.json``), loaded by
`EchoPipeline.load_few_step_weights`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from echo.atomic import write_text_atomic
from echo.components import read_yaml
from echo.data import ConversationDataset, collate_conversations
from echo.encoding import PromptEncoder, chunk_condition, encode_user_video
from echo.flow_matching import sigma_to_timestep
from pipelines import EchoPipeline
from pipelines.few_step import ADAPTER_NAME, FEW_STEP_DIR, LORA_WEIGHTS, FewStepConfig, few_step_sigmas

from .config import DataConfig, apply_overrides, from_dict
from .modeling import read_safetensors
from .step import blur_motion_video, step_generator

FINAL_DIR = "final"


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StudentLora:
    """The student's LoRA on the base generator (every other weight frozen)."""

    rank: int = 16
    alpha: int | None = None  # defaults to the rank (scale 1)
    # Every linear layer a step's output depends on: self- and text attention, the SDCM audio and user attention
    # (the conditions whose guidance is folded in) and the feed-forward.
    target_modules: str = (
        r".*blocks\.\d+\.(attn1|attn2|sdcm\.attn_avt|sdcm\.attn_usr)\.(to_q|to_k|to_v|to_out\.0)"
        r"|.*blocks\.\d+\.ffn\.net\.(0\.proj|2)"
    )


@dataclass
class DistillSettings:
    """The teacher's sampler and the student's schedules."""

    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # step counts the student learns
    default_steps: int = 2  # the step count the pipeline's few-step mode uses by default
    teacher_steps: int | None = None  # None: the teacher's saved `num_inference_steps`
    audio_guidance_scale: float | None = None  # None: the teacher's saved setting
    user_guidance_scale: float | None = None  # None: the teacher's saved setting
    motion_prob: float = 0.5  # share of continuation windows (motion frames given, as every chunk after the first)
    motion_blur: float = 3.0  # their ground-truth motion frames blurred by up to σ px (the model's frames are softer)


@dataclass
class DistillOptim:
    lr: float = 1e-4  # AdamW learning rate of the LoRA
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    warmup_steps: int = 10  # linear warm-up, then constant


@dataclass
class DistillTrain:
    max_train_steps: int = 200
    checkpointing_steps: int = 10
    checkpoints_total_limit: int = 2
    save_dtype: str = "fp16"  # dtype of the final LoRA file: fp16 or fp32


@dataclass
class DistillConfig:
    """``configs/train/*_distill.yaml``: a teacher pipeline folder and how its student is distilled."""

    pipeline: str = "models/echo-demo"  # the teacher: a saved EchoPipeline folder (the base the student loads onto)
    output_dir: str = "outputs/distill"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    lora: StudentLora = field(default_factory=StudentLora)
    distill: DistillSettings = field(default_factory=DistillSettings)
    optim: DistillOptim = field(default_factory=DistillOptim)
    train: DistillTrain = field(default_factory=DistillTrain)

    def validate(self) -> DistillConfig:
        steps = self.distill.student_steps
        if not isinstance(steps, list) or not steps or any(not isinstance(n, int) or n < 1 for n in steps):
            raise ValueError(f"config key 'distill.student_steps' is {steps!r}: expected a list of positive integers.")
        if self.distill.default_steps not in steps:
            raise ValueError(
                f"config key 'distill.default_steps' is {self.distill.default_steps}, not in 'distill.student_steps' "
                f"{steps}."
            )
        if self.train.save_dtype not in ("fp16", "fp32"):
            raise ValueError(f"config key 'train.save_dtype' is {self.train.save_dtype!r}: expected fp16 or fp32.")
        if self.train.max_train_steps < 0 or self.train.checkpointing_steps < 1:
            raise ValueError(
                f"config keys 'train.max_train_steps' ({self.train.max_train_steps}) must be >= 0 and "
                f"'train.checkpointing_steps' ({self.train.checkpointing_steps}) >= 1."
            )
        return self


def load_distill_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """A distillation YAML with ``section.key=value`` overrides; unknown keys are errors naming them."""
    values = read_yaml(path, "distillation config") or {}
    return from_dict(DistillConfig, apply_overrides(values, overrides)).validate()


# ----------------------------------------------------------------------------------------------------------------
# The maths: teacher trajectory, segments, loss
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class WindowInputs:
    """A window's generator inputs, as `EchoPipeline.render_chunk` gives them to its passes (batch ``B``)."""

    condition: torch.Tensor  # B, 4 + 2·16, F, h, w
    prompt_embeds: torch.Tensor  # B, L_txt, text_dim
    audio_embeds: torch.Tensor  # B, F_video, audio rows
    lip_mask: torch.Tensor  # B, F, h', w'
    face_mask: torch.Tensor  # B, F, h', w'
    context_embeds: torch.Tensor | None  # B, T_cur, context_dim (None: no user branch)
    context_mask: torch.Tensor | None
    latent_shape: tuple[int, ...]  # B, 16, F, h, w

    def repeat(self, times: int) -> WindowInputs:
        """Each sample repeated ``times`` times along the batch (sample-major: ``b0, b0, …, b1, …``)."""

        def rep(x):
            return None if x is None else x.repeat_interleave(times, dim=0)

        return WindowInputs(
            condition=rep(self.condition),
            prompt_embeds=rep(self.prompt_embeds),
            audio_embeds=rep(self.audio_embeds),
            lip_mask=rep(self.lip_mask),
            face_mask=rep(self.face_mask),
            context_embeds=rep(self.context_embeds),
            context_mask=rep(self.context_mask),
            latent_shape=(self.latent_shape[0] * times, *self.latent_shape[1:]),
        )


def pass_inputs(inputs: WindowInputs, name: str) -> dict:
    """The conditions of one guidance pass (`EchoPipeline.render_chunk`'s ``uncond`` / ``audio`` / ``full``)."""
    audio = None if name == "uncond" else inputs.audio_embeds
    user = name == "full"
    return {
        "audio_embeds": audio,
        "context_embeds": inputs.context_embeds if user else None,
        "context_mask": inputs.context_mask if user else None,
    }


def generator_velocity(transformer, latents: torch.Tensor, sigma: torch.Tensor, inputs: WindowInputs, name: str):
    """One generator forward: the velocity at ``latents`` `(B, 16, F, h, w)` and σ `(B,)` with the pass's
    conditions; float32 of the latents' shape."""
    prediction = transformer(
        hidden_states=latents.to(inputs.condition.dtype),
        timestep=sigma_to_timestep(sigma),
        encoder_hidden_states=inputs.prompt_embeds,
        condition=inputs.condition,
        lip_mask=inputs.lip_mask,
        face_mask=inputs.face_mask,
        return_dict=False,
        **pass_inputs(inputs, name),
    )[0]
    return prediction.float()


def guided_velocity(transformer, latents, sigma, inputs: WindowInputs, weights: dict[str, float]) -> torch.Tensor:
    """The teacher's guided velocity: ``Σ_pass weight · v_pass`` with `EchoPipeline.guidance_weights`."""
    velocity = 0.0
    for name, weight in weights.items():
        velocity = velocity + weight * generator_velocity(transformer, latents, sigma, inputs, name)
    return velocity


@torch.no_grad()
def teacher_trajectory(
    transformer, noise: torch.Tensor, inputs: WindowInputs, sigmas: torch.Tensor, weights: dict[str, float]
) -> torch.Tensor:
    r"""The teacher's Euler sampler from ``noise`` over ``sigmas`` (`(K + 1,)`, from 1 down to 0), every state kept.

    Runs with the transformer's adapters disabled (the base model), as `FlowMatchEulerDiscreteScheduler.step` steps:
    ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v``.

    Returns:
        `torch.Tensor` of shape `(K + 1, B, 16, F, h, w)`, float32: the state at each σ, ``[0]`` the noise.
    """
    with adapters_disabled(transformer):
        states = [noise.float()]
        batch = noise.shape[0]
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i].expand(batch)
            velocity = guided_velocity(transformer, states[-1], sigma, inputs, weights)
            states.append(states[-1] + (sigmas[i + 1] - sigmas[i]) * velocity)
    return torch.stack(states)


def trajectory_at(states: torch.Tensor, sigmas: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""The Euler trajectory's state at ``sigma`` (an Euler path is linear in σ between its points: exact).

    Args:
        states (`torch.Tensor` of shape `(K + 1, B, ...)`), sigmas (`torch.Tensor` of shape `(K + 1,)`, decreasing).
    """
    sigma = float(sigma)
    values = sigmas.tolist()
    if not values[-1] - 1e-6 <= sigma <= values[0] + 1e-6:
        raise ValueError(f"σ = {sigma} is outside the trajectory's range [{values[-1]}, {values[0]}].")
    for i in range(len(values) - 1):
        high, low = values[i], values[i + 1]
        if low - 1e-6 <= sigma <= high + 1e-6:
            fraction = 0.0 if high == low else (high - sigma) / (high - low)
            fraction = min(max(fraction, 0.0), 1.0)
            return states[i] + fraction * (states[i + 1] - states[i])
    raise AssertionError("unreachable: σ is within the range")


def student_segments(scheduler, student_steps: list[int]) -> list[tuple[float, float]]:
    """The distinct ``(σ_a, σ_b)`` steps of the student's schedules (`few_step_sigmas`), e.g. 7 for 1, 2, 4 steps."""
    segments = []
    for num_steps in student_steps:
        sigmas = few_step_sigmas(scheduler, num_steps).tolist()
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            if (a, b) not in segments:
                segments.append((a, b))
    return segments


def segment_targets(states: torch.Tensor, sigmas: torch.Tensor, segments: list[tuple[float, float]]):
    r"""The student's inputs and targets on every segment: ``x_T(σ_a)`` and ``v* = (x_T(σ_b) − x_T(σ_a)) / (σ_b −
    σ_a)``, stacked sample-major `(B·S, 16, F, h, w)` each, with σ_a `(B·S,)`."""
    starts, targets, sigma_a = [], [], []
    batch = states.shape[1]
    for b in range(batch):
        for a, z in segments:
            start = trajectory_at(states[:, b], sigmas, a)
            end = trajectory_at(states[:, b], sigmas, z)
            starts.append(start)
            targets.append((end - start) / (z - a))
            sigma_a.append(a)
    return torch.stack(starts), torch.stack(targets), torch.tensor(sigma_a, dtype=torch.float32)


def distillation_loss(
    transformer, starts: torch.Tensor, targets: torch.Tensor, sigma_a: torch.Tensor, inputs: WindowInputs
) -> torch.Tensor:
    """``mean ‖v_student(x_T(σ_a), σ_a) − v*‖²``: the student's single ``full`` pass (all conditions, no guidance);
    ``inputs`` already repeated to the segments' batch (`WindowInputs.repeat`)."""
    prediction = generator_velocity(transformer, starts, sigma_a.to(starts.device), inputs, "full")
    return F.mse_loss(prediction, targets)


@contextlib.contextmanager
def adapters_disabled(transformer):
    """The base model inside the block (a transformer without adapters is left as it is)."""
    has_adapters = bool(getattr(transformer, "peft_config", None))
    if has_adapters:
        transformer.disable_adapters()
    try:
        yield transformer
    finally:
        if has_adapters:
            transformer.enable_adapters()


# ----------------------------------------------------------------------------------------------------------------
# Inputs of a window (what the pipeline builds for a chunk)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def window_inputs(pipe: EchoPipeline, batch: dict, settings: DistillSettings, generator: torch.Generator):
    """A `collate_conversations` batch → `WindowInputs`, through the encodings the pipeline uses (`echo.encoding`),
    the pipeline's LCU and prompt encoder. A continuation window (probability ``settings.motion_prob``) is given its
    first ``motion_frames`` ground-truth frames, blurred, as the previous chunk's frames."""
    vae, device, dtype = pipe.vae, pipe.transformer.device, pipe.transformer.dtype
    video = batch["video"].to(device)  # B, 3, T, H, W
    num_frames = video.shape[2]
    latent_frames = (num_frames - 1) // vae.config.scale_factor_temporal + 1
    motion_video = None
    if settings.motion_prob > 0 and torch.rand((), generator=generator).item() < settings.motion_prob:
        motion_video = video[:, :, : pipe.settings.motion_frames]
        if settings.motion_blur > 0:
            motion_video = blur_motion_video(motion_video, settings.motion_blur, generator)
    condition = chunk_condition(vae, batch["reference"].to(device), motion_video, latent_frames)
    batch_size = video.shape[0]
    encoder = PromptEncoder(pipe.text_encoder, pipe.tokenizer, pipe.settings.max_sequence_length)
    prompt_embeds = encoder(list(batch["emotion_text"]), device, dtype)
    context_embeds = context_mask = None
    lcu = pipe.context_encoder
    if lcu is not None:
        required = lcu.required_inputs
        user_inputs = {
            "user_audio": batch["user_audio"].to(device),
            "clip_frames": num_frames,
            "user_audio_mask": batch["user_audio_mask"].to(device),
        }
        if "user_video" in required:
            user_inputs["user_video"], user_inputs["user_face_mask"] = encode_user_video(
                vae, batch["user_video"].to(device), batch["user_face_mask"].to(device)
            )
        if "understanding" in required:
            user_inputs["understanding"] = batch["understanding"].to(device)
            user_inputs["understanding_mask"] = batch["understanding_mask"].to(device)
        out = lcu(**user_inputs)
        context_embeds, context_mask = out.context.to(dtype), out.context_mask
    height, width = video.shape[-2:]
    scale = vae.config.scale_factor_spatial
    return WindowInputs(
        condition=condition.to(device, dtype),
        prompt_embeds=prompt_embeds,
        audio_embeds=batch["avatar_audio"].to(device, dtype),
        lip_mask=batch["lip_mask"].to(device, dtype),
        face_mask=batch["face_mask"].to(device, dtype),
        context_embeds=context_embeds,
        context_mask=context_mask,
        latent_shape=(batch_size, vae.config.z_dim, latent_frames, height // scale, width // scale),
    )


# ----------------------------------------------------------------------------------------------------------------
# Student adapter, saving, checkpoints
# ----------------------------------------------------------------------------------------------------------------


def add_student_lora(transformer, lora: StudentLora, adapter_name: str = ADAPTER_NAME):
    """Freeze the base and add the student's LoRA (zero-initialised B: the student starts as the base's single
    ``full`` pass); returns the `LoraConfig`."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        init_lora_weights=True,
        target_modules=lora.target_modules,
    )
    try:
        transformer.add_adapter(config, adapter_name=adapter_name)
    except ValueError as error:
        raise ValueError(f"config key 'lora.target_modules' = {lora.target_modules!r}: {error}") from error
    transformer.set_adapter(adapter_name)
    for name, param in transformer.named_parameters():
        param.requires_grad_(f"lora_A.{adapter_name}." in name or f"lora_B.{adapter_name}." in name)
    return config


def student_state(transformer, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's weights as diffusers saves a LoRA (peft names without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def save_student(
    folder: str | Path,
    transformer,
    lora_config,
    few_step: FewStepConfig,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a few-step folder: ``pytorch_lora_weights.safetensors`` (diffusers' Wan LoRA format, ``dtype``) and
    ``few_step.json``; written to a temporary folder and renamed, so a folder that exists is complete."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    layers = {
        k: v.detach().to(dtype).contiguous() for k, v in student_state(transformer, few_step.adapter_name).items()
    }
    metadata = lora_config.to_dict()
    metadata["target_modules"] = str(metadata["target_modules"])
    EchoPipeline.save_lora_weights(
        partial, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS
    )
    # safetensors writes its temporary file owner-only; a shipped file is read by all
    (partial / LORA_WEIGHTS).chmod(0o644)
    few_step.save(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def save_checkpoint(folder: Path, transformer, optimizer, step: int) -> None:
    """Adapter, AdamW moments (safetensors) and the step (JSON): all a resumed run needs."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in student_state(transformer).items()}, str(partial / "adapter.safetensors"))
    state = optimizer.state_dict()
    moments = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    save_file({k: v.contiguous() for k, v in moments.items()}, str(partial / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    write_text_atomic(partial / "state.json", json.dumps({"step": step, "param_groups": groups}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def load_checkpoint(folder: Path, transformer, optimizer) -> int:
    """Restore `save_checkpoint`'s adapter and optimizer; returns the step."""
    from peft.utils import set_peft_model_state_dict

    adapter = read_safetensors(folder / "adapter.safetensors")
    expected = set(student_state(transformer))
    if set(adapter) != expected:
        raise ValueError(
            f"{str(folder)!r} holds adapter weights {sorted(set(adapter) ^ expected)[:4]} that do not match this "
            "config's LoRA (lora.rank / lora.target_modules changed?): use a new output_dir or the old settings."
        )
    set_peft_model_state_dict(transformer, adapter, adapter_name=ADAPTER_NAME)
    meta = json.loads((folder / "state.json").read_text())
    moments = read_safetensors(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def ship_student(output_dir: Path, pipeline_dir: Path) -> Path:
    """Copy ``<output_dir>/final`` into ``<pipeline_dir>/few_step`` (through a temporary folder: the shipped folder is
    either the old one or the new one, never half of each); returns it."""
    final = Path(output_dir) / FINAL_DIR
    FewStepConfig.load(final)  # a complete student folder, or an error naming it
    target = Path(pipeline_dir) / FEW_STEP_DIR
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(final, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def shipped_student_steps(pipeline_dir: Path) -> int | None:
    """The distillation steps of the student shipped in ``<pipeline_dir>/few_step``, `None` when there is none."""
    folder = Path(pipeline_dir) / FEW_STEP_DIR
    if not (folder / LORA_WEIGHTS).is_file() or not (folder / "few_step.json").is_file():
        return None
    return FewStepConfig.load(folder).train_steps


def checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def build_dataset(config: DistillConfig, pipe: EchoPipeline) -> ConversationDataset:
    data, transformer = config.data, pipe.transformer.config
    lcu = pipe.context_encoder
    return ConversationDataset(
        data.root,
        num_frames=data.num_frames,
        resolution=data.resolution,
        token_patch=pipe.vae_scale_factor_spatial * transformer.patch_size[1],
        temporal_compression=pipe.vae_scale_factor_temporal,
        audio_radius=transformer.audio_window // 2,
        windows_per_clip=data.windows_per_clip,
        max_history_frames=data.max_history_frames,
        use_user_video=lcu is not None and "user_video" in lcu.required_inputs,
        user_video_size=data.user_video_size,
        use_understanding=lcu is not None and "understanding" in lcu.required_inputs,
        window_stride=data.window_stride,
        default_emotion=data.default_emotion,
        drop_emotion=not pipe.settings.use_emotion,
        seed=config.seed,
    )


def window_batch(dataset: ConversationDataset, config: DistillConfig, step: int, rank: int, world: int) -> dict:
    """The batch of optimizer step ``step`` on ``rank``: a pure function of ``(seed, step)`` (exact resume)."""
    size = config.data.batch_size
    first = (step * world + rank) * size
    items = []
    for k in range(first, first + size):
        epoch, position = divmod(k, len(dataset))
        dataset.set_epoch(epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(len(dataset))
        items.append(dataset[int(order[position])])
    return collate_conversations(items)


def teacher_sampler(pipe: EchoPipeline, settings: DistillSettings, has_user: bool):
    """The teacher's σ points `(K + 1,)` and guidance weights (its saved settings unless the config sets them)."""
    steps = settings.teacher_steps or pipe.settings.num_inference_steps
    s_a = pipe.settings.audio_guidance_scale if settings.audio_guidance_scale is None else settings.audio_guidance_scale
    s_u = pipe.settings.user_guidance_scale if settings.user_guidance_scale is None else settings.user_guidance_scale
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    probe.set_timesteps(steps)
    return probe.sigmas.float().cpu(), pipe.guidance_weights(s_a, s_u, has_user), (steps, s_a, s_u)


def distill_step(pipe, module, batch, config: DistillConfig, segments, generator) -> dict[str, torch.Tensor]:
    """One step's loss: the teacher's trajectory on the window, the student's velocities on every segment."""
    inputs = window_inputs(pipe, batch, config.distill, generator)
    sigmas, weights, _ = teacher_sampler(pipe, config.distill, inputs.context_embeds is not None)
    noise = torch.randn(inputs.latent_shape, generator=generator).to(pipe.transformer.device)
    states = teacher_trajectory(pipe.transformer, noise, inputs, sigmas, weights)
    starts, targets, sigma_a = segment_targets(states, sigmas, segments)
    loss = distillation_loss(module, starts, targets, sigma_a, inputs.repeat(len(segments)))
    return {"loss": loss}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a distillation YAML (configs/train/demo_distill.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--overwrite", action="store_true", help="start over: delete output_dir's checkpoints first")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = parse_args(argv)
    config = load_distill_config(args.config, args.set)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU processes join one gloo group
    output_dir = Path(config.output_dir)
    if args.overwrite and accelerator.is_main_process:
        for old in checkpoints(output_dir):
            shutil.rmtree(old)
        shutil.rmtree(output_dir / FINAL_DIR, ignore_errors=True)
        (output_dir / "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    # 1. Teacher (frozen base) and the student's LoRA on the same transformer
    pipe = EchoPipeline.from_pretrained(config.pipeline, dtype=torch.float32).to(accelerator.device)
    for component in (pipe.vae, pipe.text_encoder, pipe.context_encoder, pipe.audio_encoder):
        if component is not None:
            component.requires_grad_(False).eval()
    lora_config = add_student_lora(pipe.transformer, config.lora)
    trainable = [p for p in pipe.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    module, optimizer = accelerator.prepare(pipe.transformer, optimizer)
    dataset = build_dataset(config, pipe)
    segments = student_segments(pipe.scheduler, config.distill.student_steps)

    # 2. Resume from the newest checkpoint
    step = 0
    found = checkpoints(output_dir)
    if found:
        step = load_checkpoint(found[-1], pipe.transformer, optimizer)
        accelerator.print(f"resumed from {found[-1]} at step {step}")
    log_path = output_dir / "log.jsonl"

    # 3. Loop
    bar = tqdm(range(step, config.train.max_train_steps), initial=step, total=config.train.max_train_steps,
               disable=not accelerator.is_main_process, desc="distill")  # fmt: skip
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * min(1.0, (step + 1) / max(config.optim.warmup_steps, 1))
        generator = step_generator(config.seed, accelerator.process_index, step)
        batch = window_batch(dataset, config, step, accelerator.process_index, accelerator.num_processes)
        terms = distill_step(pipe, module, batch, config, segments, generator)
        if not math.isfinite(terms["loss"].item()):
            raise FloatingPointError(
                f"distillation loss is {terms['loss'].item()} at step {step} ({batch['clip_id']})."
            )
        accelerator.backward(terms["loss"])
        norm = accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": terms["loss"].item(), "grad_norm": float(norm)}
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if accelerator.is_main_process:
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            done = step + 1
            if done % config.train.checkpointing_steps == 0 or done == config.train.max_train_steps:
                save_checkpoint(output_dir / f"checkpoint-{done}", pipe.transformer, optimizer, done)
                for old in checkpoints(output_dir)[: -config.train.checkpoints_total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    # 4. The student folder
    final = output_dir / FINAL_DIR
    if accelerator.is_main_process:
        _, _, (teacher_steps, s_a, s_u) = teacher_sampler(pipe, config.distill, pipe.context_encoder is not None)
        few_step = FewStepConfig(
            num_steps=list(config.distill.student_steps),
            default_steps=config.distill.default_steps,
            teacher_steps=teacher_steps,
            teacher_audio_guidance_scale=s_a,
            teacher_user_guidance_scale=s_u,
            train_steps=config.train.max_train_steps,
        )
        dtype = torch.float16 if config.train.save_dtype == "fp16" else torch.float32
        save_student(final, pipe.transformer, lora_config, few_step, dtype)
        write_text_atomic(output_dir / "distill_config.json", json.dumps(asdict(config), indent=1))
        print(f"few-step student: {final}")
    accelerator.wait_for_everyone()
    return final


def cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
