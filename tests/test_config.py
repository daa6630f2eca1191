"""training.config: values that make no sense are refused at load, naming the dotted key; YAML syntax errors name the
file, line and column (training configs, the files they inherit from, model descriptions, ``--set`` values)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from training.config import VALUE_RULES, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_stage1.yaml"

# (override, dotted key the message must name)
BAD_VALUES = [
    ("stage=3", "stage"),
    ("seed=-1", "seed"),
    ("output_dir=''", "output_dir"),
    ("model.config=''", "model.config"),
    ("data.root=''", "data.root"),
    ("data.num_frames=8", "data.num_frames"),
    ("data.num_frames=-3", "data.num_frames"),
    ("data.window_stride=0", "data.window_stride"),
    ("data.resolution=70", "data.resolution"),
    ("data.resolution=0", "data.resolution"),
    ("data.windows_per_clip=0", "data.windows_per_clip"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.user_video_size=20", "data.user_video_size"),
    ("data.max_history_frames=4", "data.max_history_frames"),
    ("data.max_sequence_length=0", "data.max_sequence_length"),
    ("lora.rank=0", "lora.rank"),
    ("lora.alpha=-4", "lora.alpha"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("lora.target_modules=''", "lora.target_modules"),
    ("lora.target_modules='(blocks'", "lora.target_modules"),
    ("lora.trainable_modules='audio_proj['", "lora.trainable_modules"),
    ("optim.lora_lr=-1e-4", "optim.lora_lr"),
    ("optim.lora_lr=0", "optim.lora_lr"),
    ("optim.base_lr=-2e-5", "optim.base_lr"),
    ("optim.base_lr=.inf", "optim.base_lr"),
    ("optim.lora_lr=.nan", "optim.lora_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=[0.9, 1.5]", "optim.betas[1]"),
    ("optim.betas=[-0.1, 0.999]", "optim.betas[0]"),
    ("optim.eps=0", "optim.eps"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("optim.lr_warmup_steps=-5", "optim.lr_warmup_steps"),
    ("loss.logit_mean=.inf", "loss.logit_mean"),
    ("loss.logit_std=0", "loss.logit_std"),
    ("loss.shift=-1", "loss.shift"),
    ("loss.pixel_weight=-0.1", "loss.pixel_weight"),
    ("loss.pixel_latent_frames=0", "loss.pixel_latent_frames"),
    ("loss.pixel_loss_type=huber", "loss.pixel_loss_type"),
    ("loss.lip_flow_weight=0.5", "loss.lip_flow_weight"),
    ("loss.align_weight=-1", "loss.align_weight"),
    ("loss.align_blocks=0", "loss.align_blocks"),
    ("loss.align_distance=l2", "loss.align_distance"),
    ("loss.speech_weight_floor=1.5", "loss.speech_weight_floor"),
    ("loss.motion_prob=1.5", "loss.motion_prob"),
    ("loss.motion_prob=-0.1", "loss.motion_prob"),
    ("loss.motion_latent_frames=0", "loss.motion_latent_frames"),
    ("loss.motion_noise=-0.1", "loss.motion_noise"),
    ("loss.motion_noise=1.5", "loss.motion_noise"),
    ("loss.motion_blur=-1", "loss.motion_blur"),
    ("loss.motion_latent_frames=3", "loss.motion_latent_frames"),  # 9 motion frames of a 9-frame chunk
    ("loss.audio_drop_prob=2", "loss.audio_drop_prob"),
    ("loss.user_drop_prob=-0.5", "loss.user_drop_prob"),
    ("train.max_train_steps=0", "train.max_train_steps"),
    ("train.max_train_steps=-10", "train.max_train_steps"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps"),
    ("train.checkpointing_steps=-1", "train.checkpointing_steps"),
    ("train.checkpoints_total_limit=0", "train.checkpoints_total_limit"),
    ("train.checkpoints_total_limit=-2", "train.checkpoints_total_limit"),
    ("train.resume_from_checkpoint=''", "train.resume_from_checkpoint"),
    ("train.validation_steps=-1", "train.validation_steps"),
    ("train.validation_inference_steps=0", "train.validation_inference_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.ema_decay=1.0", "train.ema_decay"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[item[0] for item in BAD_VALUES])
def test_a_value_that_makes_no_sense_is_refused_naming_its_key(override, key):
    with pytest.raises(ValueError, match=re.escape(f"config key {key!r}")):
        load_config(TINY, [override])


def test_every_value_rule_is_exercised():
    """Each key of `VALUE_RULES` has a bad value in the table above (a rule added without a test fails here)."""
    tested = {key for _, key in BAD_VALUES}
    assert set(VALUE_RULES) - tested == set()


@pytest.mark.parametrize(
    "override",
    [
        "optim.max_grad_norm=0",  # no clipping
        "train.checkpointing_steps=0",  # only the final weights
        "train.validation_steps=0",  # no validation renders
        "train.checkpoints_total_limit=null",  # keep all
        "lora.alpha=null",  # the rank
        "loss.shift=null",  # the scheduler's
        "loss.pixel_weight=0",
        "loss.motion_prob=1",
        "optim.lr_warmup_steps=0",
        "data.num_workers=0",
        "train.resume_from_checkpoint=latest",
    ],
)
def test_boundary_values_that_make_sense_are_accepted(override):
    load_config(TINY, [override])


def test_yaml_syntax_error_in_a_training_config_names_the_file_and_line(tmp_path):
    bad = tmp_path / "stage1.yaml"
    bad.write_text("stage: 1\ndata:\n  root: [a, b\n  num_frames: 9\n")
    message = rf"training config '{re.escape(str(bad))}' is not valid YAML: .* line 4, column"
    with pytest.raises(ValueError, match=message):
        load_config(bad)
    # ... also in a file it inherits from through `base:`
    child = tmp_path / "child.yaml"
    child.write_text("base: stage1.yaml\ntrain:\n  max_train_steps: 3\n")
    with pytest.raises(ValueError, match=rf"'{re.escape(str(bad))}' is not valid YAML: .* line 4"):
        load_config(child)
    # A tab where YAML expects spaces: the line and column of the tab.
    tabbed = tmp_path / "tabbed.yaml"
    tabbed.write_text("stage: 1\ntrain:\n\tmax_train_steps: 3\n")
    with pytest.raises(ValueError, match=rf"'{re.escape(str(tabbed))}' is not valid YAML: .*line 3, column 1"):
        load_config(tabbed)
    # A file that is not text at all.
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x9c")
    with pytest.raises(ValueError, match=re.escape(str(binary))):
        load_config(binary)


def test_yaml_syntax_error_in_an_override_names_the_override():
    with pytest.raises(ValueError, match=r"override 'data\.num_frames=\[9': the value '\[9' is not valid YAML"):
        load_config(TINY, ["data.num_frames=[9"])


def test_yaml_syntax_error_in_a_model_description_names_the_file_and_line(tmp_path):
    from echo.components import load_components, load_model_config

    bad = tmp_path / "model.yaml"
    bad.write_text("vae:\n  class: AutoencoderKLWan\n  config: {base_dim: 8\nscheduler: {class: X}\n")
    for load in (load_model_config, load_components):
        message = rf"model config '{re.escape(str(bad))}' is not valid YAML: .* line \d+, column"
        with pytest.raises(ValueError, match=message):
            load(bad)
