"""ECHO training, both stages, one entry point.

```bash
accelerate launch --config_file configs/accelerate/single_gpu.yaml -m training.train --config configs/train/stage1.yaml
accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m training.train --config configs/train/stage2.yaml \
    --set model.stage1_dir=outputs/stage1 --resume latest
```

Precision and distribution come only from the accelerate config; everything else from the training YAML
(`training.config`). Checkpoints (``output_dir/checkpoint-N``) hold the accelerate state (optimizer, LR schedule,
RNG, step counter) plus the adapter in PEFT format and the trained modules in safetensors; they are written to a
temporary folder and renamed, so an interrupted save never leaves a checkpoint that ``--resume latest`` would pick.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from .config import TrainConfig, config_to_dict, load_config
from .modeling import build_training_models, fsdp_auto_wrap_policy, load_trained, parameter_groups, save_trained
from .step import TextEmbedder, step_generator, training_step

logger = logging.getLogger(__name__)


class TrainingProgress:
    """The optimizer-step counter, saved with every checkpoint (`Accelerator.register_for_checkpointing`)."""

    def __init__(self):
        self.global_step = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the dataset drawn from ``(seed, epoch)`` only: every rank sees the same order (accelerate
    then shards the batches), and a resumed run replays the order of the interrupted one."""

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train ECHO (stage 1 or 2) with accelerate.")
    parser.add_argument("--config", required=True, help="training YAML, e.g. configs/train/stage1.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_train_steps=10")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (= train.resume_from_checkpoint)")
    return parser.parse_args(argv)


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """`save_state` into a temporary folder, then rename it to ``checkpoint-<step>``; prune to ``total_limit``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        if total_limit is not None:
            existing = [p for p in _checkpoints(output_dir) if p != final]
            for old in existing[: max(0, len(existing) + 1 - total_limit)]:
                logger.info("removing old checkpoint %s", old)
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (or `None` when there is none yet) or an explicit folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {resume!r} does not exist (config key 'train.resume_from_checkpoint').")
    return path


def _flat_hparams(config: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(config))
    return flat


def main(config: TrainConfig) -> dict:
    """Train one stage.

    Returns:
        `dict`: ``global_step``, ``history`` (this rank's loss terms per optimizer step), ``num_processes``, and the
        in-memory ``models`` ([`TrainingModels`]) and ``text_embedder`` for inspection.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from echo.data import ConversationDataset, collate_conversations

    output_dir = Path(config.output_dir)
    train_cfg = config.train

    # 1. Accelerator (precision and distribution come from `accelerate launch` / its config file)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train_cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=train_cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # Without a GPU, a multi-process launch needs `cpu=True` to form a gloo group.
        cpu=not torch.cuda.is_available(),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(config.seed)  # identical initialisation on every rank
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    # 2. Models: trainable module in fp32, frozen parts in the mixed-precision dtype
    models = build_training_models(config)
    device = accelerator.device
    for frozen in (models.vae, models.text_encoder, models.ref_transformer):
        if frozen is not None:
            frozen.to(device) if weight_dtype == torch.float32 else frozen.to(device, weight_dtype)
    transformer_config = models.module.transformer.config
    text_embedder = None if models.text_encoder is None else TextEmbedder(models.tokenizer, models.text_encoder)

    # 3. Data
    vae_config = models.vae.config
    dataset = ConversationDataset(
        config.data.root,
        num_frames=config.data.num_frames,
        resolution=config.data.resolution,
        token_patch=vae_config.scale_factor_spatial * transformer_config.patch_size[1],
        temporal_compression=vae_config.scale_factor_temporal,
        audio_radius=transformer_config.audio_window // 2,
        windows_per_clip=config.data.windows_per_clip,
        max_history_frames=config.data.max_history_frames,
        use_user_video=config.stage == 2 and config.ablation.use_visual,
        user_video_size=config.data.user_video_size,
        use_understanding=config.stage == 2 and config.ablation.use_understanding,
        use_cached_latents=config.data.use_cached_latents,
        default_emotion=config.data.default_emotion,
        drop_emotion=not config.ablation.use_emotion,
        use_cached_emotion_embeds=config.data.use_cached_emotion_embeds,
        use_cached_user_tokens=config.data.use_cached_user_tokens,
        seed=config.seed,
    )
    sampler = EpochSampler(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=sampler,
        collate_fn=collate_conversations,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
    )

    # 4. Optimizer, LR schedule, prepare
    optim = config.optim
    optimizer = torch.optim.AdamW(
        parameter_groups(models.module, config), betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=train_cfg.max_train_steps * accelerator.num_processes,
    )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        # Frozen and trainable weights must not share a flat parameter (fsdp_use_orig_params: false).
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(models.module)
    module, optimizer, loader, lr_scheduler = accelerator.prepare(models.module, optimizer, loader, lr_scheduler)
    if len(loader) == 0:
        raise ValueError(
            f"data root {config.data.root!r} gives {len(dataset)} windows: fewer than one batch of "
            f"{config.data.batch_size} per process for {accelerator.num_processes} processes."
        )
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    # 5. Checkpoint hooks: the adapter (PEFT) and trained modules instead of the full model
    def save_hook(hook_models, weights, hook_dir):
        for model in hook_models:
            state = accelerator.get_state_dict(model)  # collective under FSDP (gathers the shards on rank 0)
            if accelerator.is_main_process:
                save_trained(hook_dir, state, accelerator.unwrap_model(model), models.adapter_name, models.trainable_pattern)
        weights.clear()  # the frozen base is not rewritten with every checkpoint

    def load_hook(hook_models, hook_dir):
        while hook_models:
            unwrapped = accelerator.unwrap_model(hook_models.pop())
            load_trained(hook_dir, unwrapped.transformer, unwrapped.context_encoder, models.adapter_name)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    # 6. Resume
    resume = resolve_resume(output_dir, train_cfg.resume_from_checkpoint)
    if resume is not None:
        accelerator.print(f"resuming from {resume}")
        accelerator.load_state(str(resume))
    elif train_cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {output_dir}; starting from step 0")
    if accelerator.is_main_process and train_cfg.report_to:
        accelerator.init_trackers(f"echo-stage{config.stage}", config=_flat_hparams(config))

    renderer = None
    if train_cfg.validation_steps and models.text_encoder is None:
        logger.warning(
            "train.validation_steps is set but data.use_cached_emotion_embeds is on: the text encoder the validation "
            "pipeline needs is not loaded, so validation renders are skipped."
        )
    elif train_cfg.validation_steps:
        from .validation import ValidationRenderer

        renderer = ValidationRenderer(config, models, dataset.clips[0].path)

    # 7. Loop: micro-steps are counted so that a resumed run skips exactly the consumed batches
    accumulation = train_cfg.gradient_accumulation_steps
    batches_per_epoch = len(loader)
    global_step = progress.global_step
    micro_step = global_step * accumulation
    history: list[dict] = []
    seen_clips: list[str] = []
    bar = tqdm(
        total=train_cfg.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
        desc=f"stage {config.stage}",
    )  # fmt: skip
    module.train()
    running: dict[str, float] = {}
    fixed_batch = None
    epoch = micro_step // batches_per_epoch
    while global_step < train_cfg.max_train_steps:
        skip = micro_step - epoch * batches_per_epoch
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        # The prepared loader re-seeds its sampler with its own pass counter on every `iter`; set it to the epoch.
        epoch_loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in epoch_loader:
            if train_cfg.overfit_one_batch:
                fixed_batch = fixed_batch if fixed_batch is not None else batch
                batch = fixed_batch
            seen_clips.extend(f"{c}@{w}" for c, w in zip(batch["clip_id"], batch["window_start"]))
            generator = step_generator(
                config.seed, accelerator.process_index, 0 if train_cfg.overfit_one_batch else micro_step
            )
            with accelerator.accumulate(module):
                terms = training_step(models, module, batch, config, text_embedder, generator, device, weight_dtype)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(module.parameters(), optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            for name, value in terms.items():
                running[name] = running.get(name, 0.0) + float(value.detach()) / accumulation
            if not accelerator.sync_gradients:
                continue

            # 7a. Bookkeeping once per optimizer step
            global_step += 1
            progress.global_step = global_step
            history.append(dict(running, step=global_step))
            running = {}
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if train_cfg.report_to and global_step % train_cfg.log_every == 0:
                logs = {f"train/{k}": v for k, v in history[-1].items() if k != "step"}
                logs["train/lr"] = lr_scheduler.get_last_lr()[0]
                accelerator.log(logs, step=global_step)
            if train_cfg.checkpointing_steps and global_step % train_cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, train_cfg.checkpoints_total_limit)
            if renderer is not None and global_step % train_cfg.validation_steps == 0:
                if accelerator.is_main_process:
                    path = renderer(accelerator.unwrap_model(module), output_dir, global_step, device)
                    accelerator.print(f"step {global_step}: validation render {path}")
                accelerator.wait_for_everyone()
            if global_step >= train_cfg.max_train_steps:
                break
        epoch += 1
    bar.close()

    # 8. Final weights (PEFT adapter + safetensors) and, on request, every rank's trainable parameters
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(module)
    state = accelerator.get_state_dict(module)
    if accelerator.is_main_process:
        save_trained(output_dir / "final", state, unwrapped, models.adapter_name, models.trainable_pattern)
        (output_dir / "final" / "training_config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    if train_cfg.dump_trainable_params:
        dump_rank_state(output_dir, accelerator, unwrapped, history, seen_clips)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = {
        "global_step": global_step,
        "history": history,
        "num_processes": accelerator.num_processes,
        "models": models,
        "text_embedder": text_embedder,
    }
    if accelerator.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # several runs in one process (tests, notebooks)
    return result


def dump_rank_state(output_dir: Path, accelerator, module, history: list[dict], seen_clips: list[str]) -> None:
    """Write this rank's trainable parameters (safetensors) and a JSON summary under ``output_dir/ranks``."""
    from safetensors.torch import save_file

    folder = output_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index
    params = {n: p.detach().float().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    save_file(params, str(folder / f"rank{rank}.safetensors"))
    summary = {
        "process_index": rank,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "clip_ids": seen_clips,
        "history": history,
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(summary))


def run(argv: list[str] | None = None) -> dict:
    """Parse the command line (``--config``, ``--set``, ``--resume``) and train; returns `main`'s result."""
    args = parse_args(argv)
    overrides = list(args.set)
    if args.resume is not None:
        overrides.append(f"train.resume_from_checkpoint={args.resume}")
    return main(load_config(args.config, overrides))


def cli(argv: list[str] | None = None) -> int:
    """The ``echo-train`` console script and ``python -m training.train``."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
