# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""`EchoSession`: interactive rendering on an `EchoPipeline`'s weights, fed a conversation as it happens.

```python
session = pipe.start_session(reference_image=image, generator=torch.Generator().manual_seed(0))
while conversation_goes_on:
    session.push(user_audio=mic_piece, user_video=camera_frames, avatar_audio=tts_piece)  # any lengths, buffered
    for chunk in session:  # every chunk whose inputs are complete, rendered now
        show(chunk.frames)  # the chunk's new frames, in order
session.close()  # end of input: the rest is rendered (streams padded as the offline call pads them)
for chunk in session:
    show(chunk.frames)
```

The offline `EchoPipeline.__call__` is such a session fed everything at once, so the two cannot drift: a session fed
the same conversation in pieces of any size yields exactly the frames of the offline call with the same generator.

Division of work: the session buffers what arrives and knows what is ready (`push` / `pull` / `close`, the audio and
user rows, the LCU's carried state); for each ready chunk it asks the pipeline to render it (`EchoPipeline.render_chunk`,
the one denoising loop, which calls back `EchoSession._chunk_inputs` for the chunk's inputs). It is built from the
resolved settings and one [`~pipelines.inputs.RenderOptions`] (`EchoPipeline.start_session` checks both once), and
uses only the pipeline's public methods and components.

How a chunk is computed (the decisions behind "exactly" and "constant cost per chunk"):

- **Chunks.** The chunk schedule is the offline one (`echo.chunks.chunk_schedule`): chunk ``c`` covers frames ``[start, stop)``,
  ``N`` frames overlapping the previous chunk by ``motion_frames``. A chunk is rendered once its inputs are complete:
  the user's frames and audio rows ``0 … stop − 1``, the avatar's audio rows up to ``stop + radius − 1`` (its audio
  windows look ``radius = audio_window // 2`` frames ahead), or when the session is closed. All work (audio
  encoding, user video tokens, LCU, denoising, decoding) happens on chunk boundaries, never on push boundaries, which
  is why the piece sizes cannot change the result.
- **User history (LCU, Eq. 5-9).** The user's whole history from frame 0 (``settings.max_history_frames = None``,
  what every shipped model is trained with): the LCU's Mamba state is carried from chunk to chunk
  (`echo.lcu.LCUState`), saved at ``stop − max(radius, motion_frames)`` (the audio windows of the history's last
  frames are not final, and the next clip starts ``motion_frames`` before ``stop``). Each call still receives the
  full history (views, no copy; the form training gives it, so both build identical inputs), but reads only the
  frames after the state, re-running the open 16-frame scan block: the result is bit-identical to the full-history
  forward the model was trained with (PyTorch path; up to float rounding on the mamba-ssm kernel path, see
  `echo.lcu`). A chunk's LCU encodes at most ``15 + max(radius, motion_frames) + (N − motion_frames) + radius``
  frames whatever the conversation's length (51 with 33-frame chunks, one motion frame, radius 2;
  `benchmarks/streaming.py`).
  A model trained with a cap (``settings.max_history_frames = W``) is served with the cap's exact semantics: every
  chunk's LCU runs on the last ``W`` frames, without a state. A state cannot be made to forget frames exactly (the
  K stacked Mamba layers: a layer's inputs inside the window depend, through the layer below, on the frames before
  it), so a capped model's cost per chunk is bounded by ``W`` frames (constant once the history is longer than ``W``,
  but ``W`` frames rather than ~``N``), and the session logs a warning saying so. The per-frame inputs of the whole
  conversation stay in CPU memory for the views (float32 wav2vec2 rows: ``NL · 768 · 4`` bytes per frame, ~3.6 GB
  per hour for wav2vec2-base).
- **Reasoning frames (understanding and emotion).** One rule with the training windows
  (`echo.clip_format.reasoning_frame`): a chunk ending at frame ``stop − 1`` reads what was reasoned at its reasoning
  frame ``r``, the latest ``k·stride − 1 ≤ stop − 1`` (strides ``settings.understanding_stride`` /
  ``settings.emotion_stride``, saved with the model from the caches it was trained on); before the first, no
  understanding tokens and ``settings.default_emotion``. Results are cached per reasoning frame, so a chunk ending
  between two reasoning frames reuses the older one, exactly as a training window does.
- **Understanding (HBCU, Eq. 8).** Φ of the user's media from the conversation's start up to ``r`` inclusive
  (``understanding_model(frames[:r + 1], audio[:(r + 1)·640])``, what echo-prep's ``omni`` stage caches), or
  precomputed tokens. Φ's own limits (``OmniUnderstanding.max_frames`` evenly spaced frames, ``max_audio_seconds``)
  bound its cost per call; its inputs, the user's frames and audio since the start, are kept only when an
  ``understanding_model`` is given.
- **Emotion (LAU, Eq. 3).** The reasoner over the dialogue pushed so far, cut at ``r`` (`echo.emotion.reason_emotion`,
  what echo-prep's ``emotion`` stage writes); ``default_emotion`` while nothing was said. A dialogue segment that
  starts before the end of an already rendered chunk arrives too late to have been seen by that chunk: an error,
  since an offline render would have used it.
- **Audio features.** wav2vec2 attends over its whole input, so a row depends on the audio after it. The rows have
  one definition, `echo.audio.audio_frame_features` (the one echo-prep writes and the offline call computes): 1-s
  blocks aligned to frame 0, each encoded with 1 s of audio on either side, so the row of frame ``t`` reads at most
  ``AUDIO_LOOKAHEAD_FRAMES`` = 49 frames (1.96 s) of audio after it. A block is encoded once its right context has
  arrived (`echo.audio.final_rows`): a chunk ``[start, stop)`` renders once the audio up to frame
  ``25⌊(stop + radius − 1)/25⌋ + 49`` is in, 27 to 51 frames (1.08 s to 2.04 s) after its last frame, plus the
  compute. The avatar windows of frames ``start … stop − 1`` read rows ``t ± radius`` clamped to the conversation's
  frames ``0 … num_frames − 1`` (`echo.audio.window_indices`, as the dataset does). Precomputed rows
  (``*_audio_features``, e.g. a
  prepared clip's ``*_w2v.npy``) bypass both.
- **Inputs.** Every pushed piece is checked and converted by `pipelines.inputs` (the accepted forms of images, frames
  and waveforms) before any buffer changes. A waveform at another rate than 16 kHz (``sampling_rate``, per session or
  per push; fixed per stream by its first piece) is resampled as it arrives by a stateful resampler, so pieces give
  exactly the samples of the whole; its last samples come at `close`.
- **Framing.** With ``frame_inputs=True`` (the default) the reference photo and the user's frames are framed as
  echo-prep frames the training crops (`echo.framing`: face detection, tracking, a causal exponential smoothing of the
  box, a square of 1.8× the face box, cropped at ``settings.resolution``, the size the model was trained at). The
  framing has no look-ahead, so each pushed user piece is framed when it is pushed, its state carried to the next
  piece: pieces of any size give the crops of the whole video, and of echo-prep's framing of it. Landmarks given with
  raw inputs are mapped into the crops. ``frame_inputs=False`` takes inputs that already are head crops as they are.
- **Reference image tokens (I2V bases).** A transformer with ``image_dim`` (Wan2.1-I2V) reads the reference's CLIP
  tokens (`EchoPipeline.encode_image`, encoded once per session) in every guidance pass, the unconditional one too, as
  diffusers' `WanImageToVideoPipeline` does.
- **Caches.** Every guidance pass runs inside ``transformer.cache_context(name)``, one name per pass (``"uncond"``,
  ``"audio"``, ``"full"``), with the step's index and σ where the installed diffusers takes them, as diffusers' Wan
  pipelines do, so a cache enabled with
  ``transformer.enable_cache(...)`` (First Block Cache, FasterCache, ...) keeps one state per pass; the states are reset
  at the start of every chunk, a new denoising trajectory.
- **Latents.** ``output_type="latent"`` gives each chunk's denoised latents (normalised, as the transformer predicts
  them; all its latent frames, a continuation chunk's regenerated motion frames included) instead of frames. The
  chunk is decoded all the same: the next chunk is conditioned on its decoded last frames.
- **Timing.** Each chunk records when its last input arrived (the `push` or `close` that completed it), when its
  rendering started and when its frames were ready, so a live caller (``echo-live``) can report latency and the
  real-time factor. `push` only buffers and may run in another thread than `pull`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from echo.audio import (
    AUDIO_BLOCK_FRAMES,
    AUDIO_CONTEXT_FRAMES,
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    StreamResampler,
    final_rows,
    window_indices,
)
from echo.chunks import chunk_range, num_chunks
from echo.clip_format import reasoning_frame
from echo.emotion import reason_emotion
from echo.framing import FaceFramer, FramingState, source_to_crop
from echo.settings import EchoSettings

from . import inputs as accepted
from .chunk_inputs import ChunkInputs, RenderContext
from .inputs import MediaPiece, RenderOptions, missing_understanding_message

logger = logging.get_logger(__name__)


class _Rows:
    """A growing `(T, ...)` CPU tensor with amortised O(1) appends; rows before `offset` may be dropped (memory)."""

    def __init__(self):
        self.data: torch.Tensor | None = None
        self.offset = 0  # global index of data[0]
        self.end = 0  # global index after the last row

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        used = self.end - self.offset
        if self.data is None or used + rows.shape[0] > self.data.shape[0]:
            capacity = max(2 * (used + rows.shape[0]), 16)
            data = rows.new_empty((capacity, *rows.shape[1:]))
            if self.data is not None:
                data[:used] = self.data[:used]
            self.data = data
        self.data[used : used + rows.shape[0]] = rows
        self.end += rows.shape[0]

    def view(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (global indices), a view."""
        assert self.offset <= start <= stop <= self.end, (self.offset, start, stop, self.end)
        return self.data[start - self.offset : stop - self.offset]

    def drop_before(self, index: int) -> None:
        """Forget the rows before ``index`` (reallocates when that frees at least half of the buffer)."""
        index = min(index, self.end)
        if self.data is None or index - self.offset < self.data.shape[0] // 2:
            return
        kept = self.data[index - self.offset : self.end - self.offset].clone()
        self.data, self.offset = None, index
        self.end = index
        self.append(kept)

    def __len__(self) -> int:
        return self.end


class _AudioStream:
    """One speaker's audio: a waveform (encoded to wav2vec2 rows on demand) and/or precomputed per-frame rows."""

    def __init__(self, name: str, feature_shape: tuple):
        self.name = name
        self.feature_shape = feature_shape  # (NL, D) of the audio encoder
        self.samples = _Rows()  # float32 waveform at 16 kHz
        self.rows = _Rows()  # float32 (T, NL, D): pushed features, or encoded from the waveform
        self.given_features = False
        self.pushed_waveform = False
        self.resampler: StreamResampler | None = None  # fixed by the first waveform piece's rate

    def check_rate(self, rate: int) -> None:
        """Every piece of a stream has the rate of the first (the resampler's state runs across pieces)."""
        if self.resampler is not None and rate != self.resampler.rate:
            raise ValueError(
                f"`{self.name}` piece at `sampling_rate` = {rate} Hz after pieces at {self.resampler.rate} Hz: every "
                "piece of a stream has the same rate."
            )
        if self.resampler is not None and self.resampler.flushed:
            raise ValueError(f"`{self.name}` was pushed after `close()` ended the stream (its resampler is flushed).")

    def push_waveform(self, waveform: np.ndarray, rate: int) -> None:
        """Appends a piece at ``rate`` Hz (checked by `check_rate`), resampled to 16 kHz as it arrives."""
        if self.resampler is None:
            self.resampler = StreamResampler(rate)
        waveform = self.resampler(waveform)
        self.samples.append(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)))
        self.pushed_waveform = True

    def end(self) -> None:
        """End of input: the samples the resampler still holds."""
        if self.resampler is not None:
            self.samples.append(torch.from_numpy(self.resampler.flush()))

    def check_features(self, features, argument: str) -> torch.Tensor:
        """Per-frame rows as float32 CPU `(n, NL, D)` (a copy), or a `ValueError` naming ``argument``."""
        return accepted.check_features(features, argument, self.feature_shape)

    def check_can_take_features(self, argument: str) -> None:
        if not self.given_features and len(self.rows):
            raise ValueError(f"`{argument}` was pushed after `{self.name}` waveforms were encoded: push one form.")

    def push_features(self, features: torch.Tensor) -> None:
        self.given_features = True
        self.rows.append(features)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def rows_final(self, closed: bool) -> int | float:
        """How many rows can be computed now and will not change (``inf`` once the stream is closed)."""
        if self.given_features:
            return len(self.rows)
        if closed:
            return math.inf
        return final_rows(self.num_samples)

    def waveform(self, stop: int | None = None) -> np.ndarray:
        """The samples kept (from ``samples.offset``, 0 unless released) up to ``stop``, a view."""
        end = len(self.samples) if stop is None else min(stop, len(self.samples))
        if self.samples.data is None or end <= self.samples.offset:
            return np.zeros(0, dtype=np.float32)
        return self.samples.view(self.samples.offset, end).numpy()

    def encode(self, stop: int, pipe: DiffusionPipeline) -> torch.Tensor:
        """Rows ``[0, stop)``, a view; encodes the blocks that are missing (`echo.audio.audio_frame_features`)."""
        if self.given_features:
            if len(self.rows) < stop:
                raise ValueError(
                    f"`{self.name}_features` has {len(self.rows)} rows, expected at least {stop}: the chunks cover "
                    f"frames 0 … {stop - 1}."
                )
            return self.rows.view(0, stop)
        if not self.pushed_waveform:
            raise ValueError(f"No `{self.name}` was pushed: a mono waveform or `{self.name}_features`.")
        if len(self.rows) < stop:
            # whole blocks (final once rows_final ≥ stop), so that no block is encoded twice
            end = -(-stop // AUDIO_BLOCK_FRAMES) * AUDIO_BLOCK_FRAMES
            rows = pipe.encode_audio_rows(self.waveform(), len(self.rows), end, waveform_offset=self.samples.offset)
            self.rows.append(rows)
        return self.rows.view(0, stop)

    def release(self, keep_waveform: bool) -> None:
        """Drops waveform samples no block needs any more (unless ``keep_waveform``)."""
        if keep_waveform or self.given_features:
            return
        # the next block's left context starts AUDIO_CONTEXT_FRAMES before its first frame, len(rows) at most
        self.samples.drop_before(max(0, len(self.rows) - AUDIO_CONTEXT_FRAMES) * SAMPLES_PER_FRAME)


@dataclass
class SessionChunk:
    r"""One rendered chunk of a session.

    Args:
        index (`int`): the chunk's index in the schedule.
        first_frame (`int`): index, in the conversation, of the first frame of ``frames``.
        frames (`np.ndarray`, `torch.Tensor`, `list[PIL.Image.Image]` or `None`): the chunk's new frames (a
            continuation chunk's regenerated motion frames dropped, the last chunk cut at ``num_frames``):
            `(n, H, W, 3)` in [0, 1] (``"np"``), `(n, 3, H, W)` in [0, 1] (``"pt"``), PIL images (``"pil"``), the
            chunk's ``latents[0]`` (``"latent"``), or `None` for ``output_type=None``.
        video (`torch.Tensor` of shape `(1, 3, n, H, W)`): the same frames in [−1, 1], as decoded.
        latents (`torch.Tensor` of shape `(1, z_dim, F, H / 8, W / 8)`): the chunk's denoised latents, normalised as
            the transformer predicts them, all its ``F`` latent frames; ``EchoPipeline.decode_latents(latents)`` gives
            all its ``num_frames_per_chunk`` frames, of which a continuation chunk's ``video`` drops the first
            ``motion_frames``.
        inputs_complete_at (`float`): `time.perf_counter()` when the chunk's last input arrived.
        started_at (`float`), finished_at (`float`): when its rendering started and its frames were ready.
    """

    index: int
    first_frame: int
    frames: Any
    video: torch.Tensor
    latents: torch.Tensor
    inputs_complete_at: float
    started_at: float
    finished_at: float

    @property
    def latency(self) -> float:
        """Seconds from the arrival of the chunk's last input to its first output frame."""
        return self.finished_at - self.inputs_complete_at

    @property
    def compute_seconds(self) -> float:
        return self.finished_at - self.started_at

    @property
    def num_frames(self) -> int:
        return self.video.shape[2]


@dataclass
class _UserHistory:
    """The user's per-frame LCU inputs since the conversation's start (CPU) and the raw frames not yet encoded."""

    frames: _Rows = field(default_factory=_Rows)  # uint8 (T, H, W, 3)
    landmarks: _Rows = field(default_factory=_Rows)  # float32 (T, 478, 2)
    tokens: _Rows = field(default_factory=_Rows)  # (T, C_v, h_v, w_v)
    token_mask: _Rows = field(default_factory=_Rows)  # (T, h_v, w_v)
    frame_size: tuple[int, int] | None = None
    with_landmarks: bool | None = None


class EchoSession:
    r"""A streaming render of one conversation; created by [`EchoPipeline.start_session`] (see the module docstring).

    Inputs are pushed with `push` in pieces of any length, and `close` marks their end. `pull` (or iterating the
    session) renders every chunk whose inputs are complete and returns it as a [`SessionChunk`].
    """

    def __init__(self, pipe: DiffusionPipeline, settings: EchoSettings, options: RenderOptions):
        r"""
        Args:
            pipe ([`EchoPipeline`]): renders each chunk (`EchoPipeline.render_chunk`) and encodes the session's media
                (`encode_audio_rows`, `encode_user_frames`, its ``context_encoder``).
            settings ([`~echo.settings.EchoSettings`]): resolved by `EchoPipeline.resolve_settings`.
            options ([`~pipelines.inputs.RenderOptions`]): checked by `EchoPipeline.check_inputs`.
        """
        self.pipe, self.settings, self.options = pipe, settings, options
        self.progress_bar = None  # an optional tqdm bar updated once per denoising step (the offline call's)

        # 1. What every chunk shares: the framed reference, its SDCM masks, the prompt encoder (`prepare_render`)
        self.context: RenderContext = pipe.prepare_render(settings, options)
        self.num_frames_per_chunk, self.motion_frames = settings.num_frames_per_chunk, settings.motion_frames

        # 2. Buffers
        self.avatar_audio = _AudioStream("avatar_audio", feature_shape=self.context.feature_shape)
        self.user_audio = _AudioStream("user_audio", feature_shape=self.context.feature_shape)
        self.user = _UserHistory()
        self.dialogue: list[dict] = []
        self.with_user = options.with_user
        required = pipe.context_encoder.required_inputs if self.with_user else ()
        self.needs_user_video = "user_video" in required
        self.needs_understanding = "understanding" in required
        self.keeps_user_media = (
            self.needs_understanding and options.understanding_model is not None and options.understanding is None
        )
        # The user's frames are framed as they are pushed (causal: no look-ahead), when something reads them
        reads_frames = self.needs_user_video or self.keeps_user_media
        self.user_framer = FaceFramer() if options.frame_inputs and reads_frames else None
        self.user_framing = FramingState()
        self.warned_sampling_rate = False
        self.warned_landmarks = False  # user landmarks pushed to a model that does not read the user's video
        if self.with_user and settings.max_history_frames is not None:
            cap = settings.max_history_frames
            logger.warning(
                f"This model was trained with `max_history_frames={cap}`: every chunk's LCU encodes the last {cap} "
                f"frames of the user's history anew (exactly as trained; a carried Mamba state cannot forget frames), "
                f"so its cost per chunk grows with the conversation up to {cap} frames instead of staying at about "
                f"one chunk's frames. A model trained on the whole history (`max_history_frames: null`, the shipped "
                "configs) carries the state at a constant cost per chunk (docs/inference.md)."
            )

        # 3. Progress
        self.num_frames = options.num_frames  # known at the start, or at `close` from the avatar's audio
        self.num_chunks = None if self.num_frames is None else self._count_chunks(self.num_frames)
        self.closed = False
        self.next_chunk = 0
        self.ready_times: dict[int, float] = {}
        self.lcu_state = None
        self.previous_video = None
        self.last_rendered_stop = 0
        self._reasoned_at: dict[str, tuple[int, Any]] = {}  # kind → (reasoning frame, its result)
        self._condition = threading.Condition()
        if self.num_chunks is not None:
            self._check_per_chunk_lists(self.num_chunks)

    # ------------------------------------------------------------------------------------------------------------
    # Input
    # ------------------------------------------------------------------------------------------------------------

    def push(
        self,
        user_audio: np.ndarray | torch.Tensor | None = None,
        user_video: np.ndarray | torch.Tensor | list | None = None,
        avatar_audio: np.ndarray | torch.Tensor | None = None,
        user_audio_features: np.ndarray | torch.Tensor | None = None,
        avatar_audio_features: np.ndarray | torch.Tensor | None = None,
        user_landmarks: np.ndarray | None = None,
        dialogue: list[dict] | None = None,
        sampling_rate: int | None = None,
        fps: float | None = None,
    ) -> None:
        r"""
        Appends the next pieces of the conversation's streams (each stream continues where its last piece ended; the
        pieces of different streams need not be aligned). Only buffers: the work happens in `pull`.

        Args:
            user_audio (`np.ndarray` or `torch.Tensor` of shape `(num_samples,)`, *optional*): the user's speech,
                mono, float in [−1, 1] or int16 / int32 PCM, at ``sampling_rate`` (`pipelines.inputs`).
            user_video (`np.ndarray` `(n, H_u, W_u, 3)`, `torch.Tensor` `(n, 3, H_u, W_u)` or a list of images,
                *optional*): the user's next frames at 25 fps (the size of the first piece for all pieces), in the
                forms `pipelines.inputs` accepts (uint8 or [0, 1] float arrays, [−1, 1] float tensors, PIL images);
                framed to head crops as they arrive unless the session was started with ``frame_inputs=False``.
            avatar_audio (`np.ndarray` or `torch.Tensor` of shape `(num_samples,)`, *optional*): the avatar's speech,
                as ``user_audio`` (silence where it listens).
            user_audio_features (`np.ndarray` or `torch.Tensor` of shape `(n, NL, D)`, *optional*),
            avatar_audio_features (`np.ndarray` or `torch.Tensor` of shape `(n, NL, D)`, *optional*): per-frame
                wav2vec2 rows used instead of encoding the waveform (a waveform may still be pushed: the avatar's sets
                the conversation's length, the user's feeds the ``understanding_model``).
            user_landmarks (`np.ndarray` of shape `(n, 478, 2)`, *optional*): face-mesh points of the ``user_video``
                piece (pixels of its frames as pushed, mapped into the crops when framing); with every video piece or
                with none (MediaPipe then detects them on the crops).
            dialogue (`list[dict]`, *optional*): new transcript segments ``{"speaker", "start", "end", "text"}``
                (seconds) for the emotion reasoner.
            sampling_rate (`int`, *optional*): the rate of the audio pieces in Hz, defaults to the session's
                (``start_session(sampling_rate=...)``, 16000 by default); other rates than 16 kHz are resampled as they
                arrive. Every piece of a stream has the rate of its first piece.
            fps (`float`, *optional*): the rate of the video piece; only 25 is accepted.
        """
        self.push_piece(
            accepted.check_media_piece(
                self.context.feature_shape,
                user_audio=user_audio,
                user_video=user_video,
                avatar_audio=avatar_audio,
                user_audio_features=user_audio_features,
                avatar_audio_features=avatar_audio_features,
                user_landmarks=user_landmarks,
                dialogue=dialogue,
                sampling_rate=sampling_rate,
                fps=fps,
            )
        )

    def push_piece(self, piece: MediaPiece) -> None:
        r"""`push` of a piece already checked and converted by `pipelines.inputs.check_media_piece` (what
        `EchoPipeline.__call__` feeds its session with): the checks that depend on the session's state, then the
        buffers. A refused piece changes nothing."""
        rate = self._sampling_rate(piece)
        user_given = piece.user_streams
        if user_given and not self.with_user:
            raise ValueError(
                f"{user_given} pushed to a session without the user branch (`with_user=False`, or no context encoder)."
            )
        # 1. The checks that depend on what was pushed before, and the framing, before changing any buffer
        frames, landmarks, framing = piece.user_video, None, None
        if frames is not None:
            size = self.user.frame_size or frames.shape[1:3]
            if frames.shape[1:3] != size:
                raise ValueError(
                    f"`user_video` frames are {frames.shape[1]}x{frames.shape[2]}, the earlier pieces' "
                    f"{size[0]}x{size[1]}: every piece of a stream has the same size."
                )
            if self.needs_user_video:
                landmarks = piece.user_landmarks
                if self.user.with_landmarks is not None and (landmarks is not None) != self.user.with_landmarks:
                    raise ValueError(
                        "`user_landmarks` must come with every `user_video` piece or with none (then detected)."
                    )
            elif piece.user_landmarks is not None and not self.warned_landmarks:  # once per session
                self.warned_landmarks = True
                accepted.warn_ignored_arguments(
                    use_emotion=True,
                    context_inputs=frozenset(self.pipe.context_encoder.required_inputs),
                    with_user=self.with_user,
                    user_landmarks=piece.user_landmarks,
                )
        segments = self._check_late_dialogue(piece.dialogue)
        if frames is not None and self.user_framer is not None:  # framed now, causally (module docstring)
            crop_size = self.settings.resolution
            frames, boxes, framing = self.user_framer.frame(frames, crop_size, self.user_framing)
            # n, S, S, 3 uint8 crops; n, 4 boxes; the state after them
            if landmarks is not None:  # pixels of each raw frame → pixels of its crop
                landmarks = source_to_crop(landmarks, boxes[:, None], crop_size)

        # 2. Buffer (every check first, so a rejected push changes nothing)
        with self._condition:
            if self.closed or self.done:
                raise ValueError(
                    "The session is closed: inputs pushed after `close()` (or after the last chunk) come too late."
                )
            if piece.avatar_audio_features is not None:
                self.avatar_audio.check_can_take_features("avatar_audio_features")
            if piece.user_audio_features is not None:
                self.user_audio.check_can_take_features("user_audio_features")
            if piece.avatar_audio is not None:
                self.avatar_audio.check_rate(rate)
            if piece.user_audio is not None:
                self.user_audio.check_rate(rate)
            if piece.avatar_audio is not None:
                self.avatar_audio.push_waveform(piece.avatar_audio, rate)
            if piece.avatar_audio_features is not None:
                self.avatar_audio.push_features(piece.avatar_audio_features)
            if piece.user_audio is not None:
                self.user_audio.push_waveform(piece.user_audio, rate)
            if piece.user_audio_features is not None:
                self.user_audio.push_features(piece.user_audio_features)
            if frames is not None:
                self.user.frame_size = piece.user_video.shape[1:3]
                self.user_framing = framing or self.user_framing
                self.user.frames.append(torch.from_numpy(np.ascontiguousarray(frames)))
                if self.needs_user_video:
                    self.user.with_landmarks = landmarks is not None
                    if landmarks is not None:
                        self.user.landmarks.append(torch.from_numpy(landmarks))
            self.dialogue.extend(segments)
            self._stamp_ready()

    def _sampling_rate(self, piece: MediaPiece) -> int:
        """The rate of the piece's waveforms: its own, the session's, or 16 kHz with a warning (once) when neither
        states one, as transformers' feature extractors warn about an unstated ``sampling_rate``."""
        rate = piece.sampling_rate if piece.sampling_rate is not None else self.options.sampling_rate
        has_waveform = piece.avatar_audio is not None or piece.user_audio is not None
        if rate is None and has_waveform and not self.warned_sampling_rate:
            self.warned_sampling_rate = True
            logger.warning(
                f"No `sampling_rate` was given with the audio: it is taken to be {SAMPLE_RATE} Hz, the model's rate. "
                "Pass `sampling_rate=` (e.g. 44100) with audio at another rate, which is then resampled; audio at "
                "another rate read as 16 kHz gives a wrong length and wrong lips."
            )
        return SAMPLE_RATE if rate is None else rate

    def close(self, num_frames: int | None = None) -> None:
        r"""Marks the end of input. The conversation has ``num_frames`` frames (the one given to `start_session`, or
        the avatar audio's duration); the streams are padded past their ends as the offline call pads them (silence,
        the user's last frame). A refused call changes nothing, except that audio streams at another rate than 16 kHz
        end at the first call (their resampler's last samples), so no waveform can follow them."""
        if num_frames is not None:
            num_frames = accepted.check_int(num_frames, "num_frames")
        with self._condition:
            if self.closed:
                if num_frames is not None and num_frames != self.num_frames:
                    raise ValueError(
                        f"`close(num_frames={num_frames})` after the session was closed with {self.num_frames} "
                        "frames: the length is fixed at the first `close()`."
                    )
                return
            self.avatar_audio.end()
            self.user_audio.end()
            if num_frames is None:
                num_frames = self.num_frames
            if num_frames is None:
                if self.avatar_audio.pushed_waveform:
                    if self.avatar_audio.num_samples == 0:
                        raise ValueError(
                            "`avatar_audio` is empty (0 samples) and no `num_frames` was given: the conversation's "
                            "length is unknown. Push the avatar's waveform (silence where it listens)."
                        )
                    num_frames = max(1, int(round(self.avatar_audio.num_samples * FPS / SAMPLE_RATE)))
                elif self.avatar_audio.given_features:
                    num_frames = len(self.avatar_audio.rows)
                else:
                    raise ValueError("`close()` without any `avatar_audio`: the conversation's length is unknown.")
            count = self._count_chunks(num_frames)
            if self.next_chunk > count:
                raise ValueError(
                    f"`num_frames` = {num_frames} ends before the {self.next_chunk} chunks already rendered."
                )
            self._check_per_chunk_lists(count)
            total = self.chunk_range(count - 1)[1]
            for stream, argument in (
                (self.avatar_audio, "avatar_audio_features"),
                (self.user_audio, "user_audio_features"),
            ):
                if (
                    stream.given_features
                    and len(stream.rows) < total
                    and (stream is self.avatar_audio or self.with_user)
                ):
                    raise ValueError(
                        f"`{argument}` has {len(stream.rows)} rows, expected (T, NL, D) per-frame wav2vec2 rows with "
                        f"T >= {total} (the chunks cover frames 0 … {total - 1})."
                    )
            if self.with_user and len(self.user.frames) == 0:
                raise ValueError("`close()` without any `user_video` frame in a session with the user branch.")
            self.num_frames, self.num_chunks, self.closed = num_frames, count, True
            self._stamp_ready()
            self._condition.notify_all()

    def _check_late_dialogue(self, segments: list[dict]) -> list[dict]:
        """Refuses a transcript segment that starts in an already rendered chunk (an offline render would have read
        it); the segments' form is checked by `pipelines.inputs.check_dialogue`."""
        if self.options.emotion_reasoner is not None:
            for segment in segments:
                if float(segment["start"]) < self.last_rendered_stop / FPS:
                    raise ValueError(
                        f"`dialogue` segment starting at {float(segment['start']):.2f} s arrived late: the chunks up "
                        f"to {self.last_rendered_stop / FPS:.2f} s are rendered, and their emotion was reasoned "
                        "without it. Push transcript segments before the media of the chunk they start in."
                    )
        return segments

    def _count_chunks(self, num_frames: int) -> int:
        """How many chunks cover ``num_frames`` (`echo.chunks`), without building the schedule."""
        return num_chunks(num_frames, self.num_frames_per_chunk, self.motion_frames)

    def _check_per_chunk_lists(self, num_chunks: int) -> None:
        emotion, understanding = self.options.emotion, self.options.understanding
        if isinstance(emotion, list) and len(emotion) != num_chunks:
            raise ValueError(f"`emotion` is a list of {len(emotion)} texts, expected one per chunk ({num_chunks}).")
        if isinstance(understanding, list) and len(understanding) != num_chunks:
            raise ValueError(
                f"`understanding` is a list of {len(understanding)} tensors, expected one per chunk ({num_chunks})."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Readiness
    # ------------------------------------------------------------------------------------------------------------

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Frames ``[start, stop)`` of chunk ``index`` (`echo.chunks.chunk_range`; the schedule continues while the
        length is unknown)."""
        return chunk_range(index, self.num_frames_per_chunk, self.motion_frames)

    @property
    def total_frames(self) -> int | None:
        """Frames the chunks cover (the last chunk's end), once the length is known."""
        return None if self.num_chunks is None else self.chunk_range(self.num_chunks - 1)[1]

    @property
    def done(self) -> bool:
        """Every chunk is rendered."""
        return self.num_chunks is not None and self.next_chunk >= self.num_chunks

    def _ready(self, index: int) -> bool:
        """Whether chunk ``index``'s inputs are complete (called under the lock)."""
        if self.num_chunks is not None and index >= self.num_chunks:
            return False
        if self.closed:
            return True
        start, stop = self.chunk_range(index)
        total = self.num_frames or math.inf  # the avatar's windows are clamped to the conversation's frames
        if self.avatar_audio.rows_final(False) < min(stop + self.context.avatar_radius, total):
            return False
        if self.with_user:
            if len(self.user.frames) < stop or self.user_audio.rows_final(False) < stop:
                return False
            needs_waveform = self.keeps_user_media and self.user_audio.pushed_waveform
            if needs_waveform and self.user_audio.num_samples < stop * SAMPLES_PER_FRAME:
                return False
        return True

    def _stamp_ready(self) -> None:
        now = time.perf_counter()
        index = self.next_chunk
        while index in self.ready_times:
            index += 1
        while self._ready(index):
            self.ready_times[index] = now
            index += 1
        if index > self.next_chunk:
            self._condition.notify_all()

    # ------------------------------------------------------------------------------------------------------------
    # Output
    # ------------------------------------------------------------------------------------------------------------

    def pull(self, timeout: float | None = 0.0) -> SessionChunk | None:
        r"""Renders and returns the next chunk if its inputs are complete, else `None`.

        Args:
            timeout (`float`, *optional*, defaults to 0): seconds to wait for the next chunk's inputs (pushed from
                another thread); `None` waits until they are complete or the session is done.

        Returns:
            [`SessionChunk`] or `None` (nothing ready in time, or every chunk rendered).
        """
        with self._condition:
            if timeout != 0.0:
                self._condition.wait_for(lambda: self.next_chunk in self.ready_times or self.done, timeout=timeout)
            index = self.next_chunk
            if index not in self.ready_times or self.done:
                return None
        chunk = self._render(index)
        with self._condition:
            self.next_chunk += 1
            self._condition.notify_all()
        if self.done:
            self.pipe.maybe_free_model_hooks()
        return chunk

    def __iter__(self) -> Iterator[SessionChunk]:
        """Renders and yields the chunks whose inputs are complete now (all remaining ones after `close`)."""
        while (chunk := self.pull()) is not None:
            yield chunk

    @torch.no_grad()
    def _render(self, index: int) -> SessionChunk:
        """Gathers chunk ``index``'s inputs from the buffers and asks the pipeline to render it."""
        started_at = time.perf_counter()
        start, stop = self.chunk_range(index)
        video, latents = self.pipe.render_chunk(self.context, index, self._chunk_inputs, self.progress_bar)

        # A continuation drops its regenerated motion frames, the last chunk ends at num_frames
        self.previous_video = video
        first_frame = start if index == 0 else start + self.motion_frames
        new = video if index == 0 else video[:, :, self.motion_frames :]
        if self.num_frames is not None:
            new = new[:, :, : max(0, self.num_frames - first_frame)]
        self.last_rendered_stop = stop
        self._release(stop)
        frames = self.pipe.postprocess(new, latents, self.options.output_type)
        return SessionChunk(
            index=index,
            first_frame=first_frame,
            frames=None if frames is None else frames[0],
            video=new,
            latents=latents,
            inputs_complete_at=self.ready_times[index],
            started_at=started_at,
            finished_at=time.perf_counter(),
        )

    def _chunk_inputs(self, index: int) -> ChunkInputs:
        """Chunk ``index``'s inputs from the buffers (`EchoPipeline.render_chunk` asks for them)."""
        start, stop = self.chunk_range(index)
        context_embeds = context_mask = None
        emotion = self._emotion_text(index, stop)
        if self.with_user:  # user context f_pu from the history up to the chunk's end (LCU, causal, carried state)
            context_embeds, context_mask = self._user_context(index, start, stop)
        motion_video = None if self.previous_video is None else self.previous_video[:, :, -self.motion_frames :]
        return ChunkInputs(
            index=index,
            emotion=emotion,
            audio_embeds=self._avatar_windows(start, stop),
            context_embeds=context_embeds,
            context_mask=context_mask,
            motion_video=motion_video,
        )

    def _avatar_windows(self, start: int, stop: int) -> torch.Tensor:
        """The avatar's audio windows of frames ``start … stop − 1`` (±radius rows, clamped to the conversation's
        frames as in training: `echo.audio.window_indices`): `(1, N, L_w, NL, D)` on the device."""
        radius, total = self.context.avatar_radius, self.num_frames
        last = min(stop + radius, total) if total is not None else stop + radius
        rows = self.avatar_audio.encode(last, self.pipe)  # T, NL, D
        window_rows = window_indices(start, stop, radius, last)  # N, L_w
        return rows[window_rows][None].to(self.context.device, self.context.dtype)

    def _reasoned(self, kind: str, stop: int, reason: Callable[[int], Any]) -> Any:
        """What was reasoned (``kind``: ``"understanding"`` or ``"emotion"``) for the chunk ending at frame ``stop − 1``:
        ``reason(frame)`` at its reasoning frame (`echo.clip_format.reasoning_frame` with the model's stride, the rule
        of the training windows), or `None` before the first. Cached per reasoning frame: a chunk ending before the
        next one reuses the result."""
        stride = getattr(self.settings, f"{kind}_stride")
        frame = reasoning_frame(stop - 1, stride)
        if frame is None:
            return None
        cached = self._reasoned_at.get(kind)
        if cached is None or cached[0] != frame:
            cached = self._reasoned_at[kind] = (frame, reason(frame))
        return cached[1]

    def _emotion_text(self, index: int, stop: int) -> str:
        if not self.settings.use_emotion:  # the "w/o LAU" ablation: the empty prompt, as in training
            return ""
        emotion, reasoner = self.options.emotion, self.options.emotion_reasoner
        if isinstance(emotion, list):
            return emotion[index]
        if emotion is not None:
            return emotion
        text = None
        if reasoner is not None:  # on the dialogue up to the reasoning frame (`None`: nothing said yet)
            text = self._reasoned("emotion", stop, lambda f: reason_emotion(reasoner, self.dialogue, f))
        return self.settings.default_emotion if text is None else text

    # ------------------------------------------------------------------------------------------------------------
    # User side (LCU)
    # ------------------------------------------------------------------------------------------------------------

    def _user_frames(self, start: int, stop: int) -> np.ndarray:
        """User frames ``[start, stop)``, the last one repeated past the video's end (as offline)."""
        index = np.minimum(np.arange(start, stop), len(self.user.frames) - 1)
        first = int(index[0])
        return self.user.frames.view(first, int(index[-1]) + 1).numpy()[index - first]

    def _encode_user_video(self, stop: int) -> None:
        """The LCU's video tokens and face masks of the frames up to ``stop`` (`echo.encoding`, as training)."""
        first = len(self.user.tokens)
        if first >= stop:
            return
        frames = self._user_frames(first, stop)
        landmarks = None
        if self.user.with_landmarks:
            index = np.minimum(np.arange(first, stop), len(self.user.landmarks) - 1)
            low = int(index[0])
            landmarks = self.user.landmarks.view(low, int(index[-1]) + 1).numpy()[index - low]
        tokens, token_mask = self.pipe.encode_user_frames(frames, landmarks, self.settings.user_video_size)
        self.user.tokens.append(tokens)
        self.user.token_mask.append(token_mask)

    def _user_context(self, index: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The LCU's context tokens for the chunk ``[start, stop)``: the user's history is frames ``first … stop − 1``
        (``first = 0``, or ``stop − max_history_frames`` when that is later, as in training) and the current clip its
        last ``stop − start`` frames; the inputs are those the training step gives (validity masks included).

        The whole history (``max_history_frames = None``) continues ``self.lcu_state``: the LCU reads only the frames
        after it (about one chunk's, whatever ``stop``). A capped history is encoded whole at every chunk, ``min(stop,
        max_history_frames)`` frames, the cap's exact semantics (see the module docstring)."""
        lcu, device = self.pipe.context_encoder, self.context.device
        cap = self.settings.max_history_frames
        first = 0 if cap is None else max(0, stop - cap)
        audio_rows = self.user_audio.encode(stop, self.pipe)
        kwargs = {
            "user_audio": audio_rows[None, first:stop],  # 1, T_hist, NL, D
            "clip_frames": stop - start,
            "user_audio_mask": torch.ones(1, stop - first, dtype=torch.bool),
        }
        if self.needs_user_video:
            self._encode_user_video(stop)
            kwargs["user_video"] = self.user.tokens.view(first, stop)[None]  # 1, T_hist, C_v, h, w
            kwargs["user_face_mask"] = self.user.token_mask.view(first, stop)[None]  # 1, T_hist, h, w
        if cap is not None:  # a window of the history, encoded whole as in training
            kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        else:  # the whole history: the LCU continues its state and reads only the new frames
            kwargs["state"] = self.lcu_state
            kwargs["save_state_at"] = stop - max(lcu.config.audio_window // 2, self.motion_frames)
        if self.needs_understanding:
            kwargs.update(self._understanding(index, stop))
        output = lcu(**kwargs)
        if cap is None:
            self.lcu_state = output.state
        return output.context.to(device, self.context.dtype), output.context_mask.to(device)

    def _understanding(self, index: int, stop: int) -> dict:
        understanding = self.options.understanding
        if isinstance(understanding, list):
            understanding = understanding[index]
        if understanding is None and self.options.understanding_model is not None:
            if not self.user_audio.pushed_waveform:
                raise ValueError("`understanding_model` needs the user's waveform: pass `user_audio`.")
            dim = self.pipe.context_encoder.config.understanding_dim
            understanding = self._reasoned("understanding", stop, self._understand)
            if understanding is None:  # before the first reasoning frame: nothing understood yet, as in training
                understanding = torch.zeros(1, 0, dim)
        if understanding is None:
            raise ValueError(missing_understanding_message(self.pipe.context_encoder.config.understanding_dim))
        understanding = understanding.to(
            self.context.device, torch.float32
        )  # 1, N_s, D_s (`accepted.check_understanding`)
        num_tokens = understanding.shape[1]
        if num_tokens == 0:  # nothing understood yet: one hidden zero token, as a training batch holds it
            understanding = understanding.new_zeros(1, 1, understanding.shape[2])
        mask = torch.full(understanding.shape[:2], num_tokens > 0, dtype=torch.bool, device=self.context.device)
        return {"understanding": understanding, "understanding_mask": mask}

    def _understand(self, frame: int) -> torch.Tensor:
        """Φ of the user's frames and audio from the conversation's start up to ``frame`` inclusive, `(1, N_s, D_s)`
        (what echo-prep's ``omni`` stage caches for that frame)."""
        waveform = self.user_audio.waveform((frame + 1) * SAMPLES_PER_FRAME)
        understanding = self.options.understanding_model(self._user_frames(0, frame + 1), waveform)
        dim = self.pipe.context_encoder.config.understanding_dim
        return accepted.check_understanding(understanding, "the understanding_model's output", dim)

    def _release(self, stop: int) -> None:
        """Forgets raw media no later chunk reads (the per-frame LCU inputs stay: each call gets the whole history)."""
        with self._condition:
            next_start = stop - self.motion_frames
            if not self.keeps_user_media and (not self.needs_user_video or len(self.user.tokens) >= stop):
                self.user.frames.drop_before(min(next_start, len(self.user.frames) - 1))
                self.user.landmarks.drop_before(min(next_start, len(self.user.landmarks) - 1))
            self.avatar_audio.release(keep_waveform=False)
            self.user_audio.release(keep_waveform=self.keeps_user_media)
