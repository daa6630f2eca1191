"""ECHO training, both stages, one entry point.

```bash
accelerate launch --config_file configs/accelerate/single_gpu.yaml -m training.train --config configs/train/stage1.yaml
accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m training.train --config configs/train/stage2.yaml \
    --set model.stage1_dir=outputs/stage1 --resume latest
```

Precision and distribution come only from the accelerate config; everything else from the training YAML
(`training.config`). `main` reads as the steps of a run: accelerator → output folder → models → data → optimizer →
checkpoint hooks → resume → loop → final weights; the maths live in `training.step` and `echo`.

A checkpoint (``output_dir/checkpoint-N``) holds the optimizer and LR schedule (accelerate's ``optimizer.bin`` /
``scheduler.bin``, read back with ``torch.load(weights_only=True)``, which accepts tensors and plain containers only),
the adapter in PEFT format, the trained modules in safetensors, ``training_state.json`` (the step counters),
``rng_state_<rank>.safetensors`` (every RNG of every rank), ``echo_settings.json`` and ``training_config.yaml``. Resume
loads nothing that can run code: accelerate's own pickles (``random_states_<rank>.pkl``, and the
``custom_checkpoint_<i>.pkl`` of `register_for_checkpointing`, which it loads with ``weights_only=False``) are not
used, and a checkpoint folder holding a ``.pkl`` file is refused. Checkpoints are written to a temporary folder,
verified and renamed, and older ones are rotated out (``checkpoints_total_limit``) only after that, so an interrupted
save never leaves a checkpoint that ``--resume latest`` would pick, nor loses the one before it. A loss that turns NaN
or infinite stops the run with an error naming the step (`TrainingDiverged`), before the update; weights that are not
finite are never saved. ``--resume`` compares the run's config with the checkpoint's and refuses keys that change what
is trained (`check_resume_config`), naming them. An ``output_dir`` that
holds an earlier run is refused unless the run resumes it (``--resume latest``) or ``--overwrite`` deletes it first.

Every checkpoint lists the size and SHA-256 of its files (``checkpoint_files.json``), and `verify_checkpoint` checks
them, and the form of every file resume reads, before anything is loaded: a corrupt or planted file is an error
naming it. ``--resume latest`` then falls back to the newest checkpoint that verifies, with a warning naming the
skipped one and why; ``--resume <folder>`` (a path, or a ``checkpoint-N`` of ``output_dir``) that does not verify is
an error. Under FSDP's sharded state, the ``.metadata`` pickles of ``torch.distributed.checkpoint`` are admitted only
when they name nothing but checkpoint-metadata classes; DeepSpeed's loader unpickles its files without restriction,
so resuming under DeepSpeed is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from echo.data import ConversationDataset, collate_conversations
from echo.encoding import PromptEncoder

from .checkpoint_integrity import (  # noqa: F401 (re-exported: the names resume and the tests use)
    MANIFEST_FILE,
    PROGRESS_FILE,
    CheckpointError,
    check_no_pickles,
    verify_checkpoint,
    write_manifest,
)
from .config import TrainConfig, config_help, config_to_dict, load_config, settings_from_config
from .ema import TrainedWeightsEMA
from .latent_cache import WindowLatentCache
from .modeling import (
    STAGE1_RECORD,
    TrainingModels,
    build_training_models,
    fsdp_auto_wrap_policy,
    load_trained,
    parameter_groups,
    save_trained,
)
from .step import step_generator, training_step

if TYPE_CHECKING:
    from echo.settings import EchoSettings

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.yaml"
RNG_FILE = "rng_state_{rank}.safetensors"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, ...): the message names it and the cause."""


@dataclass
class TrainingProgress:
    """Where a run stands, saved as ``training_state.json`` with every checkpoint (JSON: loading it runs no code).

    Args:
        global_step (`int`): optimizer steps done.
        micro_step (`int`): accelerate's micro-step counter (``Accelerator.step``), which decides when gradients sync.
        train_seconds (`float`): wall seconds spent in the training loop over every run that led here (resumes
            included; start-up, checkpoint writes and validation renders excluded); times the number of processes,
            the CPU- or GPU-time a learning curve plots against (`benchmarks/learning_curve.py`).
    """

    global_step: int = 0
    micro_step: int = 0
    train_seconds: float = 0.0

    def save(self, folder: str | os.PathLike) -> None:
        (Path(folder) / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(self)) + "\n")

    def load(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / PROGRESS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(folder)!r} has no {PROGRESS_FILE}: not written by this trainer.")
        try:
            values = json.loads(path.read_text())
            self.global_step, self.micro_step = int(values["global_step"]), int(values["micro_step"])
            self.train_seconds = float(values.get("train_seconds", 0.0))  # absent in checkpoints before it existed
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{str(path)!r} is not a valid training state ({error!r}).") from error


def save_rng_state(folder: str | os.PathLike, rank: int) -> Path:
    """Write this process's Python, NumPy, torch CPU and CUDA RNG states as ``rng_state_<rank>.safetensors`` (what
    accelerate pickles as ``random_states_<rank>.pkl``): integer state vectors as tensors, scalars in the header."""
    from safetensors.torch import save_file

    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "python": torch.tensor(mt_state, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached_gaussian)]),
    }
    path = Path(folder) / RNG_FILE.format(rank=rank)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_rng_state(folder: str | os.PathLike, rank: int) -> None:
    """Restore what `save_rng_state` wrote for ``rank``."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / RNG_FILE.format(rank=rank)
    if not path.is_file():
        logger.warning(
            "%s does not exist (saved with fewer processes?): rank %d's RNG states not restored.", path, rank
        )
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:  # safetensors' own message names no file
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({error}).") from error
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


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
    parser = argparse.ArgumentParser(
        description="Train ECHO (stage 1 or 2) with accelerate.",
        epilog=config_help() + "\n\n(The same list, as a table: docs/config_keys.md.)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="training YAML, e.g. configs/train/stage1.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_train_steps=10"
    )
    parser.add_argument(
        "--resume", default=None, help="'latest' or a checkpoint folder (= train.resume_from_checkpoint)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run in output_dir (checkpoints, final/, logs) and start over (= train.overwrite_output_dir)",
    )
    return parser.parse_args(argv)


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """`save_state` into a temporary folder, verify it, rename it to ``checkpoint-<step>``; then prune to
    ``total_limit``.

    accelerate always pickles the RNG states (``random_states_<rank>.pkl``); the save hook has written them as
    safetensors, so the pickles are deleted before the rename and a checkpoint never holds one. The list of files with
    their SHA-256 (`write_manifest`) is written last, into the temporary folder. Older checkpoints are deleted only
    once the new one is complete and verifies (`verify_checkpoint`): a save killed or failing at any point leaves
    every earlier checkpoint, and ``--resume latest`` resumes from the newest of them.
    """
    from safetensors import SafetensorError

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for pickled in tmp.glob("random_states_*.pkl"):
                pickled.unlink()
            write_manifest(tmp)
            verify_checkpoint(tmp)
    except BaseException as error:  # the partial folder goes (it frees the space a full disk lacks); re-raised
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (OSError, RuntimeError, SafetensorError)):  # a write failed: name the checkpoint
            raise CheckpointSaveError(
                f"saving checkpoint-{step} into output_dir {str(output_dir)!r} failed ({type(error).__name__}: "
                f"{error}); its partial folder was removed and earlier checkpoints are kept. Free space (or lift the "
                "file-size limit, `ulimit -f`) where output_dir lies, then continue with --resume latest."
            ) from error
        raise
    if accelerator.is_main_process:
        if final.exists():  # a checkpoint of this step from an earlier attempt: replaced only by a verified one
            replaced = output_dir / f".checkpoint-{step}.old"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            existing = [p for p in _checkpoints(output_dir) if p != final]
            for old in existing[: max(0, len(existing) + 1 - total_limit)]:
                logger.info("removing old checkpoint %s", old)
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, verified (`verify_checkpoint`), or `None`.

    ``latest`` is the newest ``checkpoint-N`` of ``output_dir`` that verifies: a newer one that does not is skipped
    with a warning naming it and why (`None` when there is no checkpoint yet; an error when none verifies). Any other
    value is a checkpoint folder, as a path or as a ``checkpoint-N`` of ``output_dir``, and must verify.

    Raises:
        FileNotFoundError: the named folder does not exist.
        CheckpointError: the named checkpoint, or every checkpoint for ``latest``, fails verification.
    """
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir() and not path.is_absolute() and (output_dir / path).is_dir():
            path = output_dir / path
        if not path.is_dir():
            raise FileNotFoundError(
                f"checkpoint {resume!r} does not exist (config key 'train.resume_from_checkpoint'; a folder, or a "
                f"checkpoint-N of output_dir {str(output_dir)!r})."
            )
        verify_checkpoint(path)
        return path
    skipped: list[str] = []
    for checkpoint in reversed(_checkpoints(output_dir)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as error:
            logger.warning("--resume latest: skipping %s, which cannot be resumed from: %s", checkpoint, error)
            skipped.append(f"{checkpoint.name}: {error}")
            continue
        if skipped:
            logger.warning(
                "--resume latest: resuming from %s, the newest checkpoint that verifies (skipped: %s).",
                checkpoint,
                ", ".join(entry.split(":")[0] for entry in skipped),
            )
        return checkpoint
    if skipped:
        raise CheckpointError(f"--resume latest: no checkpoint of {str(output_dir)!r} verifies: {'; '.join(skipped)}")
    return None


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


def write_run_files(
    folder: str | os.PathLike, config: TrainConfig, settings: EchoSettings, stage1: dict | None = None
) -> None:
    """``training_config.yaml`` and ``echo_settings.json``: what a trained state was trained with; in stage 2 also
    ``stage1.json``, the `stage1_identity` of the stage-1 state it was trained on (echo-export checks it)."""
    Path(folder, CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    settings.save(folder)
    if stage1 is not None:
        Path(folder, STAGE1_RECORD).write_text(json.dumps(stage1, indent=1))


# ----------------------------------------------------------------------------------------------------------------------
# The steps of a run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """The prepared objects of a run, as the loop uses them."""

    config: TrainConfig
    accelerator: Any
    models: TrainingModels
    module: torch.nn.Module  # the prepared (DDP/FSDP-wrapped) `EchoTrainingModule`
    optimizer: Any
    lr_scheduler: Any
    dataset: Any
    loader: Any
    prompt_encoder: PromptEncoder | None
    progress: TrainingProgress
    weight_dtype: torch.dtype
    renderer: Any = None
    ema: TrainedWeightsEMA | None = None  # train.ema


def make_accelerator(config: TrainConfig):
    """The accelerator (precision and distribution come from `accelerate launch` / its config file) and the dtype
    of the frozen models."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=config.train.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # Without a GPU, a multi-process launch needs `cpu=True` to form a gloo group.
        cpu=not torch.cuda.is_available(),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(config.seed)  # identical initialisation on every rank
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, weight_dtype


def prepare_output_dir(accelerator, config: TrainConfig) -> None:
    """Refuse an ``output_dir`` holding an earlier run (checkpoints, ``final/``) unless this run resumes it or
    ``train.overwrite_output_dir`` deletes it first; then write ``training_config.yaml``."""
    output_dir, train_cfg = Path(config.output_dir), config.train
    blocker = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == output_dir else f"lies under {str(blocker)!r}, which is a file"
        raise NotADirectoryError(
            f"output_dir {str(output_dir)!r} {where}: a run writes a folder there. Set another output_dir "
            "(`--set output_dir=<folder>`) or move that file away."
        )
    checkpoints = _checkpoints(output_dir) if output_dir.is_dir() else []
    earlier = [p.name + "/" for p in checkpoints] + (["final/"] if (output_dir / "final").exists() else [])
    resume = train_cfg.resume_from_checkpoint
    if train_cfg.overwrite_output_dir and resume is not None:
        raise ValueError(
            "--overwrite (train.overwrite_output_dir) and --resume (train.resume_from_checkpoint) conflict."
        )
    resumable = resume is not None and (bool(checkpoints) or resume != "latest")
    if earlier and not train_cfg.overwrite_output_dir and not resumable:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} already holds a training run ({', '.join(earlier)}). Continue it with "
            "`--resume latest` (it needs a checkpoint-N/), or train into a new output folder "
            "(`--set output_dir=<new folder>`); `--overwrite` deletes the earlier run first."
        )
    accelerator.wait_for_everyone()  # every rank has checked before the main process changes the folder
    if accelerator.is_main_process:
        if earlier and train_cfg.overwrite_output_dir:
            logger.info("--overwrite: deleting the earlier run in %s", output_dir)
            stale = _checkpoints(output_dir) + list(output_dir.glob(".checkpoint-*.tmp"))
            stale += [output_dir / name for name in ("final", "validation", "ranks", "logs")]
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    accelerator.wait_for_everyone()


def build_models(
    config: TrainConfig, accelerator, weight_dtype: torch.dtype
) -> tuple[TrainingModels, PromptEncoder | None]:
    """The stage's models (trainable module in fp32, frozen parts in the mixed-precision dtype) and the prompt
    encoder (`None` with cached emotion embeddings)."""
    models = build_training_models(config)
    for frozen in (models.vae, models.text_encoder, models.ref_transformer, models.image_encoder):
        if frozen is not None:
            frozen.to(accelerator.device) if weight_dtype == torch.float32 else frozen.to(
                accelerator.device, weight_dtype
            )
    prompt_encoder = None
    if models.text_encoder is not None:
        prompt_encoder = PromptEncoder(models.text_encoder, models.tokenizer, config.data.max_sequence_length)
    return models, prompt_encoder


def build_latent_cache(config: TrainConfig, vae):
    """The run's `WindowLatentCache` (``data.use_cached_latents``; keyed by ``vae`` as this run casts it), else `None`."""
    if not config.data.use_cached_latents:
        return None
    root = config.data.latent_cache_dir or str(Path(config.data.root) / ".latent_cache")
    return WindowLatentCache.for_vae(root, vae, config.data.resolution, config.data.num_frames)


def build_data(config: TrainConfig, models: TrainingModels):
    """The windows of the prepared clips and their loader (order from ``(seed, epoch)``, see `EpochSampler`)."""
    vae_config, transformer_config = models.vae.config, models.module.transformer.config
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
        window_stride=config.data.window_stride,
        latent_cache=build_latent_cache(config, models.vae),
        default_emotion=config.data.default_emotion,
        drop_emotion=not config.ablation.use_emotion,
        use_cached_emotion_embeds=config.data.use_cached_emotion_embeds,
        use_cached_user_tokens=config.data.use_cached_user_tokens,
        seed=config.seed,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=EpochSampler(len(dataset), config.seed),
        collate_fn=collate_conversations,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return dataset, loader


def build_optimizer(config: TrainConfig, models: TrainingModels, accelerator):
    """AdamW over the LoRA and module groups (`parameter_groups`) and the LR schedule."""
    from diffusers.optimization import get_scheduler

    optim = config.optim
    optimizer = torch.optim.AdamW(
        parameter_groups(models.module, config), betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    try:
        lr_scheduler = get_scheduler(
            optim.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=optim.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.train.max_train_steps * accelerator.num_processes,
        )
    except ValueError as error:  # an unknown name: diffusers lists the known ones
        raise ValueError(f"config key 'optim.lr_scheduler' is {optim.lr_scheduler!r}: {error}") from error
    return optimizer, lr_scheduler


def register_checkpoint_hooks(
    accelerator, config: TrainConfig, models: TrainingModels, settings: EchoSettings, progress: TrainingProgress,
    ema: TrainedWeightsEMA | None = None,
) -> None:  # fmt: skip
    """`save_state` / `load_state` hooks: the adapter (PEFT) and trained modules instead of the full model, the step
    counters as JSON, the RNG states and (``train.ema``) the EMA weights as safetensors (instead of accelerate's
    pickles)."""

    def save_hook(hook_models, weights, hook_dir):
        for model in hook_models:
            state = accelerator.get_state_dict(model)  # collective under FSDP (gathers the shards on rank 0)
            if accelerator.is_main_process:
                save_trained(
                    hook_dir, state, accelerator.unwrap_model(model), models.adapter_name, models.trainable_pattern
                )
        weights.clear()  # the frozen base is not rewritten with every checkpoint
        if accelerator.is_main_process:
            progress.micro_step = accelerator.step
            progress.save(hook_dir)
            write_run_files(hook_dir, config, settings, models.stage1)
            if ema is not None:
                ema.save(hook_dir)
        save_rng_state(hook_dir, accelerator.process_index)

    def load_hook(hook_models, hook_dir):
        while hook_models:
            unwrapped = accelerator.unwrap_model(hook_models.pop())
            load_trained(hook_dir, unwrapped.transformer, unwrapped.context_encoder, models.adapter_name)
        progress.load(hook_dir)
        load_rng_state(hook_dir, accelerator.process_index)
        if ema is not None:
            ema.load(hook_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_from_checkpoint(
    accelerator, config: TrainConfig, progress: TrainingProgress, stage1: dict | None = None
) -> None:
    """Load ``train.resume_from_checkpoint`` (``latest`` or a folder) when given, after `resolve_resume` verified it
    on the main process (every rank then loads the same checkpoint); nothing in it can run code. In stage 2,
    ``stage1`` (the `stage1_identity` fused now) must be the one the checkpoint recorded."""
    from accelerate.utils import DistributedType, broadcast_object_list

    output_dir, resume = Path(config.output_dir), config.train.resume_from_checkpoint
    if resume is None:
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "--resume is refused under DeepSpeed: DeepSpeed reads its checkpoint files with torch.load("
            "weights_only=False), which runs any code a crafted file holds. Resume with DDP "
            "(configs/accelerate/multi_gpu.yaml) or FSDP (configs/accelerate/fsdp.yaml)."
        )
    # 1. The main process verifies (and for `latest` picks) the checkpoint; the others follow its outcome
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            checkpoint = resolve_resume(output_dir, resume)
            outcome = [("ok", None if checkpoint is None else str(checkpoint))]
        except (CheckpointError, FileNotFoundError) as error:
            outcome = [(type(error).__name__, str(error))]
            if accelerator.num_processes == 1:
                raise
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind != "ok":
        raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(value)
    if value is None:
        accelerator.print(f"no checkpoint in {output_dir}; starting from step 0")
        return

    # 2. Load it, once its training config agrees with this run's
    checkpoint = Path(value)
    check_resume_config(config, checkpoint)
    recorded = checkpoint / STAGE1_RECORD
    if stage1 is not None and recorded.is_file():
        before = json.loads(recorded.read_text())
        if before.get("weights_sha256") != stage1["weights_sha256"]:
            raise ValueError(
                f"--resume: {str(checkpoint)!r} was trained on the stage-1 state {before.get('dir')!r}, but "
                f"model.stage1_dir now gives {stage1['dir']!r}, whose weights differ (SHA-256 {stage1['weights_sha256'][:16]}…, "
                f"recorded {str(before.get('weights_sha256'))[:16]}…). Resume with that stage-1 run, or start a new run."
            )
    accelerator.print(f"resuming from {checkpoint}")
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as error:  # torch's weights-only loader refused a file (optimizer.bin, scheduler.bin)
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r}: a file could not be loaded safely (torch.load weights_only=True): {error}"
        ) from error
    accelerator.step = progress.micro_step


# Config keys a resumed run may change: how long it runs, how it saves, logs and validates, and where its files are.
# Any other difference (learning rates, LoRA rank, windows, losses, ...) would not continue the same training.
RESUME_SAFE_KEYS = re.compile(
    r"output_dir|model\.(config|stage1_dir)|data\.(root|num_workers|latent_cache_dir|use_cached_latents)"
    r"|train\.(max_train_steps|checkpointing_steps|checkpoints_total_limit|resume_from_checkpoint|overwrite_output_dir"
    r"|validation_steps|validation_inference_steps|log_every|report_to|dump_trainable_params|gradient_checkpointing)"
)


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resume_config(config: TrainConfig, checkpoint: Path) -> None:
    """Compare this run's config with the ``training_config.yaml`` saved in ``checkpoint``: keys that change what is
    trained are refused, naming each with both values; keys safe to change (`RESUME_SAFE_KEYS`) are logged."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no {CONFIG_FILE}: not written by this trainer.")
    saved = _flat(yaml.safe_load(path.read_text()) or {})
    own = _flat(yaml.safe_load(yaml.safe_dump(config_to_dict(config))))  # tuples → lists, as saved
    # A key newer than the checkpoint's config was trained at its default (a later loss term, say): compare with that
    defaults = _flat(yaml.safe_load(yaml.safe_dump(config_to_dict(TrainConfig()))))
    saved = {key: saved.get(key, defaults.get(key)) for key in own} | saved
    differ = {key: (saved[key], own[key]) for key in sorted(saved.keys() & own.keys()) if saved[key] != own[key]}
    refused = {key: values for key, values in differ.items() if not RESUME_SAFE_KEYS.fullmatch(key)}
    if refused:
        details = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in refused.items())
        raise ValueError(
            f"--resume: this run's config differs from the one {str(checkpoint)!r} was trained with ({details}); "
            "resuming would not continue the same training. Resume with the checkpoint's values, or start a new run "
            "into a new output_dir."
        )
    changed = [key for key in differ if key not in ("train.resume_from_checkpoint", "train.max_train_steps")]
    if changed:
        logger.warning(
            "--resume: continuing %s with changed %s (safe to change).",
            checkpoint,
            ", ".join(f"{key} = {differ[key][1]!r} (was {differ[key][0]!r})" for key in changed),
        )


def build_validation(config: TrainConfig, models: TrainingModels, dataset):
    """The validation renderer, or `None` (no ``train.validation_steps``, or no text encoder to render with)."""
    if not config.train.validation_steps:
        return None
    if models.text_encoder is None:
        logger.warning(
            "train.validation_steps is set but data.use_cached_emotion_embeds is on: the text encoder the validation "
            "pipeline needs is not loaded, so validation renders are skipped."
        )
        return None
    # import here: import time (the pipeline and diffusers' model stack, seconds; only runs with validation need it)
    from .validation import ValidationRenderer

    return ValidationRenderer(config, models, dataset.clips[0].path)


def train_loop(run: TrainingRun) -> tuple[list[dict], list[str]]:
    """Optimizer steps up to ``train.max_train_steps``. Micro-steps are counted so that a resumed run skips exactly
    the consumed batches and draws the same σ and noise (`step_generator`).

    Returns:
        ``(history, seen_clips)``: this rank's loss terms per optimizer step and the ``clip@window`` it trained on.
    """
    from tqdm.auto import tqdm

    config, accelerator, module = run.config, run.accelerator, run.module
    train_cfg = config.train
    accumulation = train_cfg.gradient_accumulation_steps
    batches_per_epoch = len(run.loader)
    global_step = run.progress.global_step
    micro_step = global_step * accumulation
    epoch = micro_step // batches_per_epoch
    history: list[dict] = []
    seen_clips: list[str] = []
    running: dict[str, float] = {}
    fixed_batch = None
    bar = tqdm(
        total=train_cfg.max_train_steps,
        initial=global_step,
        disable=not accelerator.is_local_main_process,
        desc=f"stage {config.stage}",
    )
    module.train()
    clock = time.perf_counter()
    while global_step < train_cfg.max_train_steps:
        skip = micro_step - epoch * batches_per_epoch
        epoch_loader = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        # The prepared loader re-seeds its sampler with its own pass counter on every `iter`; set it to the epoch.
        epoch_loader.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        for batch in epoch_loader:
            if train_cfg.overfit_one_batch:
                fixed_batch = fixed_batch if fixed_batch is not None else batch
                batch = fixed_batch
            seen_clips.extend(f"{c}@{w}" for c, w in zip(batch["clip_id"], batch["window_start"]))
            generator = step_generator(
                config.seed, accelerator.process_index, 0 if train_cfg.overfit_one_batch else micro_step
            )
            with accelerator.accumulate(module):
                terms = training_step(
                    run.models,
                    module,
                    batch,
                    config,
                    run.prompt_encoder,
                    generator,
                    accelerator.device,
                    run.weight_dtype,
                    latent_cache=run.dataset.latent_cache,
                )
                check_finite_loss(terms, global_step + 1, batch)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:  # the norm before clipping (logged; max_grad_norm 0: not clipped)
                    grad_norm = accelerator.clip_grad_norm_(module.parameters(), config.optim.max_grad_norm or math.inf)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            for name, value in terms.items():
                running[name] = running.get(name, 0.0) + float(value.detach()) / accumulation
            if not accelerator.sync_gradients:
                continue

            # Bookkeeping once per optimizer step
            global_step += 1
            run.progress.global_step = global_step
            now = time.perf_counter()
            run.progress.train_seconds += now - clock
            if run.ema is not None:
                run.ema.step()
            history.append(dict(running, grad_norm=float(grad_norm), step=global_step))
            running = {}
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if train_cfg.report_to and global_step % train_cfg.log_every == 0:
                logs = {f"train/{k}": v for k, v in history[-1].items() if k != "step"}
                logs["train/lr"] = run.lr_scheduler.get_last_lr()[0]
                accelerator.log(logs, step=global_step)
            if train_cfg.checkpointing_steps and global_step % train_cfg.checkpointing_steps == 0:
                check_finite_weights(module, f"checkpoint-{global_step}")
                save_checkpoint(accelerator, Path(config.output_dir), global_step, train_cfg.checkpoints_total_limit)
                now = time.perf_counter()  # the checkpoint's write is not training time
            if run.renderer is not None and global_step % train_cfg.validation_steps == 0:
                if accelerator.is_main_process:  # with the weights final/ will hold (the EMA's with train.ema)
                    unwrapped = accelerator.unwrap_model(module)
                    with run.ema.averaged_weights() if run.ema is not None else contextlib.nullcontext():
                        path = run.renderer(
                            unwrapped, Path(config.output_dir), global_step, accelerator.device, accelerator.trackers
                        )
                    accelerator.print(f"step {global_step}: validation render {path}")
                accelerator.wait_for_everyone()
                now = time.perf_counter()
            clock = now
            if global_step >= train_cfg.max_train_steps:
                break
        epoch += 1
    bar.close()
    return history, seen_clips


class TrainingDiverged(FloatingPointError):
    """The loss or the weights became NaN or infinite: training stops, and nothing non-finite is saved."""


def check_finite_loss(terms: dict[str, torch.Tensor], step: int, batch: dict) -> None:
    """Stop the run when a loss term of optimizer step ``step`` is NaN or infinite, before it reaches the weights."""
    bad = {
        name: float(value.detach().float().mean())
        for name, value in terms.items()
        if not torch.isfinite(value.detach()).all()
    }
    if bad:
        clips = ", ".join(f"{c}@{w}" for c, w in zip(batch.get("clip_id", []), batch.get("window_start", [])))
        raise TrainingDiverged(
            f"step {step}: the loss is not finite ({', '.join(f'{k} = {v}' for k, v in bad.items())}; batch {clips}). "
            "Training stopped before this step's update; no final/ is written. Lower optim.lora_lr / optim.base_lr "
            "(or set optim.max_grad_norm), then resume from the last checkpoint (--resume latest) or start again."
        )


def check_finite_weights(module: torch.nn.Module, what: str) -> None:
    """Refuse to save ``what`` when a weight of ``module`` is NaN or infinite (checked on every rank's own copy)."""
    # import here: import time (diffusers' and transformers' model stack, seconds; `echo-train --help` stays light)
    from echo.transformer_echo import non_finite_weights

    bad = non_finite_weights(module)
    if bad:
        raise TrainingDiverged(
            f"{what}: the weights are not finite ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); it is not "
            "saved. Lower optim.lora_lr / optim.base_lr (or set optim.max_grad_norm), then resume from the last "
            "checkpoint (--resume latest) or start again."
        )


def build_ema(config: TrainConfig, accelerator, module: torch.nn.Module) -> TrainedWeightsEMA | None:
    """The EMA of the trained weights (``train.ema``; `training.ema`), or `None`. Under FSDP and DeepSpeed a rank
    holds only shards of the weights, so EMA is refused there."""
    from accelerate.utils import DistributedType

    if not config.train.ema:
        return None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"train.ema is not supported under {accelerator.distributed_type}: each rank holds shards of the weights. "
            "Train with DDP (configs/accelerate/multi_gpu.yaml) or set train.ema=false."
        )
    return TrainedWeightsEMA(accelerator.unwrap_model(module), config.train.ema_decay)


def run_summary(run: TrainingRun) -> dict:
    """What the run will do, as diffusers' training examples log it at start: examples (windows) and clips,
    trainable parameters, batch sizes, accumulation, epochs and optimizer steps."""
    config, accelerator = run.config, run.accelerator
    accumulation = config.train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(run.loader) / accumulation)
    parameters = list(run.models.module.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return {
        "num_examples": len(run.dataset),
        "num_clips": len(run.dataset.clips),
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in parameters),
        "batch_size_per_process": config.data.batch_size,
        "total_batch_size": config.data.batch_size * accelerator.num_processes * accumulation,
        "gradient_accumulation_steps": accumulation,
        "num_epochs": math.ceil(config.train.max_train_steps / steps_per_epoch),
        "max_train_steps": config.train.max_train_steps,
        "first_step": run.progress.global_step + 1,
    }


def log_run_summary(run: TrainingRun) -> dict:
    """Log `run_summary` (main process) and return it."""
    summary = run_summary(run)
    if run.accelerator.is_main_process:
        logger.info(
            "***** Running training: stage %d *****\n"
            "  Num examples (windows) = %d from %d clips\n"
            "  Trainable parameters = %s of %s (%.2f%%)\n"
            "  Batch size per process = %d\n"
            "  Total train batch size (w. parallel, distributed & accumulation) = %d\n"
            "  Gradient accumulation steps = %d\n"
            "  Num epochs = %d\n"
            "  Total optimization steps = %d (starting at step %d)\n"
            "  EMA of the trained weights = %s",
            run.config.stage, summary["num_examples"], summary["num_clips"], f"{summary['trainable_parameters']:,}",
            f"{summary['total_parameters']:,}", 100 * summary["trainable_parameters"] / summary["total_parameters"],
            summary["batch_size_per_process"], summary["total_batch_size"], summary["gradient_accumulation_steps"],
            summary["num_epochs"], summary["max_train_steps"], summary["first_step"],
            f"on (decay {run.config.train.ema_decay})" if run.ema is not None else "off",
        )  # fmt: skip
    return summary


def save_final(run: TrainingRun, settings: EchoSettings) -> None:
    """``output_dir/final/``: the adapter (PEFT), trained modules, LCU, ``echo_settings.json`` and the config; with
    ``train.ema`` the EMA weights (what echo-export then exports), else the last step's."""
    accelerator = run.accelerator
    with run.ema.averaged_weights() if run.ema is not None else contextlib.nullcontext():
        check_finite_weights(run.module, "final/")
        accelerator.wait_for_everyone()
        state = accelerator.get_state_dict(run.module)
        if accelerator.is_main_process:
            final = Path(run.config.output_dir) / "final"
            unwrapped = accelerator.unwrap_model(run.module)
            save_trained(final, state, unwrapped, run.models.adapter_name, run.models.trainable_pattern)
            write_run_files(final, run.config, settings, run.models.stage1)


def main(config: TrainConfig) -> dict:
    """Train one stage.

    Returns:
        `dict`: ``global_step``, ``history`` (this rank's loss terms and gradient norm per optimizer step),
        ``num_processes``, ``summary`` (`run_summary`), and the in-memory ``models`` ([`TrainingModels`]),
        ``prompt_encoder`` and ``ema`` ([`TrainedWeightsEMA`] or `None`) for inspection.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    settings = settings_from_config(config)  # invalid settings fail before anything is built
    accelerator, weight_dtype = make_accelerator(config)
    prepare_output_dir(accelerator, config)
    models, prompt_encoder = build_models(config, accelerator, weight_dtype)
    dataset, loader = build_data(config, models)
    settings = settings.replace(**dataset.reasoning_strides)  # the strides the caches were reasoned at (echo.data)
    optimizer, lr_scheduler = build_optimizer(config, models, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        # Frozen and trainable weights must not share a flat parameter (fsdp_use_orig_params: false).
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(models.module)
    module, optimizer, loader, lr_scheduler = accelerator.prepare(models.module, optimizer, loader, lr_scheduler)
    if len(loader) == 0:
        raise ValueError(
            f"data root {config.data.root!r} gives {len(dataset)} windows: fewer than one batch of "
            f"{config.data.batch_size} per process for {accelerator.num_processes} processes."
        )
    ema = build_ema(config, accelerator, module)
    progress = TrainingProgress()
    register_checkpoint_hooks(accelerator, config, models, settings, progress, ema)
    resume_from_checkpoint(accelerator, config, progress, models.stage1)
    if accelerator.is_main_process and config.train.report_to:
        accelerator.init_trackers(f"echo-stage{config.stage}", config=_flat_hparams(config))
    run = TrainingRun(
        config,
        accelerator,
        models,
        module,
        optimizer,
        lr_scheduler,
        dataset,
        loader,
        prompt_encoder,
        progress,
        weight_dtype,
        renderer=build_validation(config, models, dataset),
        ema=ema,
    )
    summary = log_run_summary(run)

    history, seen_clips = train_loop(run)

    save_final(run, settings)
    if config.train.dump_trainable_params:
        dump_rank_state(Path(config.output_dir), accelerator, accelerator.unwrap_model(module), history, seen_clips)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = {
        "global_step": progress.global_step,
        "history": history,
        "num_processes": accelerator.num_processes,
        "models": models,
        "prompt_encoder": prompt_encoder,
        "summary": summary,
        "ema": ema,
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
    """Parse the command line (``--config``, ``--set``, ``--resume``, ``--overwrite``) and train; returns `main`'s result."""
    args = parse_args(argv)
    overrides = list(args.set)
    if args.resume is not None:
        overrides.append(f"train.resume_from_checkpoint={args.resume}")
    if args.overwrite:
        overrides.append("train.overwrite_output_dir=true")
    return main(load_config(args.config, overrides))


def cli(argv: list[str] | None = None) -> int:
    """The ``echo-train`` console script and ``python -m training.train``."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
