"""The few-step mode of `EchoPipeline`: what a distilled student is, where its settings live, and its schedule.

A student (``python -m training.distill``, docs/few_step.md) is a LoRA on the same base generator, trained so that
``num_steps`` Euler steps of **one** generator forward each (all conditions given, no classifier-free guidance
passes) land where the base model's full guided sampler lands. It is saved as a folder:

- ``pytorch_lora_weights.safetensors``: the LoRA, in diffusers' format (`EchoPipeline.load_lora_weights` loads it);
- ``few_step.json``: `FewStepConfig`, the one place the few-step settings are saved and read (the step counts the
  student was trained for, the teacher it imitates, the adapter name, the schedule rule).

The schedule of ``n`` student steps is `few_step_sigmas`: σ = 1, 1 − 1/n, …, 1/n (then 0), through the scheduler's
own shift. Training draws its segments from this function and the pipeline sets the scheduler with it, so both use
the same σ points; diffusers' default ``set_timesteps(n)`` would end the schedule at σ = 1/1000 and waste a step
(``n = 2`` gives σ = 1, 0.001).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

FEW_STEP_CONFIG = "few_step.json"
FEW_STEP_DIR = "few_step"  # the student's folder inside a shipped pipeline folder
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "few_step"


@dataclass
class FewStepConfig:
    """The settings saved beside a student LoRA (``few_step.json``).

    Args:
        num_steps (`list[int]`): the step counts the student was trained for (a render uses one of them).
        default_steps (`int`): the step count `EchoPipeline.enable_few_step` uses when given none.
        teacher_steps (`int`), teacher_audio_guidance_scale (`float`), teacher_user_guidance_scale (`float`): the
            teacher's sampler the student imitates (its guidance is folded into the student's single pass).
        adapter_name (`str`): the adapter's name in the transformer.
        train_steps (`int`): optimizer steps of the distillation that wrote the folder.
    """

    num_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    default_steps: int = 2
    teacher_steps: int = 10
    teacher_audio_guidance_scale: float = 4.5
    teacher_user_guidance_scale: float = 2.0
    adapter_name: str = ADAPTER_NAME
    train_steps: int = 0

    def __post_init__(self):
        if not self.num_steps or any(not isinstance(n, int) or n < 1 for n in self.num_steps):
            raise ValueError(f"`num_steps` is {self.num_steps!r}: expected a non-empty list of positive integers.")
        if self.default_steps not in self.num_steps:
            raise ValueError(
                f"`default_steps` is {self.default_steps}, not one of the trained step counts {self.num_steps}."
            )

    def check_steps(self, num_steps: int) -> int:
        """``num_steps`` if the student was trained for it, else a `ValueError` naming the trained counts."""
        if num_steps not in self.num_steps:
            raise ValueError(
                f"The few-step student was trained for {self.num_steps} steps, not {num_steps}: pass one of those "
                "(or distill again with `distill.student_steps` including it)."
            )
        return num_steps

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FEW_STEP_CONFIG
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> FewStepConfig:
        path = Path(folder) / FEW_STEP_CONFIG
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist: a few-step folder holds {FEW_STEP_CONFIG} and {LORA_WEIGHTS}, written "
                "by `python -m training.distill` (docs/few_step.md)."
            )
        values = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{str(path)!r}: unknown keys {unknown}; known: {sorted(known)}.")
        return cls(**values)


def few_step_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    r"""The σ points of ``num_steps`` student steps, with the terminal 0: `(num_steps + 1,)` float32.

    Evenly spaced in the unshifted σ (1, 1 − 1/n, …, 1/n), shifted by ``scheduler`` as its ``set_timesteps`` shifts
    them (a copy of the scheduler is set, the one given is left as it is).
    """
    if num_steps < 1:
        raise ValueError(f"`num_steps` is {num_steps}, expected at least 1.")
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(sigmas=few_step_unshifted(num_steps))
    return probe.sigmas.float().cpu()


def few_step_unshifted(num_steps: int) -> np.ndarray:
    """The unshifted σ a scheduler's ``set_timesteps(sigmas=...)`` takes for ``num_steps`` student steps."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


class FewStepMixin:
    """Few-step mode of `EchoPipeline` (a pipeline with a ``transformer`` and LoRA loading): load a student folder,
    switch the mode on and off, and the two hooks the pipeline's loop calls (`few_step_overrides` in
    ``resolve_settings``, `set_sampling_timesteps` in ``render_chunk``)."""

    _few_step = None  # FewStepConfig of the loaded student (`load_few_step_weights`)
    _few_step_steps = None  # the step count while few-step mode is on (`enable_few_step`), else None

    def load_few_step_weights(self, folder: str | Path, enable: bool = True) -> FewStepConfig:
        r"""
        Loads a few-step student (``python -m training.distill``) onto this base: its LoRA through
        ``load_lora_weights`` under the adapter name saved in its ``few_step.json``, and its settings
        ([`FewStepConfig`]). With ``enable``, few-step mode is switched on at the student's default step count.

        Args:
            folder (`str` or `os.PathLike`): a folder holding ``few_step.json`` and ``pytorch_lora_weights.safetensors``
                (e.g. ``models/echo-demo/few_step``).
            enable (`bool`, defaults to `True`): switch few-step mode on (`enable_few_step`).

        Returns:
            [`FewStepConfig`].
        """
        config = FewStepConfig.load(folder)
        if config.adapter_name in getattr(self.transformer, "peft_config", {}):
            raise ValueError(
                f"An adapter named {config.adapter_name!r} is already loaded; `pipe.delete_adapters("
                f"{config.adapter_name!r})` first, or load the few-step weights into a fresh pipeline."
            )
        if not (Path(folder) / LORA_WEIGHTS).is_file():
            raise FileNotFoundError(f"{str(Path(folder) / LORA_WEIGHTS)!r} does not exist (the student's LoRA).")
        self.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=config.adapter_name)
        self._few_step = config
        if enable:
            self.enable_few_step()
        else:
            self.disable_few_step()
        return config

    def enable_few_step(self, num_steps: int | None = None) -> None:
        r"""
        Renders with the few-step student: its adapter alone active, ``num_steps`` (one of the trained counts;
        default: the student's ``default_steps``) Euler steps on the student's σ points (`few_step_sigmas`), one
        generator forward per step (guidance scales 1: no unconditional passes, the teacher's guidance is in the
        weights). A call's or session's ``num_inference_steps`` must then be `None` or this count, and its guidance
        scales `None` or 1.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self._few_step is None:
            raise ValueError("No few-step weights are loaded: call `pipe.load_few_step_weights(folder)` first.")
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"The few-step student takes Euler steps; the pipeline's scheduler is {type(self.scheduler).__name__}."
                " Set `pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`."
            )
        num_steps = self._few_step.default_steps if num_steps is None else self._few_step.check_steps(num_steps)
        self.set_adapters([self._few_step.adapter_name])
        self._few_step_steps = num_steps

    def disable_few_step(self) -> None:
        """Back to the base model's sampler (its steps and guidance); the student adapter stays loaded, inactive."""
        if self._few_step is not None:
            others = [name for name in self.transformer.peft_config if name != self._few_step.adapter_name]
            if others:
                self.set_adapters(others)
            else:
                self.disable_lora()
        self._few_step_steps = None

    @property
    def few_step_steps(self) -> int | None:
        """The step count of few-step mode, or `None` when it is off."""
        return self._few_step_steps

    def few_step_overrides(self, overrides: dict) -> dict:
        """A call's setting overrides with few-step mode applied (its step count, guidance scales 1); a conflicting
        explicit value is a `ValueError` naming it. Without few-step mode, ``overrides`` as given."""
        if self._few_step_steps is None:
            return overrides
        forced = {"num_inference_steps": self._few_step_steps, "audio_guidance_scale": 1.0, "user_guidance_scale": 1.0}
        for name, value in forced.items():
            given = overrides.get(name)
            if given is not None and given != value:
                raise ValueError(
                    f"`{name}` is {given}, but few-step mode is on ({self._few_step_steps} steps, one pass per step: "
                    f"{name} = {value}). Leave it `None`, call `pipe.enable_few_step(n)` for another step count, or "
                    "`pipe.disable_few_step()` for the base sampler."
                )
        return {**overrides, **forced}

    def set_sampling_timesteps(self, num_inference_steps: int, device) -> None:
        """Set the scheduler for a chunk: the student's σ points in few-step mode, else ``set_timesteps(n)``."""
        if self._few_step_steps is not None:
            self.scheduler.set_timesteps(sigmas=few_step_unshifted(num_inference_steps), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
