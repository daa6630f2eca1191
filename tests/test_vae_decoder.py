"""The VAE's decoder trained further with its encoder frozen (training.train_vae ``train.freeze_encoder``) and shipped
in place of the trained VAE by echo-export (``--vae``, `training.export.replace_decoder`)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from training import train_vae
from training.export import replace_decoder
from training.testing import make_tiny_training_set

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """A tiny VAE (configs/models/tiny.yaml) saved with latent statistics, as the VAE stage leaves it."""
    tmp = tmp_path_factory.mktemp("vae")
    arch = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())["vae"]["config"]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**arch)
    vae.register_to_config(latents_mean=[0.1 * i for i in range(16)], latents_std=[1.0 + 0.05 * i for i in range(16)])
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    data = make_tiny_training_set(tmp / "data", num_frames=17, size=64)
    return tmp, data


def _weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_decoder_training_keeps_the_encoder_and_its_statistics(trained_vae, tmp_path):
    tmp, data = trained_vae
    sets = [
        f"init_from={tmp / 'vae'}",
        "train.freeze_encoder=true",
        f"output_dir={tmp_path / 'run'}",
        f"export_dir={tmp_path / 'decoder'}",
        f"data.root={data}",
        f"data.heldout_root={data}",
        "data.resolution=64",
        "data.clip_frames=9",
        "data.clip_crop=32",
        "data.clip_every=1",
        "data.clips_per_folder=1",
        "optim.lr=1e-2",
        "loss.kl=0",
        "train.max_train_steps=2",
        "train.checkpointing_steps=0",
        "train.eval_frames=4",
        "train.log_every=1",
    ]
    assert (
        train_vae.main(
            [
                "--config",
                str(ROOT / "configs/train/demo_vae_decoder.yaml"),
                *(arg for item in sets for arg in ("--set", item)),
            ]
        )
        == 0
    )
    before, after = _weights(tmp / "vae"), _weights(tmp_path / "decoder")
    encoding = [k for k in before if k.startswith(train_vae.ENCODER_PREFIXES)]
    assert encoding and all(torch.equal(before[k], after[k]) for k in encoding)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    saved = json.loads((tmp / "vae" / "config.json").read_text())
    assert config["latents_mean"] == saved["latents_mean"] and config["latents_std"] == saved["latents_std"]
    # ... so it replaces the trained VAE in an export, and decodes other pictures from the same latents.
    vae = AutoencoderKLWan.from_pretrained(tmp / "vae")
    shipped = replace_decoder(vae, tmp_path / "decoder")
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        torch.testing.assert_close(shipped.encode(video).latent_dist.mode(), latents, rtol=0, atol=0)
        assert not torch.allclose(shipped.decode(latents).sample, vae.decode(latents).sample)


def test_freeze_encoder_needs_a_vae_to_start_from():
    with pytest.raises(ValueError, match="train.freeze_encoder"):
        train_vae.load_vae_config(
            ROOT / "configs/train/demo_vae_decoder.yaml", ["init_from=null", "train.freeze_encoder=true"]
        )


@pytest.mark.parametrize("change", ["encoder", "statistics"])
def test_export_refuses_a_vae_that_encodes_differently(trained_vae, tmp_path, change):
    tmp, _ = trained_vae
    other = AutoencoderKLWan.from_pretrained(tmp / "vae")
    if change == "encoder":
        with torch.no_grad():
            next(p for n, p in other.named_parameters() if n.startswith("encoder.")).add_(1e-3)
    else:
        other.register_to_config(latents_std=[2.0] * 16)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(ValueError, match="does not encode as the VAE the generator was trained with"):
        replace_decoder(AutoencoderKLWan.from_pretrained(tmp / "vae"), tmp_path / "other")


def test_a_missing_vae_folder_is_named(trained_vae, tmp_path):
    tmp, data = trained_vae
    with pytest.raises(FileNotFoundError, match="--vae .*nowhere.* not a saved AutoencoderKLWan folder"):
        replace_decoder(AutoencoderKLWan.from_pretrained(tmp / "vae"), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config key 'init_from' is .*nowhere"):
        train_vae.main(
            [
                "--config",
                str(ROOT / "configs/train/demo_vae_decoder.yaml"),
                "--set",
                f"init_from={tmp_path / 'nowhere'}",
                "--set",
                f"output_dir={tmp_path / 'run'}",
                "--set",
                f"export_dir={tmp_path / 'out'}",
                "--set",
                f"data.root={data}",
            ]
        )
    assert not (tmp_path / "out").exists()
