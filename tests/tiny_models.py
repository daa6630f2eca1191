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
