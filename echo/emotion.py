"""Linguistic-driven affective understanding (LAU, paper Eq. 3) and the emotion text encoder.

``y_emo = Ψ(P_hist)``: an LLM reads the dialogue history (both participants' transcript segments, speaker-tagged,
up to the end of the current clip) and writes the avatar's emotional state in a short phrase. ``c_emo = E_txt(y_emo)``:
a T5/UMT5 encoder embeds the phrase; the generator reads ``c_emo`` through Wan's own text cross-attention
(``encoder_hidden_states``).

Two LLM backends share one prompt:

- ``"transformers"``: a local causal LM loaded with ``AutoModelForCausalLM.from_pretrained`` (a folder or a model
  id in the Hugging Face cache), greedy decoding;
- ``"openai"``: an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, …) over stdlib ``urllib`` with a
  timeout, so a dead server fails fast instead of hanging.

When the history is empty, or the backend fails (unreachable endpoint, timeout, malformed reply, empty text),
``on_error="neutral"`` returns `NEUTRAL_DESCRIPTION` (and logs a warning) while ``on_error="raise"`` raises an
`EmotionBackendError` naming the endpoint or model.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Optional, Sequence

import torch
from diffusers.utils import logging

from .audio import FPS
from .devices import execution_device

logger = logging.get_logger(__name__)

NEUTRAL_DESCRIPTION = "calm, attentive, neutral expression"

SYSTEM_PROMPT = (
    "You infer the emotional state of a person in a face-to-face conversation. You are given the dialogue so far, "
    "one line per utterance, tagged AVATAR (the person whose face will be shown) or USER (the conversation partner), "
    "with times in seconds. Describe the AVATAR's current emotional state and the facial expression it implies, in "
    "one short phrase of at most 15 words (for example: 'warm and amused, smiling gently while listening'). Answer "
    "with the phrase only."
)


class EmotionBackendError(RuntimeError):
    """The emotion LLM could not produce a description (unreachable endpoint, timeout, bad reply, empty history)."""


def format_history(
    history: Sequence[dict], clip_end: float, avatar_speaker: str = "avatar", max_segments: Optional[int] = 40
) -> str:
    r"""The dialogue history as speaker-tagged lines, cut at ``clip_end``.

    Args:
        history (`list[dict]`): transcript segments ``{"speaker", "start", "end", "text"}`` (seconds), any order.
        clip_end (`float`): end of the current clip in seconds; later speech is unknown to the model.
        avatar_speaker (`str`, defaults to `"avatar"`): the ``speaker`` value of the avatar; every other speaker is
            tagged ``USER``.
        max_segments (`int`, *optional*, defaults to 40): keep only the most recent segments (``None`` = all).

    Returns:
        `str`: lines ``[12.0-14.5] USER: text``. A segment still running at ``clip_end`` keeps the share of its words
        spoken by then (words assumed evenly spread over the segment); segments starting at or after ``clip_end``
        are dropped. Empty string when nothing was said before ``clip_end``.
    """
    lines = []
    for segment in sorted(history, key=lambda s: (float(s["start"]), float(s["end"]))):
        start, end, text = float(segment["start"]), float(segment["end"]), str(segment["text"]).strip()
        if start >= clip_end or not text:
            continue
        if end > clip_end:
            words = text.split()
            keep = int(len(words) * (clip_end - start) / max(end - start, 1e-6))
            if keep == 0:
                continue
            text, end = " ".join(words[:keep]) + " …", clip_end
        tag = "AVATAR" if segment["speaker"] == avatar_speaker else "USER"
        lines.append(f"[{start:.1f}-{end:.1f}] {tag}: {text}")
    if max_segments is not None:
        lines = lines[-max_segments:]
    return "\n".join(lines)


def reason_emotion(reasoner, history: Sequence[dict], frame: int, avatar_speaker: str = "avatar") -> Optional[str]:
    r"""The emotion text reasoned at ``frame`` (a reasoning frame, `echo.clip_format.reasoning_frame`): the reasoner on
    the dialogue up to that frame inclusive (``clip_end = (frame + 1) / 25`` s, `format_history`'s cut), or `None`
    when nothing was said by then (the caller's ``default_emotion`` applies: echo-prep writes no window there, the
    session uses the model's ``default_emotion``). Echo-prep and the session both call this.

    Args:
        reasoner: an `EmotionReasoner`, or any object with ``describe(history, clip_end, avatar_speaker)``.
        history (`list[dict]`): transcript segments ``{"speaker", "start", "end", "text"}``, in seconds from frame 0
            of ``frame``'s clock.
        frame (`int`): the reasoning frame (inclusive).
        avatar_speaker (`str`, defaults to `"avatar"`).
    """
    clip_end = (frame + 1) / FPS
    if not format_history(history, clip_end, avatar_speaker, max_segments=None):
        return None
    text = reasoner.describe(history, clip_end=clip_end, avatar_speaker=avatar_speaker)
    if not isinstance(text, str):
        raise ValueError(
            f"The emotion reasoner's `describe(history, clip_end={clip_end:.2f}, avatar_speaker={avatar_speaker!r})` "
            f"returned {text!r} ({type(text).__name__}); expected the avatar's emotional state as a `str` (e.g. "
            "`echo.EmotionReasoner`)."
        )
    return text


def build_messages(transcript: str) -> list[dict]:
    """Chat messages of the emotion prompt (system + user) for a formatted transcript."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Dialogue so far:\n{transcript}\n\nThe AVATAR's emotional state now:"},
    ]


class EmotionReasoner:
    r"""The LLM Ψ of Eq. 3: dialogue history → a short description of the avatar's emotional state.

    Args:
        backend (`str`, defaults to `"transformers"`): ``"transformers"`` (local causal LM) or ``"openai"``
            (OpenAI-compatible chat-completions endpoint).
        model (`str`): a local folder / model id for ``"transformers"``, the served model name for ``"openai"``.
        base_url (`str`, *optional*): endpoint root for ``"openai"``, e.g. ``http://127.0.0.1:8000/v1``.
        api_key (`str`, *optional*): bearer token; defaults to the ``OPENAI_API_KEY`` environment variable if set.
        timeout (`float`, defaults to 30.0): seconds for one HTTP request (connect and read).
        max_new_tokens (`int`, defaults to 48): length limit of the description.
        on_error (`str`, defaults to `"neutral"`): ``"neutral"`` returns `NEUTRAL_DESCRIPTION` on an empty history or
            a backend failure; ``"raise"`` raises `EmotionBackendError`.
        neutral_description (`str`, defaults to `NEUTRAL_DESCRIPTION`): the fallback text.
        max_segments (`int`, defaults to 40): most recent transcript segments given to the LLM.
        device (`str` or `torch.device`, *optional*), torch_dtype (`torch.dtype`, *optional*): placement of the
            local model.
    """

    def __init__(
        self,
        backend: str = "transformers",
        model: Optional[str] = None,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = 30.0,
        max_new_tokens: int = 48,
        on_error: str = "neutral",
        neutral_description: str = NEUTRAL_DESCRIPTION,
        max_segments: int = 40,
        device: Optional[str | torch.device] = None,
        torch_dtype: Optional[torch.dtype] = None,
    ):
        if backend not in ("transformers", "openai"):
            raise ValueError(f"`backend` must be 'transformers' or 'openai', got {backend!r}.")
        if on_error not in ("neutral", "raise"):
            raise ValueError(f"`on_error` must be 'neutral' or 'raise', got {on_error!r}.")
        if model is None:
            raise ValueError("`model` is required: a local folder / model id, or the served model name.")
        if backend == "openai" and not base_url:
            raise ValueError("`base_url` is required for the 'openai' backend, e.g. 'http://127.0.0.1:8000/v1'.")
        self.backend = backend
        self.model_name = str(model)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.max_new_tokens = int(max_new_tokens)
        self.on_error = on_error
        self.neutral_description = neutral_description
        self.max_segments = max_segments
        self.model = None
        self.tokenizer = None
        if backend == "transformers":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # Weights from safetensors only (a .bin is a pickle, which can run code when loaded); no custom code.
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_name, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
            ).eval()
            if device is not None:
                self.model.to(device)

    @property
    def endpoint(self) -> Optional[str]:
        """The chat-completions URL of the ``"openai"`` backend."""
        return f"{self.base_url}/chat/completions" if self.base_url else None

    def _fail(self, message: str) -> str:
        if self.on_error == "raise":
            raise EmotionBackendError(message)
        logger.warning(f"{message} Using the neutral description {self.neutral_description!r}.")
        return self.neutral_description

    def describe(self, history: Sequence[dict], clip_end: float, avatar_speaker: str = "avatar") -> str:
        r"""The avatar's emotional state at ``clip_end``.

        Args:
            history (`list[dict]`): transcript segments ``{"speaker", "start", "end", "text"}`` of both participants.
            clip_end (`float`): end time of the current clip (seconds).
            avatar_speaker (`str`, defaults to `"avatar"`): the ``speaker`` value of the avatar.

        Returns:
            `str`: a short description (or the neutral description, see ``on_error``).
        """
        transcript = format_history(history, clip_end, avatar_speaker, self.max_segments)
        if not transcript:
            return self._fail(f"Empty dialogue history before t={clip_end:.2f}s.")
        messages = build_messages(transcript)
        if self.backend == "openai":
            text = self._chat_http(messages)
        else:
            text = self._chat_local(messages)
        if text is None:  # the failure was already handled
            return self.neutral_description
        # reasoning models (e.g. Qwen3 served by vLLM) may prepend their thoughts: keep the answer only
        text = re.sub(r"<think>.*?(</think>|$)", " ", text, flags=re.DOTALL)
        text = " ".join(text.split())
        if not text:
            where = self.endpoint if self.backend == "openai" else self.model_name
            return self._fail(f"The emotion model {where} returned an empty description.")
        return text

    def _chat_http(self, messages: list[dict]) -> Optional[str]:
        payload = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.loads(response.read().decode("utf-8"))
            return str(body["choices"][0]["message"]["content"])
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            self._fail(f"The emotion endpoint {self.endpoint} is unreachable or timed out ({error}).")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            self._fail(f"The emotion endpoint {self.endpoint} returned a malformed reply ({error!r}).")
        return None

    @torch.no_grad()
    def _chat_local(self, messages: list[dict]) -> str:
        tokenizer = self.tokenizer
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n\n".join(m["content"] for m in messages) + "\n"
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
        inputs = {
            k: v.to(execution_device(self.model)) for k, v in inputs.items() if k in ("input_ids", "attention_mask")
        }
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class EmotionTextEncoder:
    r"""``E_txt`` of the paper: a T5/UMT5 encoder and its tokenizer, emotion text → ``c_emo``.

    The embedding follows Wan's prompt encoding: the last hidden state, zeroed beyond each text's own length and
    padded to ``max_length`` tokens, so the generator sees what a Wan pipeline would give it.

    Args:
        text_encoder (`transformers.T5EncoderModel` or `transformers.UMT5EncoderModel`).
        tokenizer (`transformers.PreTrainedTokenizerBase`).
        max_length (`int`, defaults to 512): L_txt (Wan uses 512).
    """

    def __init__(self, text_encoder, tokenizer, max_length: int = 512):
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        tokenizer_name_or_path: Optional[str | os.PathLike] = None,
        max_length: int = 512,
        torch_dtype: Optional[torch.dtype] = None,
    ) -> "EmotionTextEncoder":
        r"""Load the encoder and tokenizer.

        ``pretrained_model_name_or_path`` is either an encoder folder (with ``tokenizer_name_or_path`` or the tokenizer
        files beside it) or a pipeline folder holding ``text_encoder/`` and ``tokenizer/`` (diffusers layout).
        The encoder class follows the config's ``model_type``: ``umt5`` → `UMT5EncoderModel`, otherwise
        `T5EncoderModel`. Weights are read from safetensors only (a folder holding only ``pytorch_model.bin``, a
        pickle, is refused) and no custom code is run.
        """
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        root = os.fspath(pretrained_model_name_or_path)
        encoder_path, tokenizer_path = root, tokenizer_name_or_path
        if os.path.isdir(os.path.join(root, "text_encoder")):
            encoder_path = os.path.join(root, "text_encoder")
            if tokenizer_path is None and os.path.isdir(os.path.join(root, "tokenizer")):
                tokenizer_path = os.path.join(root, "tokenizer")
        tokenizer_path = encoder_path if tokenizer_path is None else os.fspath(tokenizer_path)
        config = AutoConfig.from_pretrained(encoder_path, trust_remote_code=False)
        model_cls = UMT5EncoderModel if config.model_type == "umt5" else T5EncoderModel
        # Weights from safetensors only: a folder with only pytorch_model.bin (a pickle) is refused.
        text_encoder = model_cls.from_pretrained(encoder_path, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
        return cls(text_encoder, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return execution_device(self.text_encoder)

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], return_mask: bool = False):
        r"""Embed emotion descriptions.

        Args:
            texts (`str` or `list[str]`): B descriptions.
            return_mask (`bool`, defaults to `False`): also return the token mask.

        Returns:
            `torch.Tensor` of shape `(B, max_length, d_model)` (zeros past each text's tokens), and with
            ``return_mask`` a `(B, max_length)` bool mask.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("`texts` is empty; give at least one emotion description.")
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids, attention_mask=mask).last_hidden_state  # B, L_txt, d_model
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden, mask.bool()) if return_mask else hidden
