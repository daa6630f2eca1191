"""One training step of either stage: inputs from a batch, the flow-matching forward pass and the stage's loss.

The maths live in the library (`echo.flow_matching`, `echo.losses`, `echo.conditioning`); this module wires a batch
of `echo.data.collate_conversations` to them. Every random draw of a step (σ, noise, continuation, the block subset
S, the decoded frames of L_pixel) comes from an explicit generator seeded by ``(seed, rank, micro-step)``, so a
resumed run draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import numpy as np
import torch

from echo.encoding import encode_user_video, normalize_latents
from echo.conditioning import build_condition
from echo.flow_matching import add_noise, flow_loss, predict_x0, sample_sigmas, sigma_to_timestep, velocity_target
from echo.losses import hfa_loss, latent_frame_weights, pixel_loss, sample_blocks, speech_weights

from .config import TrainConfig
from .modeling import TrainingModels


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-step of one rank, independent of any global RNG state."""
    state = np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class TextEmbedder:
    """Emotion text → `(B, L, text_dim)` with `echo.emotion.EmotionTextEncoder` (Wan's prompt encoding, as the
    pipeline does), cached per distinct text; ``L = min(512, tokenizer.model_max_length)``."""

    def __init__(self, tokenizer, text_encoder, max_length: int | None = None):
        from echo.emotion import EmotionTextEncoder

        self.encoder = EmotionTextEncoder(
            text_encoder, tokenizer, max_length=max_length or min(int(tokenizer.model_max_length), 512)
        )
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, state in zip(missing, self.encoder.encode(missing)):
                self.cache[text] = state.detach()
        return torch.stack([self.cache[t] for t in texts]).to(device=device, dtype=dtype)


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """`(B, 3, T, H, W)` in [−1, 1] → normalised latents `(B, 16, F, h, w)` (the posterior mode)."""
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, latents.float())


def training_step(
    models: TrainingModels,
    module: torch.nn.Module,
    batch: dict,
    config: TrainConfig,
    text_embedder: TextEmbedder | None,
    generator: torch.Generator,
    device: torch.device,
    weight_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Compute the stage's loss on one batch.

    Args:
        models ([`TrainingModels`]): frozen parts (VAE, text encoder, ``f_ref``) and names.
        module (`torch.nn.Module`): the prepared (possibly DDP/FSDP-wrapped) [`EchoTrainingModule`].
        batch (`dict`): a `collate_conversations` batch; its ``emotion_embeds`` `(B, L_txt, D)` (cached, see
            ``data.use_cached_emotion_embeds``) are used as they are, otherwise ``text_embedder`` encodes its texts.
            In stage 2 its cached ``user_tokens`` `(B, T_hist, C, h, w)` and ``user_token_mask`` `(B, T_hist, h, w)`
            (``data.use_cached_user_tokens``) go to the LCU as they are (cast to the VAE's dtype, as
            `encode_user_video` returns them), otherwise `encode_user_video` encodes ``user_video`` / ``user_face_mask``.
        text_embedder ([`TextEmbedder`], *optional*): `None` when the batch holds ``emotion_embeds``.
        generator (`torch.Generator`): the step's CPU generator (`step_generator`).

    Returns:
        `dict` with ``loss`` (the total, with gradient) and the detached terms ``flow``, ``pixel`` / ``align``.
    """
    loss_cfg = config.loss
    vae = models.vae
    video = batch["video"].to(device)

    # 1. Clean latents, reference (or continuation) condition, avatar audio and masks
    if "latents" in batch:
        latents = normalize_latents(vae, batch["latents"].to(device).float())
    else:
        latents = encode_video(vae, video)  # B, 16, F, h, w
    batch_size, _, num_frames = latents.shape[:3]
    reference_latents = encode_video(vae, batch["reference"].to(device)[:, :, None])  # B, 16, 1, h, w
    motion_latents = None
    if loss_cfg.motion_prob > 0 and torch.rand((), generator=generator).item() < loss_cfg.motion_prob:
        count = min(loss_cfg.motion_latent_frames, num_frames - 1)
        motion_latents = encode_video(vae, video[:, :, : 4 * (count - 1) + 1])
    condition = build_condition(reference_latents, motion_latents, num_frames)
    audio_embeds = batch["avatar_audio"].to(device, weight_dtype)
    lip_mask, face_mask = batch["lip_mask"].to(device), batch["face_mask"].to(device)
    use_emotion = config.ablation.use_emotion
    if "emotion_embeds" in batch:  # cached; the dataset already gives "" when the emotion is ablated
        text_embeds = batch["emotion_embeds"].to(device, weight_dtype)
    elif text_embedder is None:
        raise ValueError("The batch has no 'emotion_embeds' and no text embedder was given to encode its emotion text.")
    else:
        texts = batch["emotion_text"] if use_emotion else [""] * batch_size
        text_embeds = text_embedder(texts, device, weight_dtype)

    # 2. User inputs of the LCU (stage 2)
    user_inputs = None
    if config.stage == 2:
        user_inputs = {
            "user_audio": batch["user_audio"].to(device),
            "clip_frames": video.shape[2],
            "user_audio_mask": batch["user_audio_mask"].to(device),
        }
        if config.ablation.use_visual and "user_tokens" in batch:  # cached: no VAE pass over the history
            user_inputs["user_video"] = batch["user_tokens"].to(device, vae.dtype)
            user_inputs["user_face_mask"] = batch["user_token_mask"].to(device)
        elif config.ablation.use_visual:
            with torch.no_grad():
                user_inputs["user_video"], user_inputs["user_face_mask"] = encode_user_video(
                    vae, batch["user_video"].to(device), batch["user_face_mask"].to(device)
                )
        if config.ablation.use_understanding:
            user_inputs["understanding"] = batch["understanding"].to(device)
            user_inputs["understanding_mask"] = batch["understanding_mask"].to(device)

    # 3. Noise: x_σ = (1 − σ)·x0 + σ·ε, timestep σ·1000
    shift = loss_cfg.shift if loss_cfg.shift is not None else models.scheduler.config.shift
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
    if config.stage == 2 and loss_cfg.user_drop_prob > 0:
        user_keep = (torch.rand(batch_size, generator=generator) >= loss_cfg.user_drop_prob).to(device)

    blocks = None
    if config.stage == 2 and loss_cfg.align_weight > 0:
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
    )
    prediction = output.sample.float()
    terms = {"flow": flow_loss(prediction, velocity_target(latents, noise))}

    # 5. Stage losses: λ·L_pixel (stage 1) or γ·L_align (stage 2, Eq. 12)
    loss = terms["flow"]
    if config.stage == 1 and loss_cfg.pixel_weight > 0:
        pred_x0 = predict_x0(noisy, prediction, sigmas)
        terms["pixel"] = pixel_loss(
            vae, pred_x0, video, loss_cfg.pixel_latent_frames, generator=generator, loss_type=loss_cfg.pixel_loss_type
        )
        loss = loss + loss_cfg.pixel_weight * terms["pixel"]
    if blocks is not None:
        # f_ref sees the stage-1 inputs (same noisy latents, text, audio, masks; no user context), so L_align measures
        # how far the adapted generator drifts from the talking behaviour stage 1 established.
        with torch.no_grad():
            reference = models.ref_transformer(
                noisy.to(weight_dtype),
                timestep,
                text_embeds,
                condition=condition.to(weight_dtype),
                audio_embeds=audio_embeds,
                lip_mask=lip_mask,
                face_mask=face_mask,
                return_block_features=blocks,
            )
        weights = latent_frame_weights(speech_weights(batch["avatar_rms"].to(device), loss_cfg.speech_weight_floor))
        terms["align"] = hfa_loss(
            output.block_features, reference.block_features, weights, num_frames, distance=loss_cfg.align_distance
        )
        loss = loss + loss_cfg.align_weight * terms["align"]
    result = {name: value.detach() for name, value in terms.items()}
    result["loss"] = loss
    return result
