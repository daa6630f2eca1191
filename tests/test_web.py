"""``echo-web`` (`pipelines.web`): the live page.

Default suite, without a browser: the conversation's plumbing on a tiny session (each rendered frame plays with the
avatar audio it was rendered for, in order; a camera of any size, changing size, too small; a stop mid-chunk ends the
renderer within a denoising step), the media tracks fed frames directly, a real WebRTC call from aiortc's client to
the app on uvicorn (loopback), and the server's routes with FastAPI's test client (bad requests get a message naming
the fix; a second client gets a 409 and the first keeps its conversation; after a hang-up the server takes the next
client).

``slow``: the page in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python package, no
browser download) whose fake camera and microphone play a synthetic conversation's user video and audio; it types a
sentence for the avatar, checks that the avatar's frames and voice arrive and that the mouth opens while the avatar
speaks (`echo.metrics.behaviour.mouth_darkness` on the received frames, split by the received voice's level), records
the first-frame latency and the sustained frame rate (printed as ``web_...=value``), checks that a second page gets
the one-conversation message and that a page closed mid-chunk leaves the server serving, and saves a screenshot
(``ECHO_WEB_SCREENSHOT=path`` copies it there: docs/images/web_page.png).
"""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from echo.audio import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipelines import EchoPipeline
from pipelines.web.conversation import MIN_CAMERA_SIDE, LiveConversation
from tests.tiny_models import tiny_components_as_trained

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "echo-demo"
SIZE, CHUNK, MOTION = 32, 9, 5  # tiny session: chunks [0, 9), [4, 13), [8, 17), ...


# ----------------------------------------------------------------------------------------------------------------
# The conversation's plumbing, on a tiny session
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference():
    from skimage.data import astronaut

    from echo.encoding import detect_face_landmarks

    image = astronaut()  # a real face, 512²
    return image, detect_face_landmarks(image)


def _conversation(pipe, reference, seed=0, **kwargs):
    holder = {}
    session = pipe.start_session(
        reference_image=reference[0],
        reference_landmarks=reference[1],
        understanding=torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(seed)),
        generator=torch.Generator().manual_seed(seed),
        height=SIZE,
        width=SIZE,
        num_frames_per_chunk=CHUNK,
        motion_frames=MOTION,
        user_video_size=32,
        num_inference_steps=2,
        sampling_rate=SAMPLE_RATE,
        output_type="np",
        frame_inputs=False,
        callback_on_step_end=lambda *a: holder["conversation"].step_callback(*a),
        callback_on_step_end_tensor_inputs=[],
        **kwargs,
    )
    holder["conversation"] = LiveConversation(session, resolution=SIZE)
    return holder["conversation"]


def _wait(condition, timeout=120.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_each_rendered_frame_plays_with_the_avatar_audio_it_was_rendered_for(tiny_pipe, reference):
    conversation = _conversation(tiny_pipe, reference)
    conversation.start(run_clock=False)  # the test is the clock
    conversation.open_audio()  # and the audio track
    speech = (np.sin(np.arange(70 * SAMPLES_PER_FRAME) * 0.05) * np.linspace(0.1, 0.9, 70 * 640)).astype(np.float32)
    rng = np.random.default_rng(0)
    played, audio = [], []
    try:
        assert conversation.camera_frame(np.zeros((16, 24, 3), np.uint8)) is False  # too small: refused
        conversation.camera_frame(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))  # not square, not the model's
        conversation.tick(3)  # three frames of silence, then the avatar speaks
        assert not conversation.take_audio(3 * SAMPLES_PER_FRAME).any()
        assert conversation.say(speech) == 0.0
        for t in range(3, 200):
            if t == 40:  # the camera changes size mid-conversation (WebRTC adapts resolutions)
                conversation.camera_frame(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
            conversation.microphone(rng.standard_normal(1920).astype(np.float32) * 0.1, 48_000)  # 40 ms at 48 kHz
            conversation.tick()
            samples = conversation.take_audio(SAMPLES_PER_FRAME)
            audio.append(samples)
            current = conversation.video_frame()
            if current is not None and (not played or played[-1][1] != current[0]):
                played.append((len(audio) - 1, *current))  # tick, frame index, frame
            if t >= 120:  # inputs for five chunks are in: let the renderer catch up before playing further
                _wait(lambda: conversation.rendered_frames >= 45 or conversation.error, what="five chunks")
        assert conversation.error is None, conversation.error
    finally:
        assert conversation.stop(timeout=60)
    indices = [index for _, index, _ in played]
    assert indices == list(range(len(indices))) and len(indices) >= 45, indices  # every frame, in order
    assert all(frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8 for *_, frame in played)
    # The voice leaves in step with the frames: the tick that plays frame i plays the avatar's audio of frame i
    pushed = np.concatenate([np.zeros(3 * SAMPLES_PER_FRAME, np.float32), speech, np.zeros(200 * 640, np.float32)])
    for tick, index, _ in played:
        np.testing.assert_array_equal(audio[tick], pushed[index * SAMPLES_PER_FRAME : (index + 1) * SAMPLES_PER_FRAME])
    first_tick = played[0][0]
    assert not np.concatenate(audio[:first_tick]).any()  # silence before the first rendered frame
    texts = [(m["level"], m["text"]) for m in conversation.state()["messages"]]
    assert any(level == "error" and "24x16" in text and str(MIN_CAMERA_SIDE) in text for level, text in texts)
    assert any(level == "info" and "64x48" in text for level, text in texts)
    assert any(level == "warning" and "from 64x48 to 48x64" in text for level, text in texts)
    state = conversation.state()
    assert state["chunks"] >= 5 and state["real_time_factor"] > 0 and state["latency_s"] >= 0


def test_a_stop_mid_chunk_ends_the_renderer_within_one_denoising_step(tiny_pipe, reference):
    conversation = _conversation(tiny_pipe, reference, seed=1)
    steps = []
    original = conversation.step_callback

    def stop_at_first_step(pipe, step, timestep, kwargs):
        steps.append(step)
        conversation._stop.set()  # the client goes away while the chunk renders
        return original(pipe, step, timestep, kwargs)

    conversation.step_callback = stop_at_first_step
    conversation.start(run_clock=False)
    conversation.say(np.full(2 * SAMPLE_RATE, 0.1, np.float32))
    conversation.tick(80)  # enough input for the first chunks
    assert conversation.stop(timeout=60), "the renderer did not end"
    assert steps == [0] and conversation.chunks == 0  # it left the chunk at its first step
    assert conversation.error is None  # a client going away is not a failure


class _Chunk:
    """What `LiveConversation` reads of a `SessionChunk`."""

    def __init__(self, first_frame, frames):
        self.first_frame, self.frames = first_frame, frames
        self.compute_seconds, self.latency = 1.0, 2.0


def test_media_tracks_send_every_played_frame_in_order_stamped_when_it_played_with_its_voice():
    pytest.importorskip("aiortc", reason="the `web` extra is not installed: pip install -e '.[web]'")
    import asyncio

    from pipelines.web.app import AvatarAudioTrack, AvatarVideoTrack

    conversation = LiveConversation(_IdleSession(), resolution=SIZE)
    video, audio = AvatarVideoTrack(conversation), AvatarAudioTrack(conversation)
    conversation.open_audio()  # the audio track's first read (the network connected)
    conversation.say(np.linspace(0.0, 0.5, 30 * SAMPLES_PER_FRAME, dtype=np.float32))
    conversation.tick(4)  # frames 0-3 pushed (their voice kept), nothing rendered: silence plays
    frames = np.random.default_rng(0).random((6, SIZE, SIZE, 3)).astype(np.float32)  # frames 0-5, [0, 1]
    conversation._queue_chunk(_Chunk(0, frames[:4]))
    conversation.tick(6)  # plays frames 0-3 (then nothing: frames 4-5 are not rendered yet)

    async def receive():  # called late: the frames still come, each once, in order
        sent = [await asyncio.wait_for(video.recv(), timeout=5) for _ in range(4)]
        voice = [await asyncio.wait_for(audio.recv(), timeout=5) for _ in range(20)]  # 20 ms each: the 10 ticks
        return sent, voice

    sent, voice = asyncio.run(receive())
    expected = np.round(frames[:4] * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.stack([f.to_ndarray(format="rgb24") for f in sent]), expected)
    assert [f.pts for f in sent] == [4 * 3600, 5 * 3600, 6 * 3600, 7 * 3600]  # 90 kHz, the ticks that played them
    assert conversation.state()["sent_frames"] == 4
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in voice]) / 32767.0  # 16 kHz mono s16
    assert voice[0].sample_rate == SAMPLE_RATE and [f.pts for f in voice[:2]] == [0, 320]
    # ticks 0-3: silence; ticks 4-7: frames 0-3 with the voice pushed for frames 0-3; ticks 8-9: silence
    assert not pcm[: 4 * SAMPLES_PER_FRAME].any() and not pcm[8 * SAMPLES_PER_FRAME :].any()
    said = np.linspace(0.0, 0.5, 30 * SAMPLES_PER_FRAME, dtype=np.float32)[: 4 * SAMPLES_PER_FRAME]
    np.testing.assert_allclose(pcm[4 * SAMPLES_PER_FRAME : 8 * SAMPLES_PER_FRAME], said, atol=1 / 32767)
    conversation.stop()


def test_received_audio_of_any_layout_becomes_mono_float():
    import av

    from pipelines.web.app import audio_frame_to_mono

    left, right = np.array([1000, -2000, 3000], np.int16), np.array([3000, 2000, -1000], np.int16)
    packed = av.AudioFrame.from_ndarray(np.stack([left, right], 1).reshape(1, -1), format="s16", layout="stereo")
    planar = av.AudioFrame.from_ndarray(
        np.stack([left, right]).astype(np.float32) / 32768, format="fltp", layout="stereo"
    )
    for frame in (packed, planar):  # what aiortc's Opus decoder gives, and a planar float layout
        np.testing.assert_allclose(audio_frame_to_mono(frame), (left / 32768 + right / 32768) / 2, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The server's routes (FastAPI's test client, no browser)
# ----------------------------------------------------------------------------------------------------------------


class _IdleSession:
    """A session that takes every push and never has a chunk ready."""

    def __init__(self):
        self.pushed = 0

    def push(self, **piece):
        self.pushed += 1

    def pull(self, timeout=0.0):
        time.sleep(timeout or 0.0)


def _offer_sdp() -> str:
    """A browser-like SDP offer (one video and one audio transceiver), made by aiortc."""
    import asyncio

    from aiortc import RTCConfiguration, RTCPeerConnection

    async def make():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def _wav_bytes(seconds=0.5, rate=22_050) -> bytes:
    from scipy.io import wavfile

    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    wavfile.write(buffer, rate, (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16))
    return buffer.getvalue()


def test_server_routes_say_what_is_wrong_and_keep_serving():
    pytest.importorskip("aiortc", reason="the `web` extra is not installed: pip install -e '.[web]'")
    pytest.importorskip("fastapi", reason="the `web` extra is not installed: pip install -e '.[web]'")
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the `web` extra)")
    from fastapi.testclient import TestClient

    from pipelines.web.app import EchoWebServer

    conversations, said = [], []

    def start_conversation():
        conversations.append(LiveConversation(_IdleSession(), resolution=SIZE))
        return conversations[-1]

    def speak(text):
        said.append(text)
        return np.full(SAMPLE_RATE // 2, 0.1, np.float32)

    server = EchoWebServer(start_conversation, speak=speak, chat=None)
    sdp = _offer_sdp()
    with TestClient(server.app) as http:
        page = http.get("/")
        assert page.status_code == 200 and "Start" in page.text and "getUserMedia" in page.text
        # Bad offers: a message naming what is expected, no conversation started
        for body in (b"not json", json.dumps([1]).encode(), json.dumps({"sdp": sdp, "type": "answer"}).encode()):
            response = http.post("/offer", content=body)
            assert response.status_code == 400 and "takes" in response.json()["detail"], response.text
        response = http.post("/offer", json={"sdp": "v=0\r\nnonsense\r\n", "type": "offer"})
        assert response.status_code == 400 and "could not be read" in response.json()["detail"]
        assert http.post("/say", json={"client": "nobody", "text": "hi"}).status_code == 409
        # One client at a time: the second gets a 409 saying why, the first keeps its conversation
        first = http.post("/offer", json={"sdp": sdp, "type": "offer"})
        assert first.status_code == 200 and first.json()["type"] == "answer", first.text
        client = first.json()["client"]
        second = http.post("/offer", json={"sdp": sdp, "type": "offer"})
        assert second.status_code == 409 and "one conversation at a time" in second.json()["detail"]
        assert len(conversations) == 1 and not conversations[0].stopped
        assert http.get("/state", params={"client": "other"}).json()["other_client"] is True
        # Saying things
        assert http.post("/say", json={"client": client, "text": "  "}).status_code == 400
        response = http.post("/say", json={"client": client, "text": "Hello there."})
        assert response.status_code == 200 and said == ["Hello there."] and response.json()["seconds"] == 0.5
        bad = http.post(f"/say-recording?client={client}", content=b"\x00garbage" * 10)
        assert bad.status_code == 400 and "could not be decoded" in bad.json()["detail"]
        good = http.post(f"/say-recording?client={client}", content=_wav_bytes())
        assert good.status_code == 200 and abs(good.json()["seconds"] - 0.5) < 0.01
        assert len(conversations[0]._speech) == 2  # the sentence and the recording, in order
        ask = http.post("/ask", json={"client": client, "text": "How are you?"})
        assert ask.status_code == 400 and "--chat-base-url" in ask.json()["detail"]
        state = http.get("/state", params={"client": client}).json()
        assert state["running"] and any("Hello" not in m["text"] for m in state["messages"])
        # A hang-up ends the conversation, and the next client is served
        assert http.post("/hangup", content=json.dumps({"client": client})).json() == {"ended": True}
        assert conversations[0].stopped
        third = http.post("/offer", json={"sdp": sdp, "type": "offer"})
        assert third.status_code == 200 and len(conversations) == 2 and not conversations[1].stopped
        assert http.post("/say", json={"client": client, "text": "hi"}).status_code == 409  # the old page's id
    assert all(c.stopped for c in conversations)  # the server's shutdown ends the last one


class _InstantSession:
    """Renders a chunk of 5 frames as soon as its 5 frames were pushed; frame ``k`` is grey level ``40 + 8 (k % 20)``."""

    def __init__(self):
        self.pushed, self.next = 0, 0

    def push(self, user_video=None, **piece):
        self.pushed += len(user_video)

    def pull(self, timeout=0.0):
        if self.pushed < self.next + 5:
            time.sleep(timeout or 0.0)
            return None
        levels = (40 + 8 * (np.arange(self.next, self.next + 5) % 20)) / 255.0
        chunk = _Chunk(self.next, np.broadcast_to(levels[:, None, None, None], (5, 64, 64, 3)).astype(np.float32))
        self.next += 5
        return chunk


def test_a_webrtc_client_gets_the_avatars_frames_in_order_and_its_voice_over_a_real_connection():
    """The whole transport without a browser: aiortc's client ↔ the app on uvicorn, over loopback."""
    pytest.importorskip("aiortc", reason="the `web` extra is not installed: pip install -e '.[web]'")
    uvicorn = pytest.importorskip("uvicorn", reason="the `web` extra is not installed: pip install -e '.[web]'")
    import asyncio
    import urllib.request

    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    from pipelines.web.app import EchoWebServer

    voice = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE * 3) / SAMPLE_RATE)).astype(np.float32)
    conversations = []

    def start_conversation():
        conversations.append(LiveConversation(_InstantSession(), resolution=SIZE))
        return conversations[-1]

    server = EchoWebServer(start_conversation, speak=lambda text: voice)
    port = _free_port()
    http = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    _wait(lambda: http.started, timeout=30, what="uvicorn")

    def post(path, body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    class Camera(VideoStreamTrack):  # a 64x48 camera (another size than the model's)
        async def recv(self):
            frame = await super().recv()
            return frame.reformat(width=64, height=48)

    async def call():
        loop = asyncio.get_running_loop()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(Camera())
        pc.addTransceiver("audio", direction="recvonly")
        received = {}
        pc.on("track", lambda track: received.setdefault(track.kind, track))
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        answer = await loop.run_in_executor(None, post, "/offer", offer)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await loop.run_in_executor(None, post, "/say", {"client": answer["client"], "text": "hello"})
        levels, loudness = [], []
        deadline = loop.time() + 60
        while len(levels) < 30 and loop.time() < deadline:
            frame = await asyncio.wait_for(received["video"].recv(), timeout=30)
            levels.append(float(frame.to_ndarray(format="rgb24").mean()))
        for _ in range(100):  # 2 s of the voice, decoded by the client
            frame = await asyncio.wait_for(received["audio"].recv(), timeout=30)
            loudness.append(np.abs(frame.to_ndarray().astype(np.float32) / 32768).max())
        await loop.run_in_executor(None, post, "/hangup", {"client": answer["client"]})
        await pc.close()
        return levels, loudness

    try:
        levels, loudness = asyncio.run(call())
    finally:
        http.should_exit = True
        thread.join(timeout=30)
    steps = np.round((np.array(levels) - 40) / 8) % 20  # each frame's index mod 20, read back from its grey level
    assert len(levels) == 30
    assert np.mean(np.diff(steps) % 20 == 1) > 0.8, steps  # in order, one after the other (VP8 is lossy)
    assert max(loudness) > 0.2, max(loudness)  # the voice arrived
    assert conversations[0].stopped and any("64x48" in m.text for m in conversations[0]._messages)


def test_the_chat_endpoint_keeps_the_turns_and_a_failure_names_the_endpoint():
    import http.server
    import threading

    from pipelines.web.app import ChatEndpoint

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):  # an OpenAI-compatible /chat/completions
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": f" Answer {len(seen)}. "}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chat = ChatEndpoint(f"http://127.0.0.1:{server.server_port}/v1/", "served-model", "Be brief.", timeout=5)
        assert chat.answer("Hello?") == "Answer 1." and chat.answer("And you?") == "Answer 2."
    finally:
        server.shutdown()
    path, body = seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "served-model"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in body["messages"][1:]] == ["Hello?", "Answer 1.", "And you?"]

    chat = ChatEndpoint(f"http://127.0.0.1:{server.server_port}/v1", "model", "system", timeout=2)  # closed now
    with pytest.raises(RuntimeError, match=f"{server.server_port}/v1/chat/completions did not answer.*--chat-base-url"):
        chat.answer("hello")


def test_passes_drop_guidance_passes_in_the_one_place_render_options_are_chosen(tiny_pipe):
    from pipelines.web import build_parser, render_options

    parser = build_parser()
    settings = tiny_pipe.settings.replace(audio_guidance_scale=4.5, user_guidance_scale=2.0)

    def passes(*argv):
        options = render_options(parser.parse_args(["--pipeline", "x", *argv]), settings)
        resolved, _, _ = tiny_pipe.resolve_settings(**options)
        weights = EchoPipeline.guidance_weights(resolved.audio_guidance_scale, resolved.user_guidance_scale, True)
        return options, set(weights)

    options, names = passes("--steps", "2")
    assert options["num_inference_steps"] == 2 and options["audio_guidance_scale"] is None  # the model's
    assert names == {"uncond", "audio", "full"}
    options, names = passes("--passes", "2")
    assert options["audio_guidance_scale"] == options["user_guidance_scale"] == 4.5 and names == {"uncond", "full"}
    assert passes("--passes", "2", "--audio-guidance-scale", "3")[0]["user_guidance_scale"] == 3.0
    assert passes("--passes", "1")[1] == {"full"}
    with pytest.raises(ValueError, match="--passes 1 sets the guidance scales"):
        passes("--passes", "1", "--audio-guidance-scale", "3")
    with pytest.raises(ValueError, match="--passes 2 sets the guidance scales"):
        passes("--passes", "2", "--user-guidance-scale", "3")


def test_few_step_serves_the_shipped_student_with_one_pass_per_step(tmp_path):
    """``--few-step N``: the pipeline's distilled student is loaded and on at N steps, the session's options leave the
    steps and guidance to it (one ``full`` pass per step); flags that would fight it, and a pipeline without a
    student, are refused with the fix."""
    from pipelines.web import build_parser, render_options, use_few_step

    parser = build_parser()
    pipe = EchoPipeline.from_pretrained(str(DEMO))
    args = parser.parse_args(["--pipeline", str(DEMO), "--few-step", "4"])  # not the default 2
    use_few_step(pipe, args)
    options = render_options(args, pipe.settings)
    settings, _, _ = pipe.resolve_settings(**options)
    assert settings.num_inference_steps == 4
    assert set(EchoPipeline.guidance_weights(settings.audio_guidance_scale, settings.user_guidance_scale, True)) == {
        "full"
    }
    for extra in (["--passes", "2"], ["--steps", "4"], ["--audio-guidance-scale", "3"]):
        with pytest.raises(ValueError, match=f"--few-step sets the steps and guidance itself: drop {extra[0]}"):
            render_options(parser.parse_args(["--pipeline", "x", "--few-step", "2", *extra]), pipe.settings)
    with pytest.raises(FileNotFoundError, match="has no few_step/ student"):
        use_few_step(pipe, parser.parse_args(["--pipeline", str(tmp_path), "--few-step", "1"]))


# ----------------------------------------------------------------------------------------------------------------
# The page in a real headless Chromium (slow)
# ----------------------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SENTENCE = "Hello! It is very nice to meet you today. How are you?"


def write_y4m(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """RGB frames `(T, H, W, 3)` uint8 as a YUV4MPEG2 file (4:2:0, BT.601), what Chromium's fake camera plays."""
    t, h, w, _ = frames.shape
    rgb = frames.astype(np.float32)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    u = (rgb[..., 2] - y) * 0.564 + 128
    v = (rgb[..., 0] - y) * 0.713 + 128
    sub = lambda c: c.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4))  # noqa: E731
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for k in range(t):
            f.write(b"FRAME\n")
            for plane in (y[k], sub(u)[k], sub(v)[k]):
                f.write(np.clip(np.round(plane), 0, 255).astype(np.uint8).tobytes())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_page_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `sudo apt-get install chromium` (Debian) runs this test")
    pytest.importorskip("playwright", reason="Playwright's Python package is missing: pip install -e '.[web]'")
    pytest.importorskip("aiortc", reason="the `web` extra is not installed: pip install -e '.[web]'")
    if shutil.which("espeak-ng") is None:
        pytest.skip(
            "espeak-ng is not installed: the avatar speaks typed text with it (`sudo apt-get install espeak-ng`)"
        )
    if not (DEMO / "model_index.json").is_file():
        pytest.skip(f"the demo model is missing ({DEMO})")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from echo.metrics.behaviour import mouth_darkness
    from pipelines.video_io import load_wav, read_frames
    from synthetic.conversations import make_conversation

    # 1. The user's camera and microphone: a synthetic conversation's user side, as Chromium's fake devices
    conversation = make_conversation(tmp_path / "conversation", layout="pairs", seconds=8.0, size=256, seed=3)
    user = conversation.participants[1]
    write_y4m(tmp_path / "user.y4m", read_frames(conversation.videos[user]))
    from scipy.io import wavfile

    wavfile.write(tmp_path / "user.wav", SAMPLE_RATE, (load_wav(conversation.audios[user]) * 32767).astype(np.int16))

    # 2. The server: the demo model at its size, one denoising step of two passes (without guidance its lips do not
    # follow the voice: docs/web.md); a CPU renders the conversation in minutes
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.web", "--pipeline", str(DEMO), "--port", str(port)]
        + ["--steps", "1", "--passes", "2", "--device", "cpu"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(url, server, tmp_path / "server.log")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--use-fake-ui-for-media-stream",
                    "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-video-capture={tmp_path / 'user.y4m'}",
                    f"--use-file-for-fake-audio-capture={tmp_path / 'user.wav'}",
                    "--autoplay-policy=no-user-gesture-required",
                ],
            )
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url + "?capture=1")
            started = time.perf_counter()
            page.click("#start")
            page.wait_for_function("window.echo.state && window.echo.state.running === true", timeout=60_000)
            page.fill("#text", SENTENCE)
            page.click("#say")
            page.wait_for_function("window.echo.state && window.echo.state.speaking === true", timeout=60_000)

            # 3. A second page while the first talks: the one-conversation message, the first goes on
            other = browser.new_page()
            other.goto(url)
            other.click("#start")
            other.wait_for_selector("#messages li.error", timeout=60_000)
            assert "one conversation at a time" in other.inner_text("#messages")
            other.close()

            # 4. The screenshot while the avatar speaks; then wait until the sentence and some silence after it are
            # rendered and played (the model is slower than real time)
            speaking = "window.echo.audioLevels.length && window.echo.audioLevels.slice(-1)[0] > 0.05"
            page.wait_for_function(speaking, timeout=600_000, polling=20)
            page.screenshot(path=str(tmp_path / "web_page.png"))
            if os.environ.get("ECHO_WEB_SCREENSHOT"):
                shutil.copy(tmp_path / "web_page.png", os.environ["ECHO_WEB_SCREENSHOT"])
            page.wait_for_function(
                "window.echo.state && window.echo.state.played_frames >= 150", timeout=600_000, polling=1000
            )
            echo = page.evaluate("window.echo")
            wall = time.perf_counter() - started

            # 5. A page that goes away mid-chunk (the renderer is always behind here) leaves the server serving the
            # next one; that one has no camera permission (a browser without the fake permission prompt: denied)
            page.close()
            browser.close()
            denied = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--use-fake-device-for-media-stream"]
            )
            again = denied.new_page()
            again.goto(url)
            again.click("#start")
            again.wait_for_function("window.echo.state && window.echo.state.running === true", timeout=120_000)
            again.wait_for_function(
                "document.querySelector('#messages').innerText.includes('No camera reaches the server')",
                timeout=30_000,
            )
            no_permission = again.inner_text("#messages")
            again.click("#stop")
            denied.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert server.returncode in (0, -15), (tmp_path / "server.log").read_text()[-3000:]
    assert "permission was denied" in no_permission and "allow both" in no_permission, no_permission

    # 6. What arrived: frames, voice, a mouth that opens while the avatar speaks
    frames = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(f["png"].split(",", 1)[1]))).convert("RGB"))
            for f in echo["frames"]
        ]
    )
    levels = np.array([f["level"] for f in echo["frames"]])
    times = np.array(echo["frameTimes"]) / 1000.0
    np.savez_compressed(tmp_path / "received.npz", frames=frames, levels=levels, times=times)
    assert len(frames) >= 100 and frames.shape[1:] == (128, 128, 3), frames.shape
    assert levels.max() > 0.02, f"no avatar voice arrived (peak level {levels.max():.4f})"
    mouth = mouth_darkness(frames, np.load(DEMO / "example" / "reference_landmarks.npy"))
    speaking, silent = levels > 0.02, levels < 0.002
    assert speaking.sum() >= 20 and silent.sum() >= 20, (speaking.sum(), silent.sum())
    open_speaking, open_silent = mouth[speaking].mean(), mouth[silent].mean()
    first_frame = echo["firstFrameMs"] / 1000.0
    fps = (len(times) - 1) / (times[-1] - times[0])
    state = echo["state"]
    figures = {
        "web_first_frame_latency_s": first_frame,
        "web_sustained_fps": fps,
        "web_frames": len(frames),  # shown by the page
        "web_sent_frames": state["sent_frames"],
        "web_played_frames": state["played_frames"],
        "web_real_time_factor": state["real_time_factor"],
        "web_chunk_latency_s": state["latency_s"],
        "web_mouth_speaking": open_speaking,
        "web_mouth_silent": open_silent,
        "web_wall_s": wall,
    }
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert open_speaking > open_silent + 0.01, figures
    assert not echo["errors"], echo["errors"]


def _wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"echo-web exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"echo-web did not answer at {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
