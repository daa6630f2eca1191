"""An exponential moving average of the trained weights (``train.ema``), with diffusers' `EMAModel`.

The average covers exactly the parameters the run trains (the adapter, the fully trained generator modules, the LCU)
and is updated after every optimizer step. A checkpoint holds it as ``ema.safetensors``: one tensor per trained
parameter, under the parameter's name, and `EMAModel`'s counters in the header (JSON), so resuming restores it
exactly and loads no pickle. ``final/`` is written with the averaged weights swapped in (`averaged_weights`), so
echo-export exports the EMA weights of a run trained with ``train.ema``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .checkpoint_integrity import CheckpointError

EMA_FILE = "ema.safetensors"
# `EMAModel.state_dict()` entries besides the shadow parameters, kept in the file's header.
_COUNTERS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


class TrainedWeightsEMA:
    """`diffusers.training_utils.EMAModel` over the trainable parameters of a module, with safetensors save/load.

    Args:
        module (`torch.nn.Module`): the unwrapped training module; its parameters with ``requires_grad`` are averaged.
        decay (`float`): ``train.ema_decay``.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        named = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [param for _, param in named]
        self.model = EMAModel(self.parameters, decay=decay)

    def step(self) -> None:
        """Update the average with the current weights (once per optimizer step)."""
        self.model.step(self.parameters)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Swap the averaged weights into the module for the block, then restore the trained ones."""
        self.model.store(self.parameters)
        self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            self.model.restore(self.parameters)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``ema.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        state = self.model.state_dict()
        tensors = {name: shadow.detach().contiguous().cpu() for name, shadow in zip(self.names, state["shadow_params"])}
        path = Path(folder) / EMA_FILE
        save_file(tensors, str(path), metadata={"counters": json.dumps({k: state[k] for k in _COUNTERS})})
        return path

    def load(self, folder: str | os.PathLike) -> None:
        """Restore what `save` wrote; the file must name exactly this run's trained parameters."""
        from safetensors import SafetensorError, safe_open

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {str(folder)!r} has no {EMA_FILE}, but train.ema is on: it was trained without EMA. "
                "Resume it with train.ema=false, or start a new run."
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                counters = json.loads(f.metadata()["counters"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{str(path)!r} is not an EMA state written by this trainer ({error!r}).") from error
        if sorted(tensors) != sorted(self.names):
            missing, unexpected = sorted(set(self.names) - set(tensors)), sorted(set(tensors) - set(self.names))
            raise CheckpointError(
                f"{str(path)!r} does not match the trained parameters: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        shadow = [tensors[name].to(param.device, param.dtype) for name, param in zip(self.names, self.parameters)]
        self.model.load_state_dict(dict(counters, shadow_params=shadow))
