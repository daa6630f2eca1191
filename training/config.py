"""Training configuration: YAML → nested dataclasses, with strict keys and ``--set section.key=value`` overrides.

A config file (``configs/train/*.yaml``) has the sections below; every key is optional and defaults to the value
written here. An unknown key anywhere is an error that names its dotted path (``optim.lora_lrr``), so a typo never
silently trains with a default. Precision and distribution are *not* here: they live in the accelerate config
(``configs/accelerate/*.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from echo.chunks import is_frame_count
from echo.components import read_yaml
from echo.settings import EchoSettings


@dataclass
class ModelConfig:
    """Which model to build and where stage 2 starts from."""

    # Model description for `echo.components.load_components` (configs/models/tiny.yaml or a real one).
    config: str = "configs/models/tiny.yaml"
    # Stage 2: the output folder of stage 1 (its `final/` checkpoint or any `checkpoint-*` folder).
    stage1_dir: str | None = None


@dataclass
class DataConfig:
    """`echo.data.ConversationDataset` options and the loader."""

    root: str = "data/prepared"  # a folder of prepared clip folders
    num_frames: int = 33  # video frames per window, 4k + 1
    resolution: int = 512  # side of the square frames, a multiple of 16
    windows_per_clip: int = 1  # training windows drawn from each clip per epoch
    # Cap on the user-history frames the LCU reads (None: the whole history from the conversation's start).
    max_history_frames: int | None = None
    user_video_size: int = 64  # side of the user video the LCU reads (stage 2)
    # Exact window latents (training/latent_cache.py): the VAE encode of each window is written once, under
    # `latent_cache_dir` (default: <root>/.latent_cache) keyed by the VAE's weights and the clip, and read back instead
    # of encoding the window again. It fills as training draws windows (or ahead: python -m training.fill_latent_cache).
    use_cached_latents: bool = False
    latent_cache_dir: str | None = None  # where the window latents are cached (None: <root>/.latent_cache)
    # Window starts are multiples of this many frames (1: any frame). With the cache, a larger stride makes the
    # windows a small set that later epochs draw again (every frame is still in some window while it is <= num_frames).
    window_stride: int = 1
    # Read the emotion embeddings from `emotion_embeds.safetensors` (echo-prep --stages emotion_embeds) instead of
    # loading the text encoder: saves its memory (~11 GB for UMT5-XXL); validation renders are then skipped.
    use_cached_emotion_embeds: bool = False
    # Stage 2 with ablation.use_visual: read the user history's VAE tokens from `user_tokens.safetensors`
    # (echo-prep --stages user_tokens --user-video-size <user_video_size>) instead of encoding the frames every step.
    use_cached_user_tokens: bool = False
    default_emotion: str = "neutral"  # the emotion text of a window without one
    # Emotion-text tokens given to the text encoder (capped by the tokenizer's `model_max_length`); saved with the
    # model (`echo_settings.json`) so the pipeline encodes prompts to the same length.
    max_sequence_length: int = 512
    batch_size: int = 1  # per process
    num_workers: int = 2  # DataLoader worker processes (0: load in the training process)


@dataclass
class LoraSettings:
    """LoRA adapter on the generator (PEFT); ``target_modules`` is a regex over full dotted module names."""

    rank: int = 128  # LoRA rank r
    alpha: int | None = None  # defaults to the rank (scale 1)
    dropout: float = 0.0  # LoRA dropout probability
    # Regex over full dotted module names of the generator that get the adapter.
    target_modules: str = r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    # Regex over full parameter names of the generator trained in full at `optim.base_lr` (the new modules).
    trainable_modules: str = r".*(audio_|sdcm).*"


@dataclass
class OptimConfig:
    """AdamW with two learning rates: LoRA weights and the fully trained new modules."""

    lora_lr: float = 1e-4  # learning rate of the LoRA weights
    base_lr: float = 2e-5  # learning rate of the fully trained modules (lora.trainable_modules, the LCU)
    weight_decay: float = 1e-2  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # gradient clipping norm (0: no clipping; the norm is logged either way)
    lr_scheduler: str = "constant_with_warmup"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0  # linear warm-up optimizer steps of the LR schedule


@dataclass
class LossConfig:
    """Flow-matching σ sampling and the auxiliary losses (λ·L_pixel in stage 1, γ·L_align in stage 2)."""

    logit_mean: float = 0.0  # σ ~ shifted logit-normal
    logit_std: float = 1.0  # std of the logit-normal σ distribution
    shift: float | None = None  # None: the `shift` of the model's scheduler (one source for training and sampling)
    pixel_weight: float = 0.1  # λ
    pixel_latent_frames: int = 2  # latent frames decoded for L_pixel
    pixel_loss_type: str = "mse"  # L_pixel distance: "mse" or "l1"
    # Weight of the lip region's latents in L_flow (echo.losses.lip_loss_weights; a weighted mean): 1 is the paper's
    # plain loss. The mouth is a few per cent of the latents; this gives it more of the loss (measured on the demo
    # model at 5: docs/demo_model.md).
    lip_flow_weight: float = 1.0
    align_weight: float = 1.0  # γ
    align_blocks: int = 4  # |S|, clamped to the generator's number of blocks
    align_distance: str = "mse"  # L_align feature distance: "mse" or "cosine"
    speech_weight_floor: float = 0.1  # L_align weight of frames where the avatar does not speak
    motion_prob: float = 0.0  # probability of a continuation sample (leading latent frames given as motion)
    motion_latent_frames: int = 1  # leading latent frames given as motion in a continuation sample
    # Noise augmentation of the motion frames of a continuation sample: their latents become (1 − s)·z + s·ε with s
    # drawn per sample from U(0, motion_noise), so the model learns not to copy the previous chunk's errors (at
    # inference the motion frames are its own generated frames, never the ground truth it trains on). 0: off.
    motion_noise: float = 0.0
    # Blur augmentation of the same motion frames: a Gaussian blur of σ ~ U(0, motion_blur) pixels per sample, before
    # they are encoded. A model's own frames are softer than the ground truth; trained only on sharp motion frames, it
    # copies the softness of its previous chunk and adds its own, chunk after chunk. 0: off.
    motion_blur: float = 0.0
    # Condition dropout for classifier-free guidance: per sample, the avatar audio (resp. the user context) is dropped
    # with this probability, so the pipeline's "uncond" and "audio" guidance passes stay in the training distribution.
    audio_drop_prob: float = 0.0
    user_drop_prob: float = 0.0  # per-sample dropout of the user context (stage 2), as audio_drop_prob


@dataclass
class AblationConfig:
    """The paper's ablations (Table 1); an off-switch removes the module and its inputs."""

    use_visual: bool = True  # LPE visual branch of the LCU
    use_understanding: bool = True  # HBCU
    use_emotion: bool = True  # LAU: emotion text to the text cross-attention (off: the empty prompt)
    use_sdcm: bool = True  # SDCM (off: one cross-attention over the audio)


@dataclass
class TrainSettings:
    """Loop, checkpoints and logging."""

    max_train_steps: int = 10000  # optimizer steps of the run
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # recompute the generator blocks' activations in backward (less memory)
    checkpointing_steps: int = 500  # save_state every N optimizer steps (0: only the final weights)
    checkpoints_total_limit: int | None = 3  # keep the newest N checkpoints (None: all)
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    validation_steps: int | None = None  # render the first training clip every N steps (pipelines.EchoPipeline)
    validation_inference_steps: int = 20  # denoising steps of a validation render
    log_every: int = 1  # log the losses, learning rate and gradient norm every N optimizer steps
    report_to: str | None = "tensorboard"  # accelerate tracker(s): "tensorboard", "wandb", "all" (None: no trackers)
    # An exponential moving average of the trained weights (`diffusers.training_utils.EMAModel`), updated after every
    # optimizer step and saved with every checkpoint (`ema.safetensors`); final/ (and so echo-export) then holds the
    # EMA weights instead of the last step's.
    ema: bool = False
    ema_decay: float = 0.9999  # EMA decay per optimizer step (diffusers' `EMAModel(decay=...)`)
    # Start over in an `output_dir` that holds an earlier run (its checkpoints, final/, logs and renders are deleted
    # first); without it, such a folder is refused unless the run resumes (`--resume latest`). CLI: `--overwrite`.
    overwrite_output_dir: bool = False
    overfit_one_batch: bool = False  # sanity check: repeat the first batch with the same σ and noise every step
    dump_trainable_params: bool = False  # write each rank's trainable parameters at the end (tests, debugging)


@dataclass
class TrainConfig:
    """The whole training configuration of one stage."""

    stage: int = 1  # 1: reference + avatar audio (L_flow + λ·L_pixel); 2: the user side, from stage 1's output
    output_dir: str = "outputs/stage1"  # checkpoints, final/, logs/ and validation/ of the run
    seed: int = 0  # weights, window order, σ and noise (a resumed run replays them)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def validate(self) -> TrainConfig:
        """Refuse values that make no sense, naming the dotted key (see `VALUE_RULES`), then the settings saved
        with the model (`settings_from_config`: frame size, chunk length, motion frames, user video size)."""
        if self.stage == 2 and not self.model.stage1_dir:
            raise ValueError("config key 'model.stage1_dir' is required for stage 2 (the stage-1 output folder).")
        for key, (accepts, expected) in VALUE_RULES.items():
            value = _lookup(self, key)
            if value is not None and not accepts(value):
                raise ValueError(f"config key {key!r} is {value!r}, expected {expected}.")
        for key in ("lora.target_modules", "lora.trainable_modules"):
            pattern = _lookup(self, key)
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"config key {key!r} is {pattern!r}, not a valid regex ({error}).") from error
        settings_from_config(self)
        return self


def _finite(value) -> bool:
    return math.isfinite(value)


def _positive(value) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value) -> bool:
    return math.isfinite(value) and value >= 0


def _probability(value) -> bool:
    return 0.0 <= value <= 1.0


def _at_least(minimum: int):
    return lambda value: value >= minimum


# Dotted key → (test, what it expects). `None` (an optional key left unset) is not tested. The settings the model is
# saved with (data.resolution, data.num_frames, data.user_video_size, data.max_history_frames, data.max_sequence_length,
# loss.motion_latent_frames) are checked by `EchoSettings` itself, through `settings_from_config`.
VALUE_RULES: dict[str, tuple[typing.Callable[[typing.Any], bool], str]] = {
    "stage": (lambda v: v in (1, 2), "1 or 2"),
    "output_dir": (bool, "a folder"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)"),
    "model.config": (bool, "a model description file"),
    "data.root": (bool, "a folder of prepared clips"),
    "data.num_frames": (is_frame_count, "4k + 1"),
    "data.resolution": (lambda v: v >= 16 and v % 16 == 0, "a positive multiple of 16"),
    "data.windows_per_clip": (_at_least(1), "at least 1"),
    "data.window_stride": (_at_least(1), "at least 1 frame"),
    "data.batch_size": (_at_least(1), "at least 1"),
    "data.num_workers": (_at_least(0), "at least 0"),
    "lora.rank": (_at_least(1), "at least 1"),
    "lora.alpha": (_positive, "a number > 0 (or null: the rank)"),
    "lora.dropout": (lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)"),
    "lora.target_modules": (bool, "a regex of module names"),
    "optim.lora_lr": (_positive, "a learning rate > 0"),
    "optim.base_lr": (_positive, "a learning rate > 0"),
    "optim.weight_decay": (_non_negative, "a number >= 0"),
    "optim.betas[0]": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "optim.betas[1]": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "optim.eps": (_positive, "a number > 0"),
    "optim.max_grad_norm": (_non_negative, "a number >= 0 (0: no clipping)"),
    "optim.lr_warmup_steps": (_at_least(0), "at least 0"),
    "loss.logit_mean": (_finite, "a finite number"),
    "loss.logit_std": (_positive, "a number > 0"),
    "loss.shift": (_positive, "a number > 0 (or null: the scheduler's shift)"),
    "loss.pixel_weight": (_non_negative, "a loss weight >= 0"),
    "loss.pixel_latent_frames": (_at_least(1), "at least 1"),
    "loss.pixel_loss_type": (lambda v: v in ("mse", "l1"), "'mse' or 'l1'"),
    "loss.lip_flow_weight": (lambda v: isinstance(v, (int, float)) and v >= 1, "a weight >= 1 (1: the plain loss)"),
    "loss.align_weight": (_non_negative, "a loss weight >= 0"),
    "loss.align_blocks": (_at_least(1), "at least 1"),
    "loss.align_distance": (lambda v: v in ("mse", "cosine"), "'mse' or 'cosine'"),
    "loss.speech_weight_floor": (_probability, "a weight in [0, 1]"),
    "loss.motion_prob": (_probability, "a probability in [0, 1]"),
    "loss.motion_latent_frames": (_at_least(1), "at least 1"),
    "loss.motion_noise": (_probability, "a noise level in [0, 1]"),
    "loss.motion_blur": (_non_negative, "a blur σ in pixels >= 0"),
    "loss.audio_drop_prob": (_probability, "a probability in [0, 1]"),
    "loss.user_drop_prob": (_probability, "a probability in [0, 1]"),
    "train.max_train_steps": (_at_least(1), "at least 1 (a run of 0 steps would save untrained weights as final/)"),
    "train.gradient_accumulation_steps": (_at_least(1), "at least 1"),
    "train.checkpointing_steps": (_at_least(0), "at least 0 (0: only the final weights)"),
    "train.checkpoints_total_limit": (_at_least(1), "at least 1 (or null: keep all)"),
    "train.resume_from_checkpoint": (bool, "'latest' or a checkpoint folder (or null)"),
    "train.validation_steps": (_at_least(0), "at least 0 (0 or null: no validation renders)"),
    "train.validation_inference_steps": (_at_least(1), "at least 1"),
    "train.log_every": (_at_least(1), "at least 1"),
    "train.ema_decay": (lambda v: 0.0 <= v < 1.0, "a decay in [0, 1)"),
}


def _lookup(config: TrainConfig, key: str):
    """The value of a dotted key (``optim.betas[0]``) of a config."""
    value = config
    for part in key.split("."):
        name, _, index = part.partition("[")
        value = getattr(value, name)
        if index:
            value = value[int(index.rstrip("]"))]
    return value


def _coerce(value, annotation, key: str):
    """Convert a YAML value to a dataclass field type, raising a ValueError naming ``key`` on a mismatch."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}.")
        return from_dict(annotation, value, prefix=key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config key {key!r} must be a list of {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}.")
        return value
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"config key {key!r} must be a number, got {value!r}.")
        try:
            converted = annotation(float(value)) if annotation is int else float(value)
        except ValueError as error:
            raise ValueError(f"config key {key!r} must be a number, got {value!r}.") from error
        if annotation is int and float(value) != converted:
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}.")
        return converted
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}.")
        return str(value)
    return value


def from_dict(cls, values: dict, prefix: str = ""):
    """A config dataclass from parsed YAML: unknown keys and values of the wrong type are errors naming the dotted
    key (nested sections become their dataclasses). Shared by the training and VAE configs."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # annotations are strings under `from __future__ import annotations`
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + str(unknown[0])!r}; expected one of {sorted(prefix + k for k in fields)}."
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"override {item!r}: the value {raw!r} is not valid YAML ({problem}).") from error
    return key.strip().split("."), value


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a config file; a top-level ``base: <file>`` (relative to this file) is read first and overridden."""
    if not path.is_file():
        raise FileNotFoundError(f"training config {str(path)!r} does not exist.")
    if path.resolve() in chain:
        raise ValueError(f"training config {str(path)!r} inherits from itself through 'base'.")

    values = read_yaml(path, "training config")
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"training config {str(path)!r} must hold a mapping, got {type(values).__name__}.")
    base = values.pop("base", None)
    if base is None:
        return values
    return _merge(_read_yaml(path.parent / base, chain + (path.resolve(),)), values)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a training YAML, apply ``section.key=value`` overrides (values parsed as YAML) and validate.

    A file may start from another one with a top-level ``base: other.yaml`` (a path relative to the file); its own
    keys override the base's, section by section (the ablation configs are written this way).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown key (named by its dotted path), a value of the wrong type, or an invalid setting.
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    return from_dict(TrainConfig, apply_overrides(values, overrides)).validate()


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a parsed YAML dict, in place; returns it.
    The one reader of ``--set`` for the training, VAE and recipe configs."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section.")
        node[keys[-1]] = value
    return values


def config_to_dict(config: TrainConfig) -> dict:
    """The config as plain YAML-able data (tuples as lists)."""

    def convert(value):
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))


# ----------------------------------------------------------------------------------------------------------------------
# The reference of every key, generated from the dataclasses above: `--help` and docs/config_keys.md
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ConfigKey:
    """One config key: its dotted name, type, default and the comment written beside its field."""

    key: str
    type: str
    default: typing.Any
    help: str


def field_comments(cls) -> dict[str, str]:
    """The comment of each field of a config dataclass, read from its source (`inspect` + `tokenize` + `ast`): the
    ``#`` lines right above the field, then the comment on its line, joined."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        found[node.target.id] = " ".join(part for part in above + inline if part != "fmt: skip")
    return found


def config_keys(cls=None, prefix: str = "") -> list[ConfigKey]:
    """Every key of the training config (`TrainConfig` by default), section by section, in the order of the fields."""
    cls = TrainConfig if cls is None else cls
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    keys = []
    for item in dataclasses.fields(cls):
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            keys += config_keys(annotation, prefix + item.name + ".")
            continue
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        kind = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        keys.append(ConfigKey(prefix + item.name, kind, default, comments[item.name]))
    return keys


def _yaml_value(value) -> str:
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True).strip()


def config_help() -> str:
    """Every config key with its default and comment, for ``python -m training.train --help``."""
    lines = ["config keys (set in the YAML, or --set KEY=VALUE; default after '='):"]
    for key in config_keys():
        lines.append(f"  {key.key} = {_yaml_value(key.default).removesuffix(chr(10) + '...')}")
        if key.help:
            lines.append(f"      {key.help}")
    return "\n".join(lines)


def config_keys_markdown() -> str:
    """docs/config_keys.md: every training config key, generated (``python -m training.config --write-docs``)."""
    out = [
        "# Training config keys",
        "",
        "<!-- Generated from the dataclasses of training/config.py by `python -m training.config --write-docs "
        "docs/config_keys.md`; tests/test_ecosystem.py checks it is current. Do not edit by hand. -->",
        "",
        "Every key of a training YAML (`configs/train/*.yaml`), with its type, default and comment. Set a key in the "
        "file or on the command line (`--set train.max_train_steps=10`); an unknown key is an error naming it. "
        "Precision and distribution are not here: they come from the accelerate config. "
        "`python -m training.train --help` prints the same list.",
    ]
    section = None
    for key in config_keys():
        head = key.key.split(".")[0] if "." in key.key else "top level"
        if head != section:
            section = head
            out += ["", f"## {section}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        default = _yaml_value(key.default).removesuffix("\n...").replace("|", "\\|")
        kind, text = key.type.replace("|", "\\|"), key.help.replace("|", "\\|")
        out.append(f"| `{key.key}` | `{kind}` | `{default}` | {text} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m training.config [--write-docs docs/config_keys.md]``: print (or write) the config key reference."""
    import argparse

    parser = argparse.ArgumentParser(description="The training config keys, generated from training/config.py.")
    parser.add_argument("--write-docs", metavar="PATH", help="write the markdown page there (docs/config_keys.md)")
    args = parser.parse_args(argv)
    if args.write_docs:
        Path(args.write_docs).write_text(config_keys_markdown())
    else:
        print(config_help())
    return 0


# `EchoSettings` field → the training config key it comes from.
SETTINGS_KEYS = {
    "resolution": "data.resolution",
    "num_frames_per_chunk": "data.num_frames",
    "motion_frames": "loss.motion_latent_frames",
    "user_video_size": "data.user_video_size",
    "max_history_frames": "data.max_history_frames",
    "max_sequence_length": "data.max_sequence_length",
    "default_emotion": "data.default_emotion",
    "use_emotion": "ablation.use_emotion",
}


def settings_from_config(config: TrainConfig) -> EchoSettings:
    """The settings a model trained with ``config`` depends on, as saved with it (``echo_settings.json``).

    ``motion_frames = 4·(loss.motion_latent_frames − 1) + 1``: the video frames whose latents a continuation chunk is
    given. Sampling defaults (steps, guidance scales) are `EchoSettings`' own. An invalid value is an error naming
    its config key.
    """

    data = config.data
    try:
        return EchoSettings(
            resolution=data.resolution,
            num_frames_per_chunk=data.num_frames,
            motion_frames=4 * (config.loss.motion_latent_frames - 1) + 1,
            user_video_size=data.user_video_size,
            max_history_frames=data.max_history_frames,
            max_sequence_length=data.max_sequence_length,
            default_emotion=data.default_emotion,
            use_emotion=config.ablation.use_emotion,
        )
    except ValueError as error:
        field = re.search(r"`(\w+)`", str(error))
        key = SETTINGS_KEYS.get(field.group(1)) if field else None
        raise ValueError(f"config key {key!r}: {error}" if key else str(error)) from error


if __name__ == "__main__":
    raise SystemExit(main())
