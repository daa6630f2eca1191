"""Training behaviour on tiny models and a tiny prepared conversation: two-process DDP, exact resume, stage 2 with
f_ref and HFA, falling losses, the paper's ablations, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import random_generator_inputs
from training.config import load_config
from training.modeling import LORA_DIR, MODULES_FILE
from training.train import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    # The session's base folder is shared by every test module, so the set is prepared once per run.
    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def _run(config: str, data_root: Path, output_dir: Path, *overrides: str) -> dict:
    args = ["--config", str(CONFIGS / config), "--set", f"data.root={data_root}", "--set", f"output_dir={output_dir}"]
    for item in overrides:
        args += ["--set", item]
    return run(args)


def _trained_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {f"lora.{k}": v for k, v in load_file(str(folder / LORA_DIR / "adapter_model.safetensors")).items()}
    state.update({f"modules.{k}": v for k, v in load_file(str(folder / MODULES_FILE)).items()})
    return state


# The learning-rate warm-up spans the resume point (step 10), so a resume must restore the scheduler's state too; LoRA
# dropout draws from the global torch RNG, so it must restore the RNG states too (rng_state_<rank>.safetensors).
FAST = (
    "optim.lora_lr=5e-3",
    "optim.base_lr=5e-3",
    "train.checkpointing_steps=10",
    "optim.lr_warmup_steps=12",
    "lora.dropout=0.1",
)


@pytest.fixture(scope="module")
def stage1_runs(data_root, tmp_path_factory):
    """An uninterrupted 20-step stage-1 run, and one stopped after step 10 then resumed to step 20."""
    base = tmp_path_factory.mktemp("stage1")
    full = _run("tiny_stage1.yaml", data_root, base / "full", "train.max_train_steps=20", *FAST)
    first = _run("tiny_stage1.yaml", data_root, base / "split", "train.max_train_steps=10", *FAST)
    resumed = _run(
        "tiny_stage1.yaml",
        data_root,
        base / "split",
        "train.max_train_steps=20",
        "train.resume_from_checkpoint=latest",
        *FAST,
    )
    return {"base": base, "full": full, "first": first, "resumed": resumed}


def test_resume_matches_an_uninterrupted_run(stage1_runs):
    full, first, resumed = stage1_runs["full"], stage1_runs["first"], stage1_runs["resumed"]
    assert [h["step"] for h in resumed["history"]] == list(range(11, 21))
    losses_full = torch.tensor([h["loss"] for h in full["history"]])
    losses_split = torch.tensor([h["loss"] for h in first["history"] + resumed["history"]])
    torch.testing.assert_close(losses_split, losses_full, rtol=1e-5, atol=1e-6)
    a = _trained_state(stage1_runs["base"] / "full" / "final")
    b = _trained_state(stage1_runs["base"] / "split" / "final")
    assert a.keys() == b.keys() and any(k.startswith("modules.audio_proj") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # The saved adapter is exactly PEFT's state dict of the trained model.
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(full["models"].module.transformer, adapter_name="stage1")
    saved = load_file(str(stage1_runs["base"] / "full" / "final" / LORA_DIR / "adapter_model.safetensors"))
    assert saved.keys() == peft_state.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], peft_state[key], rtol=0, atol=0)
    # The step-10 checkpoint holds the adapter in PEFT format and the new modules in safetensors.
    checkpoint = stage1_runs["base"] / "split" / "checkpoint-10"
    config = json.loads((checkpoint / LORA_DIR / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert not list((stage1_runs["base"] / "split").glob(".checkpoint-*"))  # no temporary folder is left behind


def test_training_time_is_saved_with_checkpoints_and_survives_a_resume(stage1_runs, tmp_path):
    """``train_seconds`` (what a learning curve plots against) adds up over the runs that led to a checkpoint."""
    from training.train import TrainingProgress

    def seconds(run: str, step: int) -> float:
        path = stage1_runs["base"] / run / f"checkpoint-{step}" / "training_state.json"
        return json.loads(path.read_text())["train_seconds"]

    assert 0 < seconds("split", 10) < seconds("split", 20)
    TrainingProgress(global_step=3, micro_step=3, train_seconds=12.5).save(tmp_path)
    loaded = TrainingProgress()
    loaded.load(tmp_path)
    assert loaded == TrainingProgress(global_step=3, micro_step=3, train_seconds=12.5)
    (tmp_path / "training_state.json").write_text('{"global_step": 3, "micro_step": 3}')  # written before the field
    loaded.load(tmp_path)
    assert loaded.train_seconds == 0.0


def test_checkpoints_total_limit_prunes_old_checkpoints(stage1_runs):
    # checkpoints_total_limit = 2 with a save every 2 steps (tiny config) or 10 steps (here): the newest two remain.
    steps = sorted(int(p.name.split("-")[1]) for p in (stage1_runs["base"] / "full").glob("checkpoint-*"))
    assert steps == [10, 20]


def test_settings_are_saved_with_every_checkpoint_and_the_final_weights(stage1_runs):
    """echo_settings.json (the settings the pipeline and echo-render read) is written into every checkpoint and into
    final/, from the run's config: resolution, chunk length, motion frames, text length, emotion switch."""
    from echo.settings import EchoSettings
    from training.config import settings_from_config

    config = load_config(CONFIGS / "tiny_stage1.yaml")
    expected = settings_from_config(config)
    assert (expected.resolution, expected.num_frames_per_chunk, expected.motion_frames) == (64, 9, 1)
    assert expected.use_emotion is False and expected.max_sequence_length == config.data.max_sequence_length
    run_dir = stage1_runs["base"] / "full"
    folders = [run_dir / "final", *sorted(run_dir.glob("checkpoint-*"))]
    assert len(folders) == 3
    for folder in folders:
        assert EchoSettings.load(folder) == expected, folder
    # Continuation chunks share 4·(m − 1) + 1 frames for m motion latent frames; a bad value names its config key.
    longer = load_config(CONFIGS / "tiny_stage1.yaml", ["loss.motion_latent_frames=2", "data.user_video_size=32"])
    assert settings_from_config(longer).motion_frames == 5 and settings_from_config(longer).user_video_size == 32
    with pytest.raises(ValueError, match="loss.motion_latent_frames"):
        settings_from_config(load_config(CONFIGS / "tiny_stage1.yaml", ["loss.motion_latent_frames=3"]))


def test_stage2_refuses_a_stage1_output_of_another_size_or_chunk_length(stage1_runs, data_root, tmp_path):
    stage1_dir = stage1_runs["base"] / "full"
    common = (f"model.stage1_dir={stage1_dir}", "train.max_train_steps=1", "train.checkpointing_steps=0")
    with pytest.raises(ValueError, match=r"resolution = 64 .*echo_settings\.json.*data\.resolution = 32"):
        _run("tiny_stage2.yaml", data_root, tmp_path / "a", *common, "data.resolution=32")
    with pytest.raises(ValueError, match=r"num_frames_per_chunk = 9 .*data\.num_frames = 17"):
        _run("tiny_stage2.yaml", data_root, tmp_path / "b", *common, "data.num_frames=17")


class _PlantedPickle:
    """Unpickling this writes a marker file: what a crafted file in a checkpoint folder could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_resume_loads_nothing_that_can_run_code(stage1_runs, data_root, tmp_path):
    """A checkpoint holds no pickle; a pickle planted in one (accelerate's custom-state or RNG file names) makes
    the resume refuse, naming it, without unpickling it; a crafted optimizer.bin is refused, naming it, before
    anything is loaded. Exact resume itself is `test_resume_matches_an_uninterrupted_run`."""
    import pickle
    import shutil

    checkpoint = stage1_runs["base"] / "split" / "checkpoint-10"
    assert not [p.name for p in checkpoint.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert json.loads((checkpoint / "training_state.json").read_text())["global_step"] == 10
    assert (checkpoint / "rng_state_0.safetensors").is_file()
    resume = ("train.max_train_steps=12", "train.resume_from_checkpoint=latest", *FAST)
    marker = tmp_path / "marker"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        out = tmp_path / name
        shutil.copytree(checkpoint, out / "checkpoint-10")
        (out / "checkpoint-10" / name).write_bytes(pickle.dumps(_PlantedPickle(marker), protocol=2))
        with pytest.raises(ValueError, match=f"holds pickle files.*{name}"):
            _run("tiny_stage1.yaml", data_root, out, *resume)
        assert not marker.exists()
    # A crafted optimizer.bin is refused, even when the list of files was rewritten to match: a bare pickle is not a
    # torch.save archive, and an archive holding an object is refused by the weights-only loader.
    from training.train import write_manifest

    refusals = {"pickle": "is not a torch.save archive", "torch": "was refused by torch's weights-only loader"}
    for kind, expected in refusals.items():
        out = tmp_path / f"optimizer_{kind}"
        shutil.copytree(checkpoint, out / "checkpoint-10")
        planted = out / "checkpoint-10" / "optimizer.bin"
        if kind == "pickle":
            planted.write_bytes(pickle.dumps(_PlantedPickle(marker), protocol=2))
        else:
            torch.save({"state": _PlantedPickle(marker), "param_groups": []}, planted)
        write_manifest(out / "checkpoint-10")
        with pytest.raises(ValueError, match=r"checkpoint-10/optimizer\.bin' " + expected):
            _run("tiny_stage1.yaml", data_root, out, *resume)
        assert not marker.exists()


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":  # one byte in the middle: same size, a valid header
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"not a checkpoint file" * 8)


@pytest.mark.parametrize(
    "name, how, manifest, reason",
    [
        ("optimizer.bin", "truncate", True, "has \\d+ bytes, \\d+ when it was saved"),
        ("optimizer.bin", "flip", True, "does not match the SHA-256"),
        ("optimizer.bin", "flip", False, "fails its CRC check"),
        ("scheduler.bin", "garbage", False, "is not a torch.save archive"),
        ("transformer_modules.safetensors", "truncate", False, "is not a readable safetensors file"),
        ("transformer_lora/adapter_model.safetensors", "flip", True, "does not match the SHA-256"),
        ("transformer_lora/adapter_model.safetensors", "garbage", False, "is not a readable safetensors file"),
        ("rng_state_0.safetensors", "truncate", True, "has \\d+ bytes"),
        ("model.safetensors", "garbage", True, "is not a readable safetensors file"),  # a file the manifest omits
        ("training_state.json", "garbage", False, "is not valid JSON"),
    ],
)
def test_a_corrupt_checkpoint_file_is_named(stage1_runs, tmp_path, name, how, manifest, reason):
    """Every checkpoint lists its files' sizes and SHA-256; resume verifies them and the form of every file it reads
    before loading anything, and names the corrupt file (checkpoints without the list: the form only)."""
    import shutil

    from training.train import MANIFEST_FILE, CheckpointError, resolve_resume

    checkpoint = stage1_runs["base"] / "split" / "checkpoint-10"
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    expected = {"optimizer.bin", "scheduler.bin", "training_state.json", f"{LORA_DIR}/adapter_model.safetensors"}
    assert expected <= set(listed)
    assert all(len(entry["sha256"]) == 64 for entry in listed.values())
    copy = tmp_path / "run" / "checkpoint-10"
    shutil.copytree(checkpoint, copy)
    if not manifest:
        (copy / MANIFEST_FILE).unlink()
    target = copy / name
    if not target.exists():
        target.write_bytes(b"")
    _corrupt(target, how)
    with pytest.raises(CheckpointError, match=re.escape(str(target)) + "'.* " + reason):
        resolve_resume(tmp_path / "run", "checkpoint-10")  # a checkpoint-N of output_dir
    with pytest.raises(CheckpointError, match=re.escape(str(target))):
        resolve_resume(tmp_path / "elsewhere", str(copy))  # a path


def test_resume_latest_falls_back_to_the_previous_complete_checkpoint(stage1_runs, data_root, tmp_path, caplog):
    """A corrupt newest checkpoint: `--resume latest` warns, naming it and why, and resumes exactly from the one
    before; `--resume checkpoint-N` naming the corrupt one is an error; when none verifies, an error names them all."""
    import logging
    import shutil

    from training.train import CheckpointError

    out = tmp_path / "run"
    shutil.copytree(stage1_runs["base"] / "full", out)
    _corrupt(out / "checkpoint-20" / "optimizer.bin", "truncate")
    with caplog.at_level(logging.WARNING, logger="training.train"):
        resumed = _run(
            "tiny_stage1.yaml", data_root, out, "train.max_train_steps=12", "train.resume_from_checkpoint=latest", *FAST
        )
    assert [h["step"] for h in resumed["history"]] == [11, 12]
    expected = torch.tensor([h["loss"] for h in stage1_runs["full"]["history"][10:12]])
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed["history"]]), expected, rtol=1e-5, atol=1e-6)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert re.search(r"skipping .*checkpoint-20.*optimizer\.bin' has \d+ bytes", warning), warning
    assert re.search(r"resuming from .*checkpoint-10", warning), warning
    # An explicit checkpoint is never replaced by another one.
    longer = "train.max_train_steps=22"
    with pytest.raises(CheckpointError, match=r"checkpoint-20/optimizer\.bin"):
        _run("tiny_stage1.yaml", data_root, out, longer, "train.resume_from_checkpoint=checkpoint-20")
    _corrupt(out / "checkpoint-10" / "scheduler.bin", "garbage")
    with pytest.raises(CheckpointError, match=r"no checkpoint .* verifies: checkpoint-20: .*; checkpoint-10: .*sched"):
        _run("tiny_stage1.yaml", data_root, out, longer, "train.resume_from_checkpoint=latest")


def test_a_corrupt_trained_state_is_named_when_loaded(tmp_path):
    """Stage 2 and echo-export read a stage output's safetensors through `read_safetensors`: a corrupt file is named."""
    from training.modeling import load_fused, read_safetensors

    bad = tmp_path / MODULES_FILE
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + "' is not a readable safetensors file"):
        read_safetensors(bad)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_fused(torch.nn.Linear(2, 2), tmp_path, "stage1")


def test_rerun_into_an_earlier_run_refuses_unless_resumed_or_overwritten(data_root, tmp_path):
    out = tmp_path / "out"
    first = ("train.max_train_steps=2", "train.checkpointing_steps=2")
    _run("tiny_stage1.yaml", data_root, out, *first)
    adapter = out / "final" / LORA_DIR / "adapter_model.safetensors"
    before = adapter.read_bytes()
    with pytest.raises(
        FileExistsError, match=r"checkpoint-2/, final/.*--resume latest.*new output folder.*--overwrite"
    ):
        _run("tiny_stage1.yaml", data_root, out, "train.max_train_steps=1", "train.checkpointing_steps=0")
    assert adapter.read_bytes() == before and (out / "checkpoint-2").is_dir()  # nothing of the earlier run was touched
    # --overwrite deletes the earlier run's checkpoints and final weights first.
    args = [
        "--config",
        str(CONFIGS / "tiny_stage1.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        f"output_dir={out}",
    ]
    result = run([*args, "--set", "train.max_train_steps=1", "--set", "train.checkpointing_steps=0", "--overwrite"])
    assert result["global_step"] == 1 and not (out / "checkpoint-2").exists() and adapter.read_bytes() != before
    # A folder with final/ but no checkpoint cannot be resumed either: `--resume latest` would start over.
    with pytest.raises(FileExistsError, match="needs a checkpoint-N"):
        run([*args, "--resume", "latest"])


def _tiny_generator_with_adapter(alpha: int = 8):
    """The tiny generator with a stage-1 adapter (rank 4, scale alpha / 4) whose weights are random."""
    from echo.components import load_components
    from training.modeling import add_lora

    config = load_config(CONFIGS / "tiny_stage1.yaml", [f"lora.alpha={alpha}"])
    transformer = load_components(str(ROOT / config.model.config), only=["transformer"])["transformer"].eval()
    add_lora(transformer, config, "stage1")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for p in transformer.parameters() if p.requires_grad):  # LoRA and the new modules
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return transformer


def test_fused_adapter_computes_what_the_active_adapter_computes():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from training.modeling import fuse_adapter

    transformer = _tiny_generator_with_adapter()
    inputs = random_generator_inputs(transformer, with_context=False)
    with torch.no_grad():
        active = transformer(**inputs).sample
        transformer.disable_adapters()
        base = transformer(**inputs).sample
        transformer.enable_adapters()
    assert (active - base).abs().max() > 1e-3  # the adapter changes the output
    fuse_adapter(transformer, "stage1")
    assert not any(isinstance(m, BaseTunerLayer) for m in transformer.modules()) and not hasattr(
        transformer, "peft_config"
    )
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs).sample, active, rtol=1e-5, atol=1e-5)


def test_saved_adapter_loads_back_into_a_fresh_generator(tmp_path):
    """The PEFT folder written by `save_adapter` reproduces the adapted outputs through `load_adapter`, and through
    diffusers' `load_lora_adapter` alone (the scale alpha / r = 2 comes from the file's header); a PEFT folder
    without that header loads by its adapter_config.json; a file whose weights match no layer is refused, naming it."""
    from echo.components import load_components
    from training.modeling import load_adapter, load_module_state, save_adapter, trainable_module_state

    transformer = _tiny_generator_with_adapter(alpha=8)
    inputs = random_generator_inputs(transformer, with_context=False)
    with torch.no_grad():
        expected = transformer(**inputs).sample
    save_adapter(tmp_path / "adapter", transformer, "stage1")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 8

    pattern = load_config(CONFIGS / "tiny_stage1.yaml").lora.trainable_modules

    def fresh():  # the same base weights and trained new modules, no adapter
        model = load_components(str(ROOT / "configs/models/tiny.yaml"), only=["transformer"])["transformer"].eval()
        load_module_state(model, trainable_module_state(transformer, pattern), "trained modules")
        return model

    loaded = fresh()
    load_adapter(loaded, tmp_path / "adapter", "stage1")
    by_diffusers = fresh()
    by_diffusers.load_lora_adapter(
        str(tmp_path / "adapter"), prefix=None, weight_name="adapter_model.safetensors", adapter_name="stage1"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, expected, rtol=0, atol=0)
        torch.testing.assert_close(by_diffusers(**inputs).sample, expected, rtol=0, atol=0)
    # A PEFT folder as peft itself writes it (no diffusers header in the weights file) loads by its adapter_config.json.
    from safetensors.torch import save_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    save_file(weights, str(tmp_path / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    plain = fresh()
    load_adapter(plain, tmp_path / "adapter", "stage1")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, expected, rtol=0, atol=0)
    weights["blocks.0.nowhere.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*blocks\.0\.nowhere"):
        load_adapter(fresh(), tmp_path / "adapter", "other")


def test_stage1_loss_falls(stage1_runs):
    losses = [h["loss"] for h in stage1_runs["full"]["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert all("pixel" in h and h["pixel"] > 0 for h in stage1_runs["full"]["history"])
    # The optimised total is L_flow + λ·L_pixel (λ = 0.1 in the tiny config).
    for h in stage1_runs["full"]["history"]:
        assert h["loss"] == pytest.approx(h["flow"] + 0.1 * h["pixel"], rel=1e-5), h


@pytest.fixture(scope="module")
def stage2_run(stage1_runs, data_root):
    stage1_dir = stage1_runs["base"] / "full"
    result = _run(
        "tiny_stage2.yaml",
        data_root,
        stage1_runs["base"] / "stage2",
        f"model.stage1_dir={stage1_dir}",
        "train.max_train_steps=10",
        "train.checkpointing_steps=0",
        "optim.lora_lr=5e-3",
        "optim.base_lr=5e-3",
        "train.overfit_one_batch=true",
        "train.validation_steps=10",
        "train.validation_inference_steps=2",
    )
    return result, stage1_dir


def test_stage2_f_ref_is_the_frozen_stage1_model(stage2_run):
    from echo.components import load_components, load_model_config
    from training.modeling import _apply_ablation, load_stage1_into

    result, stage1_dir = stage2_run
    models = result["models"]
    config = load_config(CONFIGS / "tiny_stage2.yaml")
    description = _apply_ablation(load_model_config(ROOT / config.model.config), config)
    fresh = load_components(description, only=["transformer"])["transformer"]
    load_stage1_into(fresh, stage1_dir)
    ref_state = models.ref_transformer.state_dict()
    assert ref_state.keys() == fresh.state_dict().keys()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(ref_state[key], value, rtol=0, atol=0, msg=key)  # f_ref never changed
    assert not any(p.requires_grad for p in models.ref_transformer.parameters())
    # ... while the adapted generator and the LCU did change.
    adapted = models.module.transformer
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B.stage2" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert all(".attn2." in n for n, _ in adapted.named_parameters() if "lora_A.stage2" in n)
    # The LCU and the SDCM are trained in stage 2: they moved away from their initial (stage-1) values.
    initial_lcu = load_components(description, only=["context_encoder"])["context_encoder"].state_dict()
    trained_lcu = models.module.context_encoder.state_dict()
    assert any(not torch.equal(trained_lcu[k], v) for k, v in initial_lcu.items())
    sdcm = {n: p for n, p in adapted.named_parameters() if ".sdcm." in n}
    assert sdcm and all(p.requires_grad for p in sdcm.values())
    assert any(not torch.equal(p, ref_state[n]) for n, p in sdcm.items() if n in ref_state)
    # The LCU is saved in diffusers format and loads back with `from_pretrained`.
    from echo.lcu import LongRangeContextEncoder

    output = stage2_run[1].parent / "stage2" / "final" / "context_encoder"
    loaded = LongRangeContextEncoder.from_pretrained(output)
    for key, value in models.module.context_encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_stage2_align_is_zero_while_the_model_equals_f_ref_then_grows(stage2_run):
    history = stage2_run[0]["history"]
    # Step 1 runs before any update: LoRA B = 0 and the SDCM user stream is zero-initialised, so the adapted model
    # equals f_ref, and the features differ only through the text: f_ref reads the empty prompt (stage 1's input,
    # `training.step.stage1_prompt_embeds`), the adapted model the window's emotion text (the tiny set always has one).
    assert history[0]["align"] > 0.0
    assert max(h["align"] for h in history[1:]) > 0.0


def test_stage2_validation_render_is_written(stage2_run, stage1_runs):
    from pipelines.video_io import probe_mp4

    info = probe_mp4(stage1_runs["base"] / "stage2" / "validation" / "step-10.mp4")
    assert info["num_frames"] == 9 and info["width"] == 64 and info.get("audio_seconds", 0) > 0, info


def test_stage2_loss_falls_when_overfitting_one_batch(stage2_run):
    losses = [h["loss"] for h in stage2_run[0]["history"]]
    assert losses[-1] < min(losses[:3]) - 0.02, losses
    assert all(b < a for a, b in zip(losses[-4:], losses[-3:])), losses  # steadily falling at the end
    # The optimised total is L_flow + γ·L_align (γ = 1 in the tiny config).
    for h in stage2_run[0]["history"]:
        assert h["loss"] == pytest.approx(h["flow"] + 1.0 * h["align"], rel=1e-5), h


def test_stage2_align_weights_come_from_the_avatar_speech(stage1_runs, data_root, tmp_path, monkeypatch):
    """Eq. 12 in the training step: the frame weights given to L_align are w(i) of the batch's avatar RMS (grouped
    to latent frames), not uniform weights."""
    import training.step as step_module
    import training.train as train_module
    from echo.losses import latent_frame_weights, speech_weights

    batches, weights = [], []
    original_step, original_hfa = train_module.training_step, step_module.hfa_loss

    def spy_step(models, module, batch, *args, **kwargs):
        batches.append(batch)
        return original_step(models, module, batch, *args, **kwargs)

    def spy_hfa(features, ref_features, frame_weights, *args, **kwargs):
        weights.append(frame_weights.detach().clone())
        return original_hfa(features, ref_features, frame_weights, *args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", spy_step)
    monkeypatch.setattr(step_module, "hfa_loss", spy_hfa)
    _run(
        "tiny_stage2.yaml",
        data_root,
        tmp_path / "out",
        f"model.stage1_dir={stage1_runs['base'] / 'full'}",
        "train.max_train_steps=2",
        "train.checkpointing_steps=0",
    )
    assert len(batches) == len(weights) == 2
    floor = load_config(CONFIGS / "tiny_stage2.yaml", ["model.stage1_dir=x"]).loss.speech_weight_floor
    for batch, given in zip(batches, weights):
        expected = latent_frame_weights(speech_weights(batch["avatar_rms"], floor))
        torch.testing.assert_close(given, expected)
    assert any(w.max() - w.min() > 0.1 for w in weights), weights  # the windows hold speech and quieter frames


@pytest.mark.parametrize(
    "config, removed, switch",
    [
        ("tiny_stage2_wo_lpe.yaml", "context_encoder.video_proj", "use_visual"),
        ("tiny_stage2_wo_hbcu.yaml", "context_encoder.f_align", "use_understanding"),
        ("tiny_stage2_wo_lau.yaml", None, "use_emotion"),
    ],
)
def test_stage2_ablations_train_from_their_configs(config, removed, switch, stage1_runs, data_root, tmp_path):
    result = _run(
        config,
        data_root,
        tmp_path / "out",
        f"model.stage1_dir={stage1_runs['base'] / 'full'}",
        "train.max_train_steps=1",
        "train.checkpointing_steps=0",
    )
    assert result["global_step"] == 1 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    names = [n for n, _ in result["models"].module.named_parameters()]
    if removed is not None:
        assert not any(n.startswith(removed) for n in names)  # the module is removed, not zeroed
    else:
        assert set(result["prompt_encoder"].cache) == {""}  # w/o LAU: only the empty prompt reaches the generator
    assert (tmp_path / "out" / "final" / "context_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    # The switch is saved with the LCU, so the pipeline built from this output runs the same ablation.
    saved = json.loads((tmp_path / "out" / "final" / "context_encoder" / "config.json").read_text())
    assert saved[switch] is False and result["models"].module.context_encoder.config[switch] is False


def test_wo_sdcm_ablation_trains_both_stages(data_root, tmp_path):
    from echo.transformer_echo import EchoDirectFusion

    first = _run(
        "tiny_stage1_wo_sdcm.yaml", data_root, tmp_path / "s1", "train.max_train_steps=1", "train.checkpointing_steps=0"
    )
    assert isinstance(first["models"].module.transformer.blocks[0].sdcm, EchoDirectFusion)
    second = _run(
        "tiny_stage2_wo_sdcm.yaml",
        data_root,
        tmp_path / "s2",
        f"model.stage1_dir={tmp_path / 's1'}",
        "train.max_train_steps=1",
        "train.checkpointing_steps=0",
    )
    assert isinstance(second["models"].ref_transformer.blocks[0].sdcm, EchoDirectFusion)
    assert second["global_step"] == 1 and torch.isfinite(torch.tensor(second["history"][0]["loss"]))
    # w/o SDCM the user context shares the audio cross-attention trained in stage 1, so the adapted model differs
    # from f_ref (which sees the stage-1 inputs, without user context) from the first step on.
    assert second["history"][0]["align"] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_run_keeps_ranks_identical(data_root, tmp_path):
    """`accelerate launch` with two CPU processes (gloo): both ranks end with the same parameters."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "training.train",
        "--config",
        str(CONFIGS / "tiny_stage1.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        f"output_dir={out}",
        "--set",
        "train.max_train_steps=2",
        "--set",
        "train.checkpointing_steps=2",
        "--set",
        "train.dump_trainable_params=true",
    ]
    command[command.index("--main_process_port") : command.index("--main_process_port")] = [
        "--num_cpu_threads_per_process",
        "1",
    ]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # The checkpoint holds each rank's RNG states as safetensors and no pickle.
    checkpoint = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert "rng_state_0.safetensors" in checkpoint and "rng_state_1.safetensors" in checkpoint
    assert not [name for name in checkpoint if name.endswith(".pkl")], checkpoint
    summaries = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["num_processes"] for s in summaries] == [2, 2]
    assert all(s["distributed_type"] == "DistributedType.MULTI_CPU" for s in summaries)  # one gloo group
    assert [s["process_index"] for s in summaries] == [0, 1]
    # The ranks read different shards of the data (batch r of each step) ...
    assert summaries[0]["clip_ids"] != summaries[1]["clip_ids"]
    # ... and computed different losses, yet hold identical parameters after the synchronised updates.
    assert summaries[0]["history"][0]["loss"] != summaries[1]["history"][0]["loss"]
    params = [load_file(str(out / "ranks" / f"rank{r}.safetensors")) for r in (0, 1)]
    assert params[0].keys() == params[1].keys() and len(params[0]) > 0
    initial_b = [k for k in params[0] if "lora_B" in k]
    assert any(params[0][k].abs().sum() > 0 for k in initial_b)  # training moved the weights
    for key in params[0]:
        torch.testing.assert_close(params[0][key], params[1][key], rtol=0, atol=0, msg=key)


def test_missing_clip_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(
            [
                "--config",
                str(CONFIGS / "tiny_stage1.yaml"),
                "--set",
                f"data.root={missing}",
                "--set",
                f"output_dir={tmp_path}",
            ]
        )


def test_clip_shorter_than_the_window_is_named(data_root, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames = 21.*conv0000_A_c0000.*has 17"):
        _run("tiny_stage1.yaml", data_root, tmp_path, "data.num_frames=21")


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'optim.lora_lrr'"):
        run(["--config", str(CONFIGS / "tiny_stage1.yaml"), "--set", "optim.lora_lrr=1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIGS / "tiny_stage1.yaml") + "\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'train.max_steps'"):
        load_config(bad)
    with pytest.raises(ValueError, match="'data.num_frames' must be an integer"):
        load_config(CONFIGS / "tiny_stage1.yaml", ["data.num_frames=8.5"])
    with pytest.raises(ValueError, match="'model.stage1_dir' is required"):
        load_config(CONFIGS / "tiny_stage2.yaml", ["model.stage1_dir=null"])


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*stage*.yaml")):  # demo_vae.yaml / demo_recipe.yaml are other schemas
        config = load_config(path)
        assert config.stage in (1, 2), path
    real = load_config(CONFIGS / "stage1.yaml")
    assert (real.lora.rank, real.optim.lora_lr, real.optim.base_lr) == (128, 1e-4, 2e-5)
    switches = {p.name: load_config(p).ablation for p in CONFIGS.glob("stage2_wo_*.yaml")}
    assert not switches["stage2_wo_lpe.yaml"].use_visual and not switches["stage2_wo_hbcu.yaml"].use_understanding
    assert not switches["stage2_wo_lau.yaml"].use_emotion and not switches["stage2_wo_sdcm.yaml"].use_sdcm


def test_gradient_checkpointing_matches_and_accumulation_counts_optimizer_steps(data_root, tmp_path):
    common = ("train.max_train_steps=2", "train.checkpointing_steps=0")
    plain = _run("tiny_stage1.yaml", data_root, tmp_path / "plain", *common)
    recomputed = _run(
        "tiny_stage1.yaml",
        data_root,
        tmp_path / "gc",
        *common,
        "train.gradient_checkpointing=true",
        "train.report_to=tensorboard",
    )
    assert recomputed["models"].module.transformer.gradient_checkpointing
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in recomputed["history"]]), torch.tensor([h["loss"] for h in plain["history"]])
    )
    assert list((tmp_path / "gc" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard through accelerate
    accumulated = _run(
        "tiny_stage1.yaml",
        data_root,
        tmp_path / "ga",
        *common,
        "train.gradient_accumulation_steps=2",
        "train.dump_trainable_params=true",
    )
    summary = json.loads((tmp_path / "ga" / "ranks" / "rank0.json").read_text())
    assert accumulated["global_step"] == 2 and len(summary["clip_ids"]) == 4  # two micro-batches per update
    assert accumulated["history"][0]["loss"] != plain["history"][0]["loss"]  # the mean over two micro-batches


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")  # one process here
@pytest.mark.parametrize("stage", [1, 2])
def test_fsdp_wrap_policy_separates_frozen_and_trainable_weights(tmp_path, stage, stage1_runs):
    """FSDP-1 with `use_orig_params=False` (configs/accelerate/fsdp.yaml) needs uniformly trainable flat parameters
    (and no 0-dim parameters, which it cannot flatten: stage 2 holds the LCU's gates α and β)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from training.modeling import build_training_models, fsdp_auto_wrap_policy

    overrides = [f"model.stage1_dir={stage1_runs['base'] / 'full'}"] if stage == 2 else []
    config = load_config(CONFIGS / f"tiny_stage{stage}.yaml", overrides)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="uniform `requires_grad`"):
            FSDP(build_training_models(config).module, use_orig_params=False, device_id=torch.device("cpu"))
        module = build_training_models(config).module
        wrapped = FSDP(
            module, auto_wrap_policy=fsdp_auto_wrap_policy(module), use_orig_params=False, device_id=torch.device("cpu")
        )
        flat = [p for p in wrapped.parameters()]
        assert any(p.requires_grad for p in flat) and any(not p.requires_grad for p in flat)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("audio_drop_prob, changes", [(1.0, False), (0.0, True)])
def test_audio_dropout_removes_the_audio_stream_from_the_update(data_root, tmp_path, audio_drop_prob, changes):
    """Condition dropout for audio guidance: with every sample's audio dropped the audio projection gets exactly zero
    gradient (its weights stay at their initial values without weight decay); without dropout it learns."""
    from accelerate.utils import set_seed

    from training.modeling import build_training_models

    overrides = ("train.max_train_steps=2", "optim.weight_decay=0", "optim.base_lr=1e-2", "optim.lr_warmup_steps=0")
    result = _run(
        "tiny_stage1.yaml", data_root, tmp_path / "run", *overrides, f"loss.audio_drop_prob={audio_drop_prob}"
    )
    config = load_config(CONFIGS / "tiny_stage1.yaml", [f"data.root={data_root}", *overrides])
    set_seed(config.seed)
    initial = build_training_models(config).module.transformer.audio_proj.state_dict()
    trained = result["models"].module.transformer.audio_proj.state_dict()
    differs = [k for k, v in trained.items() if not torch.equal(v, initial[k])]
    assert bool(differs) == changes, differs


def test_lora_and_new_modules_get_their_own_learning_rates(data_root):
    """AdamW groups (Sec. 3.3): every LoRA weight at `optim.lora_lr`, every other trainable weight (the new modules)
    at `optim.base_lr`; the frozen base generator is in no group."""
    from training.modeling import build_training_models, parameter_groups

    config = load_config(
        CONFIGS / "tiny_stage1.yaml", [f"data.root={data_root}", "optim.lora_lr=3e-4", "optim.base_lr=2e-5"]
    )
    module = build_training_models(config).module
    groups = {g["name"]: g for g in parameter_groups(module, config)}
    assert (groups["lora"]["lr"], groups["modules"]["lr"]) == (3e-4, 2e-5)
    names = {id(p): n for n, p in module.named_parameters()}
    lora = {names[id(p)] for p in groups["lora"]["params"]}
    modules = {names[id(p)] for p in groups["modules"]["params"]}
    assert lora and all("lora_" in n for n in lora)
    assert modules and not any("lora_" in n for n in modules) and any(".audio_proj." in f".{n}" for n in modules)
    assert lora | modules == {n for n, p in module.named_parameters() if p.requires_grad}
    frozen_base = [p for n, p in module.named_parameters() if n.endswith("attn1.to_q.base_layer.weight")]
    assert frozen_base and not any(p.requires_grad for p in frozen_base)


@pytest.mark.parametrize("lip_flow_weight", [1.0, 10.0])
def test_stage1_step_feeds_the_batch_and_regresses_the_flow_velocity(data_root, tmp_path, monkeypatch, lip_flow_weight):
    """One stage-1 step seen from the generator's inputs: the condition holds the VAE latent of the batch's reference
    frame at latent frame 0 (mask channels 1 there, 0 elsewhere) and in every frame's reference plane, the audio
    windows and token masks are the batch's, the noisy input is (1 − σ)·x0 + ε·σ of the batch video's latents, and
    L_flow is the MSE to v = ε − x0; with ``loss.lip_flow_weight`` the squared errors of the latents under the batch's
    lip tokens (each token's 2x2 latent patch) count that many times in the mean."""
    import training.train as train_module
    from echo.encoding import normalize_latents

    seen = []
    original_step = train_module.training_step

    def spy_step(models, module, batch, *args, **kwargs):
        def capture(mod, inputs, kwargs_, output):
            seen.append({"inputs": [t.detach().clone() for t in inputs[:7]], "prediction": output.sample.detach()})

        handle = module.register_forward_hook(capture, with_kwargs=True)
        try:
            terms = original_step(models, module, batch, *args, **kwargs)
        finally:
            handle.remove()
        seen[-1].update(batch=batch, vae=models.vae, flow=float(terms["flow"]))
        return terms

    monkeypatch.setattr(train_module, "training_step", spy_step)
    _run(
        "tiny_stage1.yaml",
        data_root,
        tmp_path / "out",
        "train.max_train_steps=1",
        "train.checkpointing_steps=0",
        f"loss.lip_flow_weight={lip_flow_weight}",
    )
    (record,) = seen
    noisy, timestep, _, condition, audio, lip, face = record["inputs"]
    batch, vae = record["batch"], record["vae"]
    with torch.no_grad():
        x0 = normalize_latents(vae, vae.encode(batch["video"]).latent_dist.mode())
        reference = normalize_latents(vae, vae.encode(batch["reference"][:, :, None]).latent_dist.mode())
    # [mask (4), given latents (C), reference plane (C)] (echo.conditioning): the reference is the given latent frame 0
    # (followed by Wan I2V's encoded zero frames) and fills the reference plane of every latent frame (Eq. 1).
    channels = reference.shape[1]
    given, plane = condition[:, 4 : 4 + channels], condition[:, 4 + channels :]
    torch.testing.assert_close(given[:, :, :1], reference)
    assert condition[:, :4, 0].eq(1).all() and not condition[:, :4, 1:].any() and given[:, :, 1:].abs().max() > 0
    torch.testing.assert_close(plane, reference.expand_as(plane))
    torch.testing.assert_close(audio, batch["avatar_audio"])
    torch.testing.assert_close(lip, batch["lip_mask"].to(lip.dtype))
    torch.testing.assert_close(face, batch["face_mask"].to(face.dtype))
    sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1
    noise = (noisy - (1 - sigma) * x0) / sigma
    assert 0.5 < float(noise.std()) < 1.5  # a standard normal ε, so x0 really is the batch's video latent
    error = (record["prediction"].float() - (noise - x0)) ** 2  # B, C, F, h, w
    tokens = batch["lip_mask"].float()  # B, F, H', W'
    assert 0 < float(tokens.mean()) < 0.5  # the batch has a lip region, smaller than the frame
    patch = error.shape[-1] // tokens.shape[-1]
    weights = 1 + (lip_flow_weight - 1) * tokens.repeat_interleave(patch, -2).repeat_interleave(patch, -1)[:, None]
    flow = (error * weights).sum() / weights.expand_as(error).sum()
    assert record["flow"] == pytest.approx(float(flow), rel=1e-4)
    if lip_flow_weight != 1:  # the weighted mean is not the plain one on this batch
        assert float(flow) != pytest.approx(float(error.mean()), rel=1e-3)


def test_stage2_step_gives_the_lcu_the_batch_user_history(stage1_runs, data_root, tmp_path, monkeypatch):
    """Stage 2: the LCU input of a step is the batch's user history (wav2vec2 rows and padding mask, per-frame VAE
    tokens of the user frames with the face mask, understanding tokens) and the clip length is the window."""
    import training.train as train_module
    from echo.encoding import encode_user_video

    seen = []
    original_step = train_module.training_step

    def spy_step(models, module, batch, *args, **kwargs):
        def capture(mod, inputs, kwargs_):
            seen.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs_["user_inputs"].items()})

        handle = module.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            return original_step(models, module, batch, *args, **kwargs)
        finally:
            handle.remove()
            seen[-1].update(batch=batch, vae=models.vae)

    monkeypatch.setattr(train_module, "training_step", spy_step)
    _run(
        "tiny_stage2.yaml",
        data_root,
        tmp_path / "out",
        f"model.stage1_dir={stage1_runs['base'] / 'full'}",
        "train.max_train_steps=1",
        "train.checkpointing_steps=0",
    )
    (record,) = seen
    batch = record["batch"]
    assert record["clip_frames"] == 9 and batch["user_audio"].shape[1] >= 9
    torch.testing.assert_close(record["user_audio"], batch["user_audio"])
    assert torch.equal(record["user_audio_mask"], batch["user_audio_mask"]) and batch["user_audio"].abs().sum() > 0
    with torch.no_grad():
        tokens, mask = encode_user_video(record["vae"], batch["user_video"], batch["user_face_mask"])
    torch.testing.assert_close(record["user_video"], tokens)
    torch.testing.assert_close(record["user_face_mask"], mask)
    torch.testing.assert_close(record["understanding"], batch["understanding"])
    assert torch.equal(record["understanding_mask"], batch["understanding_mask"])


def test_cached_emotion_embeds_train_like_the_text_encoder_without_building_it(
    data_root, tmp_path, monkeypatch, caplog
):
    """With `data.use_cached_emotion_embeds` the text encoder is never built, the losses equal the text path's, and
    validation renders (which need the encoder) are skipped with a warning."""
    import shutil

    import training.modeling
    from data_prep.caches import cache_emotion_embeds
    from echo.emotion import EmotionTextEncoder
    from training.testing import save_tiny_text_encoder

    encoder = EmotionTextEncoder.from_pretrained(save_tiny_text_encoder(tmp_path / "text"), max_length=64)
    root = tmp_path / "prepared"
    shutil.copytree(data_root, root)
    for clip in sorted(p.parent for p in root.glob("*/meta.json")):
        cache_emotion_embeds(clip, encoder)
    requested = []
    original = training.modeling.load_components

    def spy(*args, only=None, **kwargs):
        requested.append(list(only))
        return original(*args, only=only, **kwargs)

    monkeypatch.setattr(training.modeling, "load_components", spy)
    common = ("ablation.use_emotion=true", "train.max_train_steps=2", "train.checkpointing_steps=0")
    by_text = _run("tiny_stage1.yaml", root, tmp_path / "text_run", *common)
    cached = _run(
        "tiny_stage1.yaml",
        root,
        tmp_path / "cached_run",
        "data.use_cached_emotion_embeds=true",
        "train.validation_steps=1",
        *common,
    )
    assert "text_encoder" in requested[0] and not any(s in requested[1] for s in ("text_encoder", "tokenizer"))
    assert cached["models"].text_encoder is None and cached["prompt_encoder"] is None
    assert len(cached["history"]) == 2
    assert "validation renders are skipped" in caplog.text and not (tmp_path / "cached_run" / "validation").exists()
    for a, b in zip(by_text["history"], cached["history"]):
        assert a["loss"] == b["loss"] and a["flow"] == b["flow"]


def test_cached_user_tokens_train_like_the_frame_path_without_encoding_the_user_video(data_root, tmp_path, monkeypatch):
    """With `data.use_cached_user_tokens` a stage-2 run never encodes the user frames and its losses equal the frame
    path's. The windows here span the whole 17-frame clips, so the step's VAE batch is the cache's and the tokens are
    bit-identical (a shorter history encoded alone differs by the VAE's batch-size-dependent float rounding)."""
    import shutil

    import training.step
    from data_prep.caches import cache_user_tokens
    from echo.components import load_components

    root = tmp_path / "prepared"
    shutil.copytree(data_root, root)
    vae = load_components(str(ROOT / "configs" / "models" / "tiny.yaml"), only=["vae"])["vae"].eval()
    for clip in sorted(p.parent for p in root.glob("*/meta.json")):
        cache_user_tokens(clip, vae, user_video_size=32)  # tiny_stage2.yaml: data.user_video_size = 32
    calls = []
    original = training.step.encode_user_video

    def spy(vae, user_video, user_face_mask):
        calls.append(tuple(user_video.shape))
        return original(vae, user_video, user_face_mask)

    # Stage 2 continues a stage 1 of the same chunk length (13 of the clips' 17 frames: room for a reference outside).
    stage1_dir = tmp_path / "stage1_13"
    _run(
        "tiny_stage1.yaml",
        root,
        stage1_dir,
        "data.num_frames=13",
        "train.max_train_steps=1",
        "train.checkpointing_steps=0",
    )
    monkeypatch.setattr(training.step, "encode_user_video", spy)
    common = (
        f"model.stage1_dir={stage1_dir}",
        "data.num_frames=13",
        "train.max_train_steps=2",
        "train.checkpointing_steps=0",
    )
    by_frames = _run("tiny_stage2.yaml", root, tmp_path / "frames_run", *common)
    assert len(calls) == 2 and all(13 <= shape[1] <= 17 for shape in calls)  # the history: frames 0 … window end
    cached = _run("tiny_stage2.yaml", root, tmp_path / "cached_run", "data.use_cached_user_tokens=true", *common)
    assert len(calls) == 2  # no VAE pass over the user video in the cached run
    assert len(cached["history"]) == 2
    for a, b in zip(by_frames["history"], cached["history"]):
        assert a["loss"] == b["loss"] and a["flow"] == b["flow"] and a["align"] == b["align"]
    with pytest.raises(ValueError, match="user_tokens.safetensors.*user_video_size.*--user-video-size 64"):
        _run(
            "tiny_stage2.yaml",
            root,
            tmp_path / "bad_run",
            "data.use_cached_user_tokens=true",
            "data.user_video_size=64",
            *common,
        )
