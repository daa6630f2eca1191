# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""`EchoPipeline`: interactive head generation (talking + listening avatar) with a Wan2.1 DiT and SDCM.

Given an avatar reference image, the avatar's own speech, and the user's video and speech (the other side of the
conversation), the pipeline renders the avatar frame by frame at 25 fps:

- the avatar audio drives the lips (SDCM lip branch) and co-speech motion;
- the user's long-range audio-visual behaviour, encoded by the LCU (Eq. 5-9) from frame 1 to the end of the current
  chunk, drives the listening behaviour (SDCM face branch);
- an emotion description (LAU, Eq. 3), given or reasoned from the dialogue, enters through the text cross-attention.

A conversation longer than one chunk is rendered chunk by chunk (Eq. 1). Every chunk has ``num_frames_per_chunk =
4k + 1`` frames. The first chunk is conditioned on the reference image (latent frame 0 of the condition); every
continuation chunk starts ``motion_frames`` frames before the end of the previous one, is conditioned on the VAE
encoding of those last ``motion_frames`` generated frames (latent frames ``0 … m − 1``,
``motion_frames = 4(m − 1) + 1``), regenerates them, and drops them from the output.

Avatar masks: SDCM needs the avatar's lip and face regions at the token grid. They are rasterised
(`echo.masks.rasterize_masks`) from the 478 face-mesh landmarks of the reference image, held for every frame of the
video. The landmarks are given as ``reference_landmarks`` or detected with MediaPipe's face mesh when it is
installed; ``lip_mask`` / ``face_mask`` may be passed directly at the token grid instead.

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
from echo.encoding import encode_user_video, normalize_latents
from echo.conditioning import build_condition
from echo.lcu import LongRangeContextEncoder
from echo.masks import NUM_LANDMARKS, masks_to_token_grid, rasterize_masks
from echo.transformer_echo import EchoTransformer3DModel

from .pipeline_output import EchoPipelineOutput

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
        ...     height=512,
        ...     width=512,
        ...     num_inference_steps=40,
        ... )
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


def detect_face_landmarks(images: np.ndarray) -> np.ndarray:
    r"""MediaPipe face-mesh landmarks (478 points, refined) of the most prominent face, in pixels.

    Args:
        images (`np.ndarray`): one RGB uint8 image `(H, W, 3)` or frames `(T, H, W, 3)`.

    Returns:
        `np.ndarray` float32: `(478, 2)` for one image (a `ValueError` when no face is found), or `(T, 478, 2)` for
        frames, NaN on frames without a face (as in prepared data, they give empty masks).
    """
    try:
        import mediapipe as mp
    except ImportError as error:
        raise ImportError(
            "Detecting faces needs MediaPipe (`pip install 'echo-ihg[prep]'`); alternatively pass "
            "`reference_landmarks` (478, 2) / `user_landmarks` (T, 478, 2), or `lip_mask` / `face_mask`."
        ) from error
    images = np.asarray(images)
    single = images.ndim == 3
    frames = images[None] if single else images
    if frames.ndim != 4 or frames.shape[-1] < 3:
        raise ValueError(f"`images` has shape {images.shape}, expected (H, W, 3) or (T, H, W, 3) RGB.")
    height, width = frames.shape[1:3]
    landmarks = np.full((len(frames), NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as mesh:
        for t, frame in enumerate(frames):
            result = mesh.process(np.ascontiguousarray(frame[..., :3].astype(np.uint8)))
            if result.multi_face_landmarks:
                points = result.multi_face_landmarks[0].landmark
                landmarks[t] = [[p.x * width, p.y * height] for p in points]
    if single:
        if np.isnan(landmarks[0]).any():
            raise ValueError(
                "MediaPipe found no face in `reference_image`; pass `reference_landmarks` or `lip_mask` / `face_mask`."
            )
        return landmarks[0]
    return landmarks


def _to_uint8_frames(video) -> np.ndarray:
    """Frames as `(T, H, W, 3)` uint8 from a uint8 array, a float array in [0, 1], a tensor or a list of PIL images."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame.convert("RGB") if isinstance(frame, PIL.Image.Image) else frame) for frame in video])
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"`user_video` has shape {video.shape}, expected (T, H, W, 3) RGB frames.")
    if video.dtype != np.uint8:
        video = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    return video


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

        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------------------------------------------------
    # Encoders
    # ------------------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str],
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        r"""
        Encodes emotion descriptions with the T5/UMT5 encoder, as Wan does: the last hidden state of the valid tokens,
        zero-padded to ``max_sequence_length``.

        Args:
            prompt (`str` or `list[str]`): emotion description(s).
            max_sequence_length (`int`, defaults to 512): padded length (capped by the tokenizer's maximum).
            device (`torch.device`, *optional*), dtype (`torch.dtype`, *optional*): of the returned embeddings.

        Returns:
            `torch.Tensor` of shape `(batch_size, max_sequence_length, text_dim)`.
        """
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        max_sequence_length = min(max_sequence_length, self.tokenizer.model_max_length)

        text_inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids, mask = text_inputs.input_ids, text_inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        prompt_embeds = self.text_encoder(input_ids.to(self.text_encoder.device), mask.to(self.text_encoder.device))
        prompt_embeds = prompt_embeds.last_hidden_state.to(dtype=dtype, device=device)
        prompt_embeds = [u[:v] for u, v in zip(prompt_embeds, seq_lens)]
        return torch.stack(
            [torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in prompt_embeds], dim=0
        )  # batch_size, max_sequence_length, text_dim

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

    def encode_video(self, video: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        r"""VAE encoding (distribution mode) of `(B, 3, T, H, W)` frames in [−1, 1] → normalised latents
        `(B, 16, (T − 1)/4 + 1, H/8, W/8)`, ``(z − latents_mean) / latents_std`` as in Wan."""
        latents = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return normalize_latents(self.vae, latents).to(device, dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        r"""Normalised latents `(B, 16, F, h, w)` → frames `(B, 3, 4(F − 1) + 1, 8h, 8w)` in [−1, 1]."""
        latents = normalize_latents(self.vae, latents.to(self.vae.device, self.vae.dtype), inverse=True)
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    def prepare_reference(self, image, height: int, width: int) -> torch.Tensor:
        """Reference image (PIL, `(H, W, 3)` uint8 / float array, or `(3, H, W)` tensor in [−1, 1]) → `(1, 3, H, W)`."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"`reference_image` tensor has shape {tuple(image.shape)}, expected (3, H, W) in [-1, 1].")
            image = image[None].float()
            return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True).clamp(-1, 1)
        if isinstance(image, np.ndarray):
            image = PIL.Image.fromarray(_to_uint8_frames(image[None])[0])
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"`reference_image` is a {type(image).__name__}, expected a PIL image, an array or a tensor.")
        return self.video_processor.preprocess(image.convert("RGB"), height=height, width=width)  # 1, 3, H, W

    def prepare_avatar_masks(
        self,
        reference: torch.Tensor,
        num_latent_frames: int,
        reference_landmarks: np.ndarray | None = None,
        lip_mask: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        reference_image=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Token-grid lip and face masks `(1, F, H', W')` for SDCM.

        ``lip_mask`` / ``face_mask`` are used as given (`(H', W')`, `(F, H', W')` or `(1, F, H', W')`). Otherwise the
        face-mesh landmarks of the reference (``reference_landmarks`` `(478, 2)` in pixels of ``reference``, or
        MediaPipe's detection on the original ``reference_image`` when given, else on ``reference``) are rasterised at
        the reference's resolution and held for all frames (the avatar's face stays roughly where the reference has
        it; the masks are not tracked through the generated frames).
        """
        height, width = reference.shape[-2:]
        patch = self.transformer.config.patch_size
        grid = (height // (self.vae_scale_factor_spatial * patch[1]), width // (self.vae_scale_factor_spatial * patch[2]))
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
        if reference_landmarks is None:
            if reference_image is None:
                reference_image = ((reference[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255)
            image = np.asarray(reference_image.convert("RGB") if isinstance(reference_image, PIL.Image.Image) else reference_image)
            if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:  # (3, H, W) tensor in [-1, 1]
                image = (np.transpose(image, (1, 2, 0)) + 1) * 127.5
            image = np.clip(image, 0, 255).astype(np.uint8) if image.dtype != np.uint8 else image
            # detect on the full-resolution image, then scale to the reference's size (preprocessing stretches)
            scale = np.array([width / image.shape[1], height / image.shape[0]], dtype=np.float32)
            reference_landmarks = detect_face_landmarks(image) * scale
        reference_landmarks = np.asarray(reference_landmarks, dtype=np.float32)
        if reference_landmarks.shape != (NUM_LANDMARKS, 2):
            raise ValueError(
                f"`reference_landmarks` has shape {reference_landmarks.shape}, expected ({NUM_LANDMARKS}, 2) pixels "
                f"of the {height}x{width} reference."
            )
        lip, face = rasterize_masks(reference_landmarks[None], height, width)  # 1, H, W each
        patch_px = (self.vae_scale_factor_spatial * patch[1], self.vae_scale_factor_spatial * patch[2])
        lip = masks_to_token_grid(torch.from_numpy(lip), patch_px, self.vae_scale_factor_temporal)  # 1, H', W'
        face = masks_to_token_grid(torch.from_numpy(face), patch_px, self.vae_scale_factor_temporal)
        face = face * (1 - lip)
        return lip[None].expand(1, num_latent_frames, *grid), face[None].expand(1, num_latent_frames, *grid)

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
    ):
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"`output_type` is {output_type!r}, expected 'np', 'pt' or 'pil'.")
        if reference_image is None:
            raise ValueError("`reference_image` is required: it fixes the avatar's identity.")
        if avatar_audio is None:
            raise ValueError("`avatar_audio` is required: a mono waveform at 16 kHz.")
        unit = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % unit != 0 or width % unit != 0:
            raise ValueError(f"`height` and `width` have to be divisible by {unit} but are {height} and {width}.")
        if (user_video is None) != (user_audio is None):
            raise ValueError("Pass both `user_video` and `user_audio` (the user's side of the conversation), or neither.")
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
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 40,
        audio_guidance_scale: float = 4.5,
        user_guidance_scale: float = 2.0,
        num_frames_per_chunk: int = 81,
        motion_frames: int = 5,
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
        default_emotion: str = "neutral",
        user_video_size: int = 64,
        max_sequence_length: int = 512,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers convention)
    ):
        r"""
        The call function to the pipeline for generation.

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
                A model trained without LAU (``context_encoder.config.use_emotion=False``) gets the empty prompt.
            num_frames (`int`, *optional*):
                Frames to generate at 25 fps; defaults to the avatar audio's duration.
            height (`int`, defaults to 512), width (`int`, defaults to 512):
                Output size, multiples of 16.
            num_inference_steps (`int`, defaults to 40):
                Denoising steps per chunk.
            audio_guidance_scale (`float`, defaults to 4.5), user_guidance_scale (`float`, defaults to 2.0):
                ``s_a`` and ``s_u`` of ``uncond + s_a (audio − uncond) + s_u (full − audio)``.
            num_frames_per_chunk (`int`, defaults to 81):
                ``4k + 1`` frames generated per chunk.
            motion_frames (`int`, defaults to 5):
                ``T_prev = 4(m − 1) + 1`` last frames of a chunk that condition the next one.
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
                Face-mesh landmarks of the reference in pixels of the `height` × `width` image; detected with
                MediaPipe when omitted.
            user_landmarks (`np.ndarray` `(T_u, 478, 2)`, *optional*):
                Face-mesh landmarks of the user's frames (pixels of the given frames) for the LCU's face-masked token
                selection (Eq. 7); detected with MediaPipe when omitted and the LCU uses the visual branch.
            lip_mask (`torch.Tensor`, *optional*), face_mask (`torch.Tensor`, *optional*):
                Token-grid masks `(H', W')` or `(F, H', W')` replacing the landmark masks.
            default_emotion (`str`, defaults to `"neutral"`):
                Emotion text when none is given or reasoned (as in training).
            user_video_size (`int`, defaults to 64):
                Square size the user's frames are resized to before the LCU's VAE tokens (as in training).
            max_sequence_length (`int`, defaults to 512):
                Token length of the emotion embeddings.
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

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
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
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._audio_guidance_scale = audio_guidance_scale
        self._user_guidance_scale = user_guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._current_chunk = None
        self._interrupt = False

        device = self._execution_device
        dtype = self.transformer.dtype
        avatar_audio = _to_waveform(avatar_audio, "avatar_audio")
        if num_frames is None:
            num_frames = max(1, int(round(len(avatar_audio) * FPS / SAMPLE_RATE)))
        chunks = chunk_schedule(num_frames, num_frames_per_chunk, motion_frames)
        total_frames = chunks[-1][1]
        if isinstance(emotion, list) and len(emotion) != len(chunks):
            raise ValueError(f"`emotion` is a list of {len(emotion)} texts, expected one per chunk ({len(chunks)}).")
        if isinstance(understanding, list) and len(understanding) != len(chunks):
            raise ValueError(
                f"`understanding` is a list of {len(understanding)} tensors, expected one per chunk ({len(chunks)})."
            )

        # 2. Encode the avatar's audio (per-frame wav2vec2 rows with ±2 context windows) and the reference
        avatar_features = self.encode_audio(avatar_audio, total_frames)  # T_all, NL, D
        avatar_windows = window_features(avatar_features[None], radius=self.transformer.config.audio_window // 2)
        avatar_windows = avatar_windows.to(device, dtype)  # 1, T_all, L_w, NL, D
        reference = self.prepare_reference(reference_image, height, width).to(device)  # 1, 3, H, W
        reference_latents = self.encode_video(reference[:, :, None], device, dtype)  # 1, 16, 1, h, w
        num_latent_frames = (num_frames_per_chunk - 1) // self.vae_scale_factor_temporal + 1
        avatar_lip, avatar_face = self.prepare_avatar_masks(
            reference, num_latent_frames, reference_landmarks, lip_mask, face_mask, reference_image
        )
        avatar_lip, avatar_face = avatar_lip.to(device, dtype), avatar_face.to(device, dtype)

        # 3. Prepare the user's side: per-frame wav2vec2 rows and video for the LCU
        has_user = user_audio is not None
        user_inputs = None
        if has_user:
            user_inputs = self.prepare_user_inputs(
                _to_waveform(user_audio, "user_audio"),
                _to_uint8_frames(user_video),
                total_frames,
                user_landmarks,
                user_video_size,
            )

        # 4. Denoise chunk by chunk
        use_emotion = self.context_encoder is None or getattr(self.context_encoder.config, "use_emotion", True)
        pieces = []
        previous_video = None
        prompt_cache: dict[str, torch.Tensor] = {}
        motion_latent_frames = (motion_frames - 1) // self.vae_scale_factor_temporal + 1
        with self.progress_bar(total=len(chunks) * num_inference_steps) as progress_bar:
            for chunk_index, (start, stop) in enumerate(chunks):
                self._current_chunk = chunk_index

                # 4.1 Emotion text (LAU) → c_emo
                if not use_emotion:  # the "w/o LAU" ablation: the empty prompt, as in training
                    text = ""
                elif isinstance(emotion, list):
                    text = emotion[chunk_index]
                elif emotion is not None:
                    text = emotion
                elif emotion_reasoner is not None and dialogue:
                    text = emotion_reasoner.describe(dialogue, clip_end=stop / FPS, avatar_speaker="avatar")
                else:
                    text = default_emotion
                if text not in prompt_cache:  # the same emotion text over many chunks is encoded once
                    prompt_cache[text] = self.encode_prompt(text, max_sequence_length, device=device, dtype=dtype)
                prompt_embeds = prompt_cache[text]

                # 4.2 User context f_pu from the history 0 … stop − 1 (LCU, causal)
                context_embeds = context_mask = None
                if has_user:
                    chunk_understanding = understanding[chunk_index] if isinstance(understanding, list) else understanding
                    context_embeds, context_mask = self.encode_user_context(
                        user_inputs, start, stop, chunk_understanding, understanding_model, device, dtype
                    )

                # 4.3 Condition: the reference (first chunk) or the previous chunk's last motion frames
                if previous_video is None:
                    condition = build_condition(reference_latents, None, num_latent_frames)
                else:
                    motion_video = previous_video[:, :, -motion_frames:]  # 1, 3, T_prev, H, W
                    motion_latents = self.encode_video(motion_video, device, dtype)  # 1, 16, m, h, w
                    if motion_latents.shape[2] != motion_latent_frames:
                        raise ValueError(
                            f"motion latents have {motion_latents.shape[2]} frames, expected {motion_latent_frames}."
                        )
                    condition = build_condition(None, motion_latents, num_latent_frames)
                condition = condition.to(device, dtype)  # 1, 20, F, h, w

                # 4.4 Noise and timesteps
                latents = self.prepare_latents(num_frames_per_chunk, height, width, torch.float32, device, generator)
                self.scheduler.set_timesteps(num_inference_steps, device=device)
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
        user_audio: np.ndarray,
        user_video: np.ndarray,
        total_frames: int,
        user_landmarks: np.ndarray | None,
        user_video_size: int,
    ) -> dict:
        r"""
        Per-frame user inputs for the whole conversation, ``total_frames`` rows (the video repeats its last frame and
        the audio is padded with silence beyond their ends): ``audio_features`` `(T, NL, D)`, ``frames``
        `(T, H_u, W_u, 3)` uint8, ``waveform``, and, when the LCU uses the visual branch, ``video_tokens``
        `(T, C_v, h_v, w_v)` and ``face_mask`` `(T, h_v, w_v)` (`echo.components.encode_user_video` of the frames
        resized to ``user_video_size``², face = face oval including the lips, from ``user_landmarks``).
        """
        inputs = {"audio_features": self.encode_audio(user_audio, total_frames), "waveform": user_audio}
        index = np.minimum(np.arange(total_frames), len(user_video) - 1)
        inputs["frames"] = user_video[index]  # T_all, H_u, W_u, 3 uint8
        if self.context_encoder.config.use_visual:
            if user_landmarks is None:
                user_landmarks = detect_face_landmarks(user_video)
            user_landmarks = np.asarray(user_landmarks, dtype=np.float32)
            if user_landmarks.shape != (len(user_video), NUM_LANDMARKS, 2):
                raise ValueError(
                    f"`user_landmarks` has shape {user_landmarks.shape}, expected ({len(user_video)}, {NUM_LANDMARKS}, 2)."
                )
            size = user_video_size
            lip, face = rasterize_masks(user_landmarks[index], size, size, source_size=user_video.shape[1:3])
            frames = torch.from_numpy(inputs["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # T, 3, H_u, W_u
            if frames.shape[-2:] != (size, size):
                frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            face_mask = torch.from_numpy(lip | face).float()  # whole face, lips included
            tokens, token_mask = encode_user_video(self.vae, frames.clamp(-1, 1)[None], face_mask[None])
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The LCU's context tokens for the chunk ``[start, stop)``: the user's history is frames ``0 … stop − 1`` and the
        current clip its last ``stop − start`` frames.

        Returns:
            `(context, context_mask)`: `(1, N_ctx, context_dim)` and `(1, N_ctx)` bool.
        """
        lcu = self.context_encoder
        kwargs = {
            "user_audio": user_inputs["audio_features"][None, :stop].to(device, lcu.dtype),  # 1, T_hist, NL, D
            "clip_frames": stop - start,
        }
        if lcu.config.use_visual:
            kwargs["user_video"] = user_inputs["video_tokens"][None, :stop].to(device, lcu.dtype)  # 1, T_hist, C_v, h, w
            kwargs["user_face_mask"] = user_inputs["face_mask"][None, :stop].to(device)  # 1, T_hist, h, w
        if lcu.config.use_understanding:
            if understanding is None and understanding_model is not None:
                num_samples = int(round(stop * SAMPLE_RATE / FPS))
                understanding = understanding_model(user_inputs["frames"][:stop], user_inputs["waveform"][:num_samples])
            if understanding is None:
                raise ValueError(
                    "The context encoder uses understanding tokens (use_understanding=True): pass `understanding` "
                    "(N_s, D_s) or an `understanding_model`."
                )
            understanding = torch.as_tensor(understanding)
            if understanding.ndim == 2:
                understanding = understanding[None]
            kwargs["understanding"] = understanding.to(device, lcu.dtype)
        output = lcu(**kwargs)
        return output.context.to(device, dtype), output.context_mask.to(device)


def _register_with_diffusers() -> None:
    """Make ``getattr(diffusers, "EchoPipeline")`` resolve, which `DiffusionPipeline.from_pretrained` uses to map a
    ``model_index.json`` ``_class_name`` to a pipeline class (no remote code is involved)."""
    import diffusers

    if getattr(diffusers, "__dict__", {}).get("EchoPipeline") is None:
        diffusers.EchoPipeline = EchoPipeline


_register_with_diffusers()
