"""Rectified-flow matching for the generator (Sec. 3.3): σ sampling, noising, velocity target, loss and sampling.

Conventions (diffusers' ``FlowMatchEulerDiscreteScheduler``):

- ``x_σ = (1 − σ)·x0 + σ·ε`` with σ ∈ [0, 1] (σ = 1 is pure noise), the model's timestep is ``σ·1000``;
- the model predicts the velocity ``v = dx_σ/dσ = ε − x0``, so ``x0 = x_σ − σ·v``;
- training σ comes from a logit-normal ``σ = sigmoid(u), u ~ N(mean, std)`` followed by the same time shift the
  scheduler applies at sampling, ``σ' = shift·σ / (1 + (shift − 1)·σ)`` (shift > 1 moves mass toward noise).

Sampling is diffusers' scheduler itself (no scheduler is written here); :func:`retrieve_timesteps` sets it up.
`FlowMatchEulerDiscreteScheduler` and the multistep solvers in flow mode (UniPC, as Wan's own folders ship it) sample
the same flow: :func:`check_flow_scheduler` refuses any other, :func:`scheduler_shift` reads either one's shift.
"""

from __future__ import annotations

import inspect

import torch


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow time shift σ' = shift·σ / (1 + (shift − 1)·σ) (identity for shift = 1)."""
    if shift <= 0:
        raise ValueError(f"`shift` is {shift}, expected a positive number.")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    batch_size: int,
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """
    Shifted logit-normal noise levels.

    Args:
        batch_size (`int`): number of σ.
        shift (`float`, defaults to 1.0): time shift (Wan uses 3-5 at 480p-720p).
        mean (`float`, defaults to 0.0), std (`float`, defaults to 1.0): the normal before the sigmoid.
        generator (`torch.Generator`, *optional*): RNG (on CPU).
        device: device of the result.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float32 in (0, 1).
    """
    u = torch.randn(batch_size, generator=generator, dtype=torch.float32) * std + mean
    return shift_sigmas(torch.sigmoid(u), shift).to(device)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"`sigma` has shape {tuple(sigma.shape)}, expected ({like.shape[0]},): one σ per sample.")
    return sigma.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε; `x0`, `noise`: `(B, ...)`, `sigma`: `(B,)`."""
    if x0.shape != noise.shape:
        raise ValueError(f"`noise` has shape {tuple(noise.shape)}, expected the shape of `x0` {tuple(x0.shape)}.")
    sigma = _expand(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = ε − x0."""
    return noise - x0


def predict_x0(x_sigma: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_σ − σ·v (the inverse of :func:`add_noise` given the velocity)."""
    return x_sigma - _expand(sigma, x_sigma) * velocity


def flow_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weighting: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Mean squared error between predicted and target velocities.

    Args:
        prediction, target (`torch.Tensor` of shape `(B, C, F, h, w)` or any `(B, ...)`).
        weighting (`torch.Tensor` of shape `(B,)`, *optional*): per-sample weights (e.g. σ-dependent); the loss is
            their weighted mean (normalised by the sum of weights).
        mask (`torch.Tensor`, *optional*): broadcastable to `prediction`; {0, 1} or soft. Each sample's error is
            averaged over the masked elements only (samples with an empty mask contribute 0).

    Returns:
        A scalar tensor (float32).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"`prediction` has shape {tuple(prediction.shape)}, expected {tuple(target.shape)} (target).")
    error = (prediction.float() - target.float()) ** 2
    if mask is None:
        per_sample = error.flatten(1).mean(1)
    else:
        mask = torch.broadcast_to(mask.float(), error.shape)
        per_sample = (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-8)
    if weighting is None:
        return per_sample.mean()
    weighting = weighting.float().to(per_sample.device)
    if weighting.shape != per_sample.shape:
        raise ValueError(f"`weighting` has shape {tuple(weighting.shape)}, expected {tuple(per_sample.shape)}.")
    return (per_sample * weighting).sum() / weighting.sum().clamp_min(1e-8)


def sigma_to_timestep(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The model's timestep for σ: σ·num_train_timesteps (diffusers flow-matching convention)."""
    return sigma * num_train_timesteps


def retrieve_timesteps(
    scheduler,
    num_inference_steps: int | None = None,
    device: torch.device | str | None = None,
    sigmas: list[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """
    Set a diffusers `FlowMatchEulerDiscreteScheduler` (or UniPC flow) up and return `(timesteps, num_steps)`.

    Either `num_inference_steps` (the scheduler spaces σ from 1 toward 0 and applies its configured `shift`) or
    explicit `sigmas` (descending, in (0, 1]; the scheduler still applies its shift) is given.
    """
    if (num_inference_steps is None) == (sigmas is None):
        raise ValueError("Pass exactly one of `num_inference_steps` and `sigmas`.")
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, len(scheduler.timesteps)


# Multistep solvers sample a flow-matching model in their flow mode only: these config values select it.
FLOW_MODE = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
# The schedulers `flow_scheduler` builds (and `echo.components` loads).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


def check_flow_scheduler(scheduler) -> None:
    r"""
    Refuses a diffusers scheduler that cannot sample the flow-matching generator, with the way to build one that can.

    Accepted: `FlowMatchEulerDiscreteScheduler`, and the multistep solvers (`UniPCMultistepScheduler`,
    `DPMSolverMultistepScheduler`) in their flow mode (``prediction_type="flow_prediction"``,
    ``use_flow_sigmas=True``: σ from 1 to 0 with the time shift ``flow_shift``, the model output read as the velocity
    ``ε − x0``). Both set their σ from ``num_inference_steps`` alone; ``use_dynamic_shifting`` (a shift chosen per
    call from the sequence length through ``mu``) is refused, since the shift is a setting of the trained model.

    Args:
        scheduler: a diffusers scheduler (`SchedulerMixin` with a ``config``).

    Raises:
        `ValueError`: naming the scheduler's class and the offending config values.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config, name = scheduler.config, type(scheduler).__name__
    if config.get("use_dynamic_shifting", False):
        raise ValueError(
            f"The scheduler ({name}) has use_dynamic_shifting=True, which needs a per-call `mu`; ECHO samples with "
            f"the fixed shift the model was trained with. Set it with `pipe.scheduler = {name}.from_config("
            "pipe.scheduler.config, use_dynamic_shifting=False)`."
        )
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return
    mode = {key: config.get(key) for key in FLOW_MODE}
    if mode != FLOW_MODE:
        raise ValueError(
            f"The scheduler ({name} with {', '.join(f'{k}={v!r}' for k, v in mode.items())}) does not sample a "
            "flow-matching model: the generator predicts the velocity ε − x0 along σ from 1 to 0. Use "
            "FlowMatchEulerDiscreteScheduler, or a multistep solver in flow mode, e.g. `pipe.scheduler = "
            "UniPCMultistepScheduler.from_config(pipe.scheduler.config, prediction_type='flow_prediction', "
            "use_flow_sigmas=True, flow_shift=3.0)`."
        )


def scheduler_shift(scheduler) -> float:
    """The time shift a flow scheduler samples with (``shift`` of `FlowMatchEulerDiscreteScheduler`, ``flow_shift``
    of a multistep solver in flow mode, `check_flow_scheduler`); training draws its σ with the same shift. (A config
    converted from the other class may carry the other's key unused: the class decides which one counts.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_flow_scheduler(scheduler)
    key = "shift" if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else "flow_shift"
    return float(scheduler.config[key])


def flow_scheduler(name: str, scheduler, shift: float | None = None):
    r"""
    A flow scheduler of class ``name`` from a flow scheduler's config, as diffusers swaps schedulers
    (``cls.from_config(scheduler.config, ...)``), with the flow-mode values set (`FLOW_MODE`) and the shift carried
    over; the keys the new class does not take (the other one's ``shift`` / ``flow_shift``) are dropped.

    Args:
        name (`str`): one of `FLOW_SCHEDULERS`.
        scheduler: the current scheduler (``pipe.scheduler``), a flow scheduler (`check_flow_scheduler`).
        shift (`float`, *optional*): the time shift; defaults to the current scheduler's (`scheduler_shift`).

    Returns:
        The new scheduler, accepted by `check_flow_scheduler`.
    """
    import diffusers

    if name not in FLOW_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {FLOW_SCHEDULERS}.")
    if shift is None:
        shift = scheduler_shift(scheduler)
    if not shift > 0:
        raise ValueError(f"`shift` is {shift}, expected a positive number.")
    cls = getattr(diffusers, name)
    parameters = inspect.signature(cls.__init__).parameters
    config = {key: value for key, value in scheduler.config.items() if key in parameters}
    if name == "FlowMatchEulerDiscreteScheduler":
        scheduler = cls.from_config(config, shift=shift)
    else:
        scheduler = cls.from_config(config, flow_shift=shift, **FLOW_MODE)
    check_flow_scheduler(scheduler)
    return scheduler
