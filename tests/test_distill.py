"""Few-step distillation (training/distill.py) and the pipeline's few-step mode (pipelines/few_step.py): the student
LoRA round-trips through its folder onto a fresh base, a distillation step moves the student (LoRA only) towards the
teacher's trajectory, and few-step mode runs one generator forward per step with every condition (no guidance
passes)."""

import copy

import pytest
import torch

from pipelines import EchoPipeline
from pipelines.few_step import FewStepConfig, few_step_sigmas
from tests.render_inputs import tiny_render_inputs
from tests.tiny_models import random_generator_inputs, tiny_components_as_trained
from training.distill import (
    StudentLora,
    WindowInputs,
    add_student_lora,
    distillation_loss,
    save_student,
    segment_targets,
    student_segments,
    teacher_trajectory,
    trajectory_at,
)


def tiny_pipe() -> EchoPipeline:
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb_lora(transformer, seed: int = 3, scale: float = 0.05) -> None:
    """Random LoRA weights, as after training (B starts at zero: the adapter would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def render(pipe, num_steps: int | None = None, **overrides) -> torch.Tensor:
    inputs = tiny_render_inputs()
    inputs["num_inference_steps"] = num_steps
    inputs.update(overrides)
    return pipe(**inputs, generator=torch.Generator().manual_seed(0)).frames


def window_inputs_of(transformer) -> WindowInputs:
    """A fixed window of the tiny generator (9 frames at 64²: 3 × 8 × 8 latents) with every condition."""
    inputs = random_generator_inputs(transformer, seed=1)
    return WindowInputs(
        condition=inputs["condition"],
        prompt_embeds=inputs["encoder_hidden_states"],
        audio_embeds=inputs["audio_embeds"],
        lip_mask=inputs["lip_mask"],
        face_mask=inputs["face_mask"],
        context_embeds=inputs["context_embeds"],
        context_mask=None,
        latent_shape=tuple(inputs["hidden_states"].shape),
    )


def test_student_lora_round_trips_onto_a_fresh_base_with_identical_renders(tmp_path):
    trained = tiny_pipe()
    lora_config = add_student_lora(trained.transformer, StudentLora(rank=4))
    perturb_lora(trained.transformer)
    few_step = FewStepConfig(num_steps=[1, 2, 4], default_steps=2)
    folder = save_student(tmp_path / "few_step", trained.transformer, lora_config, few_step, dtype=torch.float32)
    trained._few_step = few_step  # the trained pipeline in few-step mode, as a fresh one will be after loading
    trained.enable_few_step(2)
    expected = render(trained)

    fresh = tiny_pipe()
    base = render(fresh, num_steps=2, audio_guidance_scale=1.0, user_guidance_scale=1.0)
    loaded = fresh.load_few_step_weights(folder)
    assert loaded == few_step and fresh.few_step_steps == 2
    torch.testing.assert_close(render(fresh), expected, rtol=0, atol=1e-6)
    assert (base - expected).abs().max() > 1e-3  # the student's weights do change the render

    fresh.disable_few_step()  # back to the base's own sampler, the adapter inactive
    torch.testing.assert_close(render(fresh, num_steps=2, audio_guidance_scale=1.0, user_guidance_scale=1.0), base)
    with pytest.raises(ValueError, match="trained for \\[1, 2, 4\\] steps, not 3"):
        fresh.enable_few_step(3)
    fresh.enable_few_step(2)
    with pytest.raises(ValueError, match="few-step mode is on"):
        render(fresh, num_steps=4)


def test_a_distillation_step_moves_the_student_towards_the_teacher_lora_only():
    transformer = tiny_components_as_trained()["transformer"]
    add_student_lora(transformer, StudentLora(rank=4))
    perturb_lora(transformer, scale=0.02)
    base_before = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    inputs = window_inputs_of(transformer)
    scheduler = tiny_pipe().scheduler
    sigmas = few_step_sigmas(scheduler, 6)  # a 6-step teacher (σ points shared with the 1/2-step schedules)
    weights = EchoPipeline.guidance_weights(4.5, 2.0, has_user=True)
    noise = torch.randn(inputs.latent_shape, generator=torch.Generator().manual_seed(5))
    states = teacher_trajectory(transformer, noise, inputs, sigmas, weights)
    segments = student_segments(scheduler, [1, 2, 4])
    assert len(segments) == 7
    starts, targets, sigma_a = segment_targets(states, sigmas, segments)
    repeated = inputs.repeat(len(segments))

    optimizer = torch.optim.Adam([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    loss = distillation_loss(transformer, starts, targets, sigma_a, repeated)
    loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)  # a gradient reaches the LoRA, and only the LoRA
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    optimizer.step()
    with torch.no_grad():
        after = distillation_loss(transformer, starts, targets, sigma_a, repeated)
    assert after < 0.98 * loss.detach(), (loss.item(), after.item())
    for name, param in transformer.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), name  # the base stays frozen


def test_teacher_trajectory_is_the_guided_euler_sampler_and_targets_land_on_it():
    transformer = tiny_components_as_trained()["transformer"]
    add_student_lora(transformer, StudentLora(rank=4))
    perturb_lora(transformer)
    inputs = window_inputs_of(transformer)
    scheduler = copy.deepcopy(tiny_pipe().scheduler)
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas.float()
    weights = EchoPipeline.guidance_weights(4.5, 2.0, has_user=True)
    noise = torch.randn(inputs.latent_shape, generator=torch.Generator().manual_seed(5))
    states = teacher_trajectory(transformer, noise, inputs, sigmas, weights)

    # the scheduler's own Euler steps with the three passes of the base model (adapter off) give the same states
    from training.distill import adapters_disabled, guided_velocity

    latents = noise.clone()
    with adapters_disabled(transformer), torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            velocity = guided_velocity(transformer, latents, sigmas[i].expand(1), inputs, weights)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            torch.testing.assert_close(latents, states[i + 1])
    torch.testing.assert_close(trajectory_at(states, sigmas, float(sigmas[2])), states[2])
    # a student step with the target velocity lands on the teacher's state at σ_b
    starts, targets, sigma_a = segment_targets(states, sigmas, [(1.0, 0.5), (0.5, 0.0)])
    torch.testing.assert_close(starts[1] + (0.0 - 0.5) * targets[1], states[-1, 0])
    torch.testing.assert_close(starts[0] + (0.5 - 1.0) * targets[0], trajectory_at(states, sigmas, 0.5)[0])


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_few_step_mode_runs_one_forward_per_step_with_every_condition(tmp_path, num_steps):
    pipe = tiny_pipe()
    lora_config = add_student_lora(pipe.transformer, StudentLora(rank=4))
    folder = save_student(tmp_path / "fs", pipe.transformer, lora_config, FewStepConfig(), dtype=torch.float32)
    pipe.transformer.delete_adapters("few_step")
    pipe.load_few_step_weights(folder, enable=False)
    calls = []

    def count(module, args, kwargs):
        calls.append({k: kwargs.get(k) for k in ("audio_embeds", "context_embeds", "timestep")})

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    render(pipe, num_steps=num_steps)  # the teacher: 3 guided passes per step
    assert len(calls) == 3 * num_steps
    assert sum(c["audio_embeds"] is None for c in calls) == num_steps  # its unconditional passes
    calls.clear()
    pipe.enable_few_step(num_steps)
    render(pipe)  # 9 frames at 9 per chunk: one chunk
    handle.remove()
    assert len(calls) == num_steps
    assert all(c["audio_embeds"] is not None and c["context_embeds"] is not None for c in calls)  # no uncond pass
    expected = (few_step_sigmas(pipe.scheduler, num_steps)[:-1] * 1000).tolist()
    assert [float(c["timestep"][0]) for c in calls] == pytest.approx(expected)


def test_recipe_distill_stage_resumes_a_state_file_without_it_and_ships_the_student(tmp_path, monkeypatch, capsys):
    """A recipe state written before the distill stage existed (no ``distill`` entry) runs the new stage after the
    export; the stage is complete once its student, trained to ``max_train_steps``, is in ``<export.out>/few_step``;
    a recipe without the section skips it."""
    import json
    from pathlib import Path

    from training.demo_recipe import STAGES, Recipe, load_recipe, run_recipe

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    sets = [
        f"export.out={tmp_path / 'pipeline'}",
        f"state_file={tmp_path / 'recipe_state.json'}",
        f"distill.set=[output_dir={tmp_path / 'distill'},train.max_train_steps=3]",
    ]
    recipe = Recipe(load_recipe(root / "configs/train/demo_recipe.yaml", sets), gpu=False)
    old_state = {stage: {"exit_code": 0, "upstream": None} for stage in STAGES if stage != "distill"}
    recipe.state_file.write_text(json.dumps(old_state))
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert not recipe.complete("distill")
    command = recipe.command("distill")
    assert "training.distill" in command and f"pipeline={tmp_path / 'pipeline'}" in command
    assert "configs/accelerate/cpu_1proc.yaml" in command  # one CPU process
    complete = Recipe.complete
    monkeypatch.setattr(Recipe, "check_vae_path", lambda self: None)
    monkeypatch.setattr(Recipe, "complete", lambda self, stage: stage != "distill" or complete(self, stage))
    assert run_recipe(recipe, list(STAGES), dry_run=True) == 0  # reads the old state file
    printed = capsys.readouterr().out
    assert "7/7 distill: " in printed and "starting it over" not in printed  # planned, not stale, not an error
    assert "6/7 export: complete, skipped" in printed
    monkeypatch.setattr(Recipe, "complete", complete)

    # the stage's output, shipped: complete at max_train_steps, not before
    final = tmp_path / "distill" / "final"
    final.mkdir(parents=True)
    (final / "pytorch_lora_weights.safetensors").write_bytes(b"")
    FewStepConfig(train_steps=2).save(final)
    recipe.ship_student()
    assert not recipe.complete("distill")
    FewStepConfig(train_steps=3).save(final)
    shipped = recipe.ship_student()
    assert shipped == tmp_path / "pipeline" / "few_step" and recipe.complete("distill")

    no_distill = load_recipe(root / "configs/train/demo_recipe.yaml", sets[:2])
    del no_distill["distill"]
    assert Recipe(no_distill, gpu=False).complete("distill")


def test_distill_script_writes_a_loadable_student_and_resumes_exactly(tmp_path):
    """``training.distill`` on a tiny pipeline folder and prepared set: a run stopped after 2 steps and resumed to 3
    writes the same student as an uninterrupted 3-step run, and the student loads into few-step mode."""
    from pathlib import Path

    from safetensors.torch import load_file

    from training.distill import main
    from training.testing import make_tiny_training_set

    root = Path(__file__).resolve().parents[1]
    data = make_tiny_training_set(tmp_path / "data", num_frames=17)
    tiny_pipe().save_pretrained(tmp_path / "pipeline")
    config = str(root / "configs/train/tiny_distill.yaml")
    common = [f"pipeline={tmp_path / 'pipeline'}", f"data.root={data}"]

    def run(output: str, steps: int) -> Path:
        sets = [*common, f"output_dir={tmp_path / output}", f"train.max_train_steps={steps}"]
        return main(["--config", config, *[arg for item in sets for arg in ("--set", item)]])

    whole = run("whole", 3)
    run("resumed", 2)
    resumed = run("resumed", 3)
    weights = "pytorch_lora_weights.safetensors"
    a, b = load_file(str(whole / weights)), load_file(str(resumed / weights))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained
    losses = [line for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3  # steps 1, 2, then 3 after the resume

    pipe = EchoPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    config = pipe.load_few_step_weights(whole)
    assert config.train_steps == 3 and pipe.few_step_steps == 2
    assert torch.isfinite(render(pipe)).all()


def test_demo_distill_config_matches_the_demo_model_and_the_shipped_folder_fits_40_mb():
    """configs/train/demo_distill.yaml distils windows of the demo model's chunk length and size; models/echo-demo,
    with its few-step student when shipped (fp16), stays within 40 MB."""
    from pathlib import Path

    from safetensors import safe_open

    from echo.components import load_model_config
    from training.distill import load_distill_config

    root = Path(__file__).resolve().parents[1]
    settings = load_model_config(root / "configs/models/demo.yaml")["settings"]
    config = load_distill_config(root / "configs/train/demo_distill.yaml")
    assert config.data.num_frames == settings["num_frames_per_chunk"]
    assert config.data.resolution == settings["resolution"]
    assert config.data.user_video_size == settings["user_video_size"]
    shipped = root / "models" / "echo-demo"
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) <= 40e6
    student = shipped / "few_step"
    if student.is_dir():
        few_step = FewStepConfig.load(student)
        assert few_step.num_steps == config.distill.student_steps
        with safe_open(str(student / "pytorch_lora_weights.safetensors"), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
