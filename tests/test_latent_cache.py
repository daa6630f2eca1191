"""The exact window-latent cache (`training.latent_cache`, ``data.use_cached_latents``): a cached window equals a fresh
encode of that window, another VAE misses it, a killed build resumes without encoding a window twice, and a training
step gives the same loss with the cache as without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from echo.data import ConversationDataset, collate_conversations
from echo.encoding import encode_latents
from training import fill_latent_cache
from training.latent_cache import WindowLatentCache, build, vae_fingerprint, windows

ROOT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_stage1.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    # The session's base folder is shared by every test module, so the set is prepared once per run.
    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def _vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return vae.eval().requires_grad_(False)


def _dataset(data_root, cache=None, **kwargs):
    options = dict(num_frames=9, resolution=64, windows_per_clip=6, window_stride=4, latent_cache=cache, seed=1)
    return ConversationDataset(data_root, **{**options, **kwargs})


def test_window_starts_are_the_stride_grid(data_root):
    dataset = _dataset(data_root)
    assert [list(dataset.window_starts(clip)) for clip in dataset.clips] == [[0, 4, 8]] * 2  # 17-frame clips
    drawn = {item["window_start"] for epoch in range(3) for item in (dataset.set_epoch(epoch) or dataset)}
    assert drawn == {0, 4, 8}
    # Stride 1 (the default) keeps the sampler of a run without the cache: the same draws as before the option.
    assert set(_dataset(data_root, window_stride=1).window_starts(dataset.clips[0])) == set(range(9))


def test_cached_latents_equal_a_fresh_encode_of_the_window(data_root, tmp_path):
    """Every window the sampler can draw is cached as its own encode: bit-identical to `encode_latents` of the
    dataset's ``video`` of that window (one window per VAE call, as the step with one window per process)."""
    vae = _vae()
    cache = WindowLatentCache.for_vae(tmp_path, vae, resolution=64, num_frames=9)
    dataset = _dataset(data_root, cache)
    counts = build(cache, dataset, vae)
    assert counts == {"encoded": 6, "skipped": 0}  # 2 clips × starts {0, 4, 8}
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for item in dataset:
            expected = encode_latents(vae, item["video"][None])[0]
            torch.testing.assert_close(item["latents"], expected, rtol=0, atol=0)
    # A window is not a slice of the clip's latents: the causal VAE encodes a window's first frame alone.
    clip = dataset.clips[0]
    whole = encode_latents(vae, _clip_video(dataset, clip)[None])[0]  # frames 0 … 12
    inner = cache.read(cache.window_key(clip.path, 4))  # frames 4 … 12; the old cache sliced whole[:, 1:4]
    assert (whole[:, 1:4] - inner[:, :3]).abs().max() > 1e-3


def _clip_video(dataset, clip):
    from echo import clip_format
    from echo.encoding import frames_to_tensor

    frames = clip_format.read_video_frames(clip.path / clip_format.video_name("avatar"), list(range(13)))
    return frames_to_tensor(frames, dataset.resolution).permute(1, 0, 2, 3)  # 3, 13, H, W


def test_a_different_vae_misses_the_cache(data_root, tmp_path):
    vae = _vae()
    cache = WindowLatentCache.for_vae(tmp_path, vae, resolution=64, num_frames=9)
    build(cache, _dataset(data_root, cache), vae)
    whole = vae_fingerprint(vae, include_decoder=True)
    with torch.no_grad():
        vae.decoder.conv_in.weight.add_(1e-3)  # a decoder trained further: the same latents, the same cache
    assert WindowLatentCache.for_vae(tmp_path, vae, resolution=64, num_frames=9).folder == cache.folder
    assert vae_fingerprint(vae, include_decoder=True) != whole  # but other reconstructions (a VAE ceiling's key)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1e-3)  # one encoder weight changed
    retrained = WindowLatentCache.for_vae(tmp_path, vae, resolution=64, num_frames=9)
    assert retrained.vae_key != cache.vae_key and retrained.folder != cache.folder
    assert all("latents" not in item for item in _dataset(data_root, retrained))
    # The same weights in another dtype, or other latent statistics, are other latents too.
    assert vae_fingerprint(_vae().to(torch.bfloat16)) != vae_fingerprint(_vae())
    shifted = _vae()
    shifted.register_to_config(latents_mean=[0.5] * 16)
    assert vae_fingerprint(shifted) != vae_fingerprint(_vae())
    # Another window size is another settings folder.
    assert WindowLatentCache.for_vae(tmp_path, _vae(), 64, 13).folder != cache.folder


def test_the_vae_key_is_the_same_in_every_process():
    """Ranks and reruns share the cache: a loaded VAE (whose config diffusers fills from a set) hashes alike under any
    string-hash seed."""
    import os
    import subprocess
    import sys

    code = (  # from_config with a partial config, as the model descriptions build it: most values are defaults
        "import torch; from diffusers import AutoencoderKLWan; from training.latent_cache import vae_fingerprint; "
        "torch.manual_seed(0); print(vae_fingerprint(AutoencoderKLWan.from_config({'base_dim': 4, 'z_dim': 16})))"
    )
    root = Path(__file__).resolve().parents[1]
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONHASHSEED=str(seed), OMP_NUM_THREADS="1"),
        ).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert len(keys) == 1 and len(next(iter(keys))) == 16, keys


def test_a_killed_build_resumes_without_reencoding_finished_windows(data_root, tmp_path, monkeypatch):
    vae = _vae()
    cache = WindowLatentCache.for_vae(tmp_path, vae, resolution=64, num_frames=9)
    dataset = _dataset(data_root, cache)
    calls = []
    real_encode = encode_latents

    def killed_after_four(vae_, video):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process is killed while encoding the fifth window
        calls.append(video)
        return real_encode(vae_, video)

    monkeypatch.setattr("echo.encoding.encode_latents", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        build(cache, dataset, vae)
    files = sorted(cache.folder.rglob("*.safetensors"))
    assert len(files) == 4 and not list(cache.folder.rglob("*.tmp"))  # finished windows only, no partial file
    stamps = {p: p.stat().st_mtime_ns for p in files}

    counted = []
    monkeypatch.setattr(
        "echo.encoding.encode_latents", lambda vae_, video: counted.append(1) or real_encode(vae_, video)
    )
    # Resumed by two ranks: each takes its own windows, none of them encodes a finished one.
    results = [build(cache, dataset, vae, rank=r, world_size=2) for r in (0, 1)]
    assert sum(r["encoded"] for r in results) == len(counted) == 2
    assert sum(r["skipped"] for r in results) == 4
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert len(list(cache.folder.rglob("*.safetensors"))) == len(windows(dataset)) == 6


def test_training_step_gives_the_same_loss_with_the_cache(data_root, tmp_path):
    """The step encodes a window it finds uncached and writes it (the cache fills as training draws windows); the
    same batch then comes with its cached latents, skips the VAE encode and gives the same loss, bit for bit, with
    every augmentation of a continuation sample on (motion blur on the pixels, motion noise on the latents)."""
    from echo.encoding import PromptEncoder
    from training.config import load_config
    from training.modeling import build_training_models
    from training.step import step_generator, training_step
    from training.train import build_data

    overrides = [
        f"data.root={data_root}",
        f"output_dir={tmp_path / 'run'}",
        "data.use_cached_latents=true",
        f"data.latent_cache_dir={tmp_path / 'cache'}",
        "data.window_stride=4",
        "loss.motion_prob=1.0",
        "loss.motion_latent_frames=2",
        "loss.motion_blur=2.0",
        "loss.motion_noise=0.3",
    ]
    config = load_config(ROOT_CONFIG, overrides)
    torch.manual_seed(0)
    models = build_training_models(config)
    dataset, _ = build_data(config, models)
    prompt_encoder = PromptEncoder(models.text_encoder, models.tokenizer, config.data.max_sequence_length)
    cache = dataset.latent_cache
    encodes = []
    vae_encode = models.vae.encode
    models.vae.encode = lambda video, *a, **k: encodes.append(video) or vae_encode(video, *a, **k)

    def loss(batch):
        with torch.no_grad():
            terms = training_step(
                models,
                models.module,
                batch,
                config,
                prompt_encoder,
                step_generator(0, 0, 3),
                torch.device("cpu"),
                torch.float32,
                latent_cache=cache,
            )
        return terms["loss"]

    item = dataset[1]
    assert "latents" not in item and not (cache.folder / item["latent_key"]).exists()
    fresh = loss(collate_conversations([item]))
    window = item["video"][None]
    assert any(torch.equal(v, window) for v in encodes)  # the window was encoded ...
    assert (cache.folder / item["latent_key"]).is_file()  # ... and written

    encodes.clear()
    cached_item = dataset[1]
    assert cached_item["window_start"] == item["window_start"] and "latents" in cached_item
    cached = loss(collate_conversations([cached_item]))
    assert encodes and not any(torch.equal(v, window) for v in encodes)  # the condition's passes only
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    # A batch with one uncached window is encoded whole, so the step never mixes the two.
    other = dataset[2]  # the other clip: not cached yet
    assert "latents" not in other and "latents" not in collate_conversations([cached_item, other])


def test_the_build_command_refuses_a_config_without_the_cache():
    """`python -m training.fill_latent_cache` refuses a config whose training would not read the cache."""
    with pytest.raises(ValueError, match="does not set data.use_cached_latents"):
        fill_latent_cache.main(["--config", ROOT_CONFIG])
