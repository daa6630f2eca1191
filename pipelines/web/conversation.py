# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""`LiveConversation`: one live conversation between a user (camera and microphone) and the avatar, on an `EchoSession`.

It knows nothing of the network (``pipelines.web.app`` connects it to WebRTC); its inputs and outputs are arrays:

```python
conversation = LiveConversation(session, resolution=128)
conversation.start()  # the clock and the renderer start
conversation.camera_frame(rgb)  # the user's newest camera frame, (H, W, 3) uint8, any size, whenever one arrives
conversation.microphone(samples, rate)  # the user's next audio, mono float32 at `rate` Hz, whenever it arrives
conversation.say(waveform)  # the avatar speaks this (mono float32 at 16 kHz) from now on
frame_index, frame = conversation.video_frame()  # the avatar's frame playing now (None until the first)
conversation.open_audio()  # the audio track's first read
samples = conversation.take_audio(320)  # the avatar's next samples (16 kHz), in step with its frames
conversation.stop()  # ends the clock and the renderer, mid-chunk too
```

Three threads share it, so that neither the network nor the renderer can stall the conversation's clock:

- **The clock** (`_tick_loop`) runs at the model's 25 fps in wall time. At each frame it pushes one frame of every
  stream into the session: the user's newest camera frame, framed to the model's head crop (`echo.framing`, the
  framing echo-prep trains on; a camera of any size, the size may even change), 640 samples of the user's microphone
  (silence where the network delivered none in time), and 640 samples of what the avatar says (silence where it has
  nothing to say). The streams therefore stay aligned frame by frame whatever the network does. It also plays the
  rendered frames out, one per tick (below). If the process stalls, the clock catches up by pushing the missed frames
  at once (the session takes pieces of any length).
- **The renderer** (`_render_loop`) pulls each chunk from the session as soon as its inputs are complete
  (`EchoSession.pull`, 1.1 to 2.0 s after its last frame plus the compute: `pipelines.session`) and queues its frames
  with the avatar's audio of the same frames. `stop` interrupts it at the next denoising step
  (``callback_on_step_end``), so a client that leaves mid-chunk frees the model within one step.
- **The network** calls `camera_frame`, `microphone`, `say`, `video_frame` and `take_audio`.

**Playout and sync.** A rendered frame ``t`` is played together with the avatar's audio of frame ``t`` (samples
``640 t … 640 (t + 1) − 1``, the audio the model rendered the frame for): at each tick the clock moves one frame and
its 640 samples to the output together, so the voice and the lips leave in step however late the chunk was rendered.
When the renderer is behind (the model slower than real time), the output holds the last frame and plays silence
until the next chunk: the avatar's frames arrive late, in bursts of one chunk, each burst in sync with its voice.

Everything the page shows (latency, real-time factor, messages about bad input) comes from `state`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from echo.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, StreamResampler
from echo.framing import FaceFramer, FramingState

MIN_CAMERA_SIDE = 32  # smaller camera frames are refused (a face cannot be framed in them)
MIC_JITTER_SAMPLES = 2 * SAMPLES_PER_FRAME  # microphone audio held back against network jitter (80 ms)
MIC_MAX_BACKLOG = 8 * SAMPLES_PER_FRAME  # more than this ahead of the clock is dropped (the clocks drift apart)
PLAYED_KEPT = 2 * FPS  # played frames kept for a video track that fell behind (2 s), older ones are dropped
AUDIO_OUT_MAX = FPS * SAMPLES_PER_FRAME  # output samples kept for an audio track that fell behind (1 s)
MAX_MESSAGES = 50


class ConversationStopped(Exception):
    """Raised inside the renderer's denoising loop when the conversation stops mid-chunk."""


@dataclass
class Message:
    """A line for the page: ``level`` is ``"info"``, ``"warning"`` or ``"error"``."""

    index: int
    level: str
    text: str
    at: float  # seconds since the conversation started


@dataclass
class _Rendered:
    """A rendered frame waiting for its turn to play, with its audio."""

    index: int  # frame index in the conversation
    frame: np.ndarray  # (H, W, 3) uint8
    audio: np.ndarray  # (640,) float32, the avatar's audio of that frame


class LiveConversation:
    r"""One live conversation on an `EchoSession` (see the module docstring).

    Args:
        session ([`~pipelines.session.EchoSession`]): started with ``output_type="np"`` and ``frame_inputs=False`` (the
            conversation frames the camera itself), its ``callback_on_step_end`` set to `step_callback` of this object
            (`start_live_session` does all three).
        resolution (`int`): the side of the head crops the user's frames are framed to (the model's resolution).
        clock (`Callable[[], float]`, defaults to `time.perf_counter`): seconds; tests drive a fake one.
        framer (`echo.framing.FaceFramer`, *optional*): the face framer of the camera (MediaPipe by default).
    """

    def __init__(
        self,
        session,
        resolution: int,
        clock: Callable[[], float] = time.perf_counter,
        framer: FaceFramer | None = None,
    ):
        self.session, self.resolution, self.clock = session, int(resolution), clock
        self.framer = framer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at: float | None = None
        # inputs
        self._camera: np.ndarray | None = None  # newest raw frame
        self._camera_size: tuple[int, int] | None = None
        self._framing = FramingState()
        self._last_crop = np.full((self.resolution, self.resolution, 3), 127, dtype=np.uint8)  # before any camera
        self._mic = np.zeros(0, dtype=np.float32)  # 16 kHz, not yet pushed
        self._mic_resampler: StreamResampler | None = None
        self._mic_started = False
        self._speech: deque[np.ndarray] = deque()  # what the avatar is to say, 16 kHz
        self._speech_offset = 0  # samples of _speech[0] already pushed
        # the avatar's audio pushed per frame, kept until the frame is rendered: frame index → (640,)
        self._avatar_audio: dict[int, np.ndarray] = {}
        self.pushed_frames = 0
        # outputs
        self._rendered: deque[_Rendered] = deque()
        self._frame: tuple[int, np.ndarray] | None = None  # (index, frame) playing now
        self._played: deque[tuple[int, float, np.ndarray]] = deque(maxlen=PLAYED_KEPT)  # (index, seconds, frame)
        self.sent_frames = 0  # counted by the network's video track
        self._audio_out = np.zeros(0, dtype=np.float32)
        self._audio_open = False  # the output collects from the audio track's first read on
        self.played_frames = 0
        # figures and messages
        self.chunks = 0
        self.rendered_frames = 0
        self.compute_seconds = 0.0
        self.last_latency: float | None = None
        self.first_frame_at: float | None = None  # seconds after the start when the first frame was rendered
        self.speaking_frames = 0  # frames pushed while the avatar had something to say
        self.error: str | None = None
        self._messages: list[Message] = []
        self._message_count = 0

    # ------------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------------

    def start(self, run_clock: bool = True) -> None:
        """Starts the renderer thread and (``run_clock``) the clock's; without it the caller calls `tick` (tests)."""
        self.started_at = self.clock()
        loops = [(self._render_loop, "echo-web-render")] + [(self._tick_loop, "echo-web-clock")] * run_clock
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> bool:
        """Stops both threads: the renderer at its next denoising step. Returns whether they ended in ``timeout``."""
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self.framer is not None and not any(t.is_alive() for t in self._threads):
            self.framer.close()
        return not any(t.is_alive() for t in self._threads)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """The session's ``callback_on_step_end``: ends the chunk being rendered once the conversation stopped."""
        if self._stop.is_set():
            raise ConversationStopped()
        return {}

    def now(self) -> float:
        """Seconds since `start`."""
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    def message(self, level: str, text: str) -> None:
        """Adds a line for the page (also what the server logs)."""
        with self._lock:
            self._messages.append(Message(self._message_count, level, text, self.now()))
            self._message_count += 1
            del self._messages[:-MAX_MESSAGES]

    # ------------------------------------------------------------------------------------------------------------
    # Inputs (any thread)
    # ------------------------------------------------------------------------------------------------------------

    def camera_frame(self, frame: np.ndarray) -> bool:
        """The user's newest camera frame, `(H, W, 3)` uint8 RGB of any size; the clock frames and pushes the newest
        one at each tick. A frame too small to frame a face in is refused with a message (returns `False`)."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"a camera frame must be (H, W, 3) uint8 RGB, got {frame.dtype} {frame.shape}.")
        size = frame.shape[:2]
        if min(size) < MIN_CAMERA_SIDE:
            if self._camera_size != size:
                self._camera_size = size
                self.message(
                    "error",
                    f"The camera sends {size[1]}x{size[0]} frames: too small to find a face in (at least "
                    f"{MIN_CAMERA_SIDE} px a side). Choose another camera or a larger resolution; the avatar sees your "
                    "last usable frame meanwhile.",
                )
            return False
        with self._lock:
            previous = self._camera_size
            if previous != size:
                self._camera_size = size
                self._framing = FramingState()  # boxes are in the old size's pixels: start the framing again
            self._camera = frame
        if previous is None or min(previous) < MIN_CAMERA_SIDE:
            self.message(
                "info",
                f"Camera: {size[1]}x{size[0]}. The model sees {self.resolution}x{self.resolution} head crops of it "
                "(your face, framed as in training).",
            )
        elif previous != size and min(previous) >= MIN_CAMERA_SIDE:
            self.message(
                "warning",
                f"The camera changed size from {previous[1]}x{previous[0]} to {size[1]}x{size[0]}: your face is "
                "framed again in the new frames.",
            )
        return True

    def microphone(self, samples: np.ndarray, rate: int) -> None:
        """The user's next audio, `(n,)` mono float32 in [−1, 1] at ``rate`` Hz (resampled to 16 kHz here)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._mic_resampler is None or self._mic_resampler.rate != int(rate):
                self._mic_resampler = StreamResampler(int(rate))
            self._mic = np.concatenate([self._mic, self._mic_resampler(samples)])

    def say(self, waveform: np.ndarray) -> float:
        """The avatar says ``waveform`` (`(n,)` mono float32 at 16 kHz), after what it is still saying. Returns when
        it starts, in seconds from now."""
        waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if waveform.size == 0:
            raise ValueError("the avatar was given an empty waveform to say (0 samples).")
        with self._lock:
            queued = sum(len(piece) for piece in self._speech) - self._speech_offset
            self._speech.append(waveform)
        return queued / SAMPLE_RATE

    # ------------------------------------------------------------------------------------------------------------
    # Outputs (any thread)
    # ------------------------------------------------------------------------------------------------------------

    def video_frame(self) -> tuple[int, np.ndarray] | None:
        """The avatar frame playing now: ``(frame index, (H, W, 3) uint8)``, `None` before the first."""
        with self._lock:
            return self._frame

    def frames_after(self, index: int | None) -> list[tuple[int, float, np.ndarray]]:
        """The frames played after frame ``index`` (all kept ones for `None`), in order: ``(frame index, seconds
        since the start when it played, (H, W, 3) uint8)``. A video track sends each (a busy network thread sends
        late frames late, stamped with when they played, instead of dropping them)."""
        with self._lock:
            return [item for item in self._played if index is None or item[0] > index]

    def open_audio(self) -> None:
        """Starts collecting the output audio (an audio track's first read): what played before is not kept, so the
        voice starts in step with the frames playing then instead of behind a backlog of silence."""
        with self._lock:
            self._audio_open = True

    def take_audio(self, count: int) -> np.ndarray | None:
        """The avatar's next ``count`` output samples (16 kHz) since `open_audio`, `None` until the clock has played
        that many."""
        with self._lock:
            if len(self._audio_out) < count:
                return None
            samples, self._audio_out = self._audio_out[:count], self._audio_out[count:]
        return samples

    def state(self, since: int = 0) -> dict:
        """What the page shows: the figures (seconds) and the messages with ``index >= since``."""
        with self._lock:
            messages = [vars(m).copy() for m in self._messages if m.index >= since]
            video_seconds = self.rendered_frames / FPS
            return {
                "running": not self._stop.is_set(),
                "error": self.error,
                "conversation_s": self.pushed_frames / FPS,
                "chunks": self.chunks,
                "rendered_frames": self.rendered_frames,
                "played_frames": self.played_frames,
                "sent_frames": self.sent_frames,
                "first_frame_s": self.first_frame_at,
                "latency_s": self.last_latency,
                "real_time_factor": self.compute_seconds / video_seconds if video_seconds else None,
                "behind_s": (self.pushed_frames - self.rendered_frames) / FPS,
                "speaking": bool(self._speech),
                "messages": messages,
            }

    # ------------------------------------------------------------------------------------------------------------
    # The clock
    # ------------------------------------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        try:
            while not self._stop.is_set():
                due = int(self.now() * FPS) + 1  # frames that have begun by now
                if due > self.pushed_frames:
                    self.tick(due - self.pushed_frames)
                wait = (self.pushed_frames / FPS) - self.now()
                self._stop.wait(max(0.001, wait))
        except Exception as error:  # the page says why, the server keeps serving
            self._fail(f"The conversation's clock stopped: {type(error).__name__}: {error}")

    def tick(self, frames: int = 1) -> None:
        """Pushes the next ``frames`` frames of every stream into the session and plays as many rendered frames out
        (what the clock does at 25 fps; tests call it directly)."""
        user_video = self._user_crops(frames)
        with self._lock:
            user_audio = self._take_mic(frames * SAMPLES_PER_FRAME)
            avatar_audio = self._take_speech(frames * SAMPLES_PER_FRAME)
            first = self.pushed_frames
            for k in range(frames):
                self._avatar_audio[first + k] = avatar_audio[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME]
        self.session.push(
            user_video=user_video, user_audio=user_audio, avatar_audio=avatar_audio, sampling_rate=SAMPLE_RATE
        )
        with self._lock:
            self.pushed_frames += frames
            for tick in range(first, first + frames):
                self._play_one(tick)

    def _user_crops(self, frames: int) -> np.ndarray:
        """``frames`` copies of the head crop of the newest camera frame (the last crop when none came since)."""
        with self._lock:
            camera, self._camera = self._camera, None
            framing = self._framing
        if camera is not None:
            if self.framer is None:
                self.framer = FaceFramer()
            crops, _, framing = self.framer.frame(camera[None], self.resolution, framing)
            with self._lock:
                if self._camera_size == camera.shape[:2]:  # not reset by a size change meanwhile
                    self._framing = framing
            self._last_crop = crops[0]
        return np.repeat(self._last_crop[None], frames, axis=0)

    def _take_mic(self, count: int) -> np.ndarray:
        """``count`` samples of the microphone (under the lock): silence while it is behind the clock, its oldest
        samples dropped when it runs too far ahead."""
        if not self._mic_started:  # hold back some audio against network jitter
            if len(self._mic) < MIC_JITTER_SAMPLES:
                return np.zeros(count, dtype=np.float32)
            self._mic_started = True
        if len(self._mic) > MIC_MAX_BACKLOG + count:
            self._mic = self._mic[-(MIC_JITTER_SAMPLES + count) :]
        samples = np.zeros(count, dtype=np.float32)
        taken = min(count, len(self._mic))
        samples[:taken], self._mic = self._mic[:taken], self._mic[taken:]
        return samples

    def _take_speech(self, count: int) -> np.ndarray:
        """The avatar's next ``count`` samples of speech, silence where it has nothing to say (under the lock)."""
        samples = np.zeros(count, dtype=np.float32)
        filled = 0
        while filled < count and self._speech:
            piece = self._speech[0]
            taken = min(count - filled, len(piece) - self._speech_offset)
            samples[filled : filled + taken] = piece[self._speech_offset : self._speech_offset + taken]
            filled += taken
            self._speech_offset += taken
            if self._speech_offset == len(piece):
                self._speech.popleft()
                self._speech_offset = 0
        self.speaking_frames += -(-filled // SAMPLES_PER_FRAME)
        return samples

    def _play_one(self, tick: int) -> None:
        """Moves one rendered frame and its audio to the output at frame ``tick`` of the clock, or one frame of
        silence (under the lock)."""
        if self._rendered:
            item = self._rendered.popleft()
            self._frame = (item.index, item.frame)
            self._played.append((item.index, tick / FPS, item.frame))
            audio = item.audio
            self.played_frames += 1
        else:
            audio = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
        if self._audio_open:
            self._audio_out = np.concatenate([self._audio_out, audio])[-AUDIO_OUT_MAX:]

    # ------------------------------------------------------------------------------------------------------------
    # The renderer
    # ------------------------------------------------------------------------------------------------------------

    def _render_loop(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self.session.pull(timeout=0.2)
                if chunk is not None:
                    self._queue_chunk(chunk)
        except ConversationStopped:
            return
        except Exception as error:  # the page says why, the server keeps serving
            self._fail(f"Rendering failed: {type(error).__name__}: {error}")

    def _queue_chunk(self, chunk) -> None:
        frames = np.clip(np.round(np.asarray(chunk.frames) * 255.0), 0, 255).astype(np.uint8)  # n, H, W, 3
        with self._lock:
            for k, frame in enumerate(frames):
                index = chunk.first_frame + k
                audio = self._avatar_audio.pop(index, None)
                if audio is None:  # not pushed (cannot happen while the clock runs); silence
                    audio = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
                self._rendered.append(_Rendered(index, frame, audio))
            self.chunks += 1
            self.rendered_frames += len(frames)
            self.compute_seconds += chunk.compute_seconds
            self.last_latency = chunk.latency
            if self.first_frame_at is None:
                self.first_frame_at = self.now()

    def _fail(self, text: str) -> None:
        self.error = text
        self.message("error", text + " The conversation ended; press Start to begin a new one.")
        self._stop.set()
