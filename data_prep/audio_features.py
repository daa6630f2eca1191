"""Wav2vec2 features, one row per video frame.

`Wav2Vec2Features` loads a transformers ``Wav2Vec2Model`` and its ``Wav2Vec2FeatureExtractor`` from a local folder
(or a Hugging Face cache id), runs it on 16 kHz mono audio with ``output_hidden_states=True`` and keeps *all* hidden
layers (the CNN projection output plus every transformer layer: ``num_hidden_layers + 1`` = 13 for the base model).
The ~50 Hz rows are linearly resampled (`echo.audio.resample_rows`) to exactly one row per 25 fps video frame.
"""

from __future__ import annotations

import numpy as np
import torch

from echo.audio import FPS, wav2vec2_frame_features


class Wav2Vec2Features:
    """Per-frame wav2vec2 hidden states.

    Args:
        model_path (`str` or `Path`): folder (or cache id) holding a ``Wav2Vec2Model`` and its feature extractor
            config (``preprocessor_config.json``).
        device (`str`, defaults to `"cpu"`).
        chunk_seconds (`float`, defaults to 30.0): longer audio is encoded in chunks of this length (attention cost
            is quadratic) with one second of context on each side.
        num_threads (`int`, *optional*): CPU threads torch uses during a call (restored afterwards). Preparation
            runs one process per conversation, so 1 thread per process avoids oversubscribing the cores; `None`
            keeps torch's setting.
    """

    def __init__(self, model_path, device: str = "cpu", chunk_seconds: float = 30.0, num_threads: int | None = None):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        self.model_path = str(model_path)
        self.feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_path)
        self.model = Wav2Vec2Model.from_pretrained(model_path, use_safetensors=True).to(device).eval()
        self.device = device
        self.chunk_seconds = chunk_seconds
        self.num_threads = num_threads

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, waveform: np.ndarray, num_frames: int, fps: float = FPS) -> np.ndarray:
        previous = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            return self._features(waveform, num_frames, fps)
        finally:
            torch.set_num_threads(previous)

    def _features(self, waveform: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
        """Encode mono 16 kHz audio covering ``num_frames`` video frames.

        Args:
            waveform (`np.ndarray` of shape `(N,)`): float audio; it is padded with zeros or cut to exactly
                ``num_frames / fps`` seconds.
            num_frames (`int`): T.

        Returns:
            `np.ndarray` of shape `(T, num_hidden_layers + 1, hidden_size)`, float16.
        """
        features = wav2vec2_frame_features(
            self.model, self.feature_extractor, waveform, num_frames, fps=fps, chunk_seconds=self.chunk_seconds
        )
        return features.numpy().astype(np.float16)
