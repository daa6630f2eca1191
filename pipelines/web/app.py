# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""The ``echo-web`` server: a FastAPI app that connects a browser to a `LiveConversation` over WebRTC (aiortc).

Routes (JSON unless said otherwise; an error is an HTTP status with ``{"detail": "<what went wrong and what to do>"}``):

============================  ====================================================================================
``GET /``                     the page (``static/index.html``)
``POST /offer``               ``{"sdp", "type": "offer"}`` → the answer ``{"sdp", "type", "client"}``. The browser's
                              camera and microphone tracks feed the conversation as the user; the answer carries the
                              avatar's video and audio tracks. 409 while another client is in a conversation.
``POST /say``                 ``{"client", "text"}``: the avatar says the text (espeak-ng).
``POST /say-recording``       the body is an audio file (WAV, MP3, OGG, WebM, ...; ``?client=``): the avatar says it.
``POST /ask``                 ``{"client", "text"}``: the chat endpoint's answer to the text, which the avatar says.
``GET /state``                ``?client=&since=``: figures (latency, real-time factor, ...) and messages.
``POST /hangup``              ``{"client"}``: ends the conversation (the page also sends it when it is closed).
============================  ====================================================================================

One conversation at a time: the model uses the whole machine, so a second client gets a 409 with a message saying so,
and the first keeps its conversation. A client that goes away (its page closed, its network gone: the peer connection
fails or closes) ends its conversation, mid-chunk too (`LiveConversation.stop`), and the server serves the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from echo.audio import SAMPLE_RATE

from .conversation import LiveConversation

try:  # the `web` extra
    from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse
except ImportError as error:  # named when the server is built: `require_web_extra`
    WEB_IMPORT_ERROR: ImportError | None = error
    MediaStreamTrack = object
else:
    WEB_IMPORT_ERROR = None

logger = logging.getLogger("echo-web")
STATIC = Path(__file__).resolve().parent / "static"
AUDIO_PTIME_SAMPLES = SAMPLE_RATE // 50  # 20 ms audio frames, WebRTC's usual packet time
VIDEO_CLOCK = 90_000  # RTP video clock rate
MAX_TEXT = 1000  # characters the avatar is asked to say at once
MAX_RECORDING_BYTES = 20 * 1024 * 1024
MAX_RECORDING_SECONDS = 60.0


def require_web_extra() -> None:
    """Raises an `ImportError` with the install command when the ``web`` extra is missing."""
    if WEB_IMPORT_ERROR is not None:
        raise ImportError(
            f"echo-web needs the `web` extra ({WEB_IMPORT_ERROR}): `pip install -e '.[web]'` (aiortc, FastAPI, uvicorn)."
        ) from WEB_IMPORT_ERROR


# ----------------------------------------------------------------------------------------------------------------
# Media tracks
# ----------------------------------------------------------------------------------------------------------------


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar's frames as a WebRTC video track: every frame the conversation plays, in order, stamped with the
    time it played (so a stall of the renderer is a gap in the stream, not repeated frames, and a frame this thread
    sends late still carries its place beside the voice)."""

    kind = "video"

    def __init__(self, conversation: LiveConversation, poll: float = 0.005):
        super().__init__()
        self.conversation, self.poll = conversation, poll
        self._last: int | None = None
        self._pending: list = []

    async def recv(self):
        while not self._pending:
            if self.readyState != "live" or self.conversation.stopped:
                raise MediaStreamError
            self._pending = self.conversation.frames_after(self._last)
            if not self._pending:
                await asyncio.sleep(self.poll)
        self._last, played_at, frame = self._pending.pop(0)
        video = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video.pts = int(round(played_at * VIDEO_CLOCK))
        video.time_base = Fraction(1, VIDEO_CLOCK)
        self.conversation.sent_frames += 1
        return video


class AvatarAudioTrack(MediaStreamTrack):
    """The avatar's voice as a WebRTC audio track: 20 ms frames of 16 kHz mono, as the conversation's clock plays
    them out with the frames (silence between chunks)."""

    kind = "audio"

    def __init__(self, conversation: LiveConversation, poll: float = 0.005):
        super().__init__()
        self.conversation, self.poll = conversation, poll
        self._samples = 0

    async def recv(self):
        self.conversation.open_audio()
        while True:
            if self.readyState != "live" or self.conversation.stopped:
                raise MediaStreamError
            samples = self.conversation.take_audio(AUDIO_PTIME_SAMPLES)
            if samples is not None:
                break
            await asyncio.sleep(self.poll)
        pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)[None]  # 1, n
        audio = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        audio.sample_rate = SAMPLE_RATE
        audio.pts = self._samples
        audio.time_base = Fraction(1, SAMPLE_RATE)
        self._samples += pcm.shape[1]
        return audio


def audio_frame_to_mono(frame) -> np.ndarray:
    """A decoded `av.AudioFrame` (any sample format, planar or packed, any channels) as `(n,)` float32 mono."""
    samples = frame.to_ndarray()
    channels = len(frame.layout.channels)
    samples = samples.reshape(channels, -1) if frame.format.is_planar else samples.reshape(-1, channels).T
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768.0
    elif samples.dtype == np.int32:
        samples = samples.astype(np.float32) / 2147483648.0
    return samples.astype(np.float32).mean(axis=0)


async def consume_track(track, conversation: LiveConversation) -> None:
    """Feeds one of the browser's tracks (camera or microphone) into the conversation until it ends."""
    while not conversation.stopped:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        try:
            if track.kind == "video":
                conversation.camera_frame(frame.to_ndarray(format="rgb24"))
            else:
                conversation.microphone(audio_frame_to_mono(frame), frame.sample_rate)
        except (ValueError, av.error.FFmpegError) as error:  # said on the page; this track stops, the call goes on
            device = "camera" if track.kind == "video" else "microphone"
            conversation.message("error", f"The {device}'s stream cannot be read ({error}); it is ignored from now on.")
            return


def read_recording(data: bytes) -> np.ndarray:
    """An uploaded recording (any container and codec FFmpeg reads) as `(n,)` float32 mono at 16 kHz."""
    if not data:
        raise ValueError("the uploaded recording is empty (0 bytes): choose an audio file (WAV, MP3, OGG, WebM).")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise ValueError("the uploaded file has no audio stream: choose an audio file (WAV, MP3, OGG, WebM).")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pieces = []
            for frame in container.decode(audio=0):
                pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.error.FFmpegError as error:
        raise ValueError(
            f"the uploaded recording could not be decoded ({error}): choose an audio file (WAV, MP3, OGG, WebM)."
        ) from error
    waveform = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if waveform.size == 0:
        raise ValueError("the uploaded recording holds no audio samples: choose a non-empty recording.")
    if waveform.size > MAX_RECORDING_SECONDS * SAMPLE_RATE:
        raise ValueError(
            f"the uploaded recording lasts {waveform.size / SAMPLE_RATE:.0f} s, more than {MAX_RECORDING_SECONDS:.0f} s:"
            " upload a shorter one (the avatar says it in one go)."
        )
    return waveform


# ----------------------------------------------------------------------------------------------------------------
# Chat endpoint
# ----------------------------------------------------------------------------------------------------------------


class ChatEndpoint:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, llama.cpp's server, ...) over stdlib
    ``urllib``, as `echo.emotion.EmotionReasoner`'s ``"openai"`` backend calls one; it keeps the conversation's turns.

    Args:
        base_url (`str`): the endpoint's root, e.g. ``http://127.0.0.1:8000/v1``.
        model (`str`): the served model's name.
        system (`str`): the system prompt.
        timeout (`float`, defaults to 60): seconds per request.
    """

    def __init__(self, base_url: str, model: str, system: str, timeout: float = 60.0, max_turns: int = 20):
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self.model, self.system, self.timeout, self.max_turns = model, system, timeout, max_turns
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def answer(self, text: str) -> str:
        """The model's answer to the user's ``text``; a `RuntimeError` naming the endpoint when it cannot be had."""
        messages = [{"role": "system", "content": self.system}, *self.history, {"role": "user", "content": text}]
        payload = {"model": self.model, "messages": messages, "temperature": 0.7, "max_tokens": 120}
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.loads(response.read().decode("utf-8"))
            answer = body["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            raise RuntimeError(
                f"the chat endpoint {self.endpoint} did not answer ({error}): check that it is running and that "
                "--chat-base-url and --chat-model name it."
            ) from error
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RuntimeError(
                f"the chat endpoint {self.endpoint} answered something else than an OpenAI chat completion ({error})."
            ) from error
        if not answer:
            raise RuntimeError(f"the chat endpoint {self.endpoint} answered with an empty message.")
        self.history = [*self.history, messages[-1], {"role": "assistant", "content": answer}][-2 * self.max_turns :]
        return answer


# ----------------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Client:
    id: str
    pc: object
    conversation: LiveConversation
    tasks: list = field(default_factory=list)
    ended: bool = False


async def read_json(request) -> dict:
    """The request's body as a JSON object, or a 400 saying what was expected."""
    try:
        body = json.loads((await request.body()) or b"{}")
    except ValueError as error:
        raise HTTPException(400, f"{request.url.path} takes a JSON object; the body is not JSON ({error}).") from error
    if not isinstance(body, dict):
        raise HTTPException(400, f"{request.url.path} takes a JSON object, got {type(body).__name__}.")
    return body


class EchoWebServer:
    r"""The app's state: at most one client and its conversation.

    Args:
        start_conversation (`Callable[[], LiveConversation]`): a new conversation (a new session on the loaded model),
            not yet started; called in a worker thread.
        speak (`Callable[[str], np.ndarray]`, *optional*): text → `(n,)` float32 at 16 kHz (espeak-ng); `None`
            where it is not installed (then only recordings are said).
        chat (`ChatEndpoint`, *optional*): answers the user's text for ``/ask``.
        speak_unavailable (`str`): why ``speak`` is `None`, said to the page.
    """

    def __init__(
        self,
        start_conversation: Callable[[], LiveConversation],
        speak: Callable[[str], np.ndarray] | None = None,
        chat: ChatEndpoint | None = None,
        speak_unavailable: str = "text to speech is not available",
        stop_timeout: float = 60.0,
    ):
        require_web_extra()
        self.start_conversation, self.speak, self.chat = start_conversation, speak, chat
        self.speak_unavailable, self.stop_timeout = speak_unavailable, stop_timeout
        self.client: Client | None = None
        self.previous: LiveConversation | None = None
        self.lock = asyncio.Lock()
        self.app = self._build_app()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _client(self, client_id: str | None) -> Client:
        client = self.client
        if client is None or client.ended or client.id != client_id:
            raise HTTPException(
                409, "No conversation of this page is running (it ended, or another page holds it): press Start."
            )
        if client.conversation.stopped:
            raise HTTPException(409, client.conversation.error or "The conversation ended: press Start.")
        return client

    async def end(self, client: Client, reason: str) -> None:
        """Ends ``client``'s conversation (idempotent); the server then takes the next client."""
        if client.ended:
            return
        client.ended = True
        logger.info("echo-web: conversation %s ended: %s", client.id, reason)
        client.conversation.message("info", f"The conversation ended: {reason}.")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, client.conversation.stop, 0.0)  # signals; the renderer ends at its next step
        self.previous = client.conversation
        for task in client.tasks:
            task.cancel()
        await client.pc.close()
        if self.client is client:
            self.client = None

    async def _wait_previous(self) -> None:
        """Waits until the previous conversation's renderer has left its chunk (one denoising step at most)."""
        previous = self.previous
        if previous is not None:
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, previous.stop, self.stop_timeout):
                raise HTTPException(
                    503, "The previous conversation is still finishing its denoising step: try again in a few seconds."
                )
            self.previous = None

    async def _say(self, client: Client, waveform: np.ndarray, what: str) -> dict:
        starts_in = client.conversation.say(waveform)
        seconds = len(waveform) / SAMPLE_RATE
        client.conversation.message("info", f"The avatar says {what} ({seconds:.1f} s), in {starts_in:.1f} s.")
        return {"seconds": seconds, "starts_in_s": starts_in}

    async def _speak_text(self, client: Client, text: str) -> np.ndarray:
        if self.speak is None:
            raise HTTPException(400, f"The avatar cannot speak typed text: {self.speak_unavailable}.")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.speak, text)
        except (RuntimeError, OSError, ValueError) as error:
            raise HTTPException(400, f"Text to speech failed: {error}") from error

    # -- the app ---------------------------------------------------------------------------------------------

    def _build_app(self):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            if self.client is not None:
                await self.end(self.client, "the server shut down")

        app = FastAPI(title="echo-web", lifespan=lifespan)

        @app.get("/")
        async def page():
            return FileResponse(STATIC / "index.html", media_type="text/html")

        @app.get("/config")
        async def config():
            return {
                "speak": self.speak is not None,
                "speak_unavailable": self.speak_unavailable,
                "chat": bool(self.chat),
            }

        @app.post("/offer")
        async def offer(request: Request):
            body = await read_json(request)
            if body.get("type") != "offer" or not isinstance(body.get("sdp"), str) or not body["sdp"].strip():
                raise HTTPException(400, 'POST /offer takes {"sdp": <the browser\'s SDP offer>, "type": "offer"}.')
            async with self.lock:
                if self.client is not None and not self.client.ended:
                    if not self.client.conversation.stopped:
                        raise HTTPException(
                            409,
                            "Another client is in a conversation with the avatar. This server renders one conversation "
                            "at a time (the model needs the whole machine): try again when it ends.",
                        )
                    await self.end(self.client, self.client.conversation.error or "it stopped")
                await self._wait_previous()
                loop = asyncio.get_running_loop()
                # 1. The offer, read before any conversation starts (a bad one changes nothing)
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # local: no STUN server to reach
                incoming = []
                pc.on("track", incoming.append)  # the browser's camera and microphone, fed once the conversation exists
                try:
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
                except (ValueError, KeyError, IndexError) as error:
                    await pc.close()
                    raise HTTPException(400, f"The browser's SDP offer could not be read: {error}.") from error
                if {t.kind for t in pc.getTransceivers()} != {"audio", "video"}:
                    await pc.close()
                    raise HTTPException(
                        400,
                        "The browser's SDP offer could not be read as a call: it needs one video and one audio "
                        "section (the page adds both, receive-only without a camera or microphone).",
                    )
                # 2. A new session, its tracks, the answer
                try:
                    conversation = await loop.run_in_executor(None, self.start_conversation)
                except (ValueError, RuntimeError, OSError) as error:
                    await pc.close()
                    raise HTTPException(500, f"The avatar's session could not start: {error}") from error
                client = Client(uuid.uuid4().hex, pc, conversation)

                @pc.on("connectionstatechange")
                async def on_state():
                    if pc.connectionState in ("failed", "closed"):
                        await self.end(client, f"the connection to the page {pc.connectionState}")

                pc.addTrack(AvatarVideoTrack(conversation))
                pc.addTrack(AvatarAudioTrack(conversation))
                await pc.setLocalDescription(await pc.createAnswer())
                client.tasks = [asyncio.ensure_future(consume_track(track, conversation)) for track in incoming]
                if "video" not in {track.kind for track in incoming}:
                    conversation.message(
                        "warning", "No camera reaches the server: the avatar sees a grey user while you talk."
                    )
                if self.chat is not None:
                    self.chat.reset()
                conversation.start()
                self.client = client
                return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "client": client.id}

        @app.post("/say")
        async def say(request: Request):
            body = await read_json(request)
            client = self._client(body.get("client"))
            text = body.get("text")
            if not isinstance(text, str) or not text.strip():
                raise HTTPException(400, "Type something for the avatar to say (the text is empty).")
            if len(text) > MAX_TEXT:
                raise HTTPException(400, f"The text has {len(text)} characters; at most {MAX_TEXT} are said at once.")
            waveform = await self._speak_text(client, text.strip())
            return await self._say(client, waveform, repr(text.strip()))

        @app.post("/say-recording")
        async def say_recording(request: Request, client: str | None = None):
            owner = self._client(client)
            data = await request.body()
            if len(data) > MAX_RECORDING_BYTES:
                raise HTTPException(
                    413, f"The recording has {len(data)} bytes; at most {MAX_RECORDING_BYTES} are read."
                )
            loop = asyncio.get_running_loop()
            try:
                waveform = await loop.run_in_executor(None, read_recording, data)
            except ValueError as error:
                raise HTTPException(400, f"The recording cannot be said: {error}") from error
            return await self._say(owner, waveform, "the uploaded recording")

        @app.post("/ask")
        async def ask(request: Request):
            body = await read_json(request)
            client = self._client(body.get("client"))
            if self.chat is None:
                raise HTTPException(
                    400, "No chat endpoint: start echo-web with --chat-base-url URL --chat-model NAME to use Ask."
                )
            text = body.get("text")
            if not isinstance(text, str) or not text.strip():
                raise HTTPException(400, "Type a question for the chat model (the text is empty).")
            loop = asyncio.get_running_loop()
            try:
                answer = await loop.run_in_executor(None, self.chat.answer, text.strip()[:MAX_TEXT])
            except RuntimeError as error:
                raise HTTPException(502, str(error)) from error
            waveform = await self._speak_text(client, answer)
            return {**(await self._say(client, waveform, f"the chat model's answer {answer!r}")), "answer": answer}

        @app.get("/state")
        async def state(client: str | None = None, since: int = 0):
            current = self.client
            if current is None or current.id != client:
                return {"running": False, "messages": [], "other_client": current is not None and not current.ended}
            return current.conversation.state(since)

        @app.post("/hangup")
        async def hangup(request: Request):
            body = await read_json(request)  # sendBeacon posts it as text/plain
            client = self.client
            if client is not None and client.id == body.get("client"):
                await self.end(client, "the page hung up")
                return {"ended": True}
            return {"ended": False}

        return app
