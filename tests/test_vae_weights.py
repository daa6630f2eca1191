"""The VAE's mouth-weighted reconstruction loss (training.train_vae ``loss.lip_weight`` / ``loss.face_weight``): region
labels rasterised from the clips' landmarks, cut and flipped with their frames, weighting the pixel terms."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan

from echo.clip_format import read_landmarks
from echo.masks import rasterize_masks
from training import train_vae
from training.testing import make_tiny_training_set

ROOT = Path(__file__).resolve().parents[1]


def test_weighted_mean_gives_the_lip_pixels_their_weight():
    loss = train_vae.VaeLossConfig(lip_weight=9.0, face_weight=1.0)
    regions = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    regions[0, 0, 0, :2] = train_vae.LIP
    regions[0, 0, 1, :2] = train_vae.FACE
    weights = train_vae.pixel_weights(regions, loss)[:, None]
    assert weights.unique().tolist() == [1.0, 2.0, 10.0]

    def error_at(row):
        error = torch.zeros(1, 3, 1, 4, 4)
        error[..., row, :2] = 1.0
        return train_vae.weighted_mean(error, weights)

    # The same error on two lip pixels counts 10 times as much as on two background pixels, twice on the face.
    torch.testing.assert_close(error_at(0) / error_at(3), torch.tensor(10.0))
    torch.testing.assert_close(error_at(1) / error_at(3), torch.tensor(2.0))
    # No labels: the plain mean.
    error = torch.rand(2, 3, 1, 4, 4)
    torch.testing.assert_close(train_vae.weighted_mean(error, None), error.mean())


@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory):
    return make_tiny_training_set(tmp_path_factory.mktemp("clips"), num_frames=17, size=64)


def test_the_bank_labels_are_the_landmarks_masks(tiny_clips):
    folders = train_vae.clip_folders(tiny_clips)
    bank, labels = train_vae.load_clip_bank(folders, 2, 5, 64, seed=0, progress=False, regions=True)
    plain = train_vae.load_clip_bank(folders, 2, 5, 64, seed=0, progress=False)
    np.testing.assert_array_equal(bank, plain)  # the same clips, drawn alike
    assert labels.shape == bank.shape[:4] and (labels == train_vae.LIP).any() and (labels == train_vae.FACE).any()
    # The first clip of the first folder: find its start by its frames, and compare with the masks of those frames.
    from echo.media import read_video

    frames, _ = read_video(folders[0] / "avatar.mp4")
    start = next(s for s in range(len(frames) - 4) if np.array_equal(frames[s : s + 5], bank[0]))
    lip, face = rasterize_masks(read_landmarks(folders[0], "avatar")[start : start + 5], 64, 64)
    np.testing.assert_array_equal(labels[0] == train_vae.LIP, lip)
    np.testing.assert_array_equal(labels[0] == train_vae.FACE, face)


def test_labels_are_cut_and_flipped_with_their_frames():
    """A bank whose pixels are their own labels: every batch's labels must read back from its frames."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(6, 9, 32, 32)).astype(np.uint8)
    labels[..., :16] = 0  # left/right asymmetric, so a flip of one but not the other shows
    bank = np.repeat((labels * 100)[..., None], 3, axis=-1).astype(np.uint8)
    data = train_vae.VaeDataConfig(
        resolution=32, clip_frames=9, clip_crop=16, clip_every=2, frame_batch_size=3, small_size=16
    )
    flipped = 0
    for step in range(12):
        batches = train_vae.step_batches(bank, data, seed=0, step=step, rank=0, labels=labels)
        for video, regions in batches:
            if regions is None:  # the user-size frames are unweighted
                assert video.shape[-1] == 16 and step % 2 == 0
                continue
            decoded = ((video[:, 0] + 1) * 127.5).round() / 100
            torch.testing.assert_close(decoded, regions.float(), rtol=0, atol=0)
            flipped += bool((regions[..., :16] > 0).any())
    assert flipped  # some frame steps were flipped, labels with them
    assert all(r is None for _, r in train_vae.step_batches(bank, data, seed=0, step=0, rank=0))


def test_the_training_module_weights_only_when_asked():
    arch = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())["vae"]["config"]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**arch)
    video = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    regions = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    regions[..., 12:20, 8:24] = train_vae.LIP

    def parts(loss, with_regions):
        module = train_vae.VaeTrainingModule(vae, loss)
        return module(video, torch.Generator().manual_seed(0), regions if with_regions else None)[1]

    plain = parts(train_vae.VaeLossConfig(), False)
    unweighted = parts(train_vae.VaeLossConfig(), True)  # labels but zero weights: the plain mean
    torch.testing.assert_close(unweighted["l1"], plain["l1"])
    weighted = parts(train_vae.VaeLossConfig(lip_weight=4.0), True)
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
        error = (vae.decode(posterior.sample(generator=torch.Generator().manual_seed(0))).sample - video).abs()
    inside = error[..., 12:20, 8:24].sum()
    expected = (error.sum() + 4.0 * inside) / (error[:, :1].numel() + 4.0 * 8 * 16) / 3
    torch.testing.assert_close(weighted["l1"], expected)
    assert not torch.allclose(weighted["l1"], plain["l1"])


def test_lip_crops_hold_the_whole_mouth_and_still_move():
    rng = np.random.default_rng(0)
    labels = np.zeros((5, 64, 64), dtype=np.uint8)
    labels[2, 40:46, 20:38] = train_vae.LIP  # the mouth, in one frame only: the crop covers the chunk's union
    corners = set()
    for _ in range(50):
        y, x = train_vae.lip_crop(labels, 32, rng)
        assert 0 <= y <= 32 and 0 <= x <= 32
        assert (labels[:, y : y + 32, x : x + 32] == train_vae.LIP).sum() == (labels == train_vae.LIP).sum()
        corners.add((y, x))
    assert len(corners) > 10  # random among the crops that hold it
    wide = np.zeros((1, 64, 64), dtype=np.uint8)
    wide[0, 30:34, 4:60] = train_vae.LIP  # wider than the crop: centred on it
    assert train_vae.lip_crop(wide, 32, rng)[1] == 16
    empty = np.zeros((1, 64, 64), dtype=np.uint8)
    assert len({train_vae.lip_crop(empty, 32, rng) for _ in range(20)}) > 1  # no mouth: anywhere

    # In the clip steps: every lip pixel of the drawn clip is inside the crop.
    bank_labels = np.zeros((4, 9, 64, 64), dtype=np.uint8)
    for clip in range(4):
        bank_labels[clip, :, 44 - 4 * clip : 50 - 4 * clip, 10 + 6 * clip : 30 + 6 * clip] = train_vae.LIP
    bank = np.zeros((4, 9, 64, 64, 3), dtype=np.uint8)
    data = train_vae.VaeDataConfig(resolution=64, clip_frames=9, clip_crop=32, clip_every=1, clip_crop_on_lips=True)
    for step in range(8):
        ((_, regions),) = train_vae.step_batches(bank, data, seed=0, step=step, rank=0, labels=bank_labels)
        assert (regions == train_vae.LIP).sum() == 9 * 6 * 20


class _Reconstruction:
    """A stand-in autoencoder for the measure: decodes every frame as the chunk's first (``copy``) or as itself."""

    def __init__(self, copy: bool):
        self.copy, self.dtype = copy, torch.float32

    def encode(self, video):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: video))

    def decode(self, latents):
        from types import SimpleNamespace

        video = latents[:, :, :1].expand_as(latents) if self.copy else latents + 0.01
        return SimpleNamespace(sample=video)


def test_chunk_metrics_flag_a_vae_that_decodes_every_frame_as_the_first(tiny_clips):
    folders = train_vae.clip_folders(tiny_clips)
    copying = train_vae.chunk_metrics(_Reconstruction(copy=True), folders, 2, 9, 64, "cpu")
    faithful = train_vae.chunk_metrics(_Reconstruction(copy=False), folders, 2, 9, 64, "cpu")
    assert copying["chunks"] == faithful["chunks"] == 2
    assert copying["lip_first_frame_ratio"] > 1.0 > faithful["lip_first_frame_ratio"]
    # the copy's lip PSNR falls after the first frame; the faithful one stays at its (constant) error
    assert copying["lip_psnr_by_position"][0] > max(copying["lip_psnr_by_position"][1:])
    assert len(set(faithful["lip_psnr_by_position"])) == 1


def test_the_motion_term_compares_frame_differences():
    """``loss.motion``: on a clip, ``|Δx̂ − Δx|`` over consecutive frames (the later frame's pixel weights) is added to
    the loss with its weight; a single frame has no motion term; a negative weight is refused by name."""
    arch = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())["vae"]["config"]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**arch)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    regions = torch.zeros(1, 5, 32, 32, dtype=torch.uint8)
    for t in range(5):  # the mouth moves down a row a frame: the weights of frame t, not t − 1, count
        regions[:, t, 12 + t : 20 + t, 8:24] = train_vae.LIP

    def run(loss, clip=video):
        module = train_vae.VaeTrainingModule(vae, loss)
        return module(clip, torch.Generator().manual_seed(0), regions[:, : clip.shape[2]])

    plain_total, plain = run(train_vae.VaeLossConfig(lip_weight=3.0))
    total, parts = run(train_vae.VaeLossConfig(lip_weight=3.0, motion=2.0))
    assert "motion" not in plain and set(parts) == {"l1", "l2", "kl", "motion"}
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
        decoded = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(0))).sample
    error = (decoded.diff(dim=2) - video.diff(dim=2)).abs()  # 1, 3, 4, 32, 32
    inside = sum(error[:, :, t - 1, 12 + t : 20 + t, 8:24].sum() for t in range(1, 5))
    expected = (error.sum() + 3.0 * inside) / (error[:, :1].numel() + 3.0 * 4 * 8 * 16) / 3
    torch.testing.assert_close(parts["motion"], expected)
    torch.testing.assert_close(total, plain_total + 2.0 * expected)
    _, single = run(train_vae.VaeLossConfig(motion=2.0), video[:, :, :1])
    assert "motion" not in single
    with pytest.raises(ValueError, match=r"loss\.motion"):
        train_vae.load_vae_config(None, ["loss.motion=-1"])
