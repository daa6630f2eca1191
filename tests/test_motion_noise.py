"""Noise augmentation of a continuation sample's motion frames (``loss.motion_noise``, training/step.py)."""

import torch

from training.step import noise_motion_latents

MASK, LATENT, FRAMES = 4, 16, 5


def _condition(batch=3):
    return torch.randn(batch, MASK + 2 * LATENT, FRAMES, 6, 6, generator=torch.Generator().manual_seed(0))


def test_only_the_motion_frames_given_latents_are_noised():
    condition = _condition()
    out = noise_motion_latents(condition, 2, 0.5, MASK, torch.Generator().manual_seed(1))
    given = slice(MASK, MASK + LATENT)
    assert torch.equal(out[:, :MASK], condition[:, :MASK])  # the mask
    assert torch.equal(out[:, MASK + LATENT :], condition[:, MASK + LATENT :])  # the reference plane
    assert torch.equal(out[:, given, 2:], condition[:, given, 2:])  # frames after the motion frames
    assert not torch.equal(out[:, given, :2], condition[:, given, :2])
    assert torch.equal(condition, _condition())  # the input is not modified in place


def test_noise_follows_the_flow_matching_mix_with_a_level_below_the_maximum():
    condition = _condition(batch=64)
    out = noise_motion_latents(condition, 2, 0.4, MASK, torch.Generator().manual_seed(2))
    given = slice(MASK, MASK + LATENT)
    # Reproduce the draw: out = (1 − s)·z + s·ε, so s per sample is recovered by least squares against the same ε.
    generator = torch.Generator().manual_seed(2)
    levels = torch.rand(64, generator=generator) * 0.4
    noise = torch.randn(condition[:, given, :2].shape, generator=generator)
    expected = (1 - levels.view(-1, 1, 1, 1, 1)) * condition[:, given, :2] + levels.view(-1, 1, 1, 1, 1) * noise
    torch.testing.assert_close(out[:, given, :2], expected)
    assert 0 <= levels.min() and levels.max() <= 0.4 and levels.std() > 0.05  # per sample, not one level for all


def test_zero_level_leaves_the_condition_unchanged():
    condition = _condition()
    assert torch.equal(noise_motion_latents(condition, 2, 0.0, MASK, torch.Generator().manual_seed(3)), condition)


def _video(batch=4):
    generator = torch.Generator().manual_seed(5)
    return torch.rand(batch, 3, 5, 32, 32, generator=generator) * 2 - 1


def test_blur_softens_each_sample_by_its_own_sigma_and_keeps_the_mean():
    from training.step import blur_motion_video

    video = _video(batch=16)
    out = blur_motion_video(video, 3.0, torch.Generator().manual_seed(7))
    sigmas = torch.rand(16, generator=torch.Generator().manual_seed(7)) * 3.0  # the same draw

    def detail(x):  # energy of the frame-wise horizontal differences
        return (x[..., 1:] - x[..., :-1]).pow(2).mean(dim=(1, 2, 3, 4))

    kept = detail(out) / detail(video)
    for sigma, ratio in zip(sigmas.tolist(), kept.tolist()):
        if sigma < 0.3:
            assert ratio == 1.0  # left as is
        else:
            assert ratio < 0.8
    order = torch.argsort(sigmas[sigmas >= 0.3])
    assert torch.all(kept[sigmas >= 0.3][order][1:] <= kept[sigmas >= 0.3][order][:-1] + 1e-6)  # more σ, less detail
    torch.testing.assert_close(out.mean(dim=(1, 2, 3, 4)), video.mean(dim=(1, 2, 3, 4)), atol=0.02, rtol=0)
    assert torch.equal(video, _video(batch=16))  # the input is not modified in place


def test_blur_of_a_constant_frame_is_the_same_frame():
    from training.step import blur_motion_video

    video = torch.full((2, 3, 5, 16, 16), 0.25)
    torch.testing.assert_close(blur_motion_video(video, 4.0, torch.Generator().manual_seed(0)), video)
