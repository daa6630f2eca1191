"""High-level behaviour-grounded context understanding (HBCU, paper Eq. 8).

``S_usr = Φ(P_think, V_usr, A_usr)``: a Qwen2.5-Omni thinker (Qwen3-Omni accepted) reads the user's recent frames and
audio with an instruction prompt, and the last-layer hidden states of the whole sequence are the understanding
tokens given to the LCU (``understanding``, `(N_s, D_s)` per clip).

Input presentation (a design decision written down here):

- **frames** `(N, H, W, 3)` uint8 (the user's history, in time order) are given to the thinker as images through
  the checkpoint's own image processor (``AutoImageProcessor``; the PIL backend works without torchvision). At most
  ``max_frames`` of them are used, evenly spaced over the history and always including the last one; every frame
  costs ``(H'·W') / merge_size²`` tokens after the processor's resizing.
- **audio** `(samples,)` 16 kHz mono: the most recent ``max_audio_seconds`` go through the checkpoint's Whisper
  feature extractor in chunks of ``audio_chunk_seconds`` (30 s, the encoder's input length); each chunk is one audio
  segment of the prompt.
- The conversation is written in Qwen's ChatML layout (what the Omni chat template renders):
  ``<|im_start|>system … <|im_end|> <|im_start|>user <vision>×N <audio>×C P_think <|im_end|> <|im_start|>assistant``,
  each placeholder expanded to one token per encoder output, as the Omni processor does.

Everything (thinker, tokenizer, feature extractor, image processor) is loaded from one local folder or Hugging Face
cache entry with ``from_pretrained``. ``echo-prep --stages omni`` stores ``S_usr`` of the user's history up to every
stride's end in a clip folder (`echo.clip_format.write_understanding`), so training reads what the pipeline computes
at a chunk's end instead of running the thinker.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from diffusers.utils import logging

from .audio import SAMPLE_RATE
from .devices import execution_device

logger = logging.get_logger(__name__)


SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)
P_THINK = (
    "You are watching and listening to a person talking with a partner in a face-to-face conversation. Think about "
    "this person's behaviour over the whole excerpt: what they are saying and how, their tone of voice, facial "
    "expressions, gaze and head movements, how their emotional state evolves, and what kind of facial reaction "
    "from their partner would be appropriate right now."
)

# model_type in config.json → (module, class, attribute holding the thinker or None)
_THINKER_CLASSES = {
    "qwen2_5_omni_thinker": ("transformers", "Qwen2_5OmniThinkerForConditionalGeneration", None),
    "qwen2_5_omni": ("transformers", "Qwen2_5OmniForConditionalGeneration", "thinker"),
    "qwen3_omni_moe_thinker": ("transformers", "Qwen3OmniMoeThinkerForConditionalGeneration", None),
    "qwen3_omni_moe": ("transformers", "Qwen3OmniMoeForConditionalGeneration", "thinker"),
}


class OmniUnderstanding:
    r"""Φ of Eq. 8: runs an Omni thinker on the user's frames and audio and returns its last-layer hidden states.

    Args:
        thinker (`Qwen2_5OmniThinkerForConditionalGeneration` or `Qwen3OmniMoeThinkerForConditionalGeneration`).
        tokenizer (`PreTrainedTokenizerBase`): with the Omni special tokens (``image_token``, ``audio_token``,
            ``vision_bos_token``, ``vision_eos_token``, ``audio_bos_token``, ``audio_eos_token``).
        feature_extractor (`WhisperFeatureExtractor`): log-mel features of the audio.
        image_processor (`Qwen2VLImageProcessor` or its PIL variant): patches of the frames.
        prompt (`str`, defaults to `P_THINK`): the instruction P_think.
        system_prompt (`str`, defaults to Qwen-Omni's system prompt).
        max_frames (`int`, defaults to 16): frames given to the thinker, evenly spaced over the history.
        max_audio_seconds (`float`, defaults to 300.0): the most recent audio given to the thinker.
        audio_chunk_seconds (`float`, defaults to 30.0): length of one audio segment (Whisper's input length).
    """

    def __init__(
        self,
        thinker,
        tokenizer,
        feature_extractor,
        image_processor,
        prompt: str = P_THINK,
        system_prompt: str = SYSTEM_PROMPT,
        max_frames: int = 16,
        max_audio_seconds: float = 300.0,
        audio_chunk_seconds: float = 30.0,
    ):
        for name in (
            "image_token",
            "audio_token",
            "vision_bos_token",
            "vision_eos_token",
            "audio_bos_token",
            "audio_eos_token",
        ):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"The tokenizer has no `{name}`; load the tokenizer of a Qwen-Omni checkpoint.")
        self.thinker = thinker.eval()
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.image_processor = image_processor
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.max_frames = int(max_frames)
        self.max_audio_seconds = float(max_audio_seconds)
        self.audio_chunk_seconds = float(audio_chunk_seconds)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: Optional[torch.dtype] = None,
        device: Optional[str | torch.device] = None,
        **kwargs,
    ) -> "OmniUnderstanding":
        r"""Load the thinker and its pre-processing from a folder (or a cached model id).

        A full Omni checkpoint (``model_type`` ``qwen2_5_omni`` / ``qwen3_omni_moe``) is loaded whole and its
        ``thinker`` kept; a thinker-only folder loads directly. Extra ``kwargs`` go to the constructor. Weights are
        read from safetensors only (a folder holding only ``*.bin`` pickles is refused) and no custom code is run.
        """
        import importlib

        from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

        path = os.fspath(pretrained_model_name_or_path)
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
        if model_type not in _THINKER_CLASSES:
            raise ValueError(
                f"{path!r} holds a {model_type!r} model; expected one of {sorted(_THINKER_CLASSES)} "
                "(a Qwen2.5-Omni or Qwen3-Omni checkpoint)."
            )
        module, class_name, attribute = _THINKER_CLASSES[model_type]
        model_cls = getattr(importlib.import_module(module), class_name)
        load_kwargs = {"dtype": torch_dtype, "use_safetensors": True}  # never unpickle a .bin
        if attribute is not None and model_type == "qwen2_5_omni":
            load_kwargs["enable_audio_output"] = False  # the talker is not needed for hidden states
        model = model_cls.from_pretrained(path, **load_kwargs)
        thinker = getattr(model, attribute) if attribute else model
        if device is not None:
            thinker.to(device)
        return cls(
            thinker,
            AutoTokenizer.from_pretrained(path, trust_remote_code=False),
            AutoFeatureExtractor.from_pretrained(path, trust_remote_code=False),
            AutoImageProcessor.from_pretrained(path, trust_remote_code=False),
            **kwargs,
        )

    @property
    def hidden_size(self) -> int:
        """D_s, the width of the returned tokens (the LCU's ``understanding_dim``)."""
        config = self.thinker.config
        return getattr(config, "text_config", config).hidden_size

    def _num_audio_tokens(self, feature_lengths: torch.Tensor) -> list[int]:
        """Audio placeholders per chunk: the Omni processor's own rule for the thinker's family."""
        import importlib

        family = "qwen3_omni_moe" if self.thinker.config.model_type.startswith("qwen3_omni") else "qwen2_5_omni"
        module = importlib.import_module(f"transformers.models.{family}.processing_{family}")
        return [int(n) for n in module._get_feat_extract_output_lengths(feature_lengths)]

    def _build_text(self, num_image_tokens: list[int], num_audio_tokens: list[int], prompt: str) -> str:
        tok = self.tokenizer
        vision = "".join(tok.vision_bos_token + tok.image_token * n + tok.vision_eos_token for n in num_image_tokens)
        audio = "".join(tok.audio_bos_token + tok.audio_token * n + tok.audio_eos_token for n in num_audio_tokens)
        return (
            f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{vision}{audio}{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    def prepare_inputs(self, frames: np.ndarray, audio: Optional[np.ndarray], prompt: Optional[str] = None) -> dict:
        r"""Thinker inputs for one clip.

        Args:
            frames (`np.ndarray` of shape `(N, H, W, 3)`, `uint8`): the user's frames, in time order (at most
                ``max_frames`` are used).
            audio (`np.ndarray` of shape `(samples,)`, *optional*): 16 kHz mono waveform.
            prompt (`str`, *optional*): the instruction; defaults to ``self.prompt`` (P_think).

        Returns:
            `dict` of tensors: ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
            ``input_features``, ``feature_attention_mask`` (the last four only for the modalities given).
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"`frames` must be a uint8 array of shape (N, H, W, 3), got {frames.dtype} {frames.shape}."
            )
        inputs = {}
        if len(frames) > self.max_frames:
            # evenly spaced over the history, the last frame always included
            frames = frames[history_frame_indices(len(frames), self.max_frames)]
        # 1. Frames → image patches; tokens per frame = grid_t·grid_h·grid_w / merge_size²
        num_image_tokens = []
        if len(frames):
            vision = self.image_processor(images=list(frames), return_tensors="pt")
            merge = self.image_processor.merge_size
            num_image_tokens = [int(g.prod()) // merge**2 for g in vision["image_grid_thw"]]
            inputs.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
        # 2. Audio → Whisper features in chunks of audio_chunk_seconds
        num_audio_tokens = []
        if audio is not None and len(audio):
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)[-int(self.max_audio_seconds * SAMPLE_RATE) :]
            chunk = int(self.audio_chunk_seconds * SAMPLE_RATE)
            chunks = [audio[i : i + chunk] for i in range(0, len(audio), chunk)]
            features = self.feature_extractor(
                chunks, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True, return_tensors="pt"
            )
            feature_mask = features["attention_mask"]
            num_audio_tokens = self._num_audio_tokens(feature_mask.sum(-1))
            inputs.update(input_features=features["input_features"], feature_attention_mask=feature_mask)
        if not num_image_tokens and not num_audio_tokens:
            raise ValueError("Give at least one frame or a non-empty audio waveform.")
        # 3. Prompt with one placeholder per multimodal token
        text = self._build_text(num_image_tokens, num_audio_tokens, self.prompt if prompt is None else prompt)
        tokens = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return inputs

    @torch.no_grad()
    def __call__(
        self, frames: np.ndarray, audio: Optional[np.ndarray] = None, prompt: Optional[str] = None
    ) -> torch.Tensor:
        r"""S_usr for one clip.

        Args:
            frames (`np.ndarray` of shape `(N, H, W, 3)`, `uint8`): the user's recent frames, in time order.
            audio (`np.ndarray` of shape `(samples,)`, *optional*): the user's 16 kHz mono audio.
            prompt (`str`, *optional*): the instruction; defaults to ``self.prompt`` (P_think).

        Returns:
            `torch.Tensor` of shape `(N_s, hidden_size)`, float32 on the CPU: the last-layer hidden states of the
            whole prompt (system, frame, audio and instruction tokens), ``N_s`` = its length.
        """
        inputs = self.prepare_inputs(frames, audio, prompt)
        device, dtype = execution_device(self.thinker), self.thinker.dtype
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        outputs = self.thinker(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        return outputs.hidden_states[-1][0].float().cpu()


def history_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """The frames of a history of ``num_frames`` that `OmniUnderstanding` gives the thinker: all of them, or
    ``max_frames`` evenly spaced ones, the first and last always included (giving it exactly these frames gives the
    result of giving it all of them)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, max_frames)).astype(int))


def pad_understanding(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Batch per-clip `(N_s_i, D_s)` tokens: right-padded `(B, max N_s, D_s)` and the `(B, max N_s)` bool mask."""
    if not tokens:
        raise ValueError("`tokens` is empty.")
    length = max(max(int(t.shape[0]) for t in tokens), 1)
    batch = tokens[0].new_zeros(len(tokens), length, tokens[0].shape[1])
    mask = torch.zeros(len(tokens), length, dtype=torch.bool)
    for i, t in enumerate(tokens):
        batch[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return batch, mask
