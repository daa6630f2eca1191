# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""`EchoPipeline`: interactive head generation (talking + listening avatar) with a Wan2.1 DiT and SDCM.

Given an avatar reference image, the avatar's own speech, and the user's video and speech (the other side of the
conversation), the pipeline renders the avatar frame by frame at 25 fps:

- the avatar audio drives the lips (SDCM lip branch) and co-speech motion;
- the user's long-range audio-visual behaviour, encoded by the LCU (Eq. 5-9) from frame 1 to the end of the current
  chunk, drives the listening behaviour (SDCM face branch);
- an emotion description (LAU, Eq. 3), given or reasoned from the dialogue, enters through the text cross-attention.

A conversation longer than one chunk is rendered chunk by chunk (Eq. 1). Every chunk has ``num_frames_per_chunk =
4k + 1`` frames. Every chunk is conditioned on the reference image (the condition's reference plane, and latent frame
0 of the first chunk); every continuation chunk starts ``motion_frames`` frames before the end of the previous one,
is also conditioned on the VAE encoding of those last ``motion_frames`` generated frames (latent frames ``0 … m − 1``,
``motion_frames = 4(m − 1) + 1``), regenerates them, and drops them from the output. The condition is built by
`echo.encoding.chunk_condition`, the function the training step uses.

Defaults: resolution, frames per chunk, motion frames, user video size, text length, default emotion, the LAU switch
and the sampling defaults are the settings the model was trained with (`echo.settings.EchoSettings`, stored in the
pipeline's config, i.e. ``model_index.json``, and read through `EchoPipeline.settings`); a `__call__` argument left
at `None` takes the saved setting.

Avatar masks: SDCM needs the avatar's lip and face regions at the token grid. They come from the 478 face-mesh
landmarks of the reference image through `echo.masks.reference_token_masks` (the rule training uses), held for every
frame. The landmarks are given as ``reference_landmarks`` or detected with MediaPipe's face mesh when it is installed;
``lip_mask`` / ``face_mask`` may be passed directly at the token grid instead.

Interactive mode: `EchoPipeline.start_session` returns an `EchoSession` on the same weights, fed the conversation in
pieces as it happens and rendering each chunk as soon as its inputs are complete; the LCU carries its Mamba state
from chunk to chunk, so a chunk's cost does not grow with the conversation. `__call__` is such a session fed
everything at once (`pipelines.session` documents how a chunk is computed).

Inputs: `pipelines.inputs` defines the accepted forms of every input once (images: PIL, uint8 or [0, 1] float arrays,
[−1, 1] float tensors; audio: mono float or int16 / int32 PCM at ``sampling_rate``, resampled to 16 kHz; numbers:
types and ranges). `__call__`, `start_session` and `EchoSession.push` convert the accepted forms and refuse the rest
with a `ValueError` naming the argument, before any work; nothing is clipped or guessed.

Framing: the model is trained on echo-prep's square head crops. By default (``frame_inputs=True``) a raw reference
photo and raw user frames are framed by the same code (`echo.framing`: face detection, tracking, causal box
smoothing, a square of 1.8× the face box at ``settings.resolution``); ``frame_inputs=False`` takes inputs that already
are such crops (a prepared clip's frames) as they are.

Classifier-free guidance runs up to three passes per step: ``uncond`` (no avatar audio, no user context), ``audio``
(avatar audio, no user context) and ``full`` (both), combined as
``uncond + s_a · (audio − uncond) + s_u · (full − audio)`` with ``s_a = audio_guidance_scale`` and
``s_u = user_guidance_scale``. A pass whose weight in that sum is zero (``1 − s_a``, ``s_a − s_u``, ``s_u``) is skipped,
so ``s_a = s_u = 1`` costs one pass. Each pass runs in its own ``transformer.cache_context`` (diffusers' caches).

Few-step mode (`pipelines.few_step.FewStepMixin`, docs/few_step.md): ``pipe.load_few_step_weights(folder)`` loads a
distilled student LoRA onto the same base (``python -m training.distill``); then every chunk takes 1, 2 or 4 Euler
steps on the student's σ points with guidance scales 1, i.e. one generator forward per step.

I2V bases (Wan2.1-I2V-14B: a transformer with ``image_dim``): the pipeline also holds the base's CLIP
``image_encoder`` and ``image_processor``; the reference's image tokens (`encode_image`, the encoding the training
step uses) enter every pass, as in diffusers' `WanImageToVideoPipeline`.
"""

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import (
    CLIPVisionModel,
    PreTrainedTokenizerBase,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)
from transformers.image_processing_utils import BaseImageProcessor

from echo.audio import SAMPLE_RATE, audio_frame_features, audio_track_features
from echo.chunks import num_latent_frames
from echo.encoding import (
    PromptEncoder,
    chunk_condition,
    decode_latents,
    detect_face_landmarks,
    encode_reference_image,
    encode_user_video,
    frames_to_tensor,
    prepare_user_video,
)
from echo.flow_matching import check_flow_scheduler
from echo.framing import frame_image, source_to_crop
from echo.lcu import LongRangeContextEncoder
from echo.masks import NUM_LANDMARKS, reference_token_masks
from echo.settings import EchoSettings
from echo.transformer_echo import EchoTransformer3DModel

from . import inputs as accepted
from .chunk_inputs import ChunkInputs, RenderContext
from .few_step import FewStepMixin
from .pipeline_output import EchoPipelineOutput
from .session import EchoSession

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import numpy as np
        >>> from PIL import Image
        >>> from pipelines import EchoPipeline
        >>> from pipelines.video_io import load_wav, read_frames, write_mp4

        >>> pipe = EchoPipeline.from_pretrained("path/to/echo-pipeline").to("cuda")
        >>> out = pipe(
        ...     reference_image=Image.open("avatar.png"),
        ...     avatar_audio=load_wav("avatar.wav"),
        ...     user_video=read_frames("user.mp4"),
        ...     user_audio=load_wav("user.wav"),
        ...     emotion="The avatar listens attentively with a warm smile.",
        ... )  # at the model's resolution, chunk length and sampling defaults (`pipe.settings`)
        >>> write_mp4("avatar.mp4", out.frames[0], audio=load_wav("avatar.wav"))
        ```
"""


class EchoPipeline(DiffusionPipeline, WanLoraLoaderMixin, FewStepMixin):
    r"""
    Pipeline for interactive head generation (ECHO): an avatar that talks with its own audio and listens to a user.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    The pipeline also inherits the following loading methods:
        - [`~loaders.WanLoraLoaderMixin.load_lora_weights`] for loading Wan LoRAs (diffusers or original Wan key
          format, e.g. step-distillation LoRAs) into the transformer, whose Wan layers keep Wan's names.

    Args:
        vae ([`AutoencoderKLWan`]):
            Variational Auto-Encoder model to encode and decode videos to and from latent representations.
        transformer ([`~echo.EchoTransformer3DModel`]):
            The Wan2.1 DiT with SDCM that denoises the avatar latents.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or [`UniPCMultistepScheduler`]):
            A flow-matching scheduler used with `transformer` to denoise the latents: FlowMatchEuler, or a multistep
            solver in flow mode (``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``), as Wan's folders
            ship UniPC; `echo.flow_matching.check_flow_scheduler` refuses others. Swap it the diffusers way
            (``pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, ...)``, docs/inference.md).
        audio_encoder ([`~transformers.Wav2Vec2Model`]):
            wav2vec2 encoder of both speakers' audio; all its hidden states are used (``NL = num_hidden_layers + 1``).
        feature_extractor ([`~transformers.Wav2Vec2FeatureExtractor`]):
            Normalises waveforms for `audio_encoder`.
        text_encoder ([`~transformers.UMT5EncoderModel`] or [`~transformers.T5EncoderModel`]):
            Encodes the avatar's emotion description (LAU, Eq. 3) for the text cross-attention.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer of `text_encoder`.
        context_encoder ([`~echo.LongRangeContextEncoder`], *optional*):
            The LCU (Eq. 5-9) that turns the user's history into the context tokens ``f_pu``. Without it the user branch
            is off and the avatar only talks.
        image_encoder ([`~transformers.CLIPVisionModel`], *optional*):
            The CLIP vision encoder of an I2V base (Wan2.1-I2V, whose transformer has ``image_dim``): the reference
            image's tokens (`encode_image`) enter every transformer call as ``encoder_hidden_states_image``, as in
            diffusers' `WanImageToVideoPipeline`. Required when ``transformer.config.image_dim`` is set, unused
            otherwise.
        image_processor ([`~transformers.CLIPImageProcessor`], *optional*):
            Prepares the reference image for `image_encoder`.
        settings (`dict` or [`~echo.settings.EchoSettings`], *optional*):
            The settings the model was trained with (`EchoSettings` fields; missing keys take `EchoSettings`'s
            defaults). Stored in the pipeline's config (``model_index.json``), so `save_pretrained` /
            `from_pretrained` keep them; `__call__` arguments left at `None` read them through `settings`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->audio_encoder->context_encoder->transformer->vae"
    _optional_components = ["context_encoder", "image_encoder", "image_processor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "condition"]

    def __init__(
        self,
        vae: AutoencoderKLWan,
        transformer: EchoTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        audio_encoder: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        text_encoder: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        context_encoder: LongRangeContextEncoder | None = None,
        settings: dict | EchoSettings | None = None,
        image_encoder: CLIPVisionModel | None = None,
        image_processor: BaseImageProcessor | None = None,  # CLIPImageProcessor (or its PIL twin without torchvision)
    ):
        super().__init__()

        self.register_modules(
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            context_encoder=context_encoder,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )
        if not isinstance(settings, EchoSettings):
            settings = EchoSettings.from_dict(settings, source="`settings`")
        self.register_to_config(settings=settings.to_dict())

        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' reading of ``model_index.json`` into `__init__` arguments, refusing ``"settings": null``: the
        settings a model was trained with are part of it, and a null would silently render with `EchoSettings`'s
        defaults (512², 33-frame chunks, 40 steps). A folder without the key (an older save) keeps the defaults."""
        if "settings" in config_dict and config_dict["settings"] is None and kwargs.get("settings") is None:
            raise ValueError(
                'model_index.json has `"settings": null`: the settings the model was trained with (resolution, '
                "frames per chunk, sampling defaults, ...) are missing. Write them back (`echo-export` writes them; "
                "`EchoSettings` lists the keys), or remove the key to use `EchoSettings`'s defaults knowingly."
            )
        return super().extract_init_dict(config_dict, **kwargs)

    @property
    def settings(self) -> EchoSettings:
        """The settings the model was trained with (from the config): the defaults of `__call__`."""
        return EchoSettings.from_dict(self.config.settings, source="the pipeline config's `settings`")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        r"""
        [`~DiffusionPipeline.enable_sequential_cpu_offload`]: every layer's weights stay on the CPU (``meta`` in the
        module) and move to ``device`` for its own forward only. The encoders send their inputs to each component's
        execution device (`echo.devices.execution_device`), never to ``module.device`` (``meta`` here).

        diffusers names the device with an index (``cpu:0`` for ``device="cpu"``); on the CPU, torch's
        ``Parameter.to("cpu:0")`` returns a plain tensor, which accelerate's hooks cannot offload again, so a CPU
        execution device is given to the hooks without its index (the same device; accelerators are unaffected).
        """
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        for component in self.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for module in component.modules():
                outer = getattr(module, "_hf_hook", None)
                for hook in getattr(outer, "hooks", [outer]):  # accelerate's SequentialHook holds several
                    execution_device = getattr(hook, "execution_device", None)
                    if execution_device is not None and torch.device(execution_device).type == "cpu":
                        hook.execution_device = torch.device("cpu")

    # ------------------------------------------------------------------------------------------------------------
    # Encoders (thin wrappers of `echo.encoding`, the functions training uses)
    # ------------------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str],
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        r"""
        Encodes emotion descriptions with the T5/UMT5 encoder as Wan does (`echo.encoding.PromptEncoder`, which the
        training step uses): the last hidden state of the valid tokens, zero-padded to the sequence length.

        Args:
            prompt (`str` or `list[str]`): emotion description(s).
            max_sequence_length (`int`, *optional*): padded length (capped by the tokenizer's maximum); defaults to
                ``settings.max_sequence_length``.
            device (`torch.device`, *optional*), dtype (`torch.dtype`, *optional*): of the returned embeddings.

        Returns:
            `torch.Tensor` of shape `(batch_size, max_sequence_length, text_dim)`.
        """
        if max_sequence_length is None:
            max_sequence_length = self.settings.max_sequence_length
        encoder = PromptEncoder(self.text_encoder, self.tokenizer, max_sequence_length)
        return encoder(prompt, device=device or self._execution_device, dtype=dtype or self.text_encoder.dtype)

    def encode_audio(self, waveform, num_frames: int, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
        r"""
        Per-video-frame wav2vec2 rows of frames ``[0, num_frames)`` of a mono track, by the one definition that
        echo-prep writes and `__call__` and sessions compute (`echo.audio.audio_track_features`: 1-s blocks with 1 s
        of audio on either side, every hidden state stacked, one row per 25 fps frame; a row reads at most 49 frames
        of audio after its frame). Silence after the waveform's end; audio after frame ``num_frames − 1`` is read
        only as the look-ahead of the last rows.

        Args:
            waveform: a mono waveform in a form `pipelines.inputs` accepts (float in [−1, 1], int16 / int32 PCM).
            num_frames (`int`): frames the audio covers.
            sampling_rate (`int`, defaults to 16000): rate of ``waveform``; other rates are resampled to 16 kHz
                (`echo.audio.resample_audio`, the resampler echo-prep and sessions use).

        Returns:
            `torch.Tensor` of shape `(num_frames, num_hidden_layers + 1, hidden_size)`, float32 on the CPU.
        """
        waveform = accepted.to_16khz(waveform, "waveform", sampling_rate)
        num_frames = accepted.check_int(num_frames, "num_frames")
        return audio_track_features(self.audio_encoder, self.feature_extractor, waveform, num_frames)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        r"""Normalised latents `(B, 16, F, h, w)` → frames `(B, 3, 4(F − 1) + 1, 8h, 8w)` in [−1, 1]
        (`echo.encoding.decode_latents`)."""
        return decode_latents(self.vae, latents)

    def encode_image(self, reference: torch.Tensor) -> torch.Tensor | None:
        r"""
        CLIP image tokens of the reference for an I2V base, as diffusers' `WanImageToVideoPipeline.encode_image`
        computes them (`echo.encoding.encode_reference_image`, which the training step uses too).

        Args:
            reference (`torch.Tensor` of shape `(1, 3, H, W)`): the reference in [−1, 1] at the video size
                (`prepare_reference`).

        Returns:
            `torch.Tensor` of shape `(1, N_img, image_dim)` in the transformer's dtype, or `None` when the transformer
            reads no image tokens (``image_dim`` unset: a T2V base).
        """
        image_dim = self.transformer.config.image_dim
        if image_dim is None:
            return None
        if self.image_encoder is None or self.image_processor is None:
            raise ValueError(
                f"The transformer reads CLIP image tokens of the reference (`image_dim` = {image_dim}: an I2V base "
                "such as Wan2.1-I2V) but the pipeline has no `image_encoder` / `image_processor`. Pass "
                '`image_encoder=CLIPVisionModel.from_pretrained(repo, subfolder="image_encoder")` and '
                '`image_processor=CLIPImageProcessor.from_pretrained(repo, subfolder="image_processor")` of the I2V '
                "base (e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers) to `EchoPipeline`, or give the model description "
                "its `image_encoder` and `image_processor` sections."
            )
        image_embeds = encode_reference_image(self.image_encoder, self.image_processor, reference)
        return image_embeds.to(self._execution_device, self.transformer.dtype)  # 1, N_img, image_dim

    def prepare_reference(self, image, height: int, width: int) -> torch.Tensor:
        """Reference image, in a form `pipelines.inputs` accepts (PIL; `(H, W, 3)` uint8 or float in [0, 1]; `(3, H, W)`
        float tensor in [−1, 1]) → `(1, 3, height, width)` in [−1, 1], resized as training resizes its frames
        (`echo.encoding.frames_to_tensor`; a float tensor is resized as it is, without a uint8 round trip)."""
        image = accepted.check_image(image, "reference_image")
        if isinstance(image, torch.Tensor):  # 3, H, W in [-1, 1]
            image = image[None]
            if tuple(image.shape[-2:]) != (height, width):
                image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            return image.clamp(-1, 1)
        return frames_to_tensor(image[None], (height, width))  # 1, 3, H, W

    def prepare_avatar_masks(
        self,
        height: int,
        width: int,
        num_latent_frames: int,
        reference_landmarks: np.ndarray | None = None,
        lip_mask: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        reference_image=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Token-grid lip and face masks `(1, F, H', W')` for SDCM.

        ``lip_mask`` / ``face_mask`` are used as given (`(H', W')`, `(F, H', W')` or `(1, F, H', W')`). Otherwise they
        are `echo.masks.reference_token_masks` of the reference's face-mesh landmarks (``reference_landmarks``
        `(478, 2)` in pixels of ``reference_image``, or MediaPipe's detection on ``reference_image``): the reference's
        static masks, held for all frames, which is exactly what training gives the generator.
        """
        patch = self.transformer.config.patch_size
        patch_px = (self.vae_scale_factor_spatial * patch[1], self.vae_scale_factor_spatial * patch[2])
        grid = (height // patch_px[0], width // patch_px[1])
        if (lip_mask is None) != (face_mask is None):
            raise ValueError("Pass both `lip_mask` and `face_mask`, or neither.")
        if lip_mask is not None:
            masks = []
            for name, mask in (("lip_mask", lip_mask), ("face_mask", face_mask)):
                mask = torch.as_tensor(mask).float()
                if not torch.isfinite(mask).all():
                    raise ValueError(f"`{name}` holds NaN or infinite values; expected a token-grid mask of 0s and 1s.")
                if mask.shape[-2:] != grid:
                    raise ValueError(f"`{name}` has shape {tuple(mask.shape)}, expected (..., {grid[0]}, {grid[1]}).")
                mask = mask.reshape(-1, *grid)
                if mask.shape[0] not in (1, num_latent_frames):
                    raise ValueError(
                        f"`{name}` has {mask.shape[0]} frames, expected 1 or one per latent frame ({num_latent_frames})."
                    )
                masks.append(mask[None].expand(1, num_latent_frames, *grid))
            return masks[0], masks[1] * (1 - masks[0])
        if reference_image is None:
            raise ValueError("`prepare_avatar_masks` needs `reference_image` (its landmarks are in its pixels).")
        image = accepted.to_uint8_image(reference_image, "reference_image")  # H_ref, W_ref, 3 uint8, as MediaPipe reads
        if reference_landmarks is None:
            reference_landmarks = detect_face_landmarks(image)
        reference_landmarks = accepted.check_landmarks(
            reference_landmarks,
            "reference_landmarks",
            (NUM_LANDMARKS, 2),
            f"pixels of the {image.shape[0]}x{image.shape[1]} reference image",
        )
        lip, face = reference_token_masks(
            reference_landmarks, height, width, num_latent_frames, source_size=image.shape[:2], patch_size=patch_px
        )  # F, H', W' each
        return lip[None], face[None]

    # ------------------------------------------------------------------------------------------------------------
    # Checks and latents
    # ------------------------------------------------------------------------------------------------------------

    @property
    def token_unit(self) -> tuple[int, int]:
        """Pixels per token `(rows, columns)`: the VAE's spatial factor times the patch size; ``height`` / ``width``
        are multiples of it."""
        patch = self.transformer.config.patch_size
        return self.vae_scale_factor_spatial * patch[1], self.vae_scale_factor_spatial * patch[2]

    def resolve_settings(self, height=None, width=None, **overrides) -> tuple[EchoSettings, int, int]:
        r"""
        The settings of one call or session: the model's (`settings`) with the given arguments (not `None`), every
        value checked (`pipelines.inputs`: types, ranges; `EchoSettings`: their relations; the transformer's RoPE
        table: the positions a chunk needs), and the output size.

        Args:
            height (`int`, *optional*), width (`int`, *optional*): positive multiples of `token_unit`; default to
                ``settings.resolution``.
            **overrides: `EchoSettings` fields among ``num_inference_steps``, ``audio_guidance_scale``,
                ``user_guidance_scale``, ``num_frames_per_chunk``, ``motion_frames``, ``user_video_size``,
                ``max_sequence_length``, ``default_emotion``.

        Returns:
            `(settings, height, width)`; a `ValueError` naming the argument when one is not accepted.
        """
        overrides = self.few_step_overrides(accepted.check_call_settings(**overrides))  # few-step mode: its settings
        settings = self.settings.replace(**{name: value for name, value in overrides.items() if value is not None})
        height = settings.resolution if height is None else height
        width = settings.resolution if width is None else width
        height, width = accepted.check_size(height, width, self.token_unit)
        positions = self.transformer.config.rope_max_seq_len  # RoPE positions along each axis
        latent_frames = num_latent_frames(settings.num_frames_per_chunk, self.vae_scale_factor_temporal)
        if latent_frames > positions:
            raise ValueError(
                f"`num_frames_per_chunk` is {settings.num_frames_per_chunk}: {latent_frames} latent frames, more than "
                f"the transformer's {positions} positions (`rope_max_seq_len`). Use at most "
                f"{self.vae_scale_factor_temporal * (positions - 1) + 1} frames per chunk (the model was trained with "
                f"{self.settings.num_frames_per_chunk}); a longer conversation is rendered as more chunks."
            )
        for name, size, unit in (("height", height, self.token_unit[0]), ("width", width, self.token_unit[1])):
            if size // unit > positions:
                raise ValueError(
                    f"`{name}` is {size}: {size // unit} tokens, more than the transformer's {positions} positions "
                    f"(`rope_max_seq_len`); at most {positions * unit}."
                )
        return settings, height, width

    def check_inputs(self, height: int, width: int, **options) -> accepted.RenderOptions:
        r"""
        Checks and converts a render's options once (`pipelines.inputs.check_render_options`, with what this
        pipeline's LCU reads and the scheduler it has), before any work.

        Args:
            height (`int`), width (`int`): the output size (from `resolve_settings`).
            **options: the arguments of `start_session` other than the settings (and `__call__`'s
                ``user_landmarks``, for the warning about arguments this model does not use).

        Returns:
            [`~pipelines.inputs.RenderOptions`].
        """
        check_flow_scheduler(self.scheduler)  # FlowMatchEuler, or a multistep solver in flow mode (UniPC)
        encoder = self.context_encoder
        return accepted.check_render_options(
            context_inputs=None if encoder is None else frozenset(encoder.required_inputs),
            understanding_dim=None if encoder is None else encoder.config.understanding_dim,
            callback_tensor_names=self._callback_tensor_inputs,
            use_emotion=self.settings.use_emotion,
            height=height,
            width=width,
            **options,
        )

    def check_conversation(self, **media) -> accepted.MediaPiece:
        r"""
        The whole conversation of `__call__` (``avatar_audio``, ``user_video``, ``user_audio``, their features,
        ``user_landmarks``, ``dialogue``, ``sampling_rate``) checked for presence and pairing and converted once, as
        one [`~pipelines.inputs.MediaPiece`] the offline session is fed with.
        """
        if media.get("avatar_audio") is None and media.get("avatar_audio_features") is None:
            raise ValueError(
                "`avatar_audio` is required: a mono waveform (or its per-frame wav2vec2 rows as "
                "`avatar_audio_features`)."
            )
        user_audio = media.get("user_audio")
        if user_audio is None:
            user_audio = media.get("user_audio_features")
        if (media.get("user_video") is None) != (user_audio is None):
            raise ValueError(
                "Pass both `user_video` and `user_audio` (the user's side of the conversation), or neither."
            )
        if user_audio is not None and self.context_encoder is None:
            raise ValueError("`user_audio` was given but the pipeline has no `context_encoder` (LCU) to encode it.")
        reads_video = self.context_encoder is not None and "user_video" in self.context_encoder.required_inputs
        if media.get("user_video") is None or not reads_video:
            media["user_landmarks"] = None  # nothing reads them (`check_inputs` warned, naming them)
        piece = accepted.check_media_piece(self.audio_feature_shape, **media)
        if piece.avatar_audio is not None and piece.avatar_audio.size == 0:
            raise ValueError(
                "`avatar_audio` is empty (0 samples): it drives the lips and sets the conversation's length. Pass the "
                "avatar's waveform (silence where it listens: `np.zeros(num_frames * 640)` at 16 kHz)."
            )
        return piece

    @property
    def audio_feature_shape(self) -> tuple[int, int]:
        """``(NL, D)`` of a wav2vec2 row of `audio_encoder` (every hidden state, stacked)."""
        encoder = self.audio_encoder.config
        return encoder.num_hidden_layers + 1, encoder.hidden_size

    def prepare_latents(
        self,
        num_frames: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Gaussian noise `(1, 16, (num_frames − 1)/4 + 1, height/8, width/8)` for one chunk."""
        shape = (
            1,
            self.vae.config.z_dim,
            num_latent_frames(num_frames, self.vae_scale_factor_temporal),
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------

    _audio_guidance_scale = None
    _user_guidance_scale = None
    _num_timesteps = None
    _current_timestep = None
    _current_chunk = None
    _interrupt = False
    _attention_kwargs = None

    @property
    def audio_guidance_scale(self):
        return self._audio_guidance_scale

    @property
    def user_guidance_scale(self):
        return self._user_guidance_scale

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def current_chunk(self):
        return self._current_chunk

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    @staticmethod
    def guidance_weights(audio_guidance_scale: float, user_guidance_scale: float, has_user: bool) -> dict[str, float]:
        """Weights of the passes in ``uncond + s_a (audio − uncond) + s_u (full − audio)``; zero weights dropped."""
        s_a, s_u = float(audio_guidance_scale), float(user_guidance_scale)
        weights = {"uncond": 1.0 - s_a, "audio": s_a - s_u, "full": s_u}
        if not has_user:  # full ≡ audio without a user branch
            weights = {"uncond": weights["uncond"], "audio": weights["audio"] + weights["full"]}
        return {name: weight for name, weight in weights.items() if weight != 0.0}

    # ------------------------------------------------------------------------------------------------------------
    # One chunk: what a session asks for
    # ------------------------------------------------------------------------------------------------------------

    def prepare_render(self, settings: EchoSettings, options: accepted.RenderOptions) -> RenderContext:
        r"""
        What every chunk of a render shares, computed once: the reference framed as echo-prep frames the training
        crops (``options.frame_inputs``: `echo.framing`, landmarks mapped into the crop), resized to the output size,
        its CLIP tokens (I2V bases), its SDCM masks and the prompt encoder.

        Args:
            settings ([`~echo.settings.EchoSettings`]): from `resolve_settings`.
            options ([`~pipelines.inputs.RenderOptions`]): from `check_inputs`.

        Returns:
            [`~pipelines.chunk_inputs.RenderContext`].
        """
        device, dtype = self._execution_device, self.transformer.dtype
        reference_image, reference_landmarks = options.reference_image, options.reference_landmarks
        if options.frame_inputs:  # a raw photo → echo-prep's head crop at the training size (`echo.framing`)
            raw = accepted.to_uint8_image(reference_image, "reference_image")  # H, W, 3 uint8, as the detector reads
            if reference_landmarks is not None:  # pixels of the photo as given → pixels of its crop
                reference_landmarks = accepted.check_landmarks(
                    reference_landmarks,
                    "reference_landmarks",
                    (NUM_LANDMARKS, 2),
                    f"pixels of the {raw.shape[0]}x{raw.shape[1]} reference image",
                )
            reference_image, box = frame_image(raw, settings.resolution, "reference_image")  # S, S, 3 uint8
            if reference_landmarks is not None:
                reference_landmarks = source_to_crop(reference_landmarks, box, settings.resolution)
        latent_frames = num_latent_frames(settings.num_frames_per_chunk, self.vae_scale_factor_temporal)
        reference = self.prepare_reference(reference_image, options.height, options.width).to(device)  # 1, 3, H, W
        lip, face = self.prepare_avatar_masks(
            options.height,
            options.width,
            latent_frames,
            reference_landmarks,
            options.lip_mask,
            options.face_mask,
            reference_image,
        )  # 1, F, H', W' each
        return RenderContext(
            settings=settings,
            options=options,
            reference=reference,
            image_embeds=self.encode_image(reference),  # 1, N_img, image_dim (I2V bases), else None
            lip_mask=lip.to(device, dtype),
            face_mask=face.to(device, dtype),
            prompt_encoder=PromptEncoder(self.text_encoder, self.tokenizer, settings.max_sequence_length),
            device=device,
            dtype=dtype,
            num_latent_frames=latent_frames,
            avatar_radius=self.transformer.config.audio_window // 2,
            feature_shape=self.audio_feature_shape,
        )

    @torch.no_grad()
    def render_chunk(
        self,
        context: RenderContext,
        index: int,
        gather_inputs: Callable[[int], ChunkInputs],
        progress_bar=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Denoises and decodes one chunk: the one denoising loop of the pipeline, which `__call__` (through its
        session) and every `EchoSession` call, and the only code that sets the guidance and timestep state.

        Args:
            context ([`~pipelines.chunk_inputs.RenderContext`]): from `prepare_render`.
            index (`int`): the chunk's index in the schedule.
            gather_inputs (`Callable[[int], ChunkInputs]`): the session's gathering of the chunk's inputs from its
                buffers (emotion text, user context from the LCU, audio windows, motion frames), called once the
                chunk is current, so that everything computed for it (the LCU call included) sees
                ``current_chunk``.
            progress_bar (*optional*): a tqdm bar updated once per denoising step.

        Returns:
            `(video, latents)`: the chunk's decoded frames `(1, 3, N, H, W)` in [−1, 1] and its denoised latents
            `(1, z_dim, F, H / 8, W / 8)`.
        """
        settings, options = context.settings, context.options
        device, dtype = context.device, context.dtype

        # 1. Guidance and timestep state of this chunk (read by step callbacks through the properties)
        self._current_chunk = index
        self._audio_guidance_scale = settings.audio_guidance_scale
        self._user_guidance_scale = settings.user_guidance_scale
        self._attention_kwargs = options.attention_kwargs

        # 2. The chunk's inputs, gathered by the session from its buffers
        chunk = gather_inputs(index)

        # 3. Encode the emotion text (LAU → c_emo); each distinct text is encoded once per render
        prompt_embeds = context.prompt_encoder(chunk.emotion, device=device, dtype=dtype)  # 1, L, text_dim

        # 4. Condition (Eq. 1): the reference in every chunk, plus the previous chunk's last motion frames
        condition = chunk_condition(self.vae, context.reference, chunk.motion_video, context.num_latent_frames)
        condition = condition.to(device, dtype)  # 1, 4 + 2·16, F, h, w

        # 5. Prepare latents
        latents = self.prepare_latents(
            settings.num_frames_per_chunk, options.height, options.width, torch.float32, device, options.generator
        )  # 1, 16, F, h, w

        # 6. Prepare timesteps (few-step mode: the student's σ points) and the guidance passes (a pass of weight 0 is
        # skipped; few-step mode has guidance scales 1: the single ``full`` pass)
        self.set_sampling_timesteps(settings.num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        has_user = chunk.context_embeds is not None
        weights = self.guidance_weights(settings.audio_guidance_scale, settings.user_guidance_scale, has_user)
        pass_inputs = {
            "uncond": {"audio_embeds": None, "context_embeds": None, "context_mask": None},
            "audio": {"audio_embeds": chunk.audio_embeds, "context_embeds": None, "context_mask": None},
            "full": {
                "audio_embeds": chunk.audio_embeds,
                "context_embeds": chunk.context_embeds,
                "context_mask": chunk.context_mask,
            },
        }
        # Caches that use where the loop is (SeaCache) read it from the cache context; older diffusers take a name only
        context_parameters = inspect.signature(self.transformer.cache_context).parameters.values()
        cache_step_info = any(parameter.kind is parameter.VAR_KEYWORD for parameter in context_parameters)

        # 7. Denoising loop; each chunk is a new trajectory, so the state of an enabled cache starts afresh
        self.transformer._reset_stateful_cache()
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            self._current_timestep = t
            latent_model_input = latents.to(dtype)
            timestep = t.expand(latents.shape[0])
            step_context = {}
            if cache_step_info:  # as diffusers' Wan pipelines
                sigma = float(self.scheduler.sigmas[i])
                step_context = {"step_index": i, "sigma": sigma, "num_inference_steps": len(timesteps)}
            noise_pred = 0.0
            for name, weight in weights.items():
                extra = pass_inputs[name]
                with self.transformer.cache_context(name, **step_context):  # one cache state per guidance pass
                    prediction = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        encoder_hidden_states_image=context.image_embeds,
                        condition=condition,
                        lip_mask=context.lip_mask,
                        face_mask=context.face_mask,
                        attention_kwargs=options.attention_kwargs,
                        return_dict=False,
                        **extra,
                    )[0]
                noise_pred = noise_pred + weight * prediction.float()

            # compute the previous noisy sample x_t -> x_t-1
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

            if options.callback_on_step_end is not None:
                step_tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "condition": condition}
                callback_kwargs = {k: step_tensors[k] for k in options.callback_on_step_end_tensor_inputs}
                callback_outputs = options.callback_on_step_end(self, i, t, callback_kwargs)
                if not isinstance(callback_outputs, dict):
                    raise ValueError(
                        f"`callback_on_step_end` returned {accepted.describe(callback_outputs)} at step {i} of chunk "
                        f"{chunk.index}; expected a dict of the tensors it changes (`return callback_kwargs` to "
                        "change none), as diffusers' step callbacks return."
                    )
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
            if progress_bar is not None:
                progress_bar.update()
        self._current_timestep = None

        # 8. Decode
        video = self.decode_latents(latents)  # 1, 3, N, H, W in [-1, 1]
        return video, latents

    def postprocess(self, video: torch.Tensor, latents: torch.Tensor, output_type: str | None):
        r"""Frames `(B, 3, n, H, W)` in [−1, 1] (or the latents, for ``"latent"``) in the form ``output_type`` names:
        `(B, n, H, W, 3)` float in [0, 1] (``"np"``), `(B, n, 3, H, W)` in [0, 1] (``"pt"``), PIL images
        (``"pil"``), ``latents`` (``"latent"``), or `None` (``None``)."""
        if output_type is None:
            return None
        if output_type == "latent":
            return latents
        if output_type == "pt":
            return ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).cpu()  # B, n, 3, H, W
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

    def encode_audio_rows(self, waveform: np.ndarray, first: int, end: int, waveform_offset: int) -> torch.Tensor:
        r"""Rows ``[first, end)`` of a 16 kHz track of which ``waveform`` holds the samples from ``waveform_offset``
        (`echo.audio.audio_frame_features`, the one definition of the rows): `(end − first, NL, D)` float32."""
        return audio_frame_features(
            self.audio_encoder, self.feature_extractor, waveform, first, end, waveform_offset=waveform_offset
        )

    def encode_user_frames(
        self, frames: np.ndarray, landmarks: np.ndarray | None, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The LCU's video tokens and face masks of user frames `(n, H, W, 3)` uint8 (`echo.encoding`, as training):
        `(n, C_v, h, w)` and `(n, h, w)` on the CPU; ``landmarks`` `(n, 478, 2)` detected when `None`."""
        if landmarks is None:
            landmarks = detect_face_landmarks(frames)
        video, face_mask = prepare_user_video(frames, landmarks, size)
        tokens, token_mask = encode_user_video(self.vae, video[None], face_mask[None])
        return tokens[0].cpu(), token_mask[0].cpu()

    # ------------------------------------------------------------------------------------------------------------
    # Interactive session
    # ------------------------------------------------------------------------------------------------------------

    def start_session(
        self,
        reference_image: PIL.Image.Image | np.ndarray | torch.Tensor,
        generator: torch.Generator | None = None,
        num_frames: int | None = None,
        with_user: bool | None = None,
        emotion: str | list[str] | None = None,
        emotion_reasoner: Any | None = None,
        understanding: torch.Tensor | list[torch.Tensor] | None = None,
        understanding_model: Callable | None = None,
        reference_landmarks: np.ndarray | None = None,
        lip_mask: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        audio_guidance_scale: float | None = None,
        user_guidance_scale: float | None = None,
        num_frames_per_chunk: int | None = None,
        motion_frames: int | None = None,
        default_emotion: str | None = None,
        user_video_size: int | None = None,
        max_sequence_length: int | None = None,
        output_type: str | None = "np",
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        sampling_rate: int | None = None,
        frame_inputs: bool = True,
    ) -> EchoSession:
        r"""
        Starts an interactive render: an [`~pipelines.session.EchoSession`] on this pipeline's weights, fed with
        ``session.push(user_audio=..., user_video=..., avatar_audio=...)`` in pieces of any length and yielding each
        chunk's frames (``session.pull()``, or iterating it) as soon as the chunk's inputs are complete;
        ``session.close()`` ends the input. Fed the same conversation, it yields exactly the frames of `__call__` with
        the same generator.

        Args:
            reference_image, generator, emotion, emotion_reasoner, understanding, understanding_model,
            reference_landmarks, lip_mask, face_mask, height, width, num_inference_steps, audio_guidance_scale,
            user_guidance_scale, num_frames_per_chunk, motion_frames, default_emotion, user_video_size,
            max_sequence_length, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs:
                As in `__call__` (``emotion`` / ``understanding`` lists: one entry per chunk, checked once the length
                is known). Settings left at `None` are the model's.
            num_frames (`int`, *optional*): the conversation's length in frames when known in advance; otherwise it
                is the avatar audio's duration at `close`.
            with_user (`bool`, *optional*): whether the user's streams drive the avatar (the LCU branch); defaults to
                whether the pipeline has a ``context_encoder``.
            output_type (`str` or `None`, defaults to `"np"`): of ``SessionChunk.frames``: `"np"`, `"pt"`, `"pil"`,
                `"latent"` (the chunk's denoised latents, not decoded: see `__call__`), or `None` (only
                ``SessionChunk.video`` and ``SessionChunk.latents``).
            sampling_rate (`int`, *optional*): the rate of the waveforms pushed without their own
                ``sampling_rate``; other rates than 16 kHz are resampled as they arrive (`pipelines.inputs`). When
                stated nowhere, 16 kHz is assumed with a warning (as `__call__`).
            frame_inputs (`bool`, defaults to `True`):
                Frame ``reference_image`` and each pushed ``user_video`` frame as echo-prep frames the training crops
                (`echo.framing`: the face detected and tracked, its box smoothed causally, a square of 1.8× the face
                box cropped at the model's ``settings.resolution``), so a raw photo or webcam video reaches the model
                framed as in training. A reference without a face is a `ValueError`. Landmarks given with the inputs
                are in their pixels as given and are mapped into the crops. Pass `False` when the inputs already are
                echo-prep head crops (a prepared clip's frames, the demo's example): they are used as given. Needs
                MediaPipe (``pip install -e .[prep]``) when `True`.

        Returns:
            [`~pipelines.session.EchoSession`].
        """
        settings, height, width = self.resolve_settings(
            height=height,
            width=width,
            num_frames_per_chunk=num_frames_per_chunk,
            motion_frames=motion_frames,
            user_video_size=user_video_size,
            max_sequence_length=max_sequence_length,
            default_emotion=default_emotion,
            num_inference_steps=num_inference_steps,
            audio_guidance_scale=audio_guidance_scale,
            user_guidance_scale=user_guidance_scale,
        )
        options = self.check_inputs(
            height,
            width,
            reference_image=reference_image,
            num_frames=num_frames,
            with_user=with_user,
            generator=generator,
            emotion=emotion,
            emotion_reasoner=emotion_reasoner,
            understanding=understanding,
            understanding_model=understanding_model,
            reference_landmarks=reference_landmarks,
            lip_mask=lip_mask,
            face_mask=face_mask,
            output_type=output_type,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            sampling_rate=sampling_rate,
            frame_inputs=frame_inputs,
        )
        self._interrupt = False
        return EchoSession(self, settings, options)

    # ------------------------------------------------------------------------------------------------------------
    # Call
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        reference_image: PIL.Image.Image | np.ndarray | torch.Tensor = None,
        avatar_audio: np.ndarray | torch.Tensor = None,
        user_video: np.ndarray | torch.Tensor | list[PIL.Image.Image] | None = None,
        user_audio: np.ndarray | torch.Tensor | None = None,
        dialogue: list[dict] | None = None,
        emotion: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        audio_guidance_scale: float | None = None,
        user_guidance_scale: float | None = None,
        num_frames_per_chunk: int | None = None,
        motion_frames: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        understanding: torch.Tensor | list[torch.Tensor] | None = None,
        understanding_model: Callable | None = None,
        emotion_reasoner: Any | None = None,
        reference_landmarks: np.ndarray | None = None,
        user_landmarks: np.ndarray | None = None,
        lip_mask: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        default_emotion: str | None = None,
        user_video_size: int | None = None,
        max_sequence_length: int | None = None,
        avatar_audio_features: np.ndarray | torch.Tensor | None = None,
        user_audio_features: np.ndarray | torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers convention)
        sampling_rate: int | None = None,
        frame_inputs: bool = True,
    ):
        r"""
        The call function to the pipeline for generation.

        Every argument documented as "defaults to the model's setting" is read from `settings` when left at `None`.

        Args:
            reference_image (`PIL.Image.Image`, `np.ndarray` `(H, W, 3)` or `torch.Tensor` `(3, H, W)`):
                The avatar's identity (Eq. 1, ``I_ref``): a PIL image, a uint8 array, a float array in [0, 1], or a
                float tensor in [−1, 1] (`pipelines.inputs` lists the accepted forms; others are refused, not
                clipped).
            avatar_audio (`np.ndarray` or `torch.Tensor` of shape `(num_samples,)`):
                The avatar's own speech, mono, float in [−1, 1] or int16 / int32 PCM, at ``sampling_rate``
                (``A_avt``). Silence where the avatar listens.
            user_video (`np.ndarray` `(T_u, H_u, W_u, 3)`, `torch.Tensor` `(T_u, 3, H_u, W_u)` or a list of images,
                *optional*):
                The user's video at 25 fps, frame 0 aligned with the avatar's frame 0 (``V_usr``); every frame in a
                form ``reference_image`` accepts.
            user_audio (`np.ndarray` or `torch.Tensor` of shape `(num_samples,)`, *optional*):
                The user's speech, as ``avatar_audio`` (``A_usr``). Without user inputs the user branch is off.
            dialogue (`list[dict]`, *optional*):
                Transcript segments ``{"speaker": "avatar"|"user", "start", "end", "text"}`` (seconds) for the emotion
                reasoner (``P_hist``).
            emotion (`str` or `list[str]`, *optional*):
                The avatar's emotional state in words, for all chunks or one per chunk. When `None`, it is reasoned
                by ``emotion_reasoner`` from ``dialogue`` up to each chunk's reasoning frame (the latest
                ``k·settings.emotion_stride − 1`` at or before its last frame, `echo.clip_format.reasoning_frame`, as
                in training), else (none yet, or nothing said by then) ``default_emotion``.
                A model trained without LAU (``settings.use_emotion=False``) gets the empty prompt.
            num_frames (`int`, *optional*):
                Frames to generate at 25 fps; defaults to the avatar audio's duration.
            height (`int`, *optional*), width (`int`, *optional*):
                Output size, positive multiples of `token_unit` (16 for Wan's VAE and patches); default to the
                model's setting (``settings.resolution``).
            num_inference_steps (`int`, *optional*):
                Denoising steps per chunk, at least 1; defaults to the model's setting.
            audio_guidance_scale (`float`, *optional*), user_guidance_scale (`float`, *optional*):
                ``s_a`` and ``s_u`` of ``uncond + s_a (audio − uncond) + s_u (full − audio)``, finite and >= 0; default
                to the model's settings.
            num_frames_per_chunk (`int`, *optional*):
                ``4k + 1`` frames generated per chunk; defaults to the model's setting (its training window).
            motion_frames (`int`, *optional*):
                ``T_prev = 4(m − 1) + 1`` last frames of a chunk that condition the next one; defaults to the model's
                setting.
            generator (`torch.Generator`, *optional*):
                Makes generation deterministic; one generator draws the noise of all chunks in order.
            output_type (`str`, defaults to `"np"`):
                `"np"`, `"pt"`, `"pil"`, or `"latent"`: as diffusers' Wan pipelines, the denoised latents before VAE
                decoding, in the normalised latent space the transformer works in (`decode_latents` turns them into
                frames). Chunks are stitched in pixel space (a continuation chunk regenerates, then drops, its first
                ``motion_frames`` frames), and a chunk's latents only decode as a whole (the VAE is causal in time), so
                the latents are per chunk: a tensor `(num_chunks, z_dim, F, H / 8, W / 8)` whose entry ``c`` holds
                all ``F = (num_frames_per_chunk − 1) / 4 + 1`` latent frames of chunk ``c`` (for a continuation
                chunk its first ``(motion_frames − 1) / 4 + 1`` latent frames are the regenerated overlap). The
                frames of the other output types are ``decode_latents(latents[0:1])``, then for each later chunk
                ``decode_latents(latents[c:c + 1])[:, :, motion_frames:]``, concatenated and cut to ``num_frames``.
                The chunks are decoded all the same, since each conditions the next on its decoded last frames.
            return_dict (`bool`, defaults to `True`):
                Return an [`EchoPipelineOutput`] instead of a plain tuple.
            understanding (`torch.Tensor` `(N_s, D_s)` or a list of them, one per chunk, *optional*):
                Precomputed HBCU tokens ``S_usr`` (Eq. 8) when the LCU uses understanding.
            understanding_model (`Callable`, *optional*):
                Computes ``S_usr`` as ``understanding_model(frames, audio)`` from the user's frames `(T, H, W, 3)`
                uint8 and 16 kHz audio up to each chunk's reasoning frame (the latest
                ``k·settings.understanding_stride − 1`` at or before its last frame, as in training; no tokens
                before the first), e.g. `echo.OmniUnderstanding`.
            emotion_reasoner (*optional*):
                An object with ``describe(history, clip_end, avatar_speaker)`` (e.g. `echo.EmotionReasoner`).
            reference_landmarks (`np.ndarray` `(478, 2)`, *optional*):
                Face-mesh landmarks of the reference in pixels of ``reference_image`` (as given, before framing and
                resizing); detected with MediaPipe (on the framed reference) when omitted.
            user_landmarks (`np.ndarray` `(T_u, 478, 2)`, *optional*):
                Face-mesh landmarks of the user's frames (pixels of the frames as given) for the LCU's face-masked token
                selection (Eq. 7); detected with MediaPipe when omitted and the LCU uses the visual branch.
            lip_mask (`torch.Tensor`, *optional*), face_mask (`torch.Tensor`, *optional*):
                Token-grid masks `(H', W')` or `(F, H', W')` replacing the landmark masks.
            default_emotion (`str`, *optional*):
                Emotion text when none is given or reasoned; defaults to the model's setting.
            user_video_size (`int`, *optional*):
                Square size the user's frames are resized to before the LCU's VAE tokens; defaults to the model's
                setting (the size it was trained with).
            max_sequence_length (`int`, *optional*):
                Token length of the emotion embeddings; defaults to the model's setting.
            avatar_audio_features (`np.ndarray` or `torch.Tensor` of shape `(T, NL, D)`, *optional*):
                The avatar audio's per-frame wav2vec2 rows, as `encode_audio` computes them (e.g. a prepared clip's
                ``avatar_w2v.npy``), used instead of encoding ``avatar_audio``; at least as many rows as the chunks
                cover (the last chunk may run past ``num_frames``).
            user_audio_features (`np.ndarray` or `torch.Tensor` of shape `(T, NL, D)`, *optional*):
                The same for ``user_audio`` (e.g. ``user_w2v.npy``).
            attention_kwargs (`dict`, *optional*):
                Passed to the transformer's attention processors.
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each denoising step of each chunk as ``callback_on_step_end(self, step, timestep,
                callback_kwargs)``; ``self.current_chunk`` tells the chunk.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in ``callback_kwargs``, among ``self._callback_tensor_inputs``.
            sampling_rate (`int`, *optional*):
                The rate of ``avatar_audio`` and ``user_audio`` in Hz; other rates than the model's 16 kHz are
                resampled (FFmpeg's resampler, as audio files are read). When not stated, waveforms are taken at 16 kHz
                and a warning says so, as transformers' feature extractors do: a 44.1 kHz array read as 16 kHz renders
                2.76 times too many frames.
            frame_inputs (`bool`, defaults to `True`):
                Frame ``reference_image`` and each ``user_video`` frame as echo-prep frames the training crops
                (`echo.framing`: the face detected and tracked, its box smoothed causally, a square of 1.8× the face
                box cropped at the model's ``settings.resolution``), so a raw photo or webcam video reaches the model
                framed as in training. A reference without a face is a `ValueError`. Landmarks given with the inputs
                are in their pixels as given and are mapped into the crops. Pass `False` when the inputs already are
                echo-prep head crops (a prepared clip's frames, the demo's example): they are used as given. Needs
                MediaPipe (``pip install -e .[prep]``) when `True`.

        Examples:

        Returns:
            [`EchoPipelineOutput`] or `tuple`: the generated frames (``num_frames`` of them, see `EchoPipelineOutput`),
            or the chunks' latents (``output_type="latent"``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if output_type not in accepted.OUTPUT_TYPES:
            raise ValueError(f"`output_type` is {output_type!r}, expected 'np', 'pt', 'pil' or 'latent'.")

        # 1. Check inputs, once: the settings (the model's, overridden by the arguments given), the options and the
        # conversation, converted to the forms the pipeline computes with (`pipelines.inputs`) before any work
        settings, height, width = self.resolve_settings(
            height=height,
            width=width,
            num_frames_per_chunk=num_frames_per_chunk,
            motion_frames=motion_frames,
            user_video_size=user_video_size,
            max_sequence_length=max_sequence_length,
            default_emotion=default_emotion,
            num_inference_steps=num_inference_steps,
            audio_guidance_scale=audio_guidance_scale,
            user_guidance_scale=user_guidance_scale,
        )
        options = self.check_inputs(
            height,
            width,
            reference_image=reference_image,
            num_frames=num_frames,
            with_user=user_video is not None,
            generator=generator,
            emotion=emotion,
            emotion_reasoner=emotion_reasoner,
            understanding=understanding,
            understanding_model=understanding_model,
            reference_landmarks=reference_landmarks,
            lip_mask=lip_mask,
            face_mask=face_mask,
            output_type=None,  # the frames are post-processed once, below
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            sampling_rate=sampling_rate,
            frame_inputs=frame_inputs,
            user_landmarks=user_landmarks,  # only for the warning naming the arguments this model does not use
        )
        if options.num_frames is not None:  # all frames are returned at once: refuse what cannot fit, now
            accepted.check_output_memory(options.num_frames, height, width)
        conversation = self.check_conversation(
            avatar_audio=avatar_audio,
            user_audio=user_audio,
            user_video=user_video,
            user_landmarks=user_landmarks,
            avatar_audio_features=avatar_audio_features,
            user_audio_features=user_audio_features,
            dialogue=dialogue,
        )
        self._interrupt = False

        # 2. A session fed the whole conversation at once: the streaming path, so the two cannot drift
        session = EchoSession(self, settings, options)
        session.push_piece(conversation)
        session.close()
        num_frames = session.num_frames
        accepted.check_output_memory(num_frames, height, width)

        # 3. Denoise chunk by chunk (`render_chunk`, asked by the session for each chunk)
        with self.progress_bar(total=session.num_chunks * settings.num_inference_steps) as progress_bar:
            session.progress_bar = progress_bar
            chunks = list(session)

        # 4. Post-process: exactly num_frames frames, or each chunk's latents
        video = torch.cat([chunk.video for chunk in chunks], dim=2)[:, :, :num_frames]  # 1, 3, num_frames, H, W
        frames = self.postprocess(video, torch.cat([chunk.latents for chunk in chunks]), output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (frames,)
        return EchoPipelineOutput(frames=frames)

    # ------------------------------------------------------------------------------------------------------------
    # LoRA loading
    # ------------------------------------------------------------------------------------------------------------

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""
        Loads a Wan LoRA into the transformer: [`~loaders.WanLoraLoaderMixin.load_lora_weights`], the Echo generator's
        Wan layers keeping Wan's names (its ECHO modules are only adapted by LoRAs that name them).

        A state dict is read from a copy of its tensors: diffusers' conversion of the original Wan key format
        (``diffusion_model.blocks.N.cross_attn.q.lora_down.weight``, ``alpha``) scales some of them in place, which
        would otherwise change the caller's dict (a second load would apply ``alpha / rank`` twice).

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`):
                A folder or hub id holding ``pytorch_lora_weights.safetensors`` (or ``weight_name``), or a state dict,
                in diffusers' or the original Wan key format.
            adapter_name (`str`, *optional*): the adapter's name (for `set_adapters`, `delete_adapters`).
            hotswap (`bool`, defaults to `False`), kwargs: as in `WanLoraLoaderMixin.load_lora_weights`.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = {
                key: value.clone() if torch.is_tensor(value) else value
                for key, value in pretrained_model_name_or_path_or_dict.items()
            }
        super().load_lora_weights(
            pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap, **kwargs
        )


def _register_with_diffusers() -> None:
    """Make ``getattr(diffusers, "EchoPipeline")`` resolve, which `DiffusionPipeline.from_pretrained` uses to map a
    ``model_index.json`` ``_class_name`` to a pipeline class (no remote code is involved)."""
    import diffusers

    if getattr(diffusers, "__dict__", {}).get("EchoPipeline") is None:
        diffusers.EchoPipeline = EchoPipeline


_register_with_diffusers()
