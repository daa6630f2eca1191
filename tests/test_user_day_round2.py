"""A diffusers and accelerate user's day, round 2 (issue 22): sequential CPU offload renders the frames of the plain
pipeline, echo-render takes a stage-1 model's manifest without the user's side, and user landmarks a model does not
read are named in the one warning about ignored arguments."""

import copy
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import cpu_offload

from echo.components import load_components, load_model_config
from echo.mamba import MambaBlock
from pipelines import EchoPipeline
from tests.render_inputs import tiny_render_inputs
from tests.tiny_models import TINY, tiny_components_as_trained


def _pipe(description: Path | dict = TINY) -> EchoPipeline:
    pipe = EchoPipeline(**tiny_components_as_trained(description=description))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: EchoPipeline, **overrides) -> torch.Tensor:
    inputs = {**tiny_render_inputs(num_frames=17), **overrides}
    return pipe(**inputs, generator=torch.Generator().manual_seed(0)).frames


# ----------------------------------------------------------------------------------------------------------------
# 1. enable_sequential_cpu_offload(device="cpu")
# ----------------------------------------------------------------------------------------------------------------


def test_mamba_block_under_accelerate_cpu_offload_computes_what_it_computes_without():
    """accelerate's `cpu_offload` hooks each module that holds parameters and loads them for that module's own
    forward only: the block must reach ``conv1d`` and ``dt_proj`` through their forward, and ``step`` through the
    block's. On the CPU nothing moves, so the outputs and states are bit-identical."""
    torch.manual_seed(0)
    block = MambaBlock(d_model=16, d_state=8, dt_min=0.05, dt_max=0.5, use_kernel=False).eval()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        expected = block(x)
        expected_head, expected_state = block.step(x[:, :4])
        expected_tail, expected_last = block.step(x[:, 4:], expected_state)
        offloaded = cpu_offload(copy.deepcopy(block), execution_device=torch.device("cpu"))
        assert offloaded.conv1d.weight.device.type == "meta" and offloaded.dt_proj.bias.device.type == "meta"
        full = offloaded(x)
        head, state = offloaded.step(x[:, :4])
        tail, last = offloaded.step(x[:, 4:], state)
    for got, want in ((full, expected), (head, expected_head), (tail, expected_tail)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(last.ssm_state, expected_last.ssm_state, rtol=0, atol=0)
    torch.testing.assert_close(last.conv_state, expected_last.conv_state, rtol=0, atol=0)


def test_sequential_cpu_offload_on_the_cpu_renders_the_frames_of_the_plain_pipeline():
    """A pipeline with the user branch (LCU: audio and vision Mamba layers, understanding) renders two chunks (the
    Mamba state carried from the first to the second) under `enable_sequential_cpu_offload(device="cpu")`, twice,
    with exactly the plain pipeline's frames: with the CPU as execution device the hooks move no value, every layer
    runs the same operations on the same numbers, so the frames are bit-identical (no tolerance is needed, and any
    difference would mean a layer ran on other weights)."""
    expected = _render(_pipe())
    pipe = _pipe()
    pipe.enable_sequential_cpu_offload(device="cpu")
    mixer = pipe.context_encoder.audio_layers[0].mixer
    assert mixer.conv1d.weight.device.type == "meta" and mixer.A_log.device.type == "meta"  # offloaded between calls
    for _ in range(2):  # the hooks stay usable after a call
        torch.testing.assert_close(_render(pipe), expected, rtol=0, atol=0)
    assert pipe._execution_device == torch.device("cpu")  # diffusers' "cpu:0", given to the hooks as "cpu"


# ----------------------------------------------------------------------------------------------------------------
# 2. echo-render on a stage-1 export
# ----------------------------------------------------------------------------------------------------------------


def _save(folder: Path, stage: int) -> Path:
    """A tiny pipeline folder as echo-export writes it: stage 1 has no LCU and no emotion, stage 2 both."""
    components = load_components(TINY)
    if stage == 1:
        components["context_encoder"] = None
        components["settings"] = {**components["settings"], "use_emotion": False}
    EchoPipeline(**components).save_pretrained(folder)
    return folder


def _stage1_manifest(folder: Path) -> Path:
    """A manifest of one conversation with the reference image and the avatar's audio only (9 frames)."""
    import PIL.Image
    from skimage.data import astronaut

    from echo.clip_format import write_wav

    folder.mkdir(parents=True)
    PIL.Image.fromarray(astronaut()[::4, ::4]).save(folder / "ref.png")
    t = np.arange(9 * 640) / 16_000
    write_wav(folder / "avatar.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    manifest = folder / "conversations.jsonl"
    entry = {"id": "solo", "reference_image": "ref.png", "avatar_audio": "avatar.wav", "frame_inputs": False}
    manifest.write_text(json.dumps(entry) + "\n")
    return manifest


def test_echo_render_renders_a_stage1_manifest_without_user_streams_and_stage2_names_them(tmp_path, capsys):
    from pipelines import render
    from pipelines.video_io import probe_mp4

    manifest = _stage1_manifest(tmp_path / "work")
    common = ["--manifest", str(manifest), "--steps", "1", "--device", "cpu", "--side-by-side"]

    out = tmp_path / "stage1-out"
    assert render.main(["--pipeline", str(_save(tmp_path / "stage1", 1)), "--out", str(out), *common]) == 0
    assert "1 rendered" in capsys.readouterr().out
    info = probe_mp4(out / "solo.mp4")
    assert info["num_frames"] == 9 and info["width"] == 64  # the avatar alone: no user video to put beside it

    out = tmp_path / "stage2-out"
    assert render.main(["--pipeline", str(_save(tmp_path / "stage2", 2)), "--out", str(out), *common]) == 1
    assert not (out / "solo.mp4").exists()
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert "`user_video`, `user_audio`" in failure["error"] and "stage-1" in failure["error"], failure["error"]


# ----------------------------------------------------------------------------------------------------------------
# 3. user landmarks a model does not read: one warning
# ----------------------------------------------------------------------------------------------------------------


def _ignored(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipelines.inputs" and f"`{name}`" in r.getMessage()]


def _without_visual() -> dict:
    description = load_model_config(TINY)
    description["context_encoder"]["config"]["use_visual"] = False  # the "w/o LPE" ablation
    return description


def test_user_landmarks_a_model_does_not_read_are_named_once_per_call(diffusers_caplog):
    inputs = {**tiny_render_inputs(num_frames=9), "num_inference_steps": 1}
    pipe = _pipe(_without_visual())
    for call in (1, 2):
        pipe(**inputs, generator=torch.Generator().manual_seed(0))
        messages = _ignored(diffusers_caplog, "user_landmarks")
        assert len(messages) == call, [r.getMessage() for r in diffusers_caplog.records]
        assert "use_visual" in messages[-1]

    pipe = _pipe()  # reads the user's video: the landmarks are used, no warning
    diffusers_caplog.clear()
    pipe(**inputs, generator=torch.Generator().manual_seed(0))
    assert not _ignored(diffusers_caplog, "user_landmarks")
    # without the user's streams the user branch is off: the landmarks are named with the other ignored arguments
    user_free = {k: v for k, v in inputs.items() if k not in ("user_video", "user_audio")}
    pipe(**user_free, generator=torch.Generator().manual_seed(0))
    (message,) = [r.getMessage() for r in diffusers_caplog.records if r.name == "pipelines.inputs"]
    assert "`user_landmarks`" in message and "`understanding`" in message and "user branch is off" in message


def test_user_landmarks_pushed_to_a_session_that_does_not_read_them_warn_once(diffusers_caplog):
    from pipelines.inputs import warn_ignored_arguments

    inputs = tiny_render_inputs(num_frames=4)
    given = ("reference_image", "understanding", "lip_mask", "face_mask", "frame_inputs", "height", "width")
    session = _pipe(_without_visual()).start_session(**{name: inputs[name] for name in given})
    for piece in (slice(0, 2), slice(2, 4)):
        session.push(user_video=inputs["user_video"][piece], user_landmarks=inputs["user_landmarks"][piece])
    messages = _ignored(diffusers_caplog, "user_landmarks")
    assert len(messages) == 1 and "use_visual" in messages[0], messages
    assert warn_ignored_arguments(
        use_emotion=True, context_inputs=None, with_user=False, user_landmarks=inputs["user_landmarks"]
    ) == ["user_landmarks"]
    assert "no context_encoder" in _ignored(diffusers_caplog, "user_landmarks")[-1]
