"""The scheduler is whatever the model folder says, with diffusers' override: FlowMatchEuler and UniPC in flow mode
both sample the generator's flow through the pipeline's denoising loop; a saved UniPC scheduler loads as UniPC (from
a pipeline folder and from a model description); a scheduler that cannot work is refused, saying what to do."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from echo.components import load_components
from echo.flow_matching import scheduler_shift
from pipelines import EchoPipeline
from tests.render_inputs import tiny_render_inputs
from tests.tiny_models import tiny_components_as_trained


@pytest.fixture(scope="module")
def pipe():
    pipe = EchoPipeline(**tiny_components_as_trained())  # FlowMatchEuler, shift 3 (configs/models/tiny.yaml)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unipc_flow(config, flow_shift: float) -> UniPCMultistepScheduler:
    """The documented override (docs/inference.md): Wan's own sampler, in flow mode."""
    return UniPCMultistepScheduler.from_config(
        config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
    )


def render(pipe, **overrides):
    kwargs = {**tiny_render_inputs(), **overrides}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("scheduler_class", ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_the_denoising_loop_follows_the_flow_with_either_scheduler(pipe, scheduler_class, monkeypatch):
    """A generator that predicts the velocity ``v = ε − x0`` of the straight path from the chunk's noise ``ε`` to a
    fixed ``x0``: a correct flow sampler (Euler, or UniPC's multistep predictor-corrector on x0 = x_σ − σ·v) started at
    ``ε`` with noise level ``σ_0`` ends on ``x0 + (1 − σ_0)·(ε − x0)`` (``x0`` when σ_0 = 1), and every pass gets the
    timesteps the scheduler set (UniPC's are integers, Euler's are not)."""
    if scheduler_class == "UniPCMultistepScheduler":
        monkeypatch.setattr(pipe, "scheduler", unipc_flow(pipe.scheduler.config, flow_shift=5.0))
    target = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(7))  # latents of 9 frames at 32²
    noise, timesteps, decoded = [], [], []

    def straight_path_velocity(hidden_states, timestep, **kwargs):
        if not noise:
            noise.append(hidden_states.float())  # the chunk's initial latents
        timesteps.append(timestep)
        return (noise[0] - target,)

    original_decode = pipe.decode_latents
    monkeypatch.setattr(pipe.transformer, "forward", straight_path_velocity)
    monkeypatch.setattr(pipe, "decode_latents", lambda latents: decoded.append(latents) or original_decode(latents))
    render(pipe, num_inference_steps=5)

    assert type(pipe.scheduler).__name__ == scheduler_class and len(decoded) == 1
    passes = len(timesteps) // 5  # guidance passes per step
    expected_timesteps = pipe.scheduler.timesteps.repeat_interleave(passes)
    torch.testing.assert_close(torch.cat(timesteps), expected_timesteps.to(torch.cat(timesteps).dtype), rtol=0, atol=0)
    sigma_0 = float(pipe.scheduler.sigmas[0])
    expected = target + (1 - sigma_0) * (noise[0] - target)
    torch.testing.assert_close(decoded[0].float(), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def unipc_pipe(pipe, tmp_path_factory):
    """The tiny pipeline with UniPC at flow shift 5, and the folder it is saved in."""
    unipc = EchoPipeline(
        **dict(pipe.components, scheduler=unipc_flow(pipe.scheduler.config, flow_shift=5.0)), settings=pipe.settings
    )
    unipc.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("unipc_pipeline")
    unipc.save_pretrained(folder)
    return unipc, folder


def test_a_pipeline_saved_with_unipc_loads_and_renders_with_it(pipe, unipc_pipe):
    """Saved with a UniPC scheduler, a pipeline folder loads it back (model_index.json and scheduler_config.json, as
    diffusers does) and renders the frames the in-memory pipeline renders; a model description pointing at that
    folder's scheduler loads the same class, ``class`` omitted, with its settings overridable."""
    unipc, folder = unipc_pipe
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "UniPCMultistepScheduler",
    ]

    loaded = DiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is UniPCMultistepScheduler and loaded.scheduler.config.flow_shift == 5.0
    assert scheduler_shift(loaded.scheduler) == 5.0  # not the FlowMatchEuler `shift` (3.0) its config still carries
    expected = render(unipc)
    torch.testing.assert_close(render(loaded), expected, rtol=0, atol=1e-6)
    assert (render(pipe) - expected).abs().max() > 1e-3  # the scheduler matters: Euler at shift 3 differs

    section = {"pretrained": str(folder), "subfolder": "scheduler"}
    scheduler = load_components({"scheduler": section})["scheduler"]
    assert type(scheduler) is UniPCMultistepScheduler and scheduler.config.flow_shift == 5.0
    scheduler = load_components({"scheduler": dict(section, config={"flow_shift": 3.0})})["scheduler"]
    assert type(scheduler) is UniPCMultistepScheduler and scheduler.config.flow_shift == 3.0


def test_echo_render_samples_with_the_saved_scheduler_unless_told_otherwise(unipc_pipe, tmp_path):
    """echo-render keeps the folder's scheduler; ``--scheduler`` swaps the class keeping its shift, ``--shift`` sets
    the shift; the scheduler and shift it samples with are recorded with the render options."""
    from pipelines import render

    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("")
    recorded = {}
    for name, options in (
        ("saved", []),
        ("euler", ["--scheduler", "FlowMatchEulerDiscreteScheduler"]),
        ("shift", ["--shift", "2"]),
    ):
        out = tmp_path / name
        assert (
            render.main(["--pipeline", str(unipc_pipe[1]), "--manifest", str(manifest), "--out", str(out), *options])
            == 0
        )
        record = json.loads((out / render.OPTIONS_FILE).read_text())
        recorded[name] = (record["scheduler"], record["shift"])
    assert recorded == {
        "saved": ("UniPCMultistepScheduler", 5.0),
        "euler": ("FlowMatchEulerDiscreteScheduler", 5.0),
        "shift": ("UniPCMultistepScheduler", 2.0),
    }


def test_schedulers_that_cannot_work_are_refused_naming_the_fix(pipe, tmp_path, monkeypatch):
    unipc_flow(pipe.scheduler.config, flow_shift=3.0).save_pretrained(tmp_path)
    section = {"pretrained": str(tmp_path)}
    # a description naming another class than the folder's (the silent FlowMatchEuler-from-UniPC load)
    with pytest.raises(
        ValueError,
        match=r"names class 'FlowMatchEulerDiscreteScheduler' but .* holds a "
        r"'UniPCMultistepScheduler' config.*Omit 'class'",
    ):
        load_components({"scheduler": dict(section, **{"class": "FlowMatchEulerDiscreteScheduler"})})
    # a setting of the other class (UniPC calls its shift flow_shift)
    with pytest.raises(ValueError, match=r"sets \['shift'\], which UniPCMultistepScheduler does not take"):
        load_components({"scheduler": dict(section, config={"shift": 5.0})})
    # UniPC built from a config without its flow mode: an epsilon-prediction scheduler
    with pytest.raises(ValueError, match=r"does not sample a flow-matching model.*flow_prediction"):
        load_components({"scheduler": {"class": "UniPCMultistepScheduler", "config": {"flow_shift": 3.0}}})

    # swapped on a pipeline the naive diffusers way, from FlowMatchEuler's config: refused before any work
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for wrong, named in (
            (UniPCMultistepScheduler.from_config(pipe.scheduler.config), "prediction_type='epsilon'"),
            (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting"),
        ):
            monkeypatch.setattr(pipe, "scheduler", wrong)
            with pytest.raises(ValueError, match=named):
                render(pipe)
    finally:
        handle.remove()
    assert calls == []
