"""echo.components: every component built tiny from configs/models/tiny.yaml, or loaded through from_pretrained."""

from pathlib import Path

import numpy as np
import pytest
import torch

from echo.components import build_tiny_tokenizer, load_components, load_model_config
from echo.encoding import encode_user_video

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_components(TINY)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_components_are_seeded_and_agree_on_the_seams(tiny):
    assert set(tiny) == {
        "vae",
        "transformer",
        "scheduler",
        "audio_encoder",
        "feature_extractor",
        "text_encoder",
        "tokenizer",
        "context_encoder",
        "settings",
    }
    transformer, audio = tiny["transformer"], tiny["audio_encoder"]
    assert (transformer.config.audio_dim, transformer.config.audio_num_layers) == (32, 3)
    assert audio.config.hidden_size == 32 and audio.config.num_hidden_layers + 1 == 3
    assert transformer.config.text_dim == tiny["text_encoder"].config.d_model
    assert transformer.config.context_dim == tiny["context_encoder"].config.context_dim

    # Same seed → identical weights whatever else was built before; another seed → different weights.
    torch.manual_seed(1234)  # the global RNG must not matter
    again = load_components(TINY, only=["audio_encoder", "vae"])
    assert _state_equal(again["audio_encoder"], audio) and _state_equal(again["vae"], tiny["vae"])
    config = load_model_config(TINY)
    config["audio_encoder"]["seed"] = 1
    other = load_components(config, only=["audio_encoder"])
    assert not _state_equal(other["audio_encoder"], audio)


def test_data_prep_tiny_wav2vec2_matches_the_pipeline_one(tiny, tmp_path):
    """Data preparation saves its tiny wav2vec2 from the same config section and seed: features must agree."""
    from data_prep.testing import save_tiny_wav2vec2

    folder = save_tiny_wav2vec2(tmp_path / "w2v", seed=0)
    config = {"audio_encoder": {"class": "Wav2Vec2Model", "pretrained": str(folder)}}
    loaded = load_components(config)["audio_encoder"]
    assert _state_equal(loaded, tiny["audio_encoder"])


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("transformer", "audio_dim", 16, "audio_dim"),
        ("transformer", "text_dim", 48, "text_dim"),
        ("context_encoder", "context_dim", 48, "context_dim"),
        ("text_encoder", "vocab_size", 100, "vocab_size"),
    ],
)
def test_mismatched_seams_raise_naming_both_sides(section, key, value, message):
    config = load_model_config(TINY)
    config[section]["config"][key] = value
    only = {"transformer": ["transformer", "audio_encoder", "text_encoder", "context_encoder"]}.get(
        section, ["transformer", "audio_encoder", "text_encoder", "tokenizer", "context_encoder"]
    )
    with pytest.raises(ValueError, match=message):
        load_components(config, only=only)


def test_pretrained_sections_round_trip_through_from_pretrained(tiny, tmp_path):
    """save_pretrained → a YAML with `pretrained:` folders → the same weights, tokenizer and feature extractor."""
    config = {}
    for section in ("text_encoder", "tokenizer", "feature_extractor", "context_encoder", "scheduler"):
        tiny[section].save_pretrained(tmp_path / section)
        config[section] = {"class": load_model_config(TINY)[section]["class"], "pretrained": str(tmp_path / section)}
    config["tokenizer"]["class"] = "AutoTokenizer"
    loaded = load_components(config)
    assert _state_equal(loaded["text_encoder"], tiny["text_encoder"])
    assert _state_equal(loaded["context_encoder"], tiny["context_encoder"])
    text = "The avatar listens calmly, with a gentle smile."
    assert loaded["tokenizer"](text).input_ids == tiny["tokenizer"](text).input_ids
    assert loaded["scheduler"].config.shift == tiny["scheduler"].config.shift == 3.0

    # Hub ids are resolved from the local cache only unless downloads are allowed.
    with pytest.raises(OSError):
        load_components({"audio_encoder": {"class": "Wav2Vec2Model", "pretrained": "echo-ihg-tests/not-a-model"}})


def test_transformer_from_wan_section_keeps_every_wan_weight(tmp_path):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    wan.save_pretrained(tmp_path / "wan" / "transformer")
    config = {
        "transformer": {
            "class": "EchoTransformer3DModel",
            "from_wan": str(tmp_path / "wan"),
            "subfolder": "transformer",
            "config": {"audio_dim": 32, "audio_num_layers": 3, "context_dim": 32},
        }
    }
    echo = load_components(config)["transformer"]
    echo_state = echo.state_dict()
    for name, tensor in wan.state_dict().items():
        if name == "patch_embedding.weight":  # T2V base: grows by 20 zero-initialised condition channels
            assert torch.equal(echo_state[name][:, :16], tensor) and not echo_state[name][:, 16:].any()
        else:
            assert torch.equal(echo_state[name], tensor), name


def test_tiny_tokenizer_is_lossless_on_ascii_and_t5_like():
    tokenizer = build_tiny_tokenizer()
    text = "the avatar nods, smiling: 'yes, 42!'"
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # whole words of the vocabulary are one piece; unknown words fall back to characters
    assert len(tokenizer("listening").input_ids) == 2
    assert len(tokenizer("zq").input_ids) == 3


def test_encode_user_video_is_per_frame_vae_encoding(tiny):
    vae = tiny["vae"]
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 3, 16, 16, generator=generator) * 2 - 1  # B, T, 3, H, W
    face = torch.zeros(1, 3, 16, 16)
    face[0, 1, 9, 2] = 1  # a single face pixel in frame 1 marks its latent cell (1, 0)
    tokens, mask = encode_user_video(vae, video, face, batch_frames=2)
    assert tokens.shape == (1, 3, 16, 2, 2) and mask.shape == (1, 3, 2, 2)
    for t in range(3):  # each frame alone, as a one-frame video, normalised like the generator's latents
        alone = vae.encode(video[:, t, :, None]).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(tokens[:, t], ((alone - mean) / std)[:, :, 0], atol=1e-5, rtol=1e-5)
    expected = np.zeros((3, 2, 2))
    expected[1, 1, 0] = 1
    np.testing.assert_array_equal(mask[0].numpy(), expected)


def test_wan_config_names_real_folders_and_never_downloads():
    """configs/models/wan2.1-t2v-1.3b.yaml: every part from the Wan diffusers folder layout or wav2vec2-base, the ECHO
    widths agreeing with them; without the weights in the local cache loading fails instead of downloading."""
    from echo.components import COMPONENT_CLASSES

    config = load_model_config(TINY.with_name("wan2.1-t2v-1.3b.yaml"))
    assert config["allow_download"] is False
    assert config["torch_dtype"] == "bfloat16" and config["vae"]["torch_dtype"] == "float32"
    i2v_only = {"image_encoder", "image_processor"}  # the CLIP parts of I2V bases
    assert set(COMPONENT_CLASSES) - i2v_only == set(config) - {"allow_download", "seed", "settings", "torch_dtype"}
    wan = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    for section in ("vae", "scheduler", "text_encoder", "tokenizer"):
        assert (config[section]["pretrained"], config[section]["subfolder"]) == (wan, section)
    assert (config["transformer"]["from_wan"], config["transformer"]["subfolder"]) == (wan, "transformer")
    assert (
        config["audio_encoder"]["pretrained"]
        == config["feature_extractor"]["pretrained"]
        == "facebook/wav2vec2-base-960h"
    )
    echo, lcu = config["transformer"]["config"], config["context_encoder"]["config"]
    assert (echo["audio_dim"], echo["audio_num_layers"]) == (lcu["audio_dim"], lcu["audio_num_layers"]) == (768, 13)
    assert echo["context_dim"] == lcu["context_dim"] == 1536  # Wan2.1-1.3B inner width: 12 heads × 128
    with pytest.raises(OSError):
        load_components(config, only=["tokenizer"])


@pytest.mark.parametrize(
    "model_config, stage_configs",
    [
        ("tiny.yaml", ("tiny_stage1.yaml", "tiny_stage2.yaml")),
        ("wan2.1-t2v-1.3b.yaml", ("stage1.yaml", "stage2.yaml")),
        ("wan2.1-i2v-14b-480p.yaml", ("stage1.yaml", "stage2.yaml")),
        ("demo.yaml", ("demo_stage1.yaml", "demo_stage2.yaml")),
    ],
)
def test_model_settings_are_what_its_training_configs_train(model_config, stage_configs):
    """The `settings:` of a model description (the pipeline's defaults) agree with the training configs that train it:
    resolution, window = chunk length, motion frames, user video size and history length."""
    from training.config import load_config

    settings = load_components(TINY.with_name(model_config), only=["settings"])["settings"]
    for name in stage_configs:
        config = load_config(TINY.parents[1] / "train" / name, ["model.stage1_dir=x"])
        assert settings["resolution"] == config.data.resolution, name
        assert settings["num_frames_per_chunk"] == config.data.num_frames, name
        assert settings["motion_frames"] == 4 * (config.loss.motion_latent_frames - 1) + 1, name
        if config.stage == 2:
            assert settings["user_video_size"] == config.data.user_video_size, name
            assert settings["max_history_frames"] == config.data.max_history_frames, name
            assert settings["use_emotion"] == config.ablation.use_emotion, name  # stage 1 never sees emotion text


def test_settings_section_is_validated_and_reaches_the_pipeline():
    from echo.settings import EchoSettings
    from pipelines import EchoPipeline

    config = load_model_config(TINY)
    settings = load_components(config, only=["settings"])["settings"]
    assert settings == EchoSettings.from_dict(config["settings"]).to_dict() and settings["resolution"] == 64
    assert "settings" not in load_components(config, only=["tokenizer"])  # only what was asked for
    config["settings"]["resolutoin"] = 64
    with pytest.raises(ValueError, match=r"model config section 'settings' has unknown keys \['resolutoin'\]"):
        load_components(config, only=["settings"])
    config["settings"] = {"motion_frames": 4}
    with pytest.raises(ValueError, match="`motion_frames` is 4"):
        load_components(config, only=["settings"])
    pipe = EchoPipeline(**load_components(TINY))
    assert pipe.settings == EchoSettings.from_dict(load_model_config(TINY)["settings"])


def test_user_video_tokens_do_not_depend_on_how_many_frames_are_encoded_together(tiny):
    """The cache encodes a whole clip, training a window's history, the pipeline the conversation so far: a frame's
    tokens must be the same bit for bit (the VAE's kernels round differently for different batch sizes)."""
    vae = tiny["vae"]
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(1, 17, 3, 32, 32, generator=generator) * 2 - 1
    face = torch.ones(1, 17, 32, 32)
    with torch.no_grad():
        whole, _ = encode_user_video(vae, video, face, batch_frames=16)
        head, _ = encode_user_video(vae, video[:, :9], face[:, :9], batch_frames=16)
        tail, _ = encode_user_video(vae, video[:, 5:], face[:, 5:], batch_frames=16)
    assert torch.equal(whole[:, :9], head) and torch.equal(whole[:, 5:], tail)
