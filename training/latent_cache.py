"""Exact window latents: the VAE encode of every training window, done once and read back (``data.use_cached_latents``).

A causal VAE (Wan's ``AutoencoderKLWan``) encodes a video's first frame alone and every later group of four frames
with the convolution caches of the groups before it, so a slice of a whole clip's latents is *not* the latent of a
window that starts inside the clip. This cache stores each window's latents as the training step computes them:
`echo.encoding.encode_latents` of the window's own frames (normalised, float32), encoded as its own video.

Key and layout (under ``data.latent_cache_dir``, by default ``<data.root>/.latent_cache``; hidden, so the data root
still lists only clip folders)::

    vae-<sha256 of the VAE's config and non-decoder weights, 16 hex>/<resolution>px-<num_frames>f/
        <clip folder name>-<sha256 of its avatar.mp4, 12 hex>/w<window start, 5 digits>.safetensors

Each file holds ``"latents"`` `(z_dim, F, h, w)` float32 and metadata naming the VAE, clip, start and settings. A
retrained VAE (other encoder weights, other ``latents_mean`` / ``latents_std``, or the same weights cast to another
dtype) has another hash (a decoder trained further does not: it never touches the latents), a re-prepared clip
(another ``avatar.mp4``) another folder, another window size or length another settings folder: none of them can read
a stale latent. Files are written through `echo.clip_format`'s atomic
safetensors writer (a temporary file, then a rename), so a killed process never leaves a partial file, and two ranks
writing the same window at once each rename a complete file of the same content.

How it fills: lazily, by training itself. The dataset returns a window's ``latents`` when its file exists; when not,
the step encodes the window as it always did and writes the file (`training.step.training_step`), so a miss costs
what a step without the cache costs, and the cache is never built in advance for windows the run never draws. With
``data.use_cached_latents`` the sampler draws window starts on a grid of ``data.window_stride`` frames, so the windows
it can draw are a finite set that later epochs draw again. To fill it in advance (e.g. before a long run), run
``python -m training.fill_latent_cache --config <training yaml>`` (under ``accelerate launch`` each rank encodes every
``num_processes``-th window; existing files are skipped, so a killed build resumes where it stopped).

What stays outside: the condition (`echo.encoding.chunk_condition`: the reference image, and the motion frames of a
continuation sample, blurred by ``loss.motion_blur``) and the pixel loss still use the window's pixels, which the
dataset still returns, so every augmentation works as without the cache and nothing is lost. The condition's VAE
passes remain in the step: a first chunk's depends on the reference frame (any frame of the clip, ~8x more entries
than windows) and a blurred continuation's on a continuous σ, so they are not window-keyed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from echo import clip_format, encoding

#: Hex digits of the VAE hash and of the clip-content hash in the folder names.
VAE_KEY_LENGTH = 16
CLIP_KEY_LENGTH = 12
#: State-dict prefixes of ``AutoencoderKLWan`` that only decoding uses: a decoder trained further (the demo recipe's
#: decoder stage, ``train.freeze_encoder``) keeps the latents, so they are left out of the key. Every other weight is
#: hashed.
DECODE_ONLY_PREFIXES = ("decoder.", "post_quant_conv.")


def vae_fingerprint(vae, include_decoder: bool = False) -> str:
    """SHA-256 (first 16 hex digits) of what a VAE's latents depend on: its config (``latents_mean`` /
    ``latents_std`` normalise them) and every state-dict entry but the decode-only ones (`DECODE_ONLY_PREFIXES`):
    names, dtypes, shapes and bytes, in name order. The config's private keys are left out: diffusers' loaders record
    ``_use_default_values`` from a set, in an order that differs from process to process. With ``include_decoder``,
    every entry: what the VAE's reconstructions depend on."""
    digest = hashlib.sha256()
    config = {name: value for name, value in dict(vae.config).items() if not name.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(DECODE_ONLY_PREFIXES) and not include_decoder:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:VAE_KEY_LENGTH]


class WindowLatentCache:
    """The window latents of one VAE at one window size (see the module docstring).

    Args:
        root (`str` or `Path`): the cache folder (``data.latent_cache_dir``).
        vae_key (`str`): `vae_fingerprint` of the VAE the latents come from.
        resolution (`int`): square side of the windows (``data.resolution``).
        num_frames (`int`): frames per window (``data.num_frames``).
        temporal_compression (`int`, defaults to 4): the VAE's frames per latent frame.
    """

    def __init__(self, root: str | Path, vae_key: str, resolution: int, num_frames: int, temporal_compression: int = 4):
        self.root = Path(root)
        self.vae_key = vae_key
        self.resolution = int(resolution)
        self.num_frames = int(num_frames)
        self.latent_frames = (self.num_frames - 1) // temporal_compression + 1
        self.folder = self.root / f"vae-{vae_key}" / f"{self.resolution}px-{self.num_frames}f"
        self._clip_keys: dict[Path, str] = {}

    @classmethod
    def for_vae(cls, root: str | Path, vae, resolution: int, num_frames: int) -> "WindowLatentCache":
        """The cache of ``vae`` (hashed here, once)."""
        return cls(root, vae_fingerprint(vae), resolution, num_frames, vae.config.scale_factor_temporal)

    def clip_key(self, clip_dir: str | Path) -> str:
        """``<folder name>-<sha256 of avatar.mp4>``, hashed once per clip and process."""
        clip_dir = Path(clip_dir)
        if clip_dir not in self._clip_keys:
            digest = hashlib.sha256((clip_dir / clip_format.video_name("avatar")).read_bytes()).hexdigest()
            self._clip_keys[clip_dir] = f"{clip_dir.name}-{digest[:CLIP_KEY_LENGTH]}"
        return self._clip_keys[clip_dir]

    def window_key(self, clip_dir: str | Path, start: int) -> str:
        """The window's file, relative to the cache's settings folder: ``<clip key>/w<start>.safetensors``."""
        return f"{self.clip_key(clip_dir)}/w{int(start):05d}.safetensors"

    def read(self, key: str) -> torch.Tensor | None:
        """The cached latents `(z_dim, F, h, w)` float32 of a `window_key`, or `None` when not cached yet."""
        path = self.folder / key
        if not path.is_file():
            return None
        with clip_format.open_safetensors(path) as f:
            if "latents" not in f.keys():
                raise clip_format.ClipFormatError(path, "has no 'latents' tensor; delete it (training rewrites it)")
            latents = f.get_tensor("latents")
        if latents.ndim != 4 or latents.shape[1] != self.latent_frames:
            raise clip_format.ClipFormatError(
                path, f"holds latents of shape {tuple(latents.shape)}, expected (z_dim, {self.latent_frames}, h, w)"
            )
        return latents

    def write(self, key: str, latents: torch.Tensor) -> Path:
        """Write one window's latents `(z_dim, F, h, w)` (the output of `encode_latents` for that window) atomically."""
        path = self.folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "vae": self.vae_key,
            "window": key,
            "resolution": str(self.resolution),
            "num_frames": str(self.num_frames),
        }
        return clip_format.write_safetensors(path, {"latents": latents.detach().float().cpu()}, metadata)

    def write_batch(self, keys: list[str], latents: torch.Tensor) -> None:
        """Write the windows of a batch `(B, z_dim, F, h, w)` under their keys (those already cached are kept)."""
        for key, window in zip(keys, latents):
            if not (self.folder / key).is_file():
                self.write(key, window)


def windows(dataset) -> list[tuple]:
    """Every ``(clip record, start)`` the dataset's sampler can draw (its ``window_starts`` of every clip)."""
    return [(clip, start) for clip in dataset.clips for start in dataset.window_starts(clip)]


@torch.no_grad()
def build(cache: WindowLatentCache, dataset, vae, rank: int = 0, world_size: int = 1) -> dict:
    """Encode and write every window of ``dataset`` that is not cached yet; rank ``r`` of ``world_size`` takes every
    ``world_size``-th window from the ``r``-th (no two ranks write the same file).

    The frames are read by the dataset's own reader (`ConversationDataset.window_video`) and encoded one window at a
    time by `echo.encoding.encode_latents`, as the training step encodes a batch of one window.

    Returns:
        `dict` with ``encoded`` and ``skipped`` (already cached) window counts of this rank.
    """

    counts = {"encoded": 0, "skipped": 0}
    for clip, start in windows(dataset)[rank::world_size]:
        key = cache.window_key(clip.path, start)
        if (cache.folder / key).is_file():
            counts["skipped"] += 1
            continue
        video = dataset.window_video(clip, start)[None]  # 1, 3, T, H, W
        latents = encoding.encode_latents(vae, video.to(vae.device))  # looked up at call time (tests patch it)
        cache.write(key, latents[0])
        counts["encoded"] += 1
    return counts
