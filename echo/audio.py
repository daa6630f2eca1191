"""Audio helpers shared by the generator, the LCU, the dataset, data preparation and the pipeline.

- Per-frame wav2vec2 rows (``T × layers × 768``) have one definition, `audio_frame_features`: 1-s blocks aligned to
  the conversation's frame 0, each encoded with 1 s of audio on either side, so a row reads at most
  ``AUDIO_LOOKAHEAD_FRAMES`` = 49 frames (1.96 s) of audio after its frame. echo-prep writes the rows of the whole
  conversation track, the offline call and the session compute the same rows.
- Both the generator and the LCU read a per-frame *context window* of ``2·radius + 1`` rows centred on each frame
  (Hallo's scheme, radius 2 → L_w = 5), clamped to the rows that exist (`window_indices`): for the avatar, the
  conversation's frames, in training (across clip boundaries) and at inference alike.
- One resampler (`StreamResampler`, `resample_audio`: FFmpeg's swresample) brings every other rate to 16 kHz.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .devices import execution_device

SAMPLE_RATE = 16_000
FPS = 25


def window_indices(first: int, stop: int, radius: int, num_rows: int) -> torch.Tensor:
    """The rows of the context windows of frames ``[first, stop)``: `(stop − first, 2·radius + 1)` int64, row ``t`` of
    the result holds ``t − radius … t + radius`` clamped to ``[0, num_rows − 1]`` (the edge rows repeated). The one
    clamping rule of the avatar's audio windows: ``num_rows`` is the conversation's frame count, in training (the
    dataset reads the neighbouring rows across clip boundaries) and at inference."""
    offsets = torch.arange(-radius, radius + 1)
    return (torch.arange(first, stop)[:, None] + offsets).clamp(0, num_rows - 1)  # T, L_w


def window_features(features: torch.Tensor, radius: int = 2, dim: int = 1) -> torch.Tensor:
    """Per-frame context windows: `(..., T, ...)` → `(..., T, 2·radius + 1, ...)` along ``dim``, edges replicated.

    Row ``t`` of the result holds frames ``t − radius … t + radius`` (clamped to ``[0, T − 1]``, `window_indices`).
    """
    num_frames = features.shape[dim]
    index = window_indices(0, num_frames, radius, num_frames).to(features.device)  # T, L_w
    windows = features.index_select(dim, index.flatten())
    shape = list(features.shape)
    shape[dim : dim + 1] = [num_frames, 2 * radius + 1]
    return windows.reshape(shape)


def resample_rows(features: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Linearly resample `(N, ...)` feature rows to exactly ``num_rows`` rows (e.g. 50 Hz wav2vec2 → 25 fps)."""
    if features.shape[0] == num_rows:
        return features
    flat = features.reshape(features.shape[0], -1).T[None].float()  # 1, C, N
    out = F.interpolate(flat, size=num_rows, mode="linear", align_corners=True)
    return out[0].T.reshape(num_rows, *features.shape[1:]).to(features.dtype)


def frame_rms(waveform: np.ndarray, num_frames: int, sample_rate: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """Short-time RMS energy of a mono waveform, one value per video frame (window = one frame period)."""
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    hop = sample_rate / fps
    rms = np.zeros(num_frames, dtype=np.float32)
    for t in range(num_frames):
        lo, hi = int(round(t * hop)), int(round((t + 1) * hop))
        segment = waveform[lo:hi]
        rms[t] = float(np.sqrt(np.mean(segment**2))) if segment.size else 0.0
    return rms


# ----------------------------------------------------------------------------------------------------------------
# Resampling: one resampler for files, pushed pieces and data preparation
# ----------------------------------------------------------------------------------------------------------------


class StreamResampler:
    r"""Resamples one mono stream from ``rate`` Hz to ``target_rate`` Hz (16 kHz by default), piece by piece: FFmpeg's
    swresample through PyAV, the one resampler of the project (echo-prep's `data_prep.media.load_audio`, files read by
    `echo.media.read_audio`, the pipeline's and the session's waveforms). The filter is stateful and its output
    timing is fixed by the sample index (each piece is stamped with the index of its first sample), so pieces of any
    size give exactly the samples of the whole stream resampled at once (`tests/test_audio_rows.py`); the last few
    samples it holds back come at `flush`. At ``rate == target_rate`` it passes pieces through.

    Args:
        rate (`int`): the stream's sampling rate in Hz.
        target_rate (`int`, defaults to `SAMPLE_RATE`): the rate of the output.
    """

    def __init__(self, rate: int, target_rate: int = SAMPLE_RATE):
        self.rate, self.target_rate = int(rate), int(target_rate)
        self.flushed = False
        self._resampler = None
        self._pts = 0
        if self.rate != self.target_rate:
            import av

            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.target_rate)

    def _run(self, frame) -> np.ndarray:
        pieces = [out.to_ndarray().reshape(-1) for out in self._resampler.resample(frame)]
        return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """The resampled samples of the next piece ``(n,)`` float32 available now (the filter holds back a few)."""
        if self.flushed:
            raise ValueError("The stream's resampler was flushed (end of input): no more samples can follow.")
        waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if self._resampler is None or len(waveform) == 0:
            return waveform
        import fractions

        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform)[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self._pts
        frame.time_base = fractions.Fraction(1, self.rate)
        self._pts += len(waveform)
        return self._run(frame)

    def flush(self) -> np.ndarray:
        """The samples the filter still holds (end of the stream; at the target rate there are none, and pieces may
        follow)."""
        if self.flushed or self._resampler is None:
            return np.zeros(0, np.float32)
        self.flushed = True
        return self._run(None)


def resample_audio(waveform: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A whole mono waveform from ``rate`` to ``target_rate`` Hz with `StreamResampler` (the same samples as the
    stream fed in pieces): `(N,)` → `(≈ N · target_rate / rate,)` float32."""
    resampler = StreamResampler(rate, target_rate)
    return np.concatenate([resampler(waveform), resampler.flush()])


# ----------------------------------------------------------------------------------------------------------------
# Per-frame wav2vec2 rows: the one definition
# ----------------------------------------------------------------------------------------------------------------

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples of 16 kHz audio per 25 fps frame
AUDIO_BLOCK_FRAMES = 25  # frames per wav2vec2 block (1 s), blocks aligned to frame 0 of the conversation
AUDIO_CONTEXT_FRAMES = 25  # audio on each side of a block (1 s)
AUDIO_LOOKAHEAD_FRAMES = AUDIO_BLOCK_FRAMES - 1 + AUDIO_CONTEXT_FRAMES  # 49 frames = 1.96 s: the most a row reads ahead


@torch.no_grad()
def _encode_span(model, feature_extractor, samples: np.ndarray, num_frames: int) -> torch.Tensor:
    """wav2vec2 of one span of 16 kHz audio, every hidden state stacked, ~50 Hz rows linearly resampled to exactly
    ``num_frames`` rows: `(num_frames, num_hidden_layers + 1, hidden_size)` float32 on the CPU."""
    inputs = feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    values = inputs.input_values.to(execution_device(model), model.dtype)
    hidden_states = model(values, output_hidden_states=True).hidden_states
    return resample_rows(torch.stack(hidden_states, dim=2)[0].float().cpu(), num_frames)  # T, NL, D


def audio_frame_features(
    model,
    feature_extractor,
    waveform: np.ndarray,
    first: int,
    stop: int,
    waveform_offset: int = 0,
) -> torch.Tensor:
    r"""The per-video-frame wav2vec2 rows of frames ``[first, stop)`` of an audio track: the one definition that
    echo-prep (`data_prep.audio_features`), the dataset (which reads echo-prep's rows), the offline call and the
    session (`pipelines.session`) all use, so training and inference see the same rows.

    The track is cut into blocks of ``AUDIO_BLOCK_FRAMES`` = 25 frames aligned to its frame 0 (the conversation's
    start). Block ``b`` (frames ``25b … 25b + 24``) is encoded from the audio of frames ``max(0, 25b − 25) … 25b + 49``
    (``AUDIO_CONTEXT_FRAMES`` = 25 frames on each side; silence past the waveform's end): every hidden state is kept
    (the CNN projection output plus each transformer layer, ``num_hidden_layers + 1``) and the ~50 Hz rows of the span
    are linearly resampled to one row per 25 fps frame (`resample_rows`), of which the block keeps its own 25. So the
    row of frame ``t`` depends on the audio up to the end of frame ``25⌊t/25⌋ + 49``: at most
    ``AUDIO_LOOKAHEAD_FRAMES`` = 49 frames (1.96 s) after frame ``t``, never further, and it is the same whatever part
    of the track is encoded and however the waveform arrived (whole or in pieces).

    Args:
        model (`transformers.Wav2Vec2Model`), feature_extractor (`transformers.Wav2Vec2FeatureExtractor`).
        waveform (`np.ndarray` of shape `(N,)`): the track's float audio at 16 kHz, from sample ``waveform_offset``
            on; samples after its end are silence.
        first (`int`), stop (`int`): the frames to encode, ``0 ≤ first ≤ stop``.
        waveform_offset (`int`, defaults to 0): the track's sample index of ``waveform[0]`` (a stream that dropped
            its oldest samples); at most the first sample the context of frame ``first`` reads.

    Returns:
        `torch.Tensor` of shape `(stop − first, num_hidden_layers + 1, hidden_size)`, float32 on the CPU.
    """
    if not 0 <= first <= stop:
        raise ValueError(f"frames [{first}, {stop}) are not a range of a track (expected 0 ≤ first ≤ stop).")
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    block, context = AUDIO_BLOCK_FRAMES, AUDIO_CONTEXT_FRAMES
    rows = []
    for begin in range(first // block * block, stop, block):
        low, high = max(0, begin - context), begin + block + context
        if waveform_offset > low * SAMPLES_PER_FRAME:
            raise ValueError(f"`waveform` starts at sample {waveform_offset}, after the context of frame {begin}.")
        span = np.zeros((high - low) * SAMPLES_PER_FRAME, dtype=np.float32)
        given = waveform[max(0, low * SAMPLES_PER_FRAME - waveform_offset) : high * SAMPLES_PER_FRAME - waveform_offset]
        span[: len(given)] = given
        encoded = _encode_span(model, feature_extractor, span, high - low)  # high − low, NL, D
        rows.append(encoded[max(first, begin) - low : min(stop, begin + block) - low])
    if not rows:
        return torch.zeros(0, model.config.num_hidden_layers + 1, model.config.hidden_size)
    return torch.cat(rows)  # stop − first, NL, D


def audio_track_features(model, feature_extractor, waveform: np.ndarray, num_frames: int) -> torch.Tensor:
    """The rows of frames ``[0, num_frames)`` of a whole track (`audio_frame_features` from frame 0): audio shorter
    than ``num_frames / 25`` s is silence after its end, and audio after frame ``num_frames − 1`` is read only as the
    look-ahead of the last rows.

    Returns:
        `torch.Tensor` of shape `(num_frames, num_hidden_layers + 1, hidden_size)`, float32 on the CPU.
    """
    return audio_frame_features(model, feature_extractor, waveform, 0, num_frames)


def final_rows(num_samples: int) -> int:
    """How many leading rows of a track are final (`audio_frame_features` gives them whatever audio follows) once its
    first ``num_samples`` samples at 16 kHz are known: the blocks whose right context has arrived."""
    blocks = (num_samples // SAMPLES_PER_FRAME - AUDIO_CONTEXT_FRAMES) // AUDIO_BLOCK_FRAMES
    return max(0, blocks) * AUDIO_BLOCK_FRAMES
