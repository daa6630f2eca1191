"""A tiny training set for tests, benchmarks and smoke runs: prepared clips plus the optional caches stage 2 reads.

`make_tiny_training_set` runs the real preparation pipeline (`data_prep.testing.make_tiny_prepared_set`) once and then
writes the two caches that data preparation only produces with large models: ``user_omni.safetensors`` (understanding
tokens S_usr, here seeded Gaussian tokens of the tiny LCU's ``understanding_dim``) and ``emotion.json`` (emotion
descriptions per window, here fixed sentences of the tiny tokenizer's vocabulary).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.testing import make_tiny_prepared_set
from echo import clip_format
from echo.components import load_components, load_model_config

EMOTIONS = ("the avatar looks calm and attentive", "the avatar smiles and feels happy")
# Reasoning strides of the tiny caches (`echo.clip_format.reasoning_frame`): several entries per 17-frame clip, so
# windows before the first reasoning frame, on one and between two all occur (saved with models trained on it).
UNDERSTANDING_STRIDE = 4  # entries at frames 3, 7, 11, 15
EMOTION_STRIDE = 6  # texts at frames 5 and 11


def make_tiny_training_set(
    out_dir: str | Path, num_frames: int = 17, size: int = 64, understanding_dim: int = 32, seed: int = 0
) -> Path:
    """Prepare (or reuse) a tiny conversation under ``out_dir`` and return the folder of its clip folders.

    Args:
        out_dir (`str` or `Path`): working folder; reused when it already holds the prepared clips.
        num_frames (`int`, defaults to 17): frames per clip.
        size (`int`, defaults to 64): crop side of the prepared videos.
        understanding_dim (`int`, defaults to 32): width of the cached understanding tokens.
        seed (`int`, defaults to 0): seed of the conversation and the caches.

    Returns:
        `Path`: ``out_dir/prepared``, holding two clip folders (each participant once as the avatar).
    """
    import torch

    out_dir = Path(out_dir)
    root = out_dir / "prepared"
    done = out_dir / ".complete"
    if done.is_file():
        return root

    clips = make_tiny_prepared_set(out_dir, num_frames=num_frames, size=size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for index, clip in enumerate(clips):
        # One S_usr entry per reasoning frame (echo-prep's layout); N_s differs, so padding is exercised.
        end_frames = clip_format.reasoning_frames(0, num_frames, UNDERSTANDING_STRIDE)
        tokens = [
            torch.randn(4 + index + e % 2, understanding_dim, generator=generator) for e in range(len(end_frames))
        ]
        clip_format.write_understanding(clip, end_frames, tokens, stride=UNDERSTANDING_STRIDE)
        ends = clip_format.reasoning_frames(0, num_frames, EMOTION_STRIDE)
        windows = [{"end_frame": end, "text": EMOTIONS[k % len(EMOTIONS)]} for k, end in enumerate(ends)]
        clip_format.write_emotion_windows(clip, windows, stride=EMOTION_STRIDE)
    done.write_text("ok")
    return root


def save_tiny_text_encoder(out_dir: str | Path) -> Path:
    """Save the tiny model's text encoder and tokenizer (``configs/models/tiny.yaml``, the weights training builds) as
    a pipeline-style folder with ``text_encoder/`` and ``tokenizer/``, for ``echo-prep --text-encoder``.

    Returns:
        `Path`: ``out_dir``.
    """

    out_dir = Path(out_dir)
    config = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
    components = load_components(str(config), only=["text_encoder", "tokenizer"])
    components["text_encoder"].save_pretrained(out_dir / "text_encoder")
    components["tokenizer"].save_pretrained(out_dir / "tokenizer")
    return out_dir


def save_tiny_vae(out_dir: str | Path) -> Path:
    """Save the tiny model's VAE (``configs/models/tiny.yaml``, the weights training builds) as a folder for
    ``echo-prep --vae``.

    Returns:
        `Path`: ``out_dir``.
    """

    out_dir = Path(out_dir)
    config = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
    load_components(str(config), only=["vae"])["vae"].save_pretrained(out_dir)
    return out_dir


def save_tiny_wan_folder(
    out_dir: str | Path, i2v: bool = False, seed: int = 0, calibration_clips: list[Path] | None = None
) -> Path:
    """Save a tiny Wan2.1 base in the diffusers layout a user downloads (``transformer/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``; an I2V base also ``image_encoder/`` and ``image_processor/``).

    The transformer is a plain `diffusers.WanTransformer3DModel` of the tiny generator's sizes (``configs/models/
    tiny.yaml``) with Wan's own input channels: 16 for T2V, 36 for I2V (latents, mask, image latents, as Wan2.1-I2V).
    `EchoTransformer3DModel.from_wan` then starts from it as it starts from the real base: every ECHO addition
    zero-initialised. Reused when ``out_dir`` already holds it.

    With ``calibration_clips`` (prepared clip folders), the VAE's ``latents_mean`` / ``latents_std`` are measured on
    their avatar videos, as Wan's were measured on its data: the random tiny VAE's latents vary little from image to
    image (std ≈ 0.07 per channel), so with Wan's own statistics (std ≈ 2) a face would be lost under the noise.

    Returns:
        `Path`: ``out_dir``.
    """
    import torch
    from diffusers import WanTransformer3DModel

    out_dir = Path(out_dir)
    done = out_dir / ".complete"
    if done.is_file():
        return out_dir
    description = load_model_config(TINY_MODEL_CONFIG)
    echo = description["transformer"]["config"]
    wan_config = {key: echo[key] for key in _WAN_KEYS}
    wan_config.update(in_channels=36 if i2v else 16, out_channels=echo["out_channels"])
    sections = ["vae", "text_encoder", "tokenizer", "scheduler"]
    if i2v:
        description = tiny_i2v_description()
        wan_config.update(image_dim=32, added_kv_proj_dim=32)
        sections += ["image_encoder", "image_processor"]
    components = load_components(description, only=sections)
    if calibration_clips:
        _calibrate_latents(components["vae"], calibration_clips)
    for name in sections:
        components[name].save_pretrained(out_dir / name)
    torch.manual_seed(seed)
    WanTransformer3DModel(**wan_config).save_pretrained(out_dir / "transformer")
    done.touch()
    return out_dir


def _calibrate_latents(vae, clips: list[Path]) -> None:
    """Set ``vae.config.latents_mean`` / ``latents_std`` to the per-channel statistics of the clips' latents."""
    import torch

    latents = []
    for clip in clips:
        record = clip_format.read_meta(clip)
        frames = clip_format.read_video_frames(clip / "avatar.mp4", range(record["num_frames"]))
        video = torch.from_numpy(frames.copy()).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            latents.append(vae.encode(video).latent_dist.mode().flatten(2))
    latents = torch.cat(latents, dim=2)
    vae.register_to_config(latents_mean=latents.mean((0, 2)).tolist(), latents_std=latents.std((0, 2)).tolist())


# The WanTransformer3DModel arguments of the tiny generator (configs/models/tiny.yaml), the rest is ECHO's.
_WAN_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "rope_max_seq_len",
)
TINY_MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


def tiny_i2v_description() -> dict:
    """``configs/models/tiny.yaml`` as an I2V base (Wan2.1-I2V's layout, tiny): the generator reads CLIP image tokens
    (``image_dim`` 32, image key/value projections of its width 32) from a tiny seeded `CLIPVisionModel` (hidden 32, 2
    layers, 32² images in 8² patches: 17 tokens) and its `CLIPImageProcessor` (32²); prompts are padded to the 512
    tokens Wan's attention expects after the image tokens."""

    description = load_model_config(TINY_MODEL_CONFIG)
    description["transformer"]["config"].update(image_dim=32, added_kv_proj_dim=32)
    description["image_encoder"] = {
        "class": "CLIPVisionModel",
        "config": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    }
    description["image_processor"] = {
        "class": "CLIPImageProcessor",
        "config": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    }
    description["tokenizer"]["config"]["model_max_length"] = 512
    description["settings"]["max_sequence_length"] = 512
    return description


def shrink_description(description: str | Path | dict, wan_folder: str | Path, wav2vec2_folder: str | Path) -> dict:
    """A shipped model description (``configs/models/*.yaml``) at the tiny base's sizes, built the way it builds the
    real model: every ``pretrained`` / ``from_wan`` source that names a Wan base now names ``wan_folder`` (saved by
    `save_tiny_wan_folder`), the wav2vec2 source ``wav2vec2_folder``, and the widths that follow the base (audio rows,
    context width, the LCU's sizes) the tiny ones; every switch, layout and source kind is kept.

    A description whose generator is built from a ``config`` (the tiny and demo models) keeps it; its other
    ``pretrained`` sources (e.g. the demo's trained VAE) name the tiny base's folders.
    """

    description = load_model_config(description)
    tiny = load_model_config(TINY_MODEL_CONFIG)
    for name, spec in description.items():
        if not isinstance(spec, dict) or name == "settings":
            continue
        if "pretrained" in spec and name in ("audio_encoder", "feature_extractor"):
            spec["pretrained"] = str(wav2vec2_folder)
            spec.pop("subfolder", None)
        elif "pretrained" in spec:
            spec["pretrained"] = str(wan_folder)
            spec["subfolder"] = name
        if "from_wan" in spec:
            spec["from_wan"] = str(wan_folder)
            spec["subfolder"] = "transformer"
            widths = {
                key: tiny["transformer"]["config"][key] for key in ("audio_dim", "audio_num_layers", "context_dim")
            }
            spec["config"].update(widths)
        spec.pop("torch_dtype", None)
    if "context_encoder" in description and "from_wan" in description["transformer"]:
        switches = {k: v for k, v in description["context_encoder"]["config"].items() if k.startswith("use_")}
        description["context_encoder"]["config"] = dict(tiny["context_encoder"]["config"], **switches)
    description.pop("torch_dtype", None)
    settings = description.setdefault("settings", {})
    for key in ("resolution", "num_frames_per_chunk", "motion_frames", "user_video_size"):
        settings[key] = tiny["settings"][key]
    if "image_encoder" not in description:
        settings["max_sequence_length"] = tiny["settings"]["max_sequence_length"]
    return description


def main(argv: list[str] | None = None) -> int:
    """``make tiny-data`` / ``python -m training.testing --out data/tiny``: the prepared set the tiny training configs
    read (``configs/train/tiny_*.yaml``: ``data.root: data/tiny/prepared``), made by `make_tiny_training_set` from a
    synthetic conversation through the real echo-prep (MediaPipe framing and face mesh, a tiny random wav2vec2) plus
    the stage-2 caches; rerunning it on a complete folder does nothing."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(":", 1)[0].strip("`"))
    parser.add_argument("--out", default="data/tiny", help="working folder; the clips go to <out>/prepared")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip (the tests' 17)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_tiny_training_set(args.out, num_frames=args.num_frames, seed=args.seed)
    print(f"tiny prepared set: {root} ({len(list(root.glob('*/meta.json')))} clips); train on it with "
          f"`python -m training.train --config configs/train/tiny_stage1.yaml --set data.root={root}`")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
