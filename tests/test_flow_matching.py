"""Flow matching: the equations' effects, and agreement with diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from echo import flow_matching


def test_euler_sampling_with_true_velocity_recovers_x0():
    """Integrating v = ε − x0 from pure noise with diffusers' scheduler lands on x0 (straight flow paths)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 3, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    timesteps, num_steps = flow_matching.retrieve_timesteps(scheduler, num_inference_steps=7)
    assert num_steps == 7 and scheduler.sigmas[0] == 1.0
    sample = noise.clone()
    for t in timesteps:
        sigma = torch.full((2,), float(t) / 1000)
        # The sample the scheduler carries is x_σ of the same straight path.
        torch.testing.assert_close(sample, flow_matching.add_noise(x0, noise, sigma), rtol=1e-4, atol=1e-5)
        velocity = flow_matching.velocity_target(x0, noise)
        torch.testing.assert_close(flow_matching.predict_x0(sample, velocity, sigma), x0, rtol=1e-4, atol=1e-5)
        sample = scheduler.step(velocity, t, sample).prev_sample
    torch.testing.assert_close(sample, x0, rtol=1e-4, atol=1e-5)
    # With the sign of the velocity flipped, sampling goes elsewhere.
    scheduler.set_timesteps(7)
    wrong = noise.clone()
    for t in scheduler.timesteps:
        wrong = scheduler.step(x0 - noise, t, wrong).prev_sample
    assert (wrong - x0).abs().mean() > 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shift_matches_the_scheduler(shift):
    """Training σ are shifted exactly as the scheduler shifts its sampling σ."""
    grid = torch.linspace(1.0, 0.05, 10)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    flow_matching.retrieve_timesteps(scheduler, sigmas=grid.tolist())
    torch.testing.assert_close(scheduler.sigmas[:-1], flow_matching.shift_sigmas(grid, shift), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps, flow_matching.sigma_to_timestep(scheduler.sigmas[:-1]))


def test_shift_moves_sigma_mass_up():
    plain = flow_matching.sample_sigmas(20000, shift=1.0, generator=torch.Generator().manual_seed(0))
    shifted = flow_matching.sample_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert ((shifted > 0) & (shifted < 1)).all()
    assert (shifted >= plain).all() and (shifted > plain).float().mean() > 0.99
    # Logit-normal with mean 0 has median 1/2; the shift maps it to s / (1 + s).
    assert abs(plain.median().item() - 0.5) < 0.02
    assert abs(shifted.median().item() - 0.75) < 0.02
    # The mean of the normal moves the mass too.
    later = flow_matching.sample_sigmas(20000, mean=1.0, generator=torch.Generator().manual_seed(0))
    assert abs(later.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    # Unshifted, logit(σ) is the normal itself: N(mean, std²)
    narrow = flow_matching.sample_sigmas(20000, mean=-0.5, std=0.4, generator=torch.Generator().manual_seed(1))
    logits = torch.logit(narrow.double())
    assert abs(logits.mean().item() + 0.5) < 0.02 and abs(logits.std().item() - 0.4) < 0.02


def test_predict_x0_inverts_add_noise():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 16, 2, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.0])
    x_sigma = flow_matching.add_noise(x0, noise, sigma)
    torch.testing.assert_close(x_sigma[0], x0[0])
    torch.testing.assert_close(x_sigma[3], noise[3])
    velocity = flow_matching.velocity_target(x0, noise)
    torch.testing.assert_close(flow_matching.predict_x0(x_sigma, velocity, sigma), x0)
    # The velocity is the derivative of the path in σ.
    eps = 1e-3
    derivative = (flow_matching.add_noise(x0, noise, sigma.clamp(max=1 - eps) + eps) - x_sigma) / eps
    torch.testing.assert_close(derivative[:3], velocity[:3], rtol=1e-2, atol=1e-2)


def test_flow_loss_mask_and_weighting():
    g = torch.Generator().manual_seed(2)
    prediction = torch.randn(3, 16, 2, 4, 4, generator=g)
    target = torch.randn(prediction.shape, generator=g)
    torch.testing.assert_close(
        flow_matching.flow_loss(prediction, target), torch.nn.functional.mse_loss(prediction, target)
    )

    # A mask over latent frames: changing the prediction outside it does not change the loss.
    mask = torch.zeros(3, 1, 2, 1, 1)
    mask[:, :, 1] = 1
    changed = prediction.clone()
    changed[:, :, 0] += 10
    masked = flow_matching.flow_loss(prediction, target, mask=mask)
    torch.testing.assert_close(flow_matching.flow_loss(changed, target, mask=mask), masked)
    torch.testing.assert_close(masked, torch.nn.functional.mse_loss(prediction[:, :, 1], target[:, :, 1]))

    # Per-sample weighting: a zero weight removes a sample.
    weights = torch.tensor([1.0, 0.0, 1.0])
    expected = torch.nn.functional.mse_loss(prediction[[0, 2]], target[[0, 2]])
    torch.testing.assert_close(flow_matching.flow_loss(prediction, target, weighting=weights), expected)

    with pytest.raises(ValueError, match=r"`prediction` has shape \(3, 16, 2, 4, 4\), expected \(3, 16, 1, 4, 4\)"):
        flow_matching.flow_loss(prediction, target[:, :, :1])
    with pytest.raises(ValueError, match=r"`sigma` has shape \(2,\), expected \(3,\)"):
        flow_matching.add_noise(prediction, target, torch.ones(2))


def test_retrieve_timesteps_with_explicit_sigmas():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    timesteps, num_steps = flow_matching.retrieve_timesteps(scheduler, sigmas=[1.0, 0.75, 0.5, 0.25])
    assert num_steps == 4
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    with pytest.raises(ValueError, match="exactly one"):
        flow_matching.retrieve_timesteps(scheduler)
