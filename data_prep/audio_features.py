"""Wav2vec2 features, one row per video frame.

`Wav2Vec2Features` loads a transformers ``Wav2Vec2Model`` and its ``Wav2Vec2FeatureExtractor`` from a local folder
(or a Hugging Face cache id), runs it on 16 kHz mono audio with ``output_hidden_states=True`` and keeps *all* hidden
layers (the CNN projection output plus every transformer layer: ``num_hidden_layers + 1`` = 13 for the base model).
The ~50 Hz rows are linearly resampled (`echo.audio.resample_rows`) to exactly one row per 25 fps video frame.
"""

from __future__ import annotations

import numpy as np
import torch

from echo.audio import FPS, SAMPLE_RATE, resample_rows


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
        self.model = Wav2Vec2Model.from_pretrained(model_path).to(device).eval()
        self.device = device
        self.chunk_seconds = chunk_seconds
        self.num_threads = num_threads

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def _encode(self, waveform: np.ndarray) -> torch.Tensor:
        inputs = self.feature_extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        values = inputs.input_values.to(self.device, self.model.dtype)
        output = self.model(values, output_hidden_states=True)
        return torch.stack(output.hidden_states, dim=2)[0].float().cpu()  # N_50Hz, NL, D

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
        num_samples = int(round(num_frames * SAMPLE_RATE / fps))
        waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)[:num_samples]
        waveform = np.pad(waveform, (0, num_samples - len(waveform)))
        chunk = int(self.chunk_seconds * SAMPLE_RATE)
        if num_samples <= chunk:
            rows = self._encode(waveform)
            return resample_rows(rows, num_frames).numpy().astype(np.float16)
        # Long audio: encode overlapping chunks, keep each chunk's centre frames.
        context = SAMPLE_RATE
        frames_per_chunk = int(self.chunk_seconds * fps)
        pieces = []
        for first in range(0, num_frames, frames_per_chunk):
            last = min(num_frames, first + frames_per_chunk)
            lo = int(round(first * SAMPLE_RATE / fps))
            hi = int(round(last * SAMPLE_RATE / fps))
            pad_lo, pad_hi = min(context, lo), min(context, num_samples - hi)
            rows = self._encode(waveform[lo - pad_lo : hi + pad_hi])
            total = (hi + pad_hi) - (lo - pad_lo)
            keep = resample_rows(rows, max(1, int(round(total * fps / SAMPLE_RATE))))
            offset = int(round(pad_lo * fps / SAMPLE_RATE))
            pieces.append(keep[offset : offset + (last - first)])
        return resample_rows(torch.cat(pieces), num_frames).numpy().astype(np.float16)
