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

Classifier-free guidance runs up to three passes per step: ``uncond`` (no avatar audio, no user context), ``audio``
(avatar audio, no user context) and ``full`` (both), combined as
``uncond + s_a · (audio − uncond) + s_u · (full − audio)`` with ``s_a = audio_guidance_scale`` and
``s_u = user_guidance_scale``. A pass whose weight in that sum is zero (``1 − s_a``, ``s_a − s_u``, ``s_u``) is skipped,
so ``s_a = s_u = 1`` costs one pass.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedTokenizerBase, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from echo.audio import FPS, SAMPLE_RATE, wav2vec2_frame_features, window_features
from echo.encoding import (
    PromptEncoder,
    chunk_condition,
    decode_latents,
    detect_face_landmarks,
    encode_user_video,
    frames_to_tensor,
    prepare_user_video,
)
from echo.lcu import LongRangeContextEncoder
from echo.masks import NUM_LANDMARKS, reference_token_masks
from echo.settings import EchoSettings
from echo.transformer_echo import EchoTransformer3DModel

from .pipeline_output import EchoPipelineOutput
from .video_io import to_uint8_frames

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


def chunk_schedule(num_frames: int, num_frames_per_chunk: int, motion_frames: int) -> list[tuple[int, int]]:
    r"""Frame ranges ``[start, stop)`` of the chunks that cover ``num_frames`` frames.

    The first chunk is ``[0, N)``; chunk ``c + 1`` starts ``motion_frames`` frames before the end of chunk ``c``. The
    last chunk may run past ``num_frames`` (the extra frames are generated from silence and cut).

    Args:
        num_frames (`int`): frames to produce.
        num_frames_per_chunk (`int`): ``N = 4k + 1`` frames per chunk.
        motion_frames (`int`): ``4(m − 1) + 1`` frames shared by consecutive chunks, ``0 < motion_frames < N``.

    Returns:
        `list[tuple[int, int]]`: one ``(start, stop)`` pair per chunk.
    """
    if num_frames < 1:
        raise ValueError(f"`num_frames` is {num_frames}, expected at least 1.")
    if num_frames_per_chunk < 1 or (num_frames_per_chunk - 1) % 4:
        raise ValueError(f"`num_frames_per_chunk` is {num_frames_per_chunk}, expected 4k + 1 (k >= 0).")
    if not 0 < motion_frames < num_frames_per_chunk or (motion_frames - 1) % 4:
        raise ValueError(
            f"`motion_frames` is {motion_frames}, expected 4(m − 1) + 1 with 0 < motion_frames < "
            f"num_frames_per_chunk = {num_frames_per_chunk}."
        )
    chunks = [(0, num_frames_per_chunk)]
    while chunks[-1][1] < num_frames:
        start = chunks[-1][1] - motion_frames
        chunks.append((start, start + num_frames_per_chunk))
    return chunks


def _reference_uint8(image) -> np.ndarray:
    """The reference image as `(H, W, 3)` uint8: from PIL, a uint8 or float-in-[0, 1] array, or a `(3, H, W)` tensor in
    [−1, 1] (as `echo.data` gives frames)."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"`reference_image` tensor has shape {tuple(image.shape)}, expected (3, H, W) in [-1, 1].")
        return (
            ((image.detach().float().cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        )
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"`reference_image` has shape {image.shape}, expected (H, W, 3) RGB.")
        return to_uint8_frames(image[None], "reference_image")[0]
    raise ValueError(f"`reference_image` is a {type(image).__name__}, expected a PIL image, an array or a tensor.")


def _to_waveform(audio, name: str) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(f"`{name}` has shape {audio.shape}, expected a mono waveform (num_samples,) at 16 kHz.")
    return audio


class EchoPipeline(DiffusionPipeline):
    r"""
    Pipeline for interactive head generation (ECHO): an avatar that talks with its own audio and listens to a user.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Args:
        vae ([`AutoencoderKLWan`]):
            Variational Auto-Encoder model to encode and decode videos to and from latent representations.
        transformer ([`~echo.EchoTransformer3DModel`]):
            The Wan2.1 DiT with SDCM that denoises the avatar latents.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]):
            A flow-matching scheduler used with `transformer` to denoise the latents.
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
        settings (`dict` or [`~echo.settings.EchoSettings`], *optional*):
            The settings the model was trained with (`EchoSettings` fields; missing keys take `EchoSettings`'s
            defaults). Stored in the pipeline's config (``model_index.json``), so `save_pretrained` /
            `from_pretrained` keep them; `__call__` arguments left at `None` read them through `settings`.
    """

    model_cpu_offload_seq = "text_encoder->audio_encoder->context_encoder->transformer->vae"
    _optional_components = ["context_encoder"]
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
        )
        if not isinstance(settings, EchoSettings):
            settings = EchoSettings.from_dict(settings, source="`settings`")
        self.register_to_config(settings=settings.to_dict())

        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @property
    def settings(self) -> EchoSettings:
        """The settings the model was trained with (from the config): the defaults of `__call__`."""
        return EchoSettings.from_dict(self.config.settings, source="the pipeline config's `settings`")

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

    def encode_audio(self, waveform: np.ndarray, num_frames: int, chunk_seconds: float = 30.0) -> torch.Tensor:
        r"""
        Per-video-frame wav2vec2 features of a 16 kHz mono waveform, computed by the function data preparation uses
        (`echo.audio.wav2vec2_frame_features`): every hidden state stacked, the ~50 Hz rows linearly resampled
        to one row per 25 fps frame; the waveform is zero-padded (silence) or cut to ``num_frames / 25`` seconds, and
        audio longer than ``chunk_seconds`` is encoded in chunks with one second of context on each side.

        Returns:
            `torch.Tensor` of shape `(num_frames, num_hidden_layers + 1, hidden_size)`, float32 on the CPU.
        """
        return wav2vec2_frame_features(
            self.audio_encoder, self.feature_extractor, _to_waveform(waveform, "audio"), num_frames,
            chunk_seconds=chunk_seconds,
        )  # fmt: skip

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        r"""Normalised latents `(B, 16, F, h, w)` → frames `(B, 3, 4(F − 1) + 1, 8h, 8w)` in [−1, 1]
        (`echo.encoding.decode_latents`)."""
        return decode_latents(self.vae, latents)

    def prepare_reference(self, image, height: int, width: int) -> torch.Tensor:
        """Reference image (PIL, `(H, W, 3)` uint8 / float-in-[0, 1] array, or `(3, H, W)` tensor in [−1, 1]) →
        `(1, 3, height, width)` in [−1, 1], resized as training resizes its frames (`echo.encoding.frames_to_tensor`)."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"`reference_image` tensor has shape {tuple(image.shape)}, expected (3, H, W) in [-1, 1]."
                )
            image = image[None].float()
            if tuple(image.shape[-2:]) != (height, width):
                image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            return image.clamp(-1, 1)
        return frames_to_tensor(_reference_uint8(image)[None], (height, width))  # 1, 3, H, W

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
        image = _reference_uint8(reference_image)  # H_ref, W_ref, 3
        if reference_landmarks is None:
            reference_landmarks = detect_face_landmarks(image)
        reference_landmarks = np.asarray(reference_landmarks, dtype=np.float32)
        if reference_landmarks.shape != (NUM_LANDMARKS, 2):
            raise ValueError(
                f"`reference_landmarks` has shape {reference_landmarks.shape}, expected ({NUM_LANDMARKS}, 2) pixels "
                f"of the {image.shape[0]}x{image.shape[1]} reference image."
            )
        lip, face = reference_token_masks(
            reference_landmarks, height, width, num_latent_frames, source_size=image.shape[:2], patch_size=patch_px
        )  # F, H', W' each
        return lip[None], face[None]

    # ------------------------------------------------------------------------------------------------------------
    # Checks and latents
    # ------------------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        reference_image,
        avatar_audio,
        user_video,
        user_audio,
        height,
        width,
        num_frames,
        num_frames_per_chunk,
        motion_frames,
        emotion,
        output_type="np",
        callback_on_step_end_tensor_inputs=None,
        avatar_audio_features=None,
        user_audio_features=None,
    ):
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"`output_type` is {output_type!r}, expected 'np', 'pt' or 'pil'.")
        if reference_image is None:
            raise ValueError("`reference_image` is required: it fixes the avatar's identity.")
        if avatar_audio is None and avatar_audio_features is None:
            raise ValueError(
                "`avatar_audio` is required: a mono waveform at 16 kHz (or its per-frame wav2vec2 rows as "
                "`avatar_audio_features`)."
            )
        unit = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % unit != 0 or width % unit != 0:
            raise ValueError(f"`height` and `width` have to be divisible by {unit} but are {height} and {width}.")
        if user_audio is None:
            user_audio = user_audio_features
        if (user_video is None) != (user_audio is None):
            raise ValueError(
                "Pass both `user_video` and `user_audio` (the user's side of the conversation), or neither."
            )
        if user_audio is not None and self.context_encoder is None:
            raise ValueError("`user_audio` was given but the pipeline has no `context_encoder` (LCU) to encode it.")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"`num_frames` is {num_frames}, expected at least 1.")
        chunk_schedule(1, num_frames_per_chunk, motion_frames)  # validates both
        if emotion is not None and not isinstance(emotion, (str, list)):
            raise ValueError(f"`emotion` has to be a `str` or a `list[str]` (one per chunk) but is {type(emotion)}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )

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
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------

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

    def _guidance_weights(self, has_user: bool) -> dict[str, float]:
        """Weights of the passes in ``uncond + s_a (audio − uncond) + s_u (full − audio)``; zero weights dropped."""
        s_a, s_u = float(self._audio_guidance_scale), float(self._user_guidance_scale)
        weights = {"uncond": 1.0 - s_a, "audio": s_a - s_u, "full": s_u}
        if not has_user:  # full ≡ audio without a user branch
            weights = {"uncond": weights["uncond"], "audio": weights["audio"] + weights["full"]}
        return {name: weight for name, weight in weights.items() if weight != 0.0}

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
    ):
        r"""
        The call function to the pipeline for generation.

        Every argument documented as "defaults to the model's setting" is read from `settings` when left at `None`.

        Args:
            reference_image (`PIL.Image.Image`, `np.ndarray` `(H, W, 3)` or `torch.Tensor` `(3, H, W)` in [−1, 1]):
                The avatar's identity (Eq. 1, ``I_ref``).
            avatar_audio (`np.ndarray` or `torch.Tensor` of shape `(num_samples,)`):
                The avatar's own speech, mono 16 kHz (``A_avt``). Silence where the avatar listens.
            user_video (`np.ndarray` `(T_u, H_u, W_u, 3)`, `torch.Tensor` or `list[PIL.Image.Image]`, *optional*):
                The user's video at 25 fps, frame 0 aligned with the avatar's frame 0 (``V_usr``).
            user_audio (`np.ndarray` or `torch.Tensor` of shape `(num_samples,)`, *optional*):
                The user's speech, mono 16 kHz (``A_usr``). Without user inputs the user branch is off.
            dialogue (`list[dict]`, *optional*):
                Transcript segments ``{"speaker": "avatar"|"user", "start", "end", "text"}`` (seconds) for the emotion
                reasoner (``P_hist``).
            emotion (`str` or `list[str]`, *optional*):
                The avatar's emotional state in words, for all chunks or one per chunk. When `None`, it is reasoned
                per chunk by ``emotion_reasoner`` from ``dialogue`` up to the chunk's end, else ``default_emotion``.
                A model trained without LAU (``settings.use_emotion=False``) gets the empty prompt.
            num_frames (`int`, *optional*):
                Frames to generate at 25 fps; defaults to the avatar audio's duration.
            height (`int`, *optional*), width (`int`, *optional*):
                Output size, multiples of 16; default to the model's setting (``settings.resolution``).
            num_inference_steps (`int`, *optional*):
                Denoising steps per chunk; defaults to the model's setting.
            audio_guidance_scale (`float`, *optional*), user_guidance_scale (`float`, *optional*):
                ``s_a`` and ``s_u`` of ``uncond + s_a (audio − uncond) + s_u (full − audio)``; default to the model's
                settings.
            num_frames_per_chunk (`int`, *optional*):
                ``4k + 1`` frames generated per chunk; defaults to the model's setting (its training window).
            motion_frames (`int`, *optional*):
                ``T_prev = 4(m − 1) + 1`` last frames of a chunk that condition the next one; defaults to the model's
                setting.
            generator (`torch.Generator`, *optional*):
                Makes generation deterministic; one generator draws the noise of all chunks in order.
            output_type (`str`, defaults to `"np"`):
                `"np"`, `"pt"` or `"pil"`.
            return_dict (`bool`, defaults to `True`):
                Return an [`EchoPipelineOutput`] instead of a plain tuple.
            understanding (`torch.Tensor` `(N_s, D_s)` or a list of them, one per chunk, *optional*):
                Precomputed HBCU tokens ``S_usr`` (Eq. 8) when the LCU uses understanding.
            understanding_model (`Callable`, *optional*):
                Computes ``S_usr`` per chunk as ``understanding_model(frames, audio)`` from the user's frames
                `(T, H, W, 3)` uint8 and 16 kHz audio up to the chunk's end (e.g. `echo.OmniUnderstanding`).
            emotion_reasoner (*optional*):
                An object with ``describe(history, clip_end, avatar_speaker)`` (e.g. `echo.EmotionReasoner`).
            reference_landmarks (`np.ndarray` `(478, 2)`, *optional*):
                Face-mesh landmarks of the reference in pixels of ``reference_image`` (as given, before resizing);
                detected with MediaPipe when omitted.
            user_landmarks (`np.ndarray` `(T_u, 478, 2)`, *optional*):
                Face-mesh landmarks of the user's frames (pixels of the given frames) for the LCU's face-masked token
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

        Examples:

        Returns:
            [`EchoPipelineOutput`] or `tuple`: the generated frames (``num_frames`` of them, see `EchoPipelineOutput`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Defaults: the settings the model was trained with; an explicit argument overrides them for this call
        settings = self.settings.replace(
            **{
                name: value
                for name, value in {
                    "num_frames_per_chunk": num_frames_per_chunk,
                    "motion_frames": motion_frames,
                    "user_video_size": user_video_size,
                    "max_sequence_length": max_sequence_length,
                    "default_emotion": default_emotion,
                    "num_inference_steps": num_inference_steps,
                    "audio_guidance_scale": audio_guidance_scale,
                    "user_guidance_scale": user_guidance_scale,
                }.items()
                if value is not None
            }
        )
        height = settings.resolution if height is None else height
        width = settings.resolution if width is None else width

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            reference_image,
            avatar_audio,
            user_video,
            user_audio,
            height,
            width,
            num_frames,
            settings.num_frames_per_chunk,
            settings.motion_frames,
            emotion,
            output_type,
            callback_on_step_end_tensor_inputs,
            avatar_audio_features=avatar_audio_features,
            user_audio_features=user_audio_features,
        )
        self._audio_guidance_scale = settings.audio_guidance_scale
        self._user_guidance_scale = settings.user_guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._current_chunk = None
        self._interrupt = False

        device = self._execution_device
        dtype = self.transformer.dtype
        num_frames_per_chunk, motion_frames = settings.num_frames_per_chunk, settings.motion_frames
        if avatar_audio is not None:
            avatar_audio = _to_waveform(avatar_audio, "avatar_audio")
        if num_frames is None:
            if avatar_audio is not None:
                num_frames = max(1, int(round(len(avatar_audio) * FPS / SAMPLE_RATE)))
            else:
                num_frames = len(avatar_audio_features)
        chunks = chunk_schedule(num_frames, num_frames_per_chunk, motion_frames)
        total_frames = chunks[-1][1]
        if isinstance(emotion, list) and len(emotion) != len(chunks):
            raise ValueError(f"`emotion` is a list of {len(emotion)} texts, expected one per chunk ({len(chunks)}).")
        if isinstance(understanding, list) and len(understanding) != len(chunks):
            raise ValueError(
                f"`understanding` is a list of {len(understanding)} tensors, expected one per chunk ({len(chunks)})."
            )

        # 2. Encode the avatar's audio (per-frame wav2vec2 rows with ±2 context windows); the reference and its masks
        if avatar_audio_features is not None:
            avatar_features = _feature_rows(avatar_audio_features, total_frames, "avatar_audio_features")
        else:
            avatar_features = self.encode_audio(avatar_audio, total_frames)  # T_all, NL, D
        avatar_windows = window_features(avatar_features[None], radius=self.transformer.config.audio_window // 2)
        avatar_windows = avatar_windows.to(device, dtype)  # 1, T_all, L_w, NL, D
        reference = self.prepare_reference(reference_image, height, width).to(device)  # 1, 3, H, W in [-1, 1]
        num_latent_frames = (num_frames_per_chunk - 1) // self.vae_scale_factor_temporal + 1
        avatar_lip, avatar_face = self.prepare_avatar_masks(
            height, width, num_latent_frames, reference_landmarks, lip_mask, face_mask, reference_image
        )
        avatar_lip, avatar_face = avatar_lip.to(device, dtype), avatar_face.to(device, dtype)  # 1, F, H', W'

        # 3. Prepare the user's side: per-frame wav2vec2 rows and video tokens for the LCU
        has_user = user_video is not None
        user_inputs = None
        if has_user:
            user_inputs = self.prepare_user_inputs(
                None if user_audio is None else _to_waveform(user_audio, "user_audio"),
                to_uint8_frames(user_video, "user_video"),
                total_frames,
                user_landmarks,
                settings.user_video_size,
                user_audio_features=user_audio_features,
            )

        # 4. Denoise chunk by chunk
        prompt_encoder = PromptEncoder(self.text_encoder, self.tokenizer, settings.max_sequence_length)
        pieces = []
        previous_video = None
        with self.progress_bar(total=len(chunks) * settings.num_inference_steps) as progress_bar:
            for chunk_index, (start, stop) in enumerate(chunks):
                self._current_chunk = chunk_index

                # 4.1 Emotion text (LAU) → c_emo; each distinct text is encoded once per call
                if not settings.use_emotion:  # the "w/o LAU" ablation: the empty prompt, as in training
                    text = ""
                elif isinstance(emotion, list):
                    text = emotion[chunk_index]
                elif emotion is not None:
                    text = emotion
                elif emotion_reasoner is not None and dialogue:
                    text = emotion_reasoner.describe(dialogue, clip_end=stop / FPS, avatar_speaker="avatar")
                else:
                    text = settings.default_emotion
                prompt_embeds = prompt_encoder(text, device=device, dtype=dtype)  # 1, L_txt, text_dim

                # 4.2 User context f_pu from the history up to the chunk's end (LCU, causal)
                context_embeds = context_mask = None
                if has_user:
                    chunk_understanding = (
                        understanding[chunk_index] if isinstance(understanding, list) else understanding
                    )
                    context_embeds, context_mask = self.encode_user_context(
                        user_inputs, start, stop, chunk_understanding, understanding_model, device, dtype,
                        max_history_frames=settings.max_history_frames,
                    )  # fmt: skip

                # 4.3 Condition (Eq. 1): the reference in every chunk, plus the previous chunk's last motion frames
                motion_video = None if previous_video is None else previous_video[:, :, -motion_frames:]
                condition = chunk_condition(self.vae, reference, motion_video, num_latent_frames)
                condition = condition.to(device, dtype)  # 1, 4 + 2·16, F, h, w

                # 4.4 Noise and timesteps
                latents = self.prepare_latents(num_frames_per_chunk, height, width, torch.float32, device, generator)
                self.scheduler.set_timesteps(settings.num_inference_steps, device=device)
                timesteps = self.scheduler.timesteps
                self._num_timesteps = len(timesteps)
                audio_embeds = avatar_windows[:, start:stop]  # 1, N, L_w, NL, D
                weights = self._guidance_weights(has_user)
                pass_inputs = {
                    "uncond": {"audio_embeds": None, "context_embeds": None},
                    "audio": {"audio_embeds": audio_embeds, "context_embeds": None},
                    "full": {"audio_embeds": audio_embeds, "context_embeds": context_embeds},
                }

                # 4.5 Denoising loop
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    self._current_timestep = t
                    latent_model_input = latents.to(dtype)
                    timestep = t.expand(latents.shape[0])

                    noise_pred = 0.0
                    for name, weight in weights.items():
                        extra = pass_inputs[name]
                        prediction = self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=prompt_embeds,
                            condition=condition,
                            audio_embeds=extra["audio_embeds"],
                            context_embeds=extra["context_embeds"],
                            context_mask=context_mask if extra["context_embeds"] is not None else None,
                            lip_mask=avatar_lip,
                            face_mask=avatar_face,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                        noise_pred = noise_pred + weight * prediction.float()

                    # compute the previous noisy sample x_t -> x_t-1
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        callback_kwargs = {}
                        for k in callback_on_step_end_tensor_inputs:
                            callback_kwargs[k] = locals()[k]
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    progress_bar.update()

                # 4.6 Decode the chunk; a continuation drops its regenerated motion frames
                video = self.decode_latents(latents)  # 1, 3, N, H, W in [-1, 1]
                previous_video = video
                pieces.append(video if chunk_index == 0 else video[:, :, motion_frames:])

        self._current_timestep = None
        self._current_chunk = None

        # 5. Post-process: exactly num_frames frames
        video = torch.cat(pieces, dim=2)[:, :, :num_frames]  # 1, 3, num_frames, H, W
        if output_type == "pt":
            frames = ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).cpu()  # 1, T, 3, H, W
        else:
            frames = self.video_processor.postprocess_video(video.float(), output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (frames,)
        return EchoPipelineOutput(frames=frames)

    # ------------------------------------------------------------------------------------------------------------
    # User side (LCU)
    # ------------------------------------------------------------------------------------------------------------

    def prepare_user_inputs(
        self,
        user_audio: np.ndarray | None,
        user_video: np.ndarray,
        total_frames: int,
        user_landmarks: np.ndarray | None,
        user_video_size: int,
        user_audio_features: np.ndarray | torch.Tensor | None = None,
    ) -> dict:
        r"""
        Per-frame user inputs for the whole conversation, ``total_frames`` rows (the video repeats its last frame and
        the audio is padded with silence beyond their ends): ``audio_features`` `(T, NL, D)` (``user_audio_features``
        when given), ``frames`` `(T, H_u, W_u, 3)` uint8, ``waveform``, and, when the LCU uses the visual branch,
        ``video_tokens`` `(T, C_v, h_v, w_v)` and ``face_mask`` `(T, h_v, w_v)`: `echo.encoding.prepare_user_video`
        (frames resized to ``user_video_size``², the face from ``user_landmarks``) then `echo.encoding.encode_user_video`,
        as training encodes them.
        """
        if user_audio_features is not None:
            features = _feature_rows(user_audio_features, total_frames, "user_audio_features")
        else:
            features = self.encode_audio(user_audio, total_frames)
        inputs = {"audio_features": features, "waveform": user_audio}
        index = np.minimum(np.arange(total_frames), len(user_video) - 1)
        inputs["frames"] = user_video[index]  # T_all, H_u, W_u, 3 uint8
        if "user_video" in self.context_encoder.required_inputs:
            if user_landmarks is None:
                user_landmarks = detect_face_landmarks(user_video)
            user_landmarks = np.asarray(user_landmarks, dtype=np.float32)
            if user_landmarks.shape != (len(user_video), NUM_LANDMARKS, 2):
                raise ValueError(
                    f"`user_landmarks` has shape {user_landmarks.shape}, expected ({len(user_video)}, {NUM_LANDMARKS}, 2)."
                )
            frames, face_mask = prepare_user_video(inputs["frames"], user_landmarks[index], user_video_size)
            tokens, token_mask = encode_user_video(self.vae, frames[None], face_mask[None])
            inputs["video_tokens"], inputs["face_mask"] = tokens[0], token_mask[0]
        return inputs

    def encode_user_context(
        self,
        user_inputs: dict,
        start: int,
        stop: int,
        understanding: torch.Tensor | None,
        understanding_model: Callable | None,
        device: torch.device,
        dtype: torch.dtype,
        max_history_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The LCU's context tokens for the chunk ``[start, stop)``: the user's history is frames ``first … stop − 1``
        (``first = 0``, or ``stop − max_history_frames`` when that is later, as in training) and the current clip its
        last ``stop − start`` frames. The LCU gets the inputs its ``required_inputs`` name, in the form the training
        step gives them (validity masks included).

        Returns:
            `(context, context_mask)`: `(1, N_ctx, context_dim)` and `(1, N_ctx)` bool.
        """
        lcu = self.context_encoder
        required = lcu.required_inputs
        first = 0 if max_history_frames is None else max(0, stop - max_history_frames)
        kwargs = {
            "user_audio": user_inputs["audio_features"][None, first:stop].to(device),  # 1, T_hist, NL, D
            "clip_frames": stop - start,
            "user_audio_mask": torch.ones(1, stop - first, dtype=torch.bool, device=device),
        }
        if "user_video" in required:
            kwargs["user_video"] = user_inputs["video_tokens"][None, first:stop].to(device)  # 1, T_hist, C_v, h, w
            kwargs["user_face_mask"] = user_inputs["face_mask"][None, first:stop].to(device)  # 1, T_hist, h, w
        if "understanding" in required:
            if understanding is None and understanding_model is not None:
                if user_inputs["waveform"] is None:
                    raise ValueError("`understanding_model` needs the user's waveform: pass `user_audio`.")
                num_samples = int(round(stop * SAMPLE_RATE / FPS))
                understanding = understanding_model(user_inputs["frames"][:stop], user_inputs["waveform"][:num_samples])
            if understanding is None:
                raise ValueError(
                    "The context encoder uses understanding tokens (use_understanding=True): pass `understanding` "
                    "(N_s, D_s) or an `understanding_model`."
                )
            understanding = torch.as_tensor(understanding).to(device, torch.float32)
            if understanding.ndim == 2:
                understanding = understanding[None]  # 1, N_s, D_s
            num_tokens = understanding.shape[1]
            if num_tokens == 0:  # nothing understood yet: one hidden zero token, as a training batch holds it
                understanding = understanding.new_zeros(1, 1, understanding.shape[2])
            kwargs["understanding"] = understanding
            kwargs["understanding_mask"] = torch.full(
                understanding.shape[:2], num_tokens > 0, dtype=torch.bool, device=device
            )
        output = lcu(**kwargs)
        return output.context.to(device, dtype), output.context_mask.to(device)


def _feature_rows(features: np.ndarray | torch.Tensor, num_rows: int, name: str) -> torch.Tensor:
    """The first ``num_rows`` per-frame wav2vec2 rows `(T, NL, D)` of precomputed features (e.g. a memory-mapped
    float16 ``*_w2v.npy``), float32 on the CPU, as the dataset reads them."""
    if not isinstance(features, torch.Tensor):
        features = np.asarray(features)
    if features.ndim != 3 or features.shape[0] < num_rows:
        raise ValueError(
            f"`{name}` has shape {tuple(features.shape)}, expected (T, NL, D) per-frame wav2vec2 rows with T >= "
            f"{num_rows} (the chunks cover frames 0 … {num_rows - 1})."
        )
    if isinstance(features, torch.Tensor):
        return features[:num_rows].detach().float().cpu()
    return torch.from_numpy(np.array(features[:num_rows], dtype=np.float32))  # a copy: memory maps are read-only


def _register_with_diffusers() -> None:
    """Make ``getattr(diffusers, "EchoPipeline")`` resolve, which `DiffusionPipeline.from_pretrained` uses to map a
    ``model_index.json`` ``_class_name`` to a pipeline class (no remote code is involved)."""
    import diffusers

    if getattr(diffusers, "__dict__", {}).get("EchoPipeline") is None:
        diffusers.EchoPipeline = EchoPipeline


_register_with_diffusers()
