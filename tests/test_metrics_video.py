"""Video metrics with tiny random feature networks built from configs and loaded through the real path."""

import json
import os

import numpy as np
import pytest
import torch

from echo.metrics import networks as nets
from echo.metrics import video

TINY = {
    "inception": dict(width_multiplier=1 / 16, input_size=75),
    "i3d": dict(width_multiplier=1 / 16, num_classes=16, input_size=32),
    "arcface": dict(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_dim=32, input_size=32),
    "syncnet": dict(width_multiplier=1 / 16, embedding_dim=32),
}


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Random BN statistics so that a loaded model differs from a freshly built one."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("metric_weights"))
    models = {}
    for i, (name, config) in enumerate(TINY.items()):
        torch.manual_seed(i)
        model = nets.FEATURE_NETWORKS[name](**config).eval()
        _randomise_batchnorm(model, i)
        model.save_to_folder(folder)
        models[name] = model
    return folder, models


@pytest.fixture(scope="module")
def clips():
    """Two sets of smooth random clips `(T, H, W, 3)` uint8 and a brightness-shifted copy of the first."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        base = rng.uniform(0, 1, size=(8, 8, 3))
        frames = []
        for t in range(8):
            img = np.kron(np.roll(base, t, axis=1), np.ones((6, 6, 1)))  # 48², drifting pattern
            frames.append((200 * img + 20).astype(np.uint8))
        out.append(np.stack(frames))
    shifted = [np.clip(c.astype(int) + 60, 0, 255).astype(np.uint8)[:, :, ::-1] for c in out]
    return out, shifted


def test_networks_round_trip_through_the_folder(weights_dir):
    folder, models = weights_dir
    for name, model in models.items():
        assert os.path.isfile(os.path.join(folder, f"{name}.safetensors"))
        with open(os.path.join(folder, f"{name}.json")) as f:
            assert json.load(f)["_class_name"] == type(model).__name__
        loaded = nets.load_feature_network(name, folder)
        public = {k: v for k, v in model.config.items() if not k.startswith("_")}
        assert json.loads(json.dumps({k: loaded.config[k] for k in public})) == json.loads(json.dumps(public))
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2), k1
    # the public checkpoints' key names
    keys = {name: set(m.state_dict()) for name, m in models.items()}
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var", "fc.bias"} <= keys["inception"]
    assert {"Conv3d_1a_7x7.conv3d.weight", "Mixed_5c.b3b.bn.weight", "logits.conv3d.bias"} <= keys["i3d"]
    assert {"conv1.weight", "layer1.0.prelu.weight", "layer4.0.downsample.1.running_mean", "features.weight"} <= keys[
        "arcface"
    ]
    assert {"netcnnaud.18.weight", "netfcaud.3.weight", "netcnnlip.0.weight", "netfclip.1.running_var"} <= keys[
        "syncnet"
    ]


def test_missing_weights_name_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        nets.load_feature_network("i3d", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "i3d.safetensors") in message and "rgb_imagenet.pt" in message
    assert "python -m echo.metrics.networks convert i3d" in message
    with pytest.raises(KeyError, match="unknown feature network"):
        nets.load_feature_network("vgg", str(tmp_path))


def test_convert_checkpoint_checks_keys_strictly(tmp_path, weights_dir):
    _, models = weights_dir
    # a full-size public layout is required: the tiny state dict must be rejected by the strict load
    torch.save(models["syncnet"].state_dict(), tmp_path / "syncnet_v2.model")
    with pytest.raises(RuntimeError, match="size mismatch"):
        nets.convert_checkpoint("syncnet", str(tmp_path / "syncnet_v2.model"), str(tmp_path / "out"))


def test_fid_identical_is_zero_and_shift_is_larger(weights_dir, clips):
    _, models = weights_dir
    real, shifted = clips
    same = video.fid(models["inception"], real, real)
    assert abs(same) < 1e-6
    feats = {
        k: np.concatenate([video.image_features(models["inception"], c) for c in v])
        for k, v in (("real", real), ("shifted", shifted))
    }
    # the order of frames does not matter (frames are one pooled set)
    assert abs(video.frechet_feature_distance(feats["real"][::-1], feats["real"])) < 1e-6
    shifted_fid = video.fid(models["inception"], shifted, real)
    assert shifted_fid > 1e-2
    # fid() scores the generated set against the reference set: the Fréchet distance of their pooled features
    assert shifted_fid == pytest.approx(video.frechet_feature_distance(feats["shifted"], feats["real"]), rel=1e-9)
    # a half-way set (every other clip shifted) lies between the identical and the fully shifted set
    mixed = [shifted[0], real[1], shifted[2]]
    assert 1e-3 < video.fid(models["inception"], mixed, real) < shifted_fid


def test_fvd_identical_is_zero_and_shift_is_larger(weights_dir, clips):
    _, models = weights_dir
    real, shifted = clips
    assert abs(video.fvd(models["i3d"], real, real, clip_length=4)) < 1e-6
    feats = {
        k: np.concatenate([video.video_features(models["i3d"], c, clip_length=4) for c in v])
        for k, v in (("real", real), ("shifted", shifted))
    }
    assert len(feats["real"]) == 2 * len(real)  # non-overlapping 4-frame windows of 8-frame clips
    shifted_fvd = video.fvd(models["i3d"], shifted, real, clip_length=4)
    assert shifted_fvd > 1e-3
    assert shifted_fvd == pytest.approx(video.frechet_feature_distance(feats["shifted"], feats["real"]), rel=1e-9)


def test_csim(weights_dir, clips):
    _, models = weights_dir
    real, shifted = clips
    frames = np.repeat(real[0][:1], 4, axis=0)
    assert video.csim(models["arcface"], frames, real[0][0]) == pytest.approx(1.0, abs=1e-5)
    other = video.csim(models["arcface"], shifted[1], real[0][0])
    assert other < 1.0 - 1e-4
    # the cosine by hand: mean over frames of <e_t, e_ref> / (|e_t| |e_ref|)
    emb = video.image_features(models["arcface"], shifted[1])
    ref = video.image_features(models["arcface"], real[0][:1])[0]
    by_hand = np.mean(emb @ ref / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref)))
    assert other == pytest.approx(by_hand, abs=1e-6)


def test_sync_distances_find_the_offset():
    torch.manual_seed(0)
    visual = torch.randn(30, 8)
    for shift in (0, 3, -4):
        audio = torch.zeros_like(visual)
        # audio[i + shift] = visual[i]: the visual stream matches the audio `shift` frames later
        for i in range(30):
            if 0 <= i + shift < 30:
                audio[i + shift] = visual[i]
        mdist = video.sync_distances(visual, audio, vshift=15)
        assert mdist.shape == (31,)
        assert int(mdist.argmin()) == 15 + shift
    mdist = video.sync_distances(visual, visual, vshift=15)
    assert float(mdist.min()) < 1e-4 and float(torch.median(mdist) - mdist.min()) > 1.0


def test_lse_end_to_end_and_errors(weights_dir, monkeypatch):
    _, models = weights_dir
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, size=(10, 32, 32, 3), dtype=np.uint8)
    audio = rng.normal(scale=0.1, size=16000 * 10 // 25).astype(np.float32)
    seen = {}
    sync_distances = video.sync_distances

    def recording_sync_distances(visual, audio_embeddings, vshift):
        seen.update(windows=(len(visual), len(audio_embeddings)), d=sync_distances(visual, audio_embeddings, vshift))
        return seen["d"]

    monkeypatch.setattr(video, "sync_distances", recording_sync_distances)
    out = video.lse(models["syncnet"], frames, audio)
    assert np.isfinite(out["lse_d"]) and out["lse_c"] >= 0 and -15 <= out["offset"] <= 15
    # syncnet_python's summary of the offset search: LSE-D the minimum mean distance, LSE-C median − minimum, the
    # offset vshift − argmin; one 5-frame window per start frame 0 … T − 6
    dist = seen["d"]
    assert dist.shape == (31,) and seen["windows"] == (10 - 5, 10 - 5)
    assert out["lse_d"] == pytest.approx(float(dist.min()))
    assert out["lse_c"] == pytest.approx(float(dist.median() - dist.min()))
    assert out["offset"] == 15 - int(dist.argmin())
    with pytest.raises(ValueError, match="25 fps"):
        video.lse(models["syncnet"], frames, audio, fps=30)
    with pytest.raises(ValueError, match="at least 6 frames"):
        video.lse(models["syncnet"], frames[:5], audio)


def test_mfcc_matches_python_speech_features_definition():
    rng = np.random.default_rng(2)
    signal = rng.normal(size=1000)
    feats = video.mfcc(signal)
    assert feats.shape == (1 + int(np.ceil((1000 - 400) / 160)), 13)
    # c0 is the log energy of the pre-emphasised first frame (power spectrum / nfft)
    emph = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    energy = (np.abs(np.fft.rfft(emph[:400], 512)) ** 2 / 512).sum()
    assert feats[0, 0] == pytest.approx(np.log(energy))
    # louder audio shifts only c0 (log energy) and the log-mel level, i.e. c1.. are gain invariant
    np.testing.assert_allclose(video.mfcc(10 * signal)[:, 1:], feats[:, 1:], atol=1e-8)


def test_write_read_video_round_trip(tmp_path):
    t = np.arange(9)[:, None, None, None]
    frames = np.broadcast_to((t * 20 + np.linspace(0, 80, 32)[None, None, :, None]).astype(np.uint8), (9, 32, 32, 3))
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 9 // 25) / 16000)).astype(np.float32)
    path = str(tmp_path / "clip.mp4")
    video.write_video(path, frames, fps=25, audio=tone)
    decoded, fps = video.read_video(path)
    assert decoded.shape == frames.shape and fps == 25
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    audio = video.read_audio(path)
    n = min(len(audio), len(tone)) - 2048
    spectrum = np.abs(np.fft.rfft(audio[1024 : 1024 + n]))
    assert abs(np.argmax(spectrum) * 16000 / n - 440) < 10


def test_convert_a_full_size_public_layout(tmp_path, capsys):
    """A full-size SyncNet state dict (syncnet_v2.model's layout, here random) converts and loads back unchanged."""
    torch.manual_seed(0)
    public = nets.SyncNet().eval()
    _randomise_batchnorm(public, 0)
    torch.save({"state_dict": public.state_dict()}, tmp_path / "syncnet_v2.model")
    nets._main(["convert", "syncnet", str(tmp_path / "syncnet_v2.model"), str(tmp_path / "weights")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "weights" / "syncnet.safetensors")
    loaded = nets.load_feature_network("syncnet", str(tmp_path / "weights"))
    mfcc = torch.randn(2, 1, 13, 20)
    torch.testing.assert_close(loaded.forward_audio(mfcc), public.forward_audio(mfcc), rtol=0, atol=0)
    # without the config json the public full-size config is assumed
    os.remove(tmp_path / "weights" / "syncnet.json")
    reloaded = nets.load_feature_network("syncnet", str(tmp_path / "weights"))
    torch.testing.assert_close(reloaded.forward_audio(mfcc), public.forward_audio(mfcc), rtol=0, atol=0)
