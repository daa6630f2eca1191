"""Shared helpers: mask rasterisation and token-grid reduction, audio windows and frame RMS."""

import numpy as np
import pytest
import torch

from echo.audio import frame_rms, resample_rows, window_features
from echo.masks import FACE_OVAL, LIPS_OUTER, NUM_LANDMARKS, masks_to_token_grid, rasterize_masks


def _synthetic_landmarks(cx=32.0, cy=32.0, face_r=24.0, mouth_w=8.0, mouth_h=3.0, mouth_y=44.0):
    """478 points with the face-oval ring on a circle and the outer-lip ring on a small ellipse."""
    points = np.full((NUM_LANDMARKS, 2), [cx, cy], dtype=np.float32)
    for k, idx in enumerate(FACE_OVAL):
        a = 2 * np.pi * k / len(FACE_OVAL)
        points[idx] = [cx + face_r * np.sin(a), cy - face_r * np.cos(a)]
    for k, idx in enumerate(LIPS_OUTER):
        a = 2 * np.pi * k / len(LIPS_OUTER)
        points[idx] = [cx + mouth_w * np.cos(a), mouth_y + mouth_h * np.sin(a)]
    return points


def test_rasterized_masks_cover_their_polygons_and_do_not_overlap():
    lm = _synthetic_landmarks()
    lip, face = rasterize_masks(lm, 64, 64)
    assert lip.shape == face.shape == (1, 64, 64)
    assert not (lip & face).any()
    assert lip[0, 44, 32] and not face[0, 44, 32]  # mouth centre is lip
    assert face[0, 20, 32] and not lip[0, 20, 32]  # forehead is face
    assert not lip[0, 2, 2] and not face[0, 2, 2]  # corner is background
    # Rasterising at twice the resolution scales the areas by ~4.
    lip2, face2 = rasterize_masks(lm, 128, 128, source_size=(64, 64))
    assert abs(face2.sum() / face.sum() - 4) < 0.4
    assert abs(lip2.sum() / lip.sum() - 4) < 0.8


def test_missing_face_gives_empty_masks_and_bad_shape_names_the_input():
    lm = np.stack([_synthetic_landmarks(), np.full((NUM_LANDMARKS, 2), np.nan, np.float32)])
    lip, face = rasterize_masks(lm, 64, 64)
    assert lip[0].any() and not lip[1].any() and not face[1].any()
    with pytest.raises(ValueError, match="landmarks"):
        rasterize_masks(np.zeros((5, 68, 2)), 64, 64)


def test_token_grid_uses_any_pixel_of_any_covered_frame():
    mask = torch.zeros(9, 32, 32)
    mask[6, 17, 3] = 1  # video frame 6 belongs to latent frame 2 (frames 5-8)
    mask[0, 0, 31] = 1  # video frame 0 is latent frame 0 alone
    tok = masks_to_token_grid(mask, patch_size=(16, 16))
    assert tok.shape == (3, 2, 2)
    expected = torch.zeros(3, 2, 2)
    expected[2, 1, 0] = 1
    expected[0, 0, 1] = 1
    assert torch.equal(tok, expected)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        masks_to_token_grid(torch.zeros(8, 32, 32))


def test_window_features_centres_each_frame_and_replicates_edges():
    x = torch.arange(6.0).reshape(1, 6, 1)
    w = window_features(x, radius=2, dim=1)
    assert w.shape == (1, 6, 5, 1)
    assert w[0, 3, :, 0].tolist() == [1, 2, 3, 4, 5]
    assert w[0, 0, :, 0].tolist() == [0, 0, 0, 1, 2]
    assert w[0, 5, :, 0].tolist() == [3, 4, 5, 5, 5]


def test_resample_rows_gives_exact_row_count_and_keeps_endpoints():
    x = torch.linspace(0, 1, 50)[:, None, None].repeat(1, 3, 4)
    y = resample_rows(x, 25)
    assert y.shape == (25, 3, 4)
    assert torch.allclose(y[0], x[0]) and torch.allclose(y[-1], x[-1])


def test_frame_rms_is_high_on_tone_and_zero_on_silence():
    sr, fps = 16000, 25
    t = np.arange(sr) / sr
    wave = np.concatenate([0.5 * np.sin(2 * np.pi * 220 * t), np.zeros(sr)])
    rms = frame_rms(wave, 50, sr, fps)
    assert rms.shape == (50,)
    assert np.allclose(rms[:25], 0.5 / np.sqrt(2), atol=0.02)
    assert np.all(rms[25:] == 0)
