"""Tiny components for the pipeline tests, with the ECHO additions acting as after training."""

from pathlib import Path

import torch

from echo.components import load_components

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


def tiny_components_as_trained(seed: int = 0, scale: float = 0.2) -> dict:
    """The components of configs/models/tiny.yaml with every all-zero tensor of the generator and the LCU (the ECHO
    additions start zero-initialised: the generator computes what Wan computes, so neither audio nor user would
    change the output) given small random values, as after training, so that tests see each condition's effect."""
    components = load_components(TINY)
    generator = torch.Generator().manual_seed(seed)
    for module in (components["transformer"], components["context_encoder"]):
        for name, param in module.named_parameters():
            if not param.any() and "norm" not in name:
                param.data = torch.randn(param.shape, generator=generator) * scale
    return components


def random_generator_inputs(transformer, seed: int = 0, with_context: bool = True) -> dict:
    """Random inputs of a tiny generator for 9 frames at 64² (3 × 8 × 8 latents), shaped by its config; with
    ``with_context`` also 5 user-context tokens (drawn last, so the other inputs are the same either way)."""
    c = transformer.config
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 3, (1, 3, 4, 4), generator=g)
    inputs = dict(
        hidden_states=torch.randn(1, c.out_channels, 3, 8, 8, generator=g),
        timestep=torch.tensor([600.0]),
        encoder_hidden_states=torch.randn(1, 6, c.text_dim, generator=g),
        condition=torch.randn(1, c.condition_channels, 3, 8, 8, generator=g),
        audio_embeds=torch.randn(1, 9, c.audio_window, c.audio_num_layers, c.audio_dim, generator=g),
        lip_mask=(masks == 1).float(),
        face_mask=(masks == 2).float(),
    )
    if with_context:
        inputs["context_embeds"] = torch.randn(1, 5, c.context_dim, generator=g)
    return inputs
