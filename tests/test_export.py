"""echo-export: a tiny stage-1 + stage-2 training output → a pipeline folder that `DiffusionPipeline.from_pretrained`
loads and renders with, computing what the training model computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tiny_models import random_generator_inputs
from training.export import export_pipeline, main
from training.train import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"
# A few steps at a high learning rate, so that every trained weight (LoRA B included) is away from its initial value.
FAST = ("train.max_train_steps=2", "train.checkpointing_steps=0", "optim.lora_lr=5e-3", "optim.base_lr=5e-3")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    # The session's base folder is shared by every test module, so the set is prepared once per run.
    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def _train(config: str, data_root: Path, output_dir: Path, *overrides: str) -> dict:
    args = ["--config", str(CONFIGS / config), "--set", f"data.root={data_root}", "--set", f"output_dir={output_dir}"]
    for item in (*FAST, *overrides):
        args += ["--set", item]
    return run(args)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    stage1 = _train("tiny_stage1.yaml", data_root, base / "stage1")
    stage2 = _train("tiny_stage2.yaml", data_root, base / "stage2", f"model.stage1_dir={base / 'stage1'}")
    return {"base": base, "stage1": stage1, "stage2": stage2}


def _render_inputs(data_root: Path) -> dict:
    """The first prepared clip's reference frame, audio and user side (64² frames, as the tiny runs train)."""
    from pipelines.video_io import load_wav, read_frames

    clip = sorted(p.parent for p in data_root.glob("*/meta.json"))[0]
    return {
        "reference_image": read_frames(clip / "avatar.mp4")[0],
        "reference_landmarks": np.load(clip / "avatar_landmarks.npy")[0],
        "avatar_audio": load_wav(clip / "avatar.wav"),
        "user_video": read_frames(clip / "user.mp4"),
        "user_audio": load_wav(clip / "user.wav"),
        "user_landmarks": np.load(clip / "user_landmarks.npy"),
        "understanding": torch.randn(4, 32, generator=torch.Generator().manual_seed(0)),
        "emotion": "the avatar looks calm and attentive",
    }


def test_stage2_export_loads_renders_and_computes_what_training_computed(trained, data_root):
    """train tiny stage 1 + 2 → echo-export → `DiffusionPipeline.from_pretrained`: the exported generator (both
    adapters fused) gives the training model's output with its stage-2 adapter active, the LCU is the trained one,
    the settings are the run's, and the pipeline renders at the trained resolution without being told it."""
    import diffusers

    import pipelines  # noqa: F401  (registers EchoPipeline with diffusers)
    from echo.settings import EchoSettings

    out = export_pipeline(trained["base"] / "stage2", trained["base"] / "pipe2")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "EchoPipeline"
    # the trained fields from the run, the sampling defaults from the model description (tiny.yaml: 4 steps)
    expected = EchoSettings.load(trained["base"] / "stage2" / "final").replace(num_inference_steps=4)
    assert pipe.settings == expected
    assert (pipe.settings.resolution, pipe.settings.num_frames_per_chunk, pipe.settings.use_emotion) == (64, 9, True)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))  # safetensors only

    # The generator: no PEFT layers left, same output as the adapted training model.
    trained_module = trained["stage2"]["models"].module.eval()
    exported = pipe.transformer.eval()
    assert not any("lora_" in name for name, _ in exported.named_parameters())
    inputs = random_generator_inputs(exported)
    with torch.no_grad():
        expected = trained_module.transformer(**inputs).sample
        trained_module.transformer.disable_adapters()
        without_stage2 = trained_module.transformer(**inputs).sample
        trained_module.transformer.enable_adapters()
        got = exported(**inputs).sample
    assert (expected - without_stage2).abs().max() > 1e-4  # the stage-2 adapter matters, so the check has teeth
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    lcu = trained_module.context_encoder.state_dict()
    assert pipe.context_encoder.state_dict().keys() == lcu.keys()
    for key, value in pipe.context_encoder.state_dict().items():
        torch.testing.assert_close(value, lcu[key], rtol=0, atol=0, msg=key)

    # A render of one chunk at the model's own resolution.
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        **_render_inputs(data_root),
        num_frames=9,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames[0]
    assert frames.shape == (9, 64, 64, 3) and np.isfinite(frames).all() and frames.std() > 0


def test_stage1_export_fp16_keeps_the_vae_float32(trained, tmp_path):
    """A stage-1 output exports without an LCU; its generator equals the training model; with --dtype fp16 the
    generator and encoders are stored in float16 (Wan's float32 modules excepted) and the VAE in float32."""
    import diffusers

    import pipelines  # noqa: F401

    out = export_pipeline(trained["base"] / "stage1" / "final", tmp_path / "pipe1")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert pipe.context_encoder is None and pipe.settings.use_emotion is False
    inputs = random_generator_inputs(pipe.transformer)
    inputs.pop("context_embeds")
    with torch.no_grad():
        expected = trained["stage1"]["models"].module.transformer.eval()(**inputs).sample
        torch.testing.assert_close(pipe.transformer.eval()(**inputs).sample, expected, rtol=1e-5, atol=1e-5)

    assert (
        main(["--stage-dir", str(trained["base"] / "stage1"), "--out", str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    )

    def dtypes(folder: Path) -> dict[str, torch.dtype]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                found.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
        return found

    vae = dtypes(tmp_path / "half" / "vae")
    transformer = dtypes(tmp_path / "half" / "transformer")
    text = dtypes(tmp_path / "half" / "text_encoder")
    assert vae and set(vae.values()) == {"F32"}
    assert transformer["blocks.0.attn1.to_q.weight"] == "F16" and transformer["audio_proj.proj_in.weight"] == "F16"
    assert transformer["blocks.0.scale_shift_table"] == "F32"  # `_keep_in_fp32_modules`
    assert "F16" in set(text.values())


def test_export_refuses_an_existing_folder_and_names_missing_files(trained, tmp_path):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_pipeline(trained["base"] / "stage1", out)
    assert (out / "keep.txt").is_file()
    with pytest.raises(FileExistsError, match="not an EchoPipeline folder"):  # --overwrite replaces pipelines only
        export_pipeline(trained["base"] / "stage1", out, overwrite=True)
    assert (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    (out / "model_index.json").write_text(json.dumps({"_class_name": "EchoPipeline"}))
    (out / "stale.txt").write_text("x")
    export_pipeline(trained["base"] / "stage1", out, overwrite=True)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "EchoPipeline"
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(".pipe.*"))  # no temporary folder is left

    with pytest.raises(FileNotFoundError, match="nowhere"):
        export_pipeline(tmp_path / "nowhere", tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"--stage1-dir if it moved\) .*moved' does not exist"):
        export_pipeline(trained["base"] / "stage2", tmp_path / "other", stage1_dir=tmp_path / "moved")


def test_sampling_defaults_come_from_the_model_description(trained, tmp_path):
    """Steps and guidance scales are not shaped by training: the exported settings take them from the model
    description's `settings:` (the trained fields still from the run)."""
    import yaml

    description = yaml.safe_load(Path("configs/models/tiny.yaml").read_text())  # what the tiny stages train
    description.setdefault("settings", {}).update(num_inference_steps=3, audio_guidance_scale=1.5)
    model_config = tmp_path / "model.yaml"
    model_config.write_text(yaml.safe_dump(description))
    out = export_pipeline(trained["base"] / "stage1" / "final", tmp_path / "pipe", model_config=str(model_config))
    settings = json.loads((out / "model_index.json").read_text())["settings"]
    assert (settings["num_inference_steps"], settings["audio_guidance_scale"]) == (3, 1.5)
    trained_settings = json.loads((trained["base"] / "stage1" / "final" / "echo_settings.json").read_text())
    assert settings["resolution"] == trained_settings["resolution"]
