"""Wav2vec2 features, one row per video frame.

`Wav2Vec2Features` loads a transformers ``Wav2Vec2Model`` and its ``Wav2Vec2FeatureExtractor`` from a local folder
(or a Hugging Face cache id) and computes the rows of `echo.audio.audio_frame_features`, the one definition the
dataset, the offline call and the session share: every hidden layer kept (the CNN projection output plus every
transformer layer: ``num_hidden_layers + 1`` = 13 for the base model), one row per 25 fps video frame, computed over
the participant's whole conversation track in 1-s blocks with 1 s of audio on either side (a row reads at most 49
frames of audio after its frame).
"""

from __future__ import annotations

import numpy as np
import torch

from echo.audio import audio_frame_features


class Wav2Vec2Features:
    """Per-frame wav2vec2 hidden states of a conversation track.

    Args:
        model_path (`str` or `Path`): folder (or cache id) holding a ``Wav2Vec2Model`` and its feature extractor
            config (``preprocessor_config.json``).
        device (`str`, defaults to `"cpu"`).
        num_threads (`int`, *optional*): CPU threads torch uses during a call (restored afterwards). Preparation
            runs one process per conversation, so 1 thread per process avoids oversubscribing the cores; `None`
            keeps torch's setting.
    """

    def __init__(self, model_path, device: str = "cpu", num_threads: int | None = None):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        self.model_path = str(model_path)
        self.feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_path)
        self.model = Wav2Vec2Model.from_pretrained(model_path, use_safetensors=True).to(device).eval()
        self.device = device
        self.num_threads = num_threads

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, waveform: np.ndarray, first: int, stop: int) -> np.ndarray:
        """The rows of frames ``[first, stop)`` of a whole track (`echo.audio.audio_frame_features`).

        Args:
            waveform (`np.ndarray` of shape `(N,)`): the participant's whole conversation track, float at 16 kHz
                (silence after its end).
            first (`int`), stop (`int`): the frames, e.g. one clip's ``[start, end)``.

        Returns:
            `np.ndarray` of shape `(stop − first, num_hidden_layers + 1, hidden_size)`, float16 (the stored format).
        """
        previous = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            rows = audio_frame_features(self.model, self.feature_extractor, waveform, first, stop)
        finally:
            torch.set_num_threads(previous)
        return rows.numpy().astype(np.float16)
