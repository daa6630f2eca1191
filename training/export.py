"""`echo-export`: turn a training run's output into a pipeline folder that `echo-render` and
``diffusers.DiffusionPipeline.from_pretrained`` load.

```bash
echo-export --stage-dir outputs/stage2 --model-config configs/models/wan2.1-t2v-1.3b.yaml --out models/echo-demo \
    --dtype bf16
```

What it does, in order:

1. ``--stage-dir`` is a run folder (its ``final/``, else, with a warning naming it, its newest ``checkpoint-N/``; a
   ``final/`` without its adapter is refused, not replaced by a checkpoint) or one of those folders; its
   ``training_config.yaml`` gives the stage, the ablation switches and (stage 2) the stage-1 output, its
   ``echo_settings.json`` the settings the model was trained with. The exported state is logged. A stage-2 state
   records the stage-1 state it was trained on (``stage1.json``: the SHA-256 of its weights); the stage-1 output
   fused with it (``--stage1-dir``, or the run's ``model.stage1_dir``) must match it, or the export is refused
   naming both.
2. The components are built from the model description (``--model-config``, by default the one the run trained
   with), with the run's ablation switches applied exactly as training applied them.
3. The generator gets the stage-1 modules and adapter, fused (diffusers' ``fuse_lora`` + ``unload_lora``); for a
   stage-2 output then the stage-2 modules and adapter, fused, and the trained LCU. The exported generator has no
   PEFT layers: it computes what the training model computed with its adapters active.
4. The model components are cast to ``--dtype`` (modules a class keeps in float32, ``_keep_in_fp32_modules``, stay
   float32); the VAE stays float32 unless ``--vae-dtype`` says otherwise, as diffusers' Wan pipelines recommend.
5. `pipelines.EchoPipeline(..., settings=...)` is saved with ``save_pretrained(safe_serialization=True)`` into a
   temporary folder beside ``--out`` and renamed, so ``--out`` is never half written (the temporary folders a killed
   export left are removed by the next export into ``--out``). An existing ``--out`` is refused unless
   ``--overwrite``, which replaces only a pipeline folder (``model_index.json`` naming `EchoPipeline`), and never one
   that is, contains or lies inside an input (``--stage-dir``, ``--stage1-dir``, ``--vae``, ``--model-config``).
   Weights holding NaN or infinite values (a diverged run) are refused, naming them.

With ``train.ema`` the exported weights are the EMA of the trained weights when ``--stage-dir`` resolves to ``final/``
(training writes them there), and the last step's weights for a ``checkpoint-N/`` (logged, with a warning).

A stage-1 output exports without an LCU (``context_encoder`` is `None`): the pipeline then renders from the reference
and the avatar audio only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from echo.components import load_components, load_model_config
from echo.settings import EchoSettings

from .config import load_config
from .modeling import (
    _apply_ablation,
    check_stage1_identity,
    check_stage1_settings,
    load_context_encoder_weights,
    load_fused,
    resolve_trained_dir,
)
from .train_vae import ENCODER_PREFIXES, load_vae_folder

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The pipeline's components besides the LCU (stage 2 only).
PIPELINE_SECTIONS = (
    "vae",
    "transformer",
    "scheduler",
    "audio_encoder",
    "feature_extractor",
    "text_encoder",
    "tokenizer",
)


SAMPLING_SETTINGS = ("num_inference_steps", "audio_guidance_scale", "user_guidance_scale")


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters and buffers of ``model`` to ``dtype`` in place, except those under a module
    named in the class's ``_keep_in_fp32_modules`` (as diffusers' and transformers' ``from_pretrained`` do)."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.is_floating_point() and not any(part in keep for part in name.split(".")):
                tensor.data = tensor.data.to(dtype)
    return model


def replace_decoder(vae, vae_dir: str | os.PathLike):
    """The VAE saved in ``vae_dir`` (loaded in float32), after checking that it encodes exactly as ``vae`` does: the
    same encoder and quant-conv weights and latent statistics, so that only the decoded pictures differ."""
    replacement = load_vae_folder(
        vae_dir,
        f"--vae {str(vae_dir)!r} is",
        "pass the export_dir of a decoder run (training.train_vae with train.freeze_encoder).",
    )
    trained, shipped = vae.state_dict(), replacement.state_dict()
    changed = [
        name
        for name, value in trained.items()
        if name.startswith(ENCODER_PREFIXES) and (name not in shipped or not torch.equal(value.float(), shipped[name]))
    ]
    for key in ("latents_mean", "latents_std", "z_dim"):
        if list(np.atleast_1d(vae.config[key])) != list(np.atleast_1d(replacement.config[key])):
            changed.append(f"config.{key}")
    if changed:
        raise ValueError(
            f"--vae {str(vae_dir)!r} does not encode as the VAE the generator was trained with ({', '.join(changed[:4])}"
            f"{' ...' if len(changed) > 4 else ''} differ): only a VAE whose decoder was trained further with the "
            "encoder frozen (training.train_vae, train.freeze_encoder: true, init_from: that VAE) can replace it."
        )
    return replacement


def build_exported_pipeline(
    stage_dir: str | os.PathLike,
    model_config: str | os.PathLike | dict | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    stage1_dir: str | os.PathLike | None = None,
    vae_dir: str | os.PathLike | None = None,
):
    """The `EchoPipeline` of a training output, in memory (see the module docstring for the steps).

    Args:
        stage_dir (`str` or `os.PathLike`): a stage-1 or stage-2 run folder, its ``final/`` or a ``checkpoint-N/``.
        model_config (`str`, `os.PathLike` or `dict`, *optional*): the model description; defaults to the
            ``model.config`` of the run's ``training_config.yaml``.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the generator, encoders and LCU.
        vae_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the VAE.
        stage1_dir (`str` or `os.PathLike`, *optional*): stage 2 only: the stage-1 output, when it moved since
            training (defaults to the run's ``model.stage1_dir``).
        vae_dir (`str` or `os.PathLike`, *optional*): a saved `AutoencoderKLWan` to ship instead of the model
            description's: the same VAE with its decoder trained further (``training.train_vae`` with
            ``train.freeze_encoder``). Its encoder and latent statistics must equal the description's, on which the
            generator was trained (checked).

    Returns:
        `pipelines.EchoPipeline` with ``settings`` from the run's ``echo_settings.json``.
    """
    # import here: import time (diffusers' and transformers' model stack, seconds; `echo-export --help` stays light)
    from echo.transformer_echo import non_finite_weights
    from pipelines import EchoPipeline

    # 1. The trained state, its training config and settings
    trained = resolve_trained_dir(stage_dir, what="training output (--stage-dir)")
    config_file = trained / "training_config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(config_file)!r} does not exist: --stage-dir must be an output of training.train (its final/ or a "
            "checkpoint-N/ holds the training config)."
        )
    config = load_config(config_file)
    settings = EchoSettings.load(trained)

    # 2. Components from the model description, with the run's ablation switches
    description = _apply_ablation(load_model_config(model_config or config.model.config), config)
    # Sampling defaults are not shaped by training: the model description's `settings:` gives them, when it has them.
    sampling = {k: v for k, v in (description.get("settings") or {}).items() if k in SAMPLING_SETTINGS}
    settings = settings.replace(**sampling)
    sections = list(PIPELINE_SECTIONS) + (["context_encoder"] if config.stage == 2 else [])
    sections += [name for name in ("image_encoder", "image_processor") if name in description]  # I2V bases
    components = load_components(description, torch_dtype=torch.float32, only=sections)  # fuse in fp32, then cast
    transformer = components["transformer"]
    if vae_dir is not None:
        components["vae"] = replace_decoder(components["vae"], vae_dir)

    # 3. Trained weights, adapters fused. With train.ema, final/ holds the EMA weights; a checkpoint-N/ holds the last
    # step's (its EMA, ema.safetensors, is for resuming)
    if config.train.ema and trained.name == "final":
        logger.info("weights: the EMA of the trained weights (train.ema, decay %s): final/ holds them",
                    config.train.ema_decay)  # fmt: skip
    elif config.train.ema:
        logger.warning("weights: the trained weights of step %s, not their EMA (train.ema): only final/ holds the EMA "
                       "weights; export the run's final/ for them", trained.name.removeprefix("checkpoint-"))  # fmt: skip
    else:
        logger.info("weights: the trained weights of the last step (train.ema off)")
    if config.stage == 2:
        given = "--stage1-dir" if stage1_dir else f"model.stage1_dir of {str(config_file)!r}"
        stage1 = resolve_trained_dir(
            stage1_dir or config.model.stage1_dir,
            what=f"stage-1 output (model.stage1_dir of {str(config_file)!r}; pass --stage1-dir if it moved)",
        )
        check_stage1_identity(trained, stage1, given)
        check_stage1_settings(config, stage1)
        logger.info("exporting the stage-2 state %s fused with the stage-1 state %s", trained, stage1)
        load_fused(transformer, stage1, "stage1")
        load_fused(transformer, trained, "stage2")
        load_context_encoder_weights(components["context_encoder"], trained)
    else:
        logger.info("exporting the stage-1 state %s", trained)
        load_fused(transformer, trained, "stage1")
    for name in ("transformer", "context_encoder"):
        bad = non_finite_weights(components[name]) if components.get(name) is not None else []
        if bad:
            raise ValueError(
                f"the trained {name} of {str(trained)!r} holds NaN or infinite weights ({', '.join(bad[:4])}"
                f"{' ...' if len(bad) > 4 else ''}): its training diverged. Export a checkpoint-N/ from before the "
                "divergence (--stage-dir <run>/checkpoint-N), or train again with a lower learning rate."
            )

    # 4. Precision: the VAE apart
    for name in ("transformer", "text_encoder", "audio_encoder", "context_encoder", "image_encoder"):
        if name in components:
            cast_model(components[name].eval(), dtype)
    cast_model(components["vae"].eval(), vae_dtype)

    return EchoPipeline(
        vae=components["vae"],
        transformer=transformer,
        scheduler=components["scheduler"],
        audio_encoder=components["audio_encoder"],
        feature_extractor=components["feature_extractor"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        context_encoder=components.get("context_encoder"),
        settings=settings.to_dict(),
        image_encoder=components.get("image_encoder"),
        image_processor=components.get("image_processor"),
    )


def export_pipeline(
    stage_dir: str | os.PathLike,
    out: str | os.PathLike,
    model_config: str | os.PathLike | dict | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    stage1_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    vae_dir: str | os.PathLike | None = None,
) -> Path:
    """Build the pipeline of a training output (`build_exported_pipeline`) and save it to ``out`` atomically.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is not set.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists; choose a new folder or pass --overwrite.")
    inputs = {"--stage-dir": stage_dir, "--stage1-dir": stage1_dir, "--vae": vae_dir}
    if not isinstance(model_config, dict):
        inputs["--model-config"] = model_config
    check_out_apart_from_inputs(out, inputs)
    if out.exists():
        check_replaceable(out)
    remove_stale_temporaries(out)
    pipeline = build_exported_pipeline(stage_dir, model_config, dtype, vae_dtype, stage1_dir, vae_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if old.exists():
        shutil.rmtree(old)
    return out


def check_out_apart_from_inputs(out: Path, inputs: dict) -> None:
    """Refuse an ``--out`` that is, contains or lies inside one of the ``inputs`` (option name → path or `None`):
    replacing it would delete what the export reads (e.g. ``--out`` equal to ``--stage-dir``, or its parent)."""
    target = out.resolve()
    for option, value in inputs.items():
        if value is None:
            continue
        path = Path(value).resolve()
        if target == path or target in path.parents or path in target.parents:
            relation = "is" if target == path else "contains" if target in path.parents else "lies inside"
            raise ValueError(
                f"--out {str(out)!r} {relation} the input {option} {str(value)!r}: writing the pipeline there would "
                "replace what the export reads. Choose an --out folder apart from the inputs."
            )


def check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces only a pipeline folder: a folder whose ``model_index.json`` names `EchoPipeline`, as
    echo-export writes. Anything else (a training run, a folder of other files) is refused, never deleted."""
    index = out / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name") if out.is_dir() else None
    except (OSError, ValueError, AttributeError):
        class_name = None
    if class_name != "EchoPipeline":
        raise FileExistsError(
            f"--out {str(out)!r} exists and is not an EchoPipeline folder (no model_index.json naming EchoPipeline): "
            "--overwrite only replaces a pipeline folder echo-export wrote. Choose a new --out folder, or move that "
            "one away yourself."
        )


def remove_stale_temporaries(out: Path) -> None:
    """Delete the ``.<out>.<pid>.tmp`` / ``.old`` folders that an earlier export into ``out``, killed mid-write, left
    beside it (those of a process that still runs are kept)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.(tmp|old)")
    for stale in out.parent.glob(f".{out.name}.*") if out.parent.is_dir() else ():
        match = pattern.fullmatch(stale.name)
        if match is None or not stale.is_dir() or _process_alive(int(match.group(1))):
            continue
        logger.info("removing %s, left by an export that was stopped", stale)
        shutil.rmtree(stale)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftovers are stale by definition
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="echo-export", description="Turn a stage-1 or stage-2 training output into an EchoPipeline folder."
    )
    parser.add_argument("--stage-dir", required=True, help="training output: run folder, its final/ or a checkpoint-N/")
    parser.add_argument("--out", required=True, help="pipeline folder to write (save_pretrained)")
    parser.add_argument(
        "--model-config",
        default=None,
        help="model description (configs/models/*.yaml); default: the model.config the run trained with",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="generator, encoders and LCU dtype")
    parser.add_argument("--vae-dtype", choices=sorted(DTYPES), default="fp32", help="VAE dtype (default fp32)")
    parser.add_argument("--stage1-dir", default=None, help="stage 2: the stage-1 output, if it moved since training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument(
        "--vae",
        default=None,
        help="a VAE folder to ship instead of the model description's: its decoder trained further, encoder frozen",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The ``echo-export`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = export_pipeline(
        args.stage_dir,
        args.out,
        model_config=args.model_config,
        dtype=DTYPES[args.dtype],
        vae_dtype=DTYPES[args.vae_dtype],
        stage1_dir=args.stage1_dir,
        overwrite=args.overwrite,
        vae_dir=args.vae,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
