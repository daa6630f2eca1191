"""What a diffusers / accelerate user reaches for (issue 22, training and tooling rows): the startup summary, gradient
norm and validation renders in the trackers, EMA weights, a generated ``--help`` and config-key page, ``make
tiny-data``, no MediaPipe noise on stderr, one mp4 writer and diffusers' own ``export_to_video``."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.config import TrainConfig, config_keys, config_keys_markdown, load_config
from training.train import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"
NOISE = ("Feedback manager", "absl::InitializeLog", "W0000")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def _run(data_root: Path, output_dir: Path, *overrides: str) -> dict:
    args = ["--config", str(CONFIGS / "tiny_stage1.yaml"), "--set", f"data.root={data_root}"]
    for item in (f"output_dir={output_dir}", *overrides):
        args += ["--set", item]
    return run(args)


def _all_fields(cls, prefix: str = "") -> list[str]:
    hints, names = typing.get_type_hints(cls), []
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            names += _all_fields(hints[item.name], prefix + item.name + ".")
        else:
            names.append(prefix + item.name)
    return names


# ----------------------------------------------------------------------------------------------------------------------
# 1. Training as in diffusers' examples
# ----------------------------------------------------------------------------------------------------------------------


def test_run_logs_a_summary_the_gradient_norm_and_sends_validation_renders_to_tensorboard(data_root, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with caplog.at_level(logging.INFO, logger="training.train"):
        result = _run(
            data_root, tmp_path / "run", "train.report_to=tensorboard", "train.validation_steps=2",
            "train.validation_inference_steps=1", "train.checkpointing_steps=0", "data.batch_size=1",
        )  # fmt: skip
    text = caplog.text
    assert "***** Running training: stage 1 *****" in text
    summary = result["summary"]
    assert summary["num_examples"] == 4 and summary["num_clips"] == 2, summary  # 2 clips × windows_per_clip 2
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["max_train_steps"] == 4 and summary["total_batch_size"] == 1
    for line in ("Num examples (windows) = 4", f"Trainable parameters = {summary['trainable_parameters']:,}",
                 "Total optimization steps = 4", "Gradient accumulation steps = 1", "Batch size per process = 1"):  # fmt: skip
        assert line in text, line
    assert all(h["grad_norm"] > 0 and np.isfinite(h["grad_norm"]) for h in result["history"]), result["history"]

    # accelerate's tensorboard tracker writes under logs/<project name>; hparams go to a sub-folder of their own.
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "echo-stage1"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    norms = events.Scalars("train/grad_norm")
    assert [e.step for e in norms] == [1, 2, 3, 4]
    assert [e.value for e in norms] == pytest.approx([h["grad_norm"] for h in result["history"]], rel=1e-5)
    tags = events.Tags()
    video_tags = [t for t in tags["images"] if t.startswith("validation/")]
    assert video_tags, tags
    assert sorted({e.step for e in events.Images(video_tags[0])}) == [2, 4]
    assert (tmp_path / "run" / "validation" / "step-4.mp4").is_file()


def test_the_paper_stage_configs_render_validation_videos():
    for name in ("stage1.yaml", "stage2.yaml"):
        config = load_config(CONFIGS / name)
        assert config.train.validation_steps and config.train.validation_steps <= config.train.max_train_steps // 10
        assert config.train.report_to == "tensorboard"
        assert not config.data.use_cached_emotion_embeds  # validation needs the text encoder


def test_ema_is_saved_resumed_exactly_and_is_what_final_holds(data_root, tmp_path):
    fast = ("train.ema=true", "train.ema_decay=0.9", "optim.lora_lr=5e-3", "optim.base_lr=5e-3")
    full = _run(data_root, tmp_path / "full", *fast)
    _run(data_root, tmp_path / "split", *fast, "train.max_train_steps=2")
    _run(data_root, tmp_path / "split", *fast, "train.resume_from_checkpoint=latest")

    # The checkpoint holds the EMA as safetensors, under the trained parameters' names, with its step counter.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "full" / "checkpoint-4" / "ema.safetensors"), framework="pt") as f:
        assert '"optimization_step": 4' in f.metadata()["counters"]
        assert sorted(f.keys()) == sorted(full["ema"].names)
    assert not list((tmp_path / "full").rglob("*.pkl"))
    # Resumed exactly: the same EMA and the same final/ as the uninterrupted run.
    for name in ("checkpoint-4/ema.safetensors", "final/transformer_modules.safetensors",
                 "final/transformer_lora/adapter_model.safetensors"):  # fmt: skip
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    # final/ holds the EMA weights, not the last step's (checkpoint-4 holds those).
    ema = load_file(str(tmp_path / "full" / "checkpoint-4" / "ema.safetensors"))
    final = load_file(str(tmp_path / "full" / "final" / "transformer_modules.safetensors"))
    last = load_file(str(tmp_path / "full" / "checkpoint-4" / "transformer_modules.safetensors"))
    key = next(k for k in final if "audio_proj" in k)
    torch.testing.assert_close(final[key], ema[f"transformer.{key}"], rtol=0, atol=0)
    assert not torch.equal(final[key], last[key])


def test_echo_export_says_which_weights_it_exports(data_root, tmp_path, caplog):
    from training.export import export_pipeline

    _run(data_root, tmp_path / "run", "train.ema=true", "train.max_train_steps=2", "train.checkpointing_steps=0")
    with caplog.at_level(logging.INFO, logger="training.export"):
        export_pipeline(tmp_path / "run", tmp_path / "model")
    assert "weights: the EMA of the trained weights" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# 2. --help and docs/config_keys.md, generated from the config dataclasses
# ----------------------------------------------------------------------------------------------------------------------


def test_help_lists_every_config_key_with_its_default_and_comment():
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    fields = _all_fields(TrainConfig)
    assert [key.key for key in config_keys()] == fields
    for key in config_keys():
        assert key.help, f"config key {key.key!r} has no comment in training/config.py"
        assert f"  {key.key} = " in result.stdout, key.key
        assert key.help in result.stdout, key.key
    assert "  train.max_train_steps = 10000\n      optimizer steps of the run" in result.stdout


def test_config_keys_page_is_complete_and_current():
    page = (ROOT / "docs" / "config_keys.md").read_text()
    assert page == config_keys_markdown(), "docs/config_keys.md is stale: run `make config-docs`"
    for name in _all_fields(TrainConfig):
        assert f"| `{name}` |" in page, name


# ----------------------------------------------------------------------------------------------------------------------
# 3. make tiny-data; 4. no MediaPipe noise
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~25 s: a real echo-prep of a synthetic conversation, then one training step
def test_tiny_data_command_makes_the_set_the_tiny_configs_train_on(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    assert "tiny-data:" in makefile and "-m training.testing --out data/tiny" in makefile
    assert load_config(CONFIGS / "tiny_stage1.yaml").data.root == "data/tiny/prepared"
    assert "make tiny-data" in (CONFIGS / "tiny_stage1.yaml").read_text().split("\nstage:")[0]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    made = subprocess.run(
        [sys.executable, "-m", "training.testing", "--out", str(tmp_path / "tiny")],
        cwd=ROOT, capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert not [line for line in made.stderr.splitlines() if any(n in line for n in NOISE)], made.stderr
    root = tmp_path / "tiny" / "prepared"
    assert len(list(root.glob("*/meta.json"))) == 2
    trained = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(CONFIGS / "tiny_stage1.yaml"),
         "--set", f"data.root={root}", "--set", f"output_dir={tmp_path / 'out'}", "--set", "train.max_train_steps=1"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "transformer_modules.safetensors").is_file()


# What echo-prep runs on a clip: MediaPipe's detector (framing) and face mesh (landmarks), on a synthetic face.
MEDIAPIPE_SCRIPT = """
import sys
import numpy as np
import PIL.Image
from echo.faces import FaceMesh
from echo.framing import MediaPipeFaceDetector
face = np.asarray(PIL.Image.open(sys.argv[1]).convert("RGB"))
assert len(MediaPipeFaceDetector()(face)) == 1
assert not np.isnan(FaceMesh()(face)).any()
print("faces ok")
"""


def test_mediapipe_prints_no_absl_noise_on_stderr(tmp_path):
    import PIL.Image

    from echo.media import read_video
    from synthetic.conversations import make_conversation

    make_conversation(tmp_path / "source", "pairs", seconds=1.0, size=128, seed=0)
    video = sorted((tmp_path / "source").rglob("*.mp4"))[0]
    PIL.Image.fromarray(read_video(video)[0][0]).save(tmp_path / "face.png")
    result = subprocess.run(
        [sys.executable, "-c", MEDIAPIPE_SCRIPT, str(tmp_path / "face.png")], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0 and "faces ok" in result.stdout, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, noise


def test_quieting_mediapipe_keeps_other_stderr_lines(capfd):
    from echo.faces import quiet_mediapipe

    with quiet_mediapipe():
        os.write(2, b"W0000 00:00:1.0 1 inference_feedback_manager.cc:114] Feedback manager requires a model\n")
        os.write(2, b"a line of someone else\n")
    assert capfd.readouterr().err == "a line of someone else\n"


# ----------------------------------------------------------------------------------------------------------------------
# 5. One mp4 writer; diffusers' export_to_video / load_video
# ----------------------------------------------------------------------------------------------------------------------


def test_data_prep_rendering_and_the_demo_write_through_one_mp4_writer(tmp_path):
    import data_prep.media
    import echo.media
    import echo.metrics.video
    import pipelines.video_io

    assert data_prep.media.write_video is echo.media.write_video
    assert echo.metrics.video.write_video is echo.media.write_video
    # No other module opens a video container for writing (the synthetic set's FLAC audio writer aside).
    writers = []
    for folder in ("echo", "pipelines", "training", "data_prep", "synthetic", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.search(r"av\.open\(.*[\"']w[\"']", line) and "flac" not in line:
                    writers.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert writers == ['echo/media.py: with av.open(str(path), "w", format="mp4") as container:'], writers
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 32, 48, 3), dtype=np.uint8)
    audio = (0.3 * np.sin(np.arange(4000) / 9.0)).astype(np.float32)  # longer than the video: cut to 6 / 25 s
    a = pipelines.video_io.write_mp4(tmp_path / "render.mp4", frames, audio=audio)
    b = echo.media.write_video(tmp_path / "prep.mp4", frames, audio=audio, trim_audio=True)
    assert a.read_bytes() == b.read_bytes()
    info = pipelines.video_io.probe_mp4(a)
    assert info["num_frames"] == 6 and abs(info["audio_seconds"] - 6 / 25) < 0.07, info


def test_diffusers_export_to_video_and_load_video_work(tmp_path):
    import tomllib
    from diffusers.utils import export_to_video, load_video

    from pipelines.video_io import to_uint8_frames

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split("=")[0].split(">")[0].strip() == "imageio-ffmpeg" for d in dependencies), dependencies
    frames = [np.full((32, 32, 3), k / 7, dtype=np.float32) for k in range(8)]  # the pipeline's "np" output
    path = export_to_video(frames, str(tmp_path / "out.mp4"), fps=25)
    loaded = load_video(path)
    assert len(loaded) == 8 and loaded[0].size == (32, 32)
    assert to_uint8_frames(loaded).shape == (8, 32, 32, 3)  # load_video's PIL list: a frames form the project takes


# ----------------------------------------------------------------------------------------------------------------------
# 3. The pipeline as a diffusers user loads and calls it
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe():
    from pipelines import EchoPipeline
    from tests.tiny_models import tiny_components_as_trained

    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ignored_warnings(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pipelines.inputs" and f"`{name}`" in r.getMessage()]


def test_emotion_given_to_a_model_trained_without_emotion_warns_once_per_call(tiny_pipe, diffusers_caplog):
    from tests.render_inputs import tiny_render_inputs

    inputs = {**tiny_render_inputs(), "num_inference_steps": 1}
    saved = dict(tiny_pipe.config.settings)
    try:
        tiny_pipe.register_to_config(settings={**saved, "use_emotion": False})  # as configs/models/demo.yaml
        for call in (1, 2):
            tiny_pipe(**inputs, emotion="joyful", generator=torch.Generator().manual_seed(0))
            records = _ignored_warnings(diffusers_caplog, "emotion")
            assert len(records) == call, [r.getMessage() for r in diffusers_caplog.records]
            assert "use_emotion" in records[-1].getMessage()
        tiny_pipe.register_to_config(settings=saved)  # emotion on: used, no warning
        diffusers_caplog.clear()
        tiny_pipe(**inputs, emotion="joyful", generator=torch.Generator().manual_seed(0))
        assert not _ignored_warnings(diffusers_caplog, "emotion"), [r.getMessage() for r in diffusers_caplog.records]
        assert not [r for r in diffusers_caplog.records if r.name == "pipelines.inputs"]
    finally:
        tiny_pipe.register_to_config(settings=saved)


def test_understanding_given_to_a_model_without_understanding_warns(tiny_pipe, diffusers_caplog):
    from pipelines.inputs import warn_ignored_arguments

    ignored = warn_ignored_arguments(
        use_emotion=True,
        context_inputs=frozenset({"user_video", "user_audio"}),  # an LCU with use_understanding false
        with_user=True,
        emotion="joyful",
        understanding=torch.zeros(4, 32),
        understanding_model=None,
    )
    assert ignored == ["understanding"]
    assert len(_ignored_warnings(diffusers_caplog, "understanding")) == 1
    assert "use_understanding" in diffusers_caplog.records[-1].getMessage()
    assert warn_ignored_arguments(
        use_emotion=False, context_inputs=None, with_user=False, emotion=None, understanding_model=print
    ) == ["understanding_model"]


_LOAD = {
    "echo_pipeline": (
        "from pipelines import EchoPipeline\n"
        "pipe = EchoPipeline.from_pretrained({folder!r})\n"
        "assert type(pipe) is EchoPipeline, type(pipe)\n"
    ),
    "import_then_diffusion_pipeline": (
        "from diffusers import DiffusionPipeline\n"
        "import pipelines\n"
        "pipe = DiffusionPipeline.from_pretrained({folder!r})\n"
        "assert type(pipe) is pipelines.EchoPipeline, type(pipe)\n"
    ),
    "plain_diffusion_pipeline": (
        "import sys\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained({folder!r})\n"
        "assert 'pipelines' not in sys.modules\n"
    ),
}


def test_a_saved_pipeline_loads_in_a_fresh_interpreter_through_echo_pipeline(tiny_pipe, tmp_path):
    """The documented path (README "3. Generate from Python", docs/inference.md): `EchoPipeline.from_pretrained`, or
    `import pipelines` before `DiffusionPipeline.from_pretrained`. Plain `DiffusionPipeline.from_pretrained` cannot
    find the class: diffusers looks ``_class_name`` up on its own module only, reads no entry points, and loading code
    from the model folder is not allowed."""
    folder = tmp_path / "echo-pipeline"
    tiny_pipe.save_pretrained(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {
        name: subprocess.run(
            [sys.executable, "-c", script.format(folder=str(folder))],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for name, script in _LOAD.items()
    }
    for name in ("echo_pipeline", "import_then_diffusion_pipeline"):
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    plain = results["plain_diffusion_pipeline"]
    assert plain.returncode != 0
    # diffusers' own message: `getattr(diffusers, "EchoPipeline")` fails
    assert "AttributeError: module diffusers has no attribute EchoPipeline" in plain.stderr, plain.stderr[-3000:]
