"""The device a module computes on: where its inputs must go."""

from __future__ import annotations

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` runs its forward on: the ``execution_device`` of an accelerate hook on it or on one of its
    submodules (diffusers' ``enable_sequential_cpu_offload`` / ``enable_model_cpu_offload`` keep the weights on the
    ``meta`` device or the CPU between calls and move them there), else the device of its first parameter, as diffusers'
    ``DiffusionPipeline._execution_device`` does for a whole pipeline. Inputs sent to ``module.device`` instead would
    land on ``meta`` under sequential offload."""
    for submodule in module.modules():
        device = getattr(getattr(submodule, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device
