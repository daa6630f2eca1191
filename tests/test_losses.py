"""Behaviour of the training losses: L_pixel (stage 1), w(i) on real speech and L_align (Eq. 12, stage 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echo.audio import SAMPLE_RATE, frame_rms
from echo.encoding import normalize_latents
from echo.losses import (
    denormalize_latents,
    hfa_loss,
    latent_frame_weights,
    latent_to_video_frames,
    lip_loss_weights,
    pixel_loss,
    sample_blocks,
    speech_weights,
)


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return vae.eval().requires_grad_(False)


def test_latent_normalisation_round_trip(tiny_vae):
    z = torch.randn(2, 16, 3, 4, 4)
    normalised = normalize_latents(tiny_vae, z)
    assert not torch.allclose(normalised, z)
    torch.testing.assert_close(denormalize_latents(tiny_vae, normalised), z, rtol=1e-5, atol=1e-5)


def test_pixel_loss_full_run_equals_decoded_mse_and_reaches_only_the_prediction(tiny_vae):
    torch.manual_seed(1)
    pred = torch.randn(1, 16, 3, 2, 2, requires_grad=True)  # F = 3 latent frames → 9 video frames of 16²
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    loss = pixel_loss(tiny_vae, pred, video, num_latent_frames=3)
    decoded = tiny_vae.decode(denormalize_latents(tiny_vae, pred.detach()), return_dict=False)[0]
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(decoded, video), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vae.parameters())  # the VAE stays frozen


def test_pixel_loss_subset_only_depends_on_its_frames(tiny_vae):
    pred = torch.randn(1, 16, 3, 2, 2, requires_grad=True)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    loss = pixel_loss(tiny_vae, pred, video, num_latent_frames=1, start=2)
    loss.backward()
    # Only latent frame 2 was decoded: no gradient reaches frames 0 and 1.
    assert pred.grad[:, :, :2].abs().sum() == 0 and pred.grad[:, :, 2].abs().sum() > 0
    # Its single decoded frame is compared with video frame 8, the last frame latent frame 2 covers.
    assert latent_to_video_frames(2, 1) == [8]
    changed = video.clone()
    changed[:, :, :8] = 0.0
    torch.testing.assert_close(pixel_loss(tiny_vae, pred, changed, num_latent_frames=1, start=2), loss.detach())


def test_pixel_loss_rejects_mismatched_frames(tiny_vae):
    with pytest.raises(ValueError, match="`video` has 8 frames"):
        pixel_loss(tiny_vae, torch.randn(1, 16, 3, 2, 2), torch.zeros(1, 3, 8, 16, 16))


@pytest.fixture(scope="module")
def speech_with_silence(tmp_path_factory):
    """Real speech from espeak-ng framed by one second of silence on each side, as (waveform, speech_mask)."""
    from scipy.signal import resample_poly

    from synthetic.conversations import speech_pcm

    wave, rate = speech_pcm("Hello there, how are you doing today?", voice="en", speed=175)
    wave = wave.astype(np.float32) / 32768.0
    wave = resample_poly(wave, SAMPLE_RATE, rate).astype(np.float32)
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    full = np.concatenate([silence, wave, silence])
    return full, len(silence), len(silence) + len(wave)


def test_speech_weights_favour_speaking_frames_of_real_speech(speech_with_silence):
    from echo.data import track_rms_reference

    wave, speech_start, speech_end = speech_with_silence
    num_frames = int(len(wave) / SAMPLE_RATE * 25)
    rms = frame_rms(wave, num_frames)
    rms = torch.from_numpy(rms / track_rms_reference(rms))[None]  # normalised over the whole track, as the dataset does
    weights = speech_weights(rms, floor=0.1)[0]
    frames = np.arange(num_frames)
    silent = (frames + 1) * SAMPLE_RATE / 25 <= speech_start
    silent |= frames * SAMPLE_RATE / 25 >= speech_end
    loud = rms[0] > 0.25 * rms.max()
    assert silent.sum() >= 40 and loud.sum() >= 10
    torch.testing.assert_close(weights[torch.from_numpy(silent)], torch.full((int(silent.sum()),), 0.1))
    assert weights[loud].min() > 0.1 + 0.9 * 0.25 - 1e-6
    assert weights.max() == pytest.approx(1.0)
    # The weight is a monotone function of the track-normalised energy.
    order = torch.argsort(rms[0])
    assert torch.all(torch.diff(weights[order]) >= -1e-7)


def test_speech_weights_map_track_normalised_rms_without_per_window_normalisation():
    """w = floor + (1 − floor)·clamp(r̂, 0, 1) frame by frame: a window of quiet frames is not stretched to 1, and a
    frame's weight does not depend on the other frames of its window."""
    rms = torch.tensor([[0.0, 0.01, 0.02, 0.01, 0.0], [0.2, 0.9, 1.3, -0.1, 0.5]])
    expected = 0.1 + 0.9 * rms.clamp(0, 1)
    torch.testing.assert_close(speech_weights(rms, floor=0.1), expected)
    assert speech_weights(rms[:1], floor=0.1).max() < 0.12  # listening only: at the floor
    torch.testing.assert_close(speech_weights(rms[:, :2], floor=0.3), speech_weights(rms, floor=0.3)[:, :2])
    assert speech_weights(rms, floor=1.0).eq(1).all() and speech_weights(rms, floor=0.0)[1, 2] == 1


def test_latent_frame_weights_group_like_the_vae():
    weights = torch.tensor([[1.0, 0, 0, 0, 4.0, 2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(latent_frame_weights(weights), torch.tensor([[1.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="expected 4k \\+ 1"):
        latent_frame_weights(torch.ones(1, 8))


def test_hfa_loss_zero_iff_features_match_and_weighted_per_frame():
    torch.manual_seed(0)
    num_frames, tokens, dim = 3, 4, 8
    ref = {0: torch.randn(2, num_frames * tokens, dim), 1: torch.randn(2, num_frames * tokens, dim)}
    same = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    weights = torch.rand(2, num_frames) + 0.1
    assert hfa_loss(same, ref, weights, num_frames).item() == 0.0

    # Perturb frame 1 of block 0 only: the loss is w(1)·d̄ / (F·|S|), averaged over the batch.
    moved = {k: v.clone() for k, v in ref.items()}
    moved[0] = moved[0].reshape(2, num_frames, tokens, dim)
    moved[0][:, 1] += 2.0
    moved[0] = moved[0].reshape(2, num_frames * tokens, dim)
    expected = (weights[:, 1] * 4.0).mean() / num_frames / 2
    torch.testing.assert_close(hfa_loss(moved, ref, weights, num_frames), expected)
    # A zero weight on that frame removes its contribution entirely.
    weights_zero = weights.clone()
    weights_zero[:, 1] = 0
    assert hfa_loss(moved, ref, weights_zero, num_frames).item() == 0.0

    # Gradients reach the adapted features, never the reference.
    ref_grad = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    adapted = {k: (v + 0.5).requires_grad_(True) for k, v in ref.items()}
    hfa_loss(adapted, ref_grad, weights, num_frames).backward()
    assert adapted[0].grad.abs().sum() > 0 and ref_grad[0].grad is None


def test_hfa_loss_names_mismatched_blocks():
    with pytest.raises(ValueError, match="same"):
        hfa_loss({0: torch.zeros(1, 4, 2)}, {1: torch.zeros(1, 4, 2)}, torch.ones(1, 2), 2)


def test_sample_blocks_is_a_seeded_subset():
    a = sample_blocks(30, 4, torch.Generator().manual_seed(3))
    assert a == sample_blocks(30, 4, torch.Generator().manual_seed(3))
    assert len(set(a)) == 4 and all(0 <= i < 30 for i in a) and a == sorted(a)
    with pytest.raises(ValueError, match="num_blocks"):
        sample_blocks(2, 3)


def test_lip_loss_weights_spread_each_lip_token_over_its_patch_and_keep_the_loss_scale():
    from echo.flow_matching import flow_loss

    lip = torch.zeros(2, 3, 4, 4)
    lip[0, :, 2, 1] = 1  # one lip token of sample 0, every latent frame
    weights = lip_loss_weights(lip, (2, 16, 3, 8, 8), lip_weight=5.0)
    assert weights.shape == (2, 1, 3, 8, 8)
    assert weights[0, 0, :, 4:6, 2:4].eq(5).all()  # token (2, 1) is latent pixels 4-5 x 2-3
    assert weights[0].sum() == 3 * (64 - 4 + 4 * 5) and weights[1].eq(1).all()
    # A weighted mean: the same error everywhere gives the same loss, an error on the lips alone counts 5 times more
    # than the same error off them.
    prediction, target = torch.zeros(2, 16, 3, 8, 8), torch.ones(2, 16, 3, 8, 8)
    assert float(flow_loss(prediction, target, mask=weights)) == pytest.approx(1.0)
    on_lip, off_lip = torch.zeros_like(target), torch.zeros_like(target)
    on_lip[0, :, :, 4, 2] = 1
    off_lip[0, :, :, 0, 0] = 1
    assert float(flow_loss(prediction, on_lip, mask=weights)) == pytest.approx(
        5 * float(flow_loss(prediction, off_lip, mask=weights))
    )
    torch.testing.assert_close(lip_loss_weights(lip, (2, 16, 3, 8, 8), 1.0), torch.ones(2, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="lip_weight"):
        lip_loss_weights(lip, (2, 16, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="token patches"):
        lip_loss_weights(lip, (2, 16, 3, 6, 6), 2.0)
