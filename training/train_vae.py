"""Train a Wan VAE (`AutoencoderKLWan`) on prepared clips: the demo model's VAE (``configs/train/demo_vae.yaml``).

    python -m training.train_vae --config configs/train/demo_vae.yaml [--set train.max_train_steps=10]
    accelerate launch -m training.train_vae --config configs/train/demo_vae.yaml      # same, any accelerate config

Data: the ``avatar.mp4`` of every clip folder under ``data.root`` (echo-prep output). A bank of ``clips_per_folder``
random ``clip_frames``-frame clips per folder is decoded once into memory; each step draws from it, as a pure
function of ``(seed, step, rank)``, so a resumed run sees the batches the interrupted one would have seen.

- frame steps: ``frame_batch_size`` single frames at ``resolution`` (the reference image's path through the causal
  VAE) and the same frames downscaled to ``small_size`` (the user video the LCU encodes);
- clip steps (every ``clip_every``-th step): ``clip_batch_size`` clips of ``clip_frames`` = 4k + 1 frames, randomly
  cropped to ``clip_crop``² (the temporal path).

Loss: ``l1·|x̂ − x| + l2·(x̂ − x)² + kl·KL(q(z|x) ‖ N(0, I))`` (means over elements), x̂ decoded from a posterior
sample; AdamW with a linear warm-up. With ``loss.lip_weight`` / ``loss.face_weight`` the pixel terms are weighted
means, each pixel weighing ``1 + lip_weight`` inside the clip's lip mask and ``1 + face_weight`` on the rest of the
face (`echo.masks.rasterize_masks` of the clip's ``avatar_landmarks.npy``): at 8 × 8 compression the mouth is a few
latent cells wide, and an unweighted loss gives them no more say than the background. ``data.clip_crop_on_lips``
crops every clip step around the clip's lip region. Everything runs through `accelerate` (a GPU when present, mixed
precision from the accelerate config).

Checkpoints (``output_dir/checkpoint-<step>/``, written atomically, the newest ``checkpoints_total_limit`` kept) are
safetensors only: ``vae.safetensors``, ``optimizer.safetensors`` (AdamW moments, per parameter index) and
``state.json`` (step, param groups); nothing is unpickled. A rerun resumes from the newest one by itself.

At the end, the posterior mode of ``stats_clips`` training clips gives per-channel ``latents_mean`` /
``latents_std``, written into the VAE config (`echo.encoding.normalize_latents` then hands the generator
unit-variance latents), the VAE is saved with ``save_pretrained`` into ``export_dir``, and the reconstruction PSNR /
SSIM on ``eval_frames`` frames of the held-out clips, and `chunk_metrics` on ``eval_chunks`` held-out chunks, go into
``output_dir/report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from echo.chunks import check_frame_count
from echo.clip_format import read_landmarks
from echo.components import read_yaml
from echo.masks import rasterize_masks
from echo.media import read_video
from echo.metrics.behaviour import psnr, ssim

from .config import apply_overrides, from_dict
from .modeling import read_safetensors

logger = logging.getLogger("train_vae")

REPORT_NAME = "report.json"


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VaeDataConfig:
    root: str = "data/demo/prepared/train"  # prepared clip folders
    heldout_root: str | None = None  # clip folders for the reconstruction PSNR (defaults to `root`)
    resolution: int = 128
    clips_per_folder: int = 8
    frame_batch_size: int = 4
    small_size: int = 32  # 0: no downscaled frames
    small_batch_size: int = 8
    clip_frames: int = 5  # 4k + 1
    clip_batch_size: int = 1
    clip_crop: int = 64
    clip_every: int = 2  # 0: no clip steps
    # Clip crops hold the clip's whole lip region (from the clips' landmarks, as the loss weights): the mouth is what
    # the temporal path must reconstruct frame by frame, and a random crop often misses it.
    clip_crop_on_lips: bool = False


@dataclass
class VaeOptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50
    max_grad_norm: float = 1.0


@dataclass
class VaeLossConfig:
    l1: float = 1.0
    l2: float = 1.0
    kl: float = 1e-6
    lip_weight: float = 0.0  # extra weight of the pixels inside the lip mask (0: a plain mean)
    face_weight: float = 0.0  # extra weight of the rest of the face
    # Weight of the frame-to-frame term (clip steps): |Δx̂ − Δx| with Δ the difference of consecutive frames, weighted
    # as the pixel terms. A mouth decoded once per latent frame (4 video frames) has Δx̂ = 0 inside a latent frame,
    # whatever its per-frame error; this term asks for the motion itself. Measured on the demo VAE (300 chunk steps
    # beyond its 1,200, docs/demo_model.md): weight 5 lowered the lip sync r ceiling (0.311 vs 0.385 without): off.
    motion: float = 0.0

    @property
    def weighted(self) -> bool:
        return bool(self.lip_weight or self.face_weight)


@dataclass
class VaeTrainSettings:
    max_train_steps: int = 900
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 2
    log_every: int = 10
    stats_clips: int = 128
    eval_frames: int = 64
    eval_chunks: int = 8  # held-out chunks of data.clip_frames for `chunk_metrics` (0: none)
    # Train the decoder only (with ``init_from``): the encoder, its latent statistics and so every latent a generator
    # was trained on stay as they are, while the pictures decoded from them sharpen.
    freeze_encoder: bool = False


@dataclass
class VaeTrainConfig:
    """``configs/train/demo_vae.yaml``: every key optional; an unknown key is an error naming its dotted path."""

    output_dir: str = "outputs/demo/vae_train"
    export_dir: str = "outputs/demo/vae"
    seed: int = 0
    vae: dict = field(default_factory=dict)  # diffusers.AutoencoderKLWan arguments
    init_from: str | None = None  # a saved AutoencoderKLWan folder to start from instead of `vae` (random weights)
    data: VaeDataConfig = field(default_factory=VaeDataConfig)
    optim: VaeOptimConfig = field(default_factory=VaeOptimConfig)
    loss: VaeLossConfig = field(default_factory=VaeLossConfig)
    train: VaeTrainSettings = field(default_factory=VaeTrainSettings)


def load_vae_config(path: str | Path | None, overrides: list[str] = ()) -> VaeTrainConfig:
    """Read the YAML, apply ``section.key=value`` overrides (values parsed as YAML), check keys and values."""

    values = apply_overrides((read_yaml(path, "VAE training config") or {}) if path else {}, overrides)
    config = from_dict(VaeTrainConfig, values)
    data = config.data
    check_frame_count(data.clip_frames, "config key 'data.clip_frames'")
    for key in ("resolution", "clip_crop"):
        if getattr(data, key) % 8:
            raise ValueError(f"config key 'data.{key}' is {getattr(data, key)}, expected a multiple of 8")
    if data.clip_crop > data.resolution:
        raise ValueError(f"config key 'data.clip_crop' ({data.clip_crop}) exceeds data.resolution ({data.resolution})")
    for key in ("l1", "l2", "kl", "lip_weight", "face_weight", "motion"):
        if getattr(config.loss, key) < 0:
            raise ValueError(f"config key 'loss.{key}' is {getattr(config.loss, key)}, expected a weight >= 0")
    if config.train.freeze_encoder and not config.init_from:
        raise ValueError("config key 'train.freeze_encoder' needs 'init_from' (the trained VAE whose encoder to keep)")
    if config.init_from and config.vae:
        raise ValueError("config keys 'init_from' and 'vae' conflict: a VAE is either loaded or built from arguments")
    return config


ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # AutoencoderKLWan's encoding path


def load_vae_folder(folder: str | Path, what: str, hint: str):
    """The `AutoencoderKLWan` saved in ``folder`` (float32, safetensors); a folder without ``config.json`` is refused
    with ``"<what> not a saved AutoencoderKLWan folder (no config.json); <hint>"`` (``what`` names the input), before
    diffusers would take the path for a hub name."""
    from diffusers import AutoencoderKLWan

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{what} not a saved AutoencoderKLWan folder (no config.json); {hint}")
    return AutoencoderKLWan.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)


def freeze_encoder(vae) -> list[torch.nn.Parameter]:
    """Freeze the encoding path of an `AutoencoderKLWan`; returns the parameters left to train (the decoder's)."""
    trainable = []
    for name, parameter in vae.named_parameters():
        frozen = name.startswith(ENCODER_PREFIXES)
        parameter.requires_grad_(not frozen)
        if not frozen:
            trainable.append(parameter)
    return trainable


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def clip_folders(root: str | Path, key: str = "data.root") -> list[Path]:
    """Prepared clip folders under ``root`` (those with ``meta.json`` and ``avatar.mp4``), sorted; ``key`` names the
    config key it came from in the error when it does not exist."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist (config key {key!r}); run the data step first")
    folders = sorted(p for p in root.iterdir() if (p / "meta.json").is_file() and (p / "avatar.mp4").is_file())
    if not folders:
        raise FileNotFoundError(f"no prepared clip folder (meta.json + avatar.mp4) under {str(root)!r}")
    return folders


# Labels of `load_clip_bank`'s regions: background, face (not lip), lip.
BACKGROUND, FACE, LIP = 0, 1, 2


def load_clip_bank(
    folders: list[Path],
    clips_per_folder: int,
    clip_frames: int,
    resolution: int,
    seed: int,
    progress: bool = True,
    regions: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """`(N, clip_frames, resolution, resolution, 3)` uint8: random clips of each folder's ``avatar.mp4``; with
    ``regions``, also `(N, clip_frames, resolution, resolution)` uint8 labels `BACKGROUND` / `FACE` / `LIP` of every
    pixel, rasterised from the folder's avatar landmarks (`echo.masks.rasterize_masks`)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    bank, labels = [], []
    for folder in tqdm(folders, desc="train-vae: read clips", unit="clip", disable=not progress):
        frames, _ = read_video(folder / "avatar.mp4")
        source_size = frames.shape[1:3]
        if frames.shape[1:3] != (resolution, resolution):
            video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
            video = F.interpolate(video, size=(resolution, resolution), mode="bilinear", antialias=True)
            frames = video.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        if len(frames) < clip_frames:
            continue
        starts = rng.integers(0, len(frames) - clip_frames + 1, size=clips_per_folder)
        bank += [frames[s : s + clip_frames] for s in starts]
        if regions:
            landmarks = read_landmarks(folder, "avatar", len(frames))
            for s in starts:
                lip, face = rasterize_masks(landmarks[s : s + clip_frames], resolution, resolution, source_size)
                labels.append(np.where(lip, LIP, np.where(face, FACE, BACKGROUND)).astype(np.uint8))
    if not bank:
        raise ValueError(f"no clip of {clip_frames} frames in {len(folders)} folders")
    return (np.stack(bank), np.stack(labels)) if regions else np.stack(bank)


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """`(B, T, H, W, 3)` uint8 → `(B, 3, T, H, W)` float in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def lip_crop(labels: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random crop corner `(y, x)` whose ``crop``² window holds every `LIP` pixel of ``labels`` `(..., H, W)` (as
    much of it as fits, centred on it, when it is larger than the crop); anywhere when there is none."""
    size = labels.shape[-1]
    rows, cols = np.nonzero((labels == LIP).reshape(-1, *labels.shape[-2:]).any(axis=0))
    corner = []
    for found in (rows, cols):
        if not len(found):
            corner.append(int(rng.integers(0, size - crop + 1)))
            continue
        low, high = int(found.max()) - crop + 1, int(found.min())  # every lip pixel inside: low <= corner <= high
        if low > high:  # wider than the crop: centre it
            low = high = (int(found.min()) + int(found.max()) + 1 - crop) // 2
        low, high = max(0, low), min(high, size - crop)
        low = min(low, high)  # a region at the border: the nearest crop that fits the frame
        corner.append(int(rng.integers(low, high + 1)))
    return corner[0], corner[1]


def step_batches(
    bank: np.ndarray, data: VaeDataConfig, seed: int, step: int, rank: int, labels: np.ndarray | None = None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The videos `(B, 3, T, H, W)` of one step, a pure function of ``(seed, step, rank)``, each with its region
    labels `(B, T, H, W)` cut the same way when ``labels`` (`load_clip_bank`'s) are given, else `None`. The user-size
    frames are unweighted (their labels are `None`)."""
    rng = np.random.default_rng([seed, step, rank])
    num_clips, clip_frames = bank.shape[:2]

    def _labels(array):
        return None if labels is None else torch.from_numpy(np.ascontiguousarray(array))

    if data.clip_every and step % data.clip_every == data.clip_every - 1:
        index = rng.integers(0, num_clips, size=data.clip_batch_size)
        y, x = rng.integers(0, data.resolution - data.clip_crop + 1, size=2)
        if data.clip_crop_on_lips and labels is not None:
            y, x = lip_crop(labels[index], data.clip_crop, rng)
        window = (index, slice(None), slice(y, y + data.clip_crop), slice(x, x + data.clip_crop))
        return [(_to_video(bank[window]), None if labels is None else _labels(labels[window]))]
    index = rng.integers(0, num_clips, size=data.frame_batch_size)
    frame = rng.integers(0, clip_frames, size=data.frame_batch_size)
    video = _to_video(bank[index, frame][:, None])  # B, 3, 1, H, W
    regions = None if labels is None else _labels(labels[index, frame][:, None])  # B, 1, H, W
    if rng.uniform() < 0.5:
        video = video.flip(-1)
        regions = None if regions is None else regions.flip(-1)
    batches = [(video, regions)]
    if data.small_size and data.small_batch_size:
        index = rng.integers(0, num_clips, size=data.small_batch_size)
        frame = rng.integers(0, clip_frames, size=data.small_batch_size)
        small = _to_video(bank[index, frame][:, None])[:, :, 0]
        small = F.interpolate(small, size=(data.small_size,) * 2, mode="bilinear", antialias=True)
        batches.append((small.clamp(-1, 1)[:, :, None], None))
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Loss, metrics, latent statistics
# ----------------------------------------------------------------------------------------------------------------


def pixel_weights(regions: torch.Tensor, loss: VaeLossConfig) -> torch.Tensor:
    """Per-pixel loss weights from region labels: 1 on the background, ``1 + face_weight`` on the face,
    ``1 + lip_weight`` inside the lip mask."""
    table = torch.tensor([1.0, 1.0 + loss.face_weight, 1.0 + loss.lip_weight])
    return table[regions.long()]


def weighted_mean(error: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``error`` `(B, C, T, H, W)` averaged with per-pixel ``weights`` `(B, 1, T, H, W)` (a plain mean without)."""
    if weights is None:
        return error.mean()
    weights = weights.expand_as(error)
    return (error * weights).sum() / weights.sum()


class VaeTrainingModule(torch.nn.Module):
    """The VAE with its training loss as ``forward`` (one module for accelerate / DDP to wrap, so that gradients are
    synchronised; ``vae.encode`` / ``vae.decode`` called on a wrapped model would bypass DDP's hooks)."""

    def __init__(self, vae, loss: VaeLossConfig):
        super().__init__()
        self.vae = vae
        self.loss = loss

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None, regions: torch.Tensor | None = None
    ):
        """``(total, {"l1", "l2", "kl"[, "motion"]})`` for `(B, 3, T, H, W)` frames in [−1, 1]; x̂ decoded from a
        posterior sample. ``regions`` (`(B, T, H, W)` labels of `load_clip_bank`) weight the pixel terms
        (`pixel_weights`; the motion term with the later frame's weights). ``motion`` only where T > 1."""
        posterior = self.vae.encode(video).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator=generator)).sample
        weights = None if regions is None else pixel_weights(regions, self.loss).to(video)[:, None]
        l1 = weighted_mean((reconstruction - video).abs(), weights)
        l2 = weighted_mean((reconstruction - video).square(), weights)
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
        total = self.loss.l1 * l1 + self.loss.l2 * l2 + self.loss.kl * kl
        parts = {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}
        if self.loss.motion and video.shape[2] > 1:
            motion = weighted_mean(
                (reconstruction.diff(dim=2) - video.diff(dim=2)).abs(), None if weights is None else weights[:, :, 1:]
            )
            total = total + self.loss.motion * motion
            parts["motion"] = motion.detach()
        return total, parts


@torch.no_grad()
def latent_statistics(vae, bank: np.ndarray, num_clips: int, device, batch_size: int = 4) -> tuple[list, list]:
    """Per-channel mean and std of the posterior mode over ``num_clips`` evenly spaced clips of the bank."""
    index = np.linspace(0, len(bank) - 1, min(num_clips, len(bank))).round().astype(int)
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(index), batch_size):
        video = _to_video(bank[index[start : start + batch_size]]).to(device, vae.dtype)
        latents = vae.encode(video).latent_dist.mode().double()  # B, C, F, h, w
        total = total + latents.sum(dim=(0, 2, 3, 4))
        total_sq = total_sq + latents.square().sum(dim=(0, 2, 3, 4))
        count += latents.numel() // latents.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


@torch.no_grad()
def reconstruction_metrics(vae, folders: list[Path], num_frames: int, resolution: int, device) -> dict:
    """PSNR (dB, frames in [0, 1]) and SSIM of single held-out frames reconstructed from the posterior mode, and
    ``lip_psnr``: the PSNR over the pixels inside their lip masks (all lip pixels of all frames pooled)."""

    bank, labels = load_clip_bank(
        folders, max(1, math.ceil(num_frames / len(folders))), 1, resolution, seed=12345, progress=False, regions=True
    )
    bank, labels = bank[:num_frames], labels[:num_frames]
    scores_psnr, scores_ssim, lip_errors = [], [], []
    for start in range(0, len(bank), 8):
        video = _to_video(bank[start : start + 8]).to(device, vae.dtype)
        reconstruction = vae.decode(vae.encode(video).latent_dist.mode()).sample.float().clamp(-1, 1)
        real = ((video.float()[:, :, 0] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        fake = ((reconstruction[:, :, 0] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        scores_psnr.append(psnr(fake, real))
        scores_ssim.append(ssim(fake, real))
        lip = labels[start : start + 8, 0] == LIP
        lip_errors.append(((fake.astype(np.float64) - real) / 255.0)[lip].reshape(-1))
    lip_mse = float(np.mean(np.square(np.concatenate(lip_errors)))) if sum(map(len, lip_errors)) else float("nan")
    return {
        "psnr": float(np.mean(scores_psnr)),
        "ssim": float(np.mean(scores_ssim)),
        "lip_psnr": float(10 * np.log10(1.0 / max(lip_mse, 1e-10))),
        "frames": int(len(bank)),
    }


@torch.no_grad()
def chunk_metrics(vae, folders: list[Path], num_chunks: int, chunk_frames: int, resolution: int, device) -> dict:
    """How held-out chunks of ``chunk_frames`` frames come back, frame by frame (posterior mode), in their lip region:
    ``lip_psnr_by_position`` (dB, pooled over ``num_chunks`` chunks) and ``lip_first_frame_ratio``: the lip-region
    error of frames 1… against their own ground truth over the error against the chunk's *first* frame. Above 1, the
    decoded mouth is nearer the first frame's than its own: the temporal latents are not carrying the mouth, and no
    generator trained on them can move it with speech (single-frame PSNR does not see this)."""

    bank, labels = load_clip_bank(
        folders, max(1, math.ceil(num_chunks / len(folders))), chunk_frames, resolution, 54321, False, regions=True
    )
    own, first, count = np.zeros(chunk_frames), np.zeros(chunk_frames), 0
    for clip, regions in zip(bank[:num_chunks], labels[:num_chunks]):
        video = _to_video(clip[None]).to(device, vae.dtype)
        decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample.float().clamp(-1, 1)[0].cpu().numpy()
        truth = video.float()[0].cpu().numpy()
        mouth = (regions == LIP).any(axis=0)  # H, W: where the mouth is at any frame of the chunk
        if not mouth.any():
            continue
        count += 1
        for t in range(chunk_frames):  # squared errors of [−1, 1] values / 4: of [0, 1] values
            own[t] += np.square(decoded[:, t] - truth[:, t])[:, mouth].mean() / 4
            first[t] += np.square(decoded[:, t] - truth[:, 0])[:, mouth].mean() / 4
    if not count:
        return {"lip_psnr_by_position": None, "lip_first_frame_ratio": None, "chunks": 0}
    own, first = own / count, first / count
    return {
        "lip_psnr_by_position": [round(float(10 * np.log10(1 / max(v, 1e-10))), 2) for v in own],
        "lip_first_frame_ratio": float(own[1:].mean() / max(first[1:].mean(), 1e-10)),
        "chunks": int(count),
    }


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors only)
# ----------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output_dir: Path, step: int, vae, optimizer, total_limit: int) -> Path:
    """``checkpoint-<step>/{vae,optimizer}.safetensors + state.json``, atomically; keeps the newest ``total_limit``."""
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}, str(tmp / "vae.safetensors"))
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": state["param_groups"]}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(output_dir)[:-total_limit] if total_limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Path, vae, optimizer) -> int:
    """Load a checkpoint written by `save_checkpoint` into ``vae`` and ``optimizer``; returns its step."""

    vae.load_state_dict(read_safetensors(checkpoint / "vae.safetensors"), strict=True)
    meta = json.loads((checkpoint / "state.json").read_text())
    tensors = read_safetensors(checkpoint / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def is_complete(config: VaeTrainConfig) -> bool:
    """The export folder holds a saved VAE and the report of a run that reached ``train.max_train_steps`` (a larger
    value continues from the newest checkpoint)."""
    report = Path(config.output_dir) / REPORT_NAME
    if not ((Path(config.export_dir) / "config.json").is_file() and report.is_file()):
        return False
    return json.loads(report.read_text())["steps"] >= config.train.max_train_steps


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "train-vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="e.g. configs/train/demo_vae.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_train_steps=10"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete output_dir and export_dir and start over")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers import AutoencoderKLWan
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    args = parse_args(argv)
    config = load_vae_config(args.config, args.set)
    output_dir, export_dir = Path(config.output_dir), Path(config.export_dir)
    # Frame steps (T = 1) leave the temporal resampling convolutions unused: DDP must not wait for their gradients.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    if args.overwrite and accelerator.is_main_process:
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(export_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    if is_complete(config):
        accelerator.print(
            f"{export_dir} is complete ({output_dir / REPORT_NAME}); nothing to do (--overwrite retrains)"
        )
        return 0
    output_dir.mkdir(parents=True, exist_ok=True)
    data, train = config.data, config.train

    # 1. Model and optimizer
    torch.manual_seed(config.seed)
    if config.init_from:
        vae = load_vae_folder(
            config.init_from,
            f"config key 'init_from' is {config.init_from!r},",
            "train the VAE first (its export_dir).",
        )
    else:
        vae = AutoencoderKLWan(**config.vae)
    parameters = freeze_encoder(vae) if train.freeze_encoder else list(vae.parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay
    )
    step = 0
    checkpoints = _checkpoints(output_dir)
    if checkpoints:
        step = load_checkpoint(checkpoints[-1], vae, optimizer)
        accelerator.print(f"resuming from {checkpoints[-1]} (step {step})")
    lr_scheduler = get_scheduler(
        "constant_with_warmup",
        optimizer,
        num_warmup_steps=config.optim.warmup_steps,
        last_epoch=step - 1 if step else -1,
    )
    if step:
        for group in optimizer.param_groups:  # the constant schedule's value at `step`
            group["lr"] = config.optim.lr * min(1.0, step / max(1, config.optim.warmup_steps))
    module, optimizer = accelerator.prepare(VaeTrainingModule(vae, config.loss), optimizer)
    n_params = sum(p.numel() for p in vae.parameters())
    accelerator.print(
        f"AutoencoderKLWan {n_params / 1e6:.2f} M parameters ({n_params * 4 / 1e6:.1f} MB fp32) on "
        f"{accelerator.device}, {accelerator.num_processes} process(es)"
    )

    # 2. Data
    folders = clip_folders(data.root)
    with_regions = config.loss.weighted or data.clip_crop_on_lips  # the loss weights and the lip crops read them
    bank = load_clip_bank(
        folders,
        data.clips_per_folder,
        data.clip_frames,
        data.resolution,
        config.seed,
        progress=accelerator.is_main_process,
        regions=with_regions,
    )
    bank, labels = bank if with_regions else (bank, None)
    accelerator.print(f"{len(bank)} clips of {data.clip_frames} frames from {len(folders)} clip folders")

    # 3. Loop
    bar = tqdm(
        total=train.max_train_steps,
        initial=step,
        desc="train-vae",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    started, first_step = time.time(), step
    generator = torch.Generator(device=accelerator.device)
    while step < train.max_train_steps:
        generator.manual_seed(config.seed * 1_000_003 + step * 17 + accelerator.process_index)
        module.train()
        optimizer.zero_grad(set_to_none=True)
        logs = {}
        for video, regions in step_batches(bank, data, config.seed, step, accelerator.process_index, labels):
            with accelerator.autocast():
                total, parts = module(
                    video.to(accelerator.device), generator, regions if config.loss.weighted else None
                )
            accelerator.backward(total)
            for key, value in parts.items():
                logs[key] = logs.get(key, 0.0) + float(value)
        if config.optim.max_grad_norm:
            accelerator.clip_grad_norm_(module.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        step += 1
        bar.update(1)
        if step % train.log_every == 0 or step == train.max_train_steps:
            rate = (step - first_step) / (time.time() - started)
            bar.set_postfix(l1=f"{logs['l1']:.4f}", kl=f"{logs['kl']:.3g}", steps_per_s=f"{rate:.2f}")
            motion = f" motion {logs['motion']:.4f}" if "motion" in logs else ""
            logger.info(
                "step %d l1 %.4f l2 %.4f kl %.4g%s (%.3f steps/s)",
                step,
                logs["l1"],
                logs["l2"],
                logs["kl"],
                motion,
                rate,
            )
        if train.checkpointing_steps and step % train.checkpointing_steps == 0 and step < train.max_train_steps:
            if accelerator.is_main_process:
                save_checkpoint(output_dir, step, vae, optimizer, train.checkpoints_total_limit)
            accelerator.wait_for_everyone()
    bar.close()
    train_seconds = time.time() - started
    if accelerator.is_main_process and step > first_step:
        save_checkpoint(output_dir, step, vae, optimizer, train.checkpoints_total_limit)

    # 4. Latent statistics, held-out reconstruction, export
    if accelerator.is_main_process:
        model = vae.eval()
        if train.freeze_encoder:  # the encoder is the one the generator learned on: so are its statistics
            mean, std = list(model.config.latents_mean), list(model.config.latents_std)
        else:
            mean, std = latent_statistics(model, bank, train.stats_clips, accelerator.device)
        model.register_to_config(latents_mean=mean, latents_std=std)
        heldout = clip_folders(
            data.heldout_root or data.root, "data.heldout_root" if data.heldout_root else "data.root"
        )
        metrics = reconstruction_metrics(model, heldout, train.eval_frames, data.resolution, accelerator.device)
        if data.clip_every and train.eval_chunks:
            metrics["chunk"] = chunk_metrics(
                model, heldout, train.eval_chunks, data.clip_frames, data.resolution, accelerator.device
            )
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(export_dir, ignore_errors=True)
        os.replace(tmp, export_dir)
        report = {
            "steps": step,
            "parameters": n_params,
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "steps_per_second_last_run": round((step - first_step) / train_seconds, 4) if step > first_step else None,
            "heldout": metrics,
            "latents_mean": mean,
            "latents_std": std,
            "export_dir": str(export_dir),
        }
        (output_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        accelerator.print(
            f"held-out reconstruction PSNR {metrics['psnr']:.2f} dB (lip {metrics['lip_psnr']:.2f} dB), SSIM "
            f"{metrics['ssim']:.3f} "
            f"({metrics['frames']} frames); saved {export_dir}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
