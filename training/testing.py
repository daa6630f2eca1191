"""A tiny training set for tests, benchmarks and smoke runs: prepared clips plus the optional caches stage 2 reads.

`make_tiny_training_set` runs the real preparation pipeline (`data_prep.testing.make_tiny_prepared_set`) once and then
writes the two caches that data preparation only produces with large models: ``user_omni.safetensors`` (understanding
tokens S_usr, here seeded Gaussian tokens of the tiny LCU's ``understanding_dim``) and ``emotion.json`` (emotion
descriptions per window, here fixed sentences of the tiny tokenizer's vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

EMOTIONS = ("the avatar looks calm and attentive", "the avatar smiles and feels happy")


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
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    root = out_dir / "prepared"
    done = out_dir / ".complete"
    if done.is_file():
        return root
    from data_prep.testing import make_tiny_prepared_set

    clips = make_tiny_prepared_set(out_dir, num_frames=num_frames, size=size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for index, clip in enumerate(clips):
        tokens = torch.randn(4 + index, understanding_dim, generator=generator)  # N_s differs: padding is exercised
        save_file({"hidden_states": tokens}, str(clip / "user_omni.safetensors"))
        windows = [{"end_frame": num_frames // 2, "text": EMOTIONS[0]}, {"end_frame": num_frames - 1, "text": EMOTIONS[1]}]
        (clip / "emotion.json").write_text(json.dumps({"windows": windows}))
    done.write_text("ok")
    return root


def save_tiny_text_encoder(out_dir: str | Path) -> Path:
    """Save the tiny model's text encoder and tokenizer (``configs/models/tiny.yaml``, the weights training builds) as
    a pipeline-style folder with ``text_encoder/`` and ``tokenizer/``, for ``echo-prep --text-encoder``.

    Returns:
        `Path`: ``out_dir``.
    """
    from echo.components import load_components

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
    from echo.components import load_components

    out_dir = Path(out_dir)
    config = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
    load_components(str(config), only=["vae"])["vae"].save_pretrained(out_dir)
    return out_dir
