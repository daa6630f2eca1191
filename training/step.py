"""One training step of either stage: inputs from a batch, the flow-matching forward pass and the stage's loss.

The maths live in the library (`echo.flow_matching`, `echo.losses`) and every input is built by the encodings
`EchoPipeline` uses too (`echo.encoding`: VAE latents, a chunk's condition, user video tokens, prompt embeddings);
this module wires a batch of `echo.data.collate_conversations` to them. Every random draw of a step (σ, noise,
continuation, the block subset S, the decoded frames of L_pixel) comes from an explicit generator seeded by
``(seed, rank, micro-step)``, so a resumed run draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from echo.encoding import (
    PromptEncoder,
    chunk_condition,
    encode_latents,
    encode_reference_image,
    encode_user_video,
)
from echo.flow_matching import (
    add_noise,
    flow_loss,
    predict_x0,
    sample_sigmas,
    scheduler_shift,
    sigma_to_timestep,
    velocity_target,
)
from echo.losses import hfa_loss, latent_frame_weights, lip_loss_weights, pixel_loss, sample_blocks, speech_weights

from .config import TrainConfig
from .modeling import TrainingModels


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-step of one rank, independent of any global RNG state."""
    state = np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def blur_motion_video(video: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    r"""Blur augmentation of a continuation sample's motion frames (``loss.motion_blur``): every frame of sample ``b``
    blurred by a Gaussian of σ_b ~ U(0, max_sigma) pixels (separable, reflected edges; σ_b < 0.3 leaves it as is).

    Args:
        video (`torch.Tensor` of shape `(B, 3, T, H, W)`): the motion frames in [−1, 1].

    Returns:
        `torch.Tensor` of the same shape: the blurred frames (a new tensor).
    """
    batch_size, channels, frames, height, width = video.shape
    sigmas = torch.rand(batch_size, generator=generator) * max_sigma
    out = video.clone()
    for b, sigma in enumerate(sigmas.tolist()):
        if sigma < 0.3:
            continue
        radius = min(int(math.ceil(3 * sigma)), (min(height, width) - 1) // 2)
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(video.device, video.dtype)
        planes = video[b].permute(1, 0, 2, 3).reshape(frames * channels, 1, height, width)  # T·3, 1, H, W
        planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
        out[b] = planes.reshape(frames, channels, height, width).permute(1, 0, 2, 3)
    return out


def noise_motion_latents(
    condition: torch.Tensor, num_motion: int, max_level: float, mask_channels: int, generator: torch.Generator
) -> torch.Tensor:
    r"""Noise augmentation of a continuation sample's motion frames (``loss.motion_noise``).

    The given latents of the first ``num_motion`` latent frames (channels ``mask_channels … mask_channels + C`` of the
    ``[mask, given, reference]`` condition) become ``(1 − s)·z + s·ε``, with ``s ~ U(0, max_level)`` per sample; the
    mask and the reference plane are untouched. At inference the motion frames are the model's own earlier output,
    never clean ground truth: trained on corrupted ones, it learns to take appearance from the reference plane and
    only the motion from them, which keeps a long render from drifting.
    """
    batch_size, channels = condition.shape[:2]
    latent_channels = (channels - mask_channels) // 2
    given = slice(mask_channels, mask_channels + latent_channels)
    levels = (torch.rand(batch_size, generator=generator) * max_level).to(condition.device)
    noise = torch.randn(condition[:, given, :num_motion].shape, generator=generator).to(condition.device)
    levels = levels.view(batch_size, 1, 1, 1, 1)
    condition = condition.clone()
    condition[:, given, :num_motion] = (1 - levels) * condition[:, given, :num_motion] + levels * noise
    return condition


def stage1_prompt_embeds(
    batch: dict, prompt_encoder: PromptEncoder | None, batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    r"""The text ``f_ref`` reads in stage 2: the empty prompt ``""``, the only text stage 1 trains on (every stage-1
    config sets ``ablation.use_emotion: false``), so that ``f_ref`` sees the inputs it was trained with.

    Args:
        batch (`dict`): a `collate_conversations` batch; its ``empty_embeds`` `(B, L_txt, D)` (the cached embedding of
            ``""``, with ``data.use_cached_emotion_embeds``) are used when present.
        prompt_encoder ([`~echo.encoding.PromptEncoder`], *optional*): encodes ``""`` otherwise.

    Returns:
        `torch.Tensor` of shape `(B, L_txt, D)`.
    """
    if "empty_embeds" in batch:
        return batch["empty_embeds"].to(device, dtype)
    if prompt_encoder is None:
        raise ValueError(
            "The batch has no 'empty_embeds' and no `prompt_encoder` was given to encode f_ref's prompt ''."
        )
    return prompt_encoder([""] * batch_size, device, dtype)


def training_step(
    models: TrainingModels,
    module: torch.nn.Module,
    batch: dict,
    config: TrainConfig,
    prompt_encoder: PromptEncoder | None,
    generator: torch.Generator,
    device: torch.device,
    weight_dtype: torch.dtype,
    latent_cache=None,
) -> dict[str, torch.Tensor]:
    """Compute the stage's loss on one batch.

    The inputs are built by the functions `EchoPipeline` uses (`echo.encoding`), and the built models decide which
    inputs exist: the LCU's ``required_inputs`` (its ablation switches) select the user streams, and an LCU exists
    only in stage 2. The emotion text is the batch's (the dataset already gives ``""`` under the "w/o LAU" ablation).
    With an image encoder (I2V bases), the reference's CLIP tokens (`echo.encoding.encode_reference_image`, as the
    pipeline computes them) go to the generator and to ``f_ref``.

    Args:
        models ([`TrainingModels`]): frozen parts (VAE, text encoder, ``f_ref``, the image encoder of I2V bases), the
            unwrapped training module.
        module (`torch.nn.Module`): the prepared (possibly DDP/FSDP-wrapped) [`EchoTrainingModule`].
        batch (`dict`): a `collate_conversations` batch; its ``emotion_embeds`` `(B, L_txt, D)` (cached, see
            ``data.use_cached_emotion_embeds``) are used as they are, otherwise ``prompt_encoder`` encodes its texts.
            In stage 2 its cached ``user_tokens`` `(B, T_hist, C, h, w)` and ``user_token_mask`` `(B, T_hist, h, w)`
            (``data.use_cached_user_tokens``) go to the LCU as they are (cast to the VAE's dtype, as
            `encode_user_video` returns them), otherwise `encode_user_video` encodes ``user_video`` / ``user_face_mask``.
        prompt_encoder ([`~echo.encoding.PromptEncoder`], *optional*): `None` when the batch holds ``emotion_embeds``.
        generator (`torch.Generator`): the step's CPU generator (`step_generator`).
        latent_cache ([`~training.latent_cache.WindowLatentCache`], *optional*): with the batch's ``latent_key``, the
            windows this step encodes (the batch has no cached ``latents``) are written to it.

    Returns:
        `dict` with ``loss`` (the total, with gradient) and the detached terms ``flow``, ``pixel`` / ``align``.
    """
    loss_cfg = config.loss
    vae = models.vae
    context_encoder = models.module.context_encoder  # None in stage 1: no user branch
    video = batch["video"].to(device)

    # 1. Clean latents, the condition (reference, + motion frames in a continuation window), avatar audio and masks
    if "latents" in batch:  # exact window latents from the cache (training.latent_cache): encode_latents' output
        latents = batch["latents"].to(device).float()
    else:
        latents = encode_latents(vae, video)  # B, 16, F, h, w
        if latent_cache is not None and "latent_key" in batch:
            latent_cache.write_batch(batch["latent_key"], latents)
    batch_size, _, num_frames = latents.shape[:3]
    motion_video = None
    if loss_cfg.motion_prob > 0 and torch.rand((), generator=generator).item() < loss_cfg.motion_prob:
        # A continuation window: its first 4(m − 1) + 1 frames play the previous chunk's last frames.
        count = min(loss_cfg.motion_latent_frames, num_frames - 1)
        motion_video = video[:, :, : vae.config.scale_factor_temporal * (count - 1) + 1]
        if loss_cfg.motion_blur > 0:
            motion_video = blur_motion_video(motion_video, loss_cfg.motion_blur, generator)
    condition = chunk_condition(vae, batch["reference"].to(device), motion_video, num_frames)  # B, 36, F, h, w
    if motion_video is not None and loss_cfg.motion_noise > 0:
        condition = noise_motion_latents(
            condition, count, loss_cfg.motion_noise, vae.config.scale_factor_temporal, generator
        )
    image_embeds = None
    if models.image_encoder is not None:  # I2V base: the reference's CLIP tokens, B, N_img, image_dim
        image_embeds = encode_reference_image(models.image_encoder, models.image_processor, batch["reference"])
        image_embeds = image_embeds.to(device, weight_dtype)
    audio_embeds = batch["avatar_audio"].to(device, weight_dtype)
    lip_mask, face_mask = batch["lip_mask"].to(device), batch["face_mask"].to(device)
    if "emotion_embeds" in batch:  # cached; the dataset already gives "" when the emotion is ablated
        text_embeds = batch["emotion_embeds"].to(device, weight_dtype)
    elif prompt_encoder is None:
        raise ValueError(
            "The batch has no 'emotion_embeds' and no `prompt_encoder` was given to encode its emotion text."
        )
    else:
        text_embeds = prompt_encoder(batch["emotion_text"], device, weight_dtype)

    # 2. User inputs of the LCU (stage 2): the streams its enabled branches need
    user_inputs = None
    if context_encoder is not None:
        required = context_encoder.required_inputs
        user_inputs = {
            "user_audio": batch["user_audio"].to(device),
            "clip_frames": video.shape[2],
            "user_audio_mask": batch["user_audio_mask"].to(device),
        }
        if "user_video" in required and "user_tokens" in batch:  # cached: no VAE pass over the history
            user_inputs["user_video"] = batch["user_tokens"].to(device, vae.dtype)
            user_inputs["user_face_mask"] = batch["user_token_mask"].to(device)
        elif "user_video" in required:
            with torch.no_grad():
                user_inputs["user_video"], user_inputs["user_face_mask"] = encode_user_video(
                    vae, batch["user_video"].to(device), batch["user_face_mask"].to(device)
                )
        if "understanding" in required:
            user_inputs["understanding"] = batch["understanding"].to(device)
            user_inputs["understanding_mask"] = batch["understanding_mask"].to(device)

    # 3. Noise: x_σ = (1 − σ)·x0 + σ·ε, timestep σ·1000
    shift = loss_cfg.shift if loss_cfg.shift is not None else scheduler_shift(models.scheduler)  # Euler or UniPC
    sigmas = sample_sigmas(
        batch_size, shift=shift, mean=loss_cfg.logit_mean, std=loss_cfg.logit_std, generator=generator
    ).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = add_noise(latents, noise, sigmas)
    timestep = sigma_to_timestep(sigmas)

    # Condition dropout (classifier-free guidance): per-sample keep masks, drawn only when enabled
    audio_mask = user_keep = None
    if loss_cfg.audio_drop_prob > 0:
        audio_mask = (torch.rand(batch_size, generator=generator) >= loss_cfg.audio_drop_prob).to(device)
    if context_encoder is not None and loss_cfg.user_drop_prob > 0:
        user_keep = (torch.rand(batch_size, generator=generator) >= loss_cfg.user_drop_prob).to(device)

    blocks = None
    if models.ref_transformer is not None and loss_cfg.align_weight > 0:
        num_layers = models.ref_transformer.config.num_layers
        blocks = sample_blocks(num_layers, min(loss_cfg.align_blocks, num_layers), generator)

    # 4. Forward
    output = module(
        noisy.to(weight_dtype),
        timestep,
        text_embeds,
        condition.to(weight_dtype),
        audio_embeds,
        lip_mask,
        face_mask,
        user_inputs=user_inputs,
        return_block_features=blocks,
        audio_mask=audio_mask,
        user_keep=user_keep,
        encoder_hidden_states_image=image_embeds,
    )
    prediction = output.sample.float()
    weights = None  # the lip region's latents counted lip_flow_weight times (echo.losses.lip_loss_weights)
    if loss_cfg.lip_flow_weight != 1:
        weights = lip_loss_weights(lip_mask, latents.shape, loss_cfg.lip_flow_weight)
    terms = {"flow": flow_loss(prediction, velocity_target(latents, noise), mask=weights)}

    # 5. Stage losses: λ·L_pixel (stage 1) or γ·L_align (stage 2, Eq. 12)
    loss = terms["flow"]
    if config.stage == 1 and loss_cfg.pixel_weight > 0:
        pred_x0 = predict_x0(noisy, prediction, sigmas)
        terms["pixel"] = pixel_loss(
            vae, pred_x0, video, loss_cfg.pixel_latent_frames, generator=generator, loss_type=loss_cfg.pixel_loss_type
        )
        loss = loss + loss_cfg.pixel_weight * terms["pixel"]
    if blocks is not None:
        # f_ref sees the stage-1 inputs of the window: the same noisy latents, condition, audio, masks and audio
        # dropout as the adapted generator, so L_align measures only how stage 2 moves the features, not the dropout;
        # the empty prompt, the only text stage 1 trains on (`stage1_prompt_embeds`); no user context (f_ref is the
        # stage-1 generator: it has no user branch).
        ref_text_embeds = stage1_prompt_embeds(batch, prompt_encoder, batch_size, device, weight_dtype)
        with torch.no_grad():
            reference = models.ref_transformer(
                noisy.to(weight_dtype),
                timestep,
                ref_text_embeds,
                condition=condition.to(weight_dtype),
                audio_embeds=audio_embeds,
                lip_mask=lip_mask,
                face_mask=face_mask,
                return_block_features=blocks,
                audio_mask=audio_mask,
                encoder_hidden_states_image=image_embeds,
            )
        weights = latent_frame_weights(speech_weights(batch["avatar_rms"].to(device), loss_cfg.speech_weight_floor))
        terms["align"] = hfa_loss(
            output.block_features, reference.block_features, weights, num_frames, distance=loss_cfg.align_distance
        )
        loss = loss + loss_cfg.align_weight * terms["align"]
    result = {name: value.detach() for name, value in terms.items()}
    result["loss"] = loss
    return result
