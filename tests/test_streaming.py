"""Interactive mode (`EchoPipeline.start_session`): a session fed a conversation in pieces of any size yields exactly
the offline call's frames; a chunk renders as soon as its inputs are complete, not before; the LCU's carried state
gives bit for bit the full-history LCU the model was trained with; bad inputs raise clear errors.

Tiny components (configs/models/tiny.yaml) at 32², 9-frame chunks with 5 motion frames, 2 steps, 25 frames (5 chunks).
With the shipped 1.3B description's history settings (33-frame chunks, one motion frame, the whole history) the LCU
encodes the same number of frames per chunk over 41 chunks; a capped model gets its exact window, at a bounded cost.
"""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from echo.mamba import MambaBlock
from pipelines import EchoPipeline
from pipelines.session import SAMPLES_PER_FRAME
from tests.tiny_models import tiny_components_as_trained

SIZE, CHUNK, MOTION, FRAMES = 32, 9, 5, 25  # chunks [0, 9), [4, 13), [8, 17), [12, 21), [16, 25)
SETTINGS = dict(
    height=SIZE, width=SIZE, num_frames_per_chunk=CHUNK, motion_frames=MOTION, user_video_size=32, num_inference_steps=2
)


@pytest.fixture(scope="module")
def pipe():
    components = tiny_components_as_trained()  # ECHO additions acting as after training: every stream counts
    # Parallel-scan blocks of 8 frames (256 by default), so that 25 frames carry the LCU's state across blocks.
    for module in components["context_encoder"].modules():
        if isinstance(module, MambaBlock):
            module.scan_chunk_size = 8
    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    # The emotion is reasoned every 8 frames (at frames 7, 15, 23), as if trained on caches of that stride
    pipe.register_to_config(settings=pipe.settings.replace(emotion_stride=8).to_dict())
    return pipe


@pytest.fixture(scope="module")
def conversation():
    from skimage.data import astronaut

    from echo.encoding import detect_face_landmarks

    image = astronaut()  # a real face, 512²
    landmarks = detect_face_landmarks(image)
    small = image[::8, ::8]  # 64² user frames
    rng = np.random.default_rng(0)
    t = np.arange(FRAMES * SAMPLES_PER_FRAME) / 16_000
    return {
        "reference_image": image,
        "reference_landmarks": landmarks,
        "avatar_audio": (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32),
        "user_audio": (0.1 * rng.standard_normal(FRAMES * SAMPLES_PER_FRAME)).astype(np.float32),
        "user_video": np.stack([np.roll(small, shift=3 * k, axis=1) for k in range(FRAMES)]),
        "user_landmarks": np.repeat(landmarks[None] / 8, FRAMES, axis=0),
        "understanding": torch.randn(4, 32, generator=torch.Generator().manual_seed(0)),
    }


class Reasoner:
    """An emotion reasoner whose text depends on the dialogue it is shown, cut at the chunk's end."""

    def __init__(self):
        self.texts = []

    def describe(self, history, clip_end, avatar_speaker="avatar"):
        known = " ".join(s["text"] for s in history if float(s["start"]) < clip_end)
        self.texts.append("joyful" if "great" in known else "calm")
        return self.texts[-1]


DIALOGUE = [
    {"speaker": "user", "start": 0.0, "end": 0.3, "text": "hello there"},
    {"speaker": "avatar", "start": 0.5, "end": 0.7, "text": "great to see you"},
]


def _offline(pipe, conversation, **kwargs):
    inputs = {k: v for k, v in conversation.items()}
    inputs.update(kwargs)
    frames = pipe(**inputs, **SETTINGS, num_frames=FRAMES, generator=torch.Generator().manual_seed(0)).frames
    return frames[0]  # T, H, W, 3


def _session_in_pieces(pipe, conversation, piece, features=None, dialogue=None, **session_kwargs):
    """Pushes ``piece`` frames of every stream at a time (audio: ``piece · 640`` samples), pulling after each push;
    with ``dialogue`` each transcript segment is pushed just before the media it starts in."""
    session = pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        understanding=conversation["understanding"],
        generator=torch.Generator().manual_seed(0),
        **SETTINGS,
        **session_kwargs,
    )
    chunks, pending = [], list(dialogue or [])
    for first in range(0, FRAMES, piece):
        stop = min(FRAMES, first + piece)
        samples = slice(first * SAMPLES_PER_FRAME, stop * SAMPLES_PER_FRAME)
        while pending and pending[0]["start"] * 25 < stop:
            session.push(dialogue=[pending.pop(0)])
        if features is None:
            session.push(
                avatar_audio=conversation["avatar_audio"][samples], user_audio=conversation["user_audio"][samples]
            )
        else:
            session.push(
                avatar_audio_features=features["avatar"][first:stop], user_audio_features=features["user"][first:stop]
            )
        session.push(
            user_video=conversation["user_video"][first:stop], user_landmarks=conversation["user_landmarks"][first:stop]
        )
        chunks += list(session)
    rendered_before_close = len(chunks)
    session.close(num_frames=FRAMES)
    chunks += list(session)
    assert session.done and [c.index for c in chunks] == list(range(5))
    assert [c.first_frame for c in chunks] == [0, 9, 13, 17, 21]
    return np.concatenate([c.frames for c in chunks]), rendered_before_close


@pytest.mark.parametrize("piece", [1, 7, CHUNK], ids=["one_frame", "seven_frames", "whole_chunk"])
def test_session_in_pieces_yields_exactly_the_offline_frames(pipe, conversation, piece):
    """Waveforms pushed in pieces of 1, 7 or 9 frames give exactly the offline call's frames (the same wav2vec2 rows,
    `echo.audio.audio_frame_features`, with the same seed), emotion reasoned from the dialogue so far included. The
    25-frame conversation is shorter than one audio block plus its right context (50 frames), so its chunks render
    at `close` (`tests/test_audio_rows.py` checks the rows a session has final before the end of input)."""
    offline_reasoner, reasoner = Reasoner(), Reasoner()
    offline = _offline(pipe, conversation, emotion_reasoner=offline_reasoner, dialogue=DIALOGUE)
    frames, rendered_before_close = _session_in_pieces(
        pipe, conversation, piece, dialogue=DIALOGUE, emotion_reasoner=reasoner
    )
    assert frames.shape == offline.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.array_equal(frames, offline)
    assert rendered_before_close == 0
    # reasoned once per reasoning frame (7, 15, 23; chunks end at 8, 12, 16, 20, 24); "great" is said at 0.5 s
    assert reasoner.texts == offline_reasoner.texts == ["calm", "joyful", "joyful"]


def test_session_with_default_arguments_equals_the_offline_call(pipe, conversation):
    """The README's claim as stated: with default arguments, the offline `__call__` and a session fed the same
    conversation in pieces give identical frames (one audio definition, no option to choose another)."""
    offline = _offline(pipe, conversation, emotion="calm")
    frames, _ = _session_in_pieces(pipe, conversation, 7, emotion="calm")
    assert np.array_equal(frames, offline)


def test_offline_call_with_features_equals_a_session_fed_features(pipe, conversation):
    """Precomputed wav2vec2 rows (a prepared clip's ``*_w2v.npy``) bypass the audio encoder."""
    features = {name: pipe.encode_audio(conversation[f"{name}_audio"], FRAMES) for name in ("avatar", "user")}
    offline = _offline(
        pipe,
        conversation,
        avatar_audio=None,
        user_audio=None,
        avatar_audio_features=features["avatar"],
        user_audio_features=features["user"],
        emotion="calm",
    )
    frames, _ = _session_in_pieces(pipe, conversation, 7, features=features, emotion="calm")
    assert np.array_equal(frames, offline)
    # ... and the rows are the whole-track encoding: the default offline call gives the same frames
    assert np.array_equal(offline, _offline(pipe, conversation, emotion="calm"))


@pytest.mark.parametrize("last", ["user_video", "user_audio_features", "avatar_audio_features"])
def test_a_chunk_renders_as_soon_as_its_inputs_are_complete(pipe, conversation, last):
    """Chunk [0, 9) needs the user's frames and audio rows 0-8 and the avatar's rows 0-10 (its audio windows look two
    frames ahead): with any one of them a row short nothing renders; the push that completes it stamps the chunk."""
    features = {name: pipe.encode_audio(conversation[f"{name}_audio"], FRAMES) for name in ("avatar", "user")}
    streams = {
        "user_video": dict(user_video=conversation["user_video"], user_landmarks=conversation["user_landmarks"]),
        "user_audio_features": dict(user_audio_features=features["user"]),
        "avatar_audio_features": dict(avatar_audio_features=features["avatar"]),
    }
    needed = {"user_video": 9, "user_audio_features": 9, "avatar_audio_features": 11}
    session = pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        understanding=conversation["understanding"],
        emotion="calm",
        **SETTINGS,
    )
    for name, pieces in streams.items():
        rows = needed[name] - (name == last)
        session.push(**{key: value[:rows] for key, value in pieces.items()})
    assert session.pull() is None and list(session) == []
    rows = needed[last]
    session.push(**{key: value[rows - 1 : rows] for key, value in streams[last].items()})
    chunk = session.pull()
    assert chunk is not None and chunk.index == 0 and chunk.frames.shape == (9, SIZE, SIZE, 3)
    assert chunk.inputs_complete_at <= chunk.started_at <= chunk.finished_at and chunk.latency >= chunk.compute_seconds
    assert session.pull() is None  # chunk [4, 13) needs the user's frames up to 12


def test_session_lcu_state_gives_the_full_history_lcu_bit_for_bit(pipe, conversation):
    """Every LCU call of a session continues the carried state (from frame 8 on, the state of the 8-frame scan blocks
    before) and reads only the new frames; its output is exactly the full-history LCU forward (the LCU as trained) of
    the very inputs the call received. With ``max_history_frames`` the history is capped as in training, no state."""
    lcu = pipe.context_encoder
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((dict(kwargs), output.context.clone()))

    handle = lcu.register_forward_hook(hook, with_kwargs=True)
    try:
        _offline(pipe, conversation, emotion="calm")
    finally:
        handle.remove()
    assert [c[0]["user_audio"].shape[1] for c in calls] == [9, 13, 17, 21, 25]
    assert [None if c[0]["state"] is None else c[0]["state"].num_frames for c in calls] == [None, None, 8, 8, 16]
    with torch.no_grad():
        for kwargs, context in calls:
            full = lcu(**{k: v for k, v in kwargs.items() if k not in ("state", "save_state_at")})
            assert torch.equal(full.context, context)

    calls.clear()
    saved = dict(pipe.config.settings)
    pipe.register_to_config(settings={**saved, "max_history_frames": 12})
    handle = lcu.register_forward_hook(hook, with_kwargs=True)
    try:
        _offline(pipe, conversation, emotion="calm")
    finally:
        handle.remove()
        pipe.register_to_config(settings=saved)
    assert [c[0]["user_audio"].shape[1] for c in calls] == [9, 12, 12, 12, 12]
    assert all("state" not in c[0] for c in calls)


def _session(pipe, conversation, **kwargs):
    return pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        understanding=conversation["understanding"],
        **{**SETTINGS, **kwargs},
    )


def test_bad_inputs_raise_clear_errors(pipe, conversation):
    session = _session(pipe, conversation)
    audio, frames = conversation["user_audio"][:640], conversation["user_video"][:2]
    with pytest.raises(ValueError, match="sampling_rate.*kHz"):  # 44.1 kHz is resampled; 44 is a unit mistake
        session.push(user_audio=audio, sampling_rate=44)
    with pytest.raises(ValueError, match="fps"):
        session.push(user_video=frames, fps=30)
    with pytest.raises(ValueError, match="avatar_audio.*mono"):
        session.push(avatar_audio=np.zeros((2, 640), np.float32))
    with pytest.raises(ValueError, match="user_audio_features"):
        session.push(user_audio_features=np.zeros((3, 3, 16), np.float32))  # the tiny encoder has 3 x 32 rows
    session.push(user_video=frames, user_landmarks=conversation["user_landmarks"][:2])
    with pytest.raises(ValueError, match="user_video.*same size"):
        session.push(user_video=conversation["user_video"][:2, :32], user_landmarks=conversation["user_landmarks"][:2])
    with pytest.raises(ValueError, match="user_landmarks"):
        session.push(user_video=frames, user_landmarks=conversation["user_landmarks"][:3])
    with pytest.raises(ValueError, match="user_landmarks.*every"):
        session.push(user_video=frames)
    with pytest.raises(ValueError, match="length is unknown"):
        session.close()
    session.push(avatar_audio=conversation["avatar_audio"], user_audio=conversation["user_audio"])
    session.close()
    with pytest.raises(ValueError, match="closed"):  # late: after the end of input
        session.push(user_audio=audio)

    # a transcript segment that starts inside a chunk already rendered comes too late for its emotion
    session = _session(pipe, conversation, emotion_reasoner=Reasoner(), num_frames=FRAMES)
    features = {name: pipe.encode_audio(conversation[f"{name}_audio"], FRAMES) for name in ("avatar", "user")}
    session.push(
        avatar_audio_features=features["avatar"],
        user_audio_features=features["user"],
        user_video=conversation["user_video"],
        user_landmarks=conversation["user_landmarks"],
    )
    assert session.pull().index == 0  # frames 0-8 are rendered
    with pytest.raises(ValueError, match="dialogue.*late"):
        session.push(dialogue=[{"speaker": "user", "start": 0.2, "end": 0.5, "text": "hi"}])
    session.push(dialogue=[{"speaker": "user", "start": 0.4, "end": 0.5, "text": "hi"}])  # starts after frame 9

    # the session's own arguments
    with pytest.raises(ValueError, match="one per chunk"):
        _session(pipe, conversation, emotion=["a", "b"], num_frames=FRAMES)
    with pytest.raises(ValueError, match="divisible by 16"):
        _session(pipe, conversation, height=40)
    with pytest.raises(ValueError, match="output_type"):
        _session(pipe, conversation, output_type="mp4")
    no_user = _session(pipe, conversation, with_user=False)
    with pytest.raises(ValueError, match="user_video"):
        no_user.push(user_video=frames)
    waveform_first = _session(pipe, conversation)
    waveform_first.push(  # 75 frames of audio: the first 1-s block's rows are final (its right context is in)
        user_audio=np.tile(conversation["user_audio"], 3),
        avatar_audio=np.tile(conversation["avatar_audio"], 3),
        user_video=conversation["user_video"],
        user_landmarks=conversation["user_landmarks"],
    )
    assert waveform_first.pull().index == 0  # encodes the user's waveform
    with pytest.raises(ValueError, match="user_audio_features.*one form"):
        waveform_first.push(user_audio_features=features["user"])


def test_emotion_list_length_is_checked_when_the_length_becomes_known(pipe, conversation):
    session = _session(pipe, conversation, emotion=["a", "b"])
    session.push(avatar_audio=conversation["avatar_audio"][: 9 * SAMPLES_PER_FRAME])  # 9 frames: one chunk
    with pytest.raises(ValueError, match="one per chunk"):
        session.close()


def _shipped_settings() -> dict:
    """The settings of the shipped Wan2.1-T2V-1.3B description (configs/models/wan2.1-t2v-1.3b.yaml)."""
    from echo.components import load_model_config
    from echo.settings import EchoSettings

    path = Path(__file__).resolve().parents[1] / "configs" / "models" / "wan2.1-t2v-1.3b.yaml"
    return EchoSettings.from_dict(load_model_config(path)["settings"]).to_dict()


def _lcu_frames_per_chunk(num_chunks: int, settings: dict, caplog) -> tuple[list[tuple[int, int, int]], str]:
    """A session of ``num_chunks`` chunks on the tiny components (the LCU's own 16-frame scan blocks) with the history
    settings of ``settings`` (chunk, motion frames, ``max_history_frames``), fed one chunk's stride of precomputed rows
    and user frames at a time. Per LCU call: (history frames it received, audio frames it encoded, video frames it
    encoded), counted by hooks on the LCU's per-frame modules; and what the session logged."""
    chunk, motion = settings["num_frames_per_chunk"], settings["motion_frames"]
    stride, num_frames = chunk - motion, chunk + (num_chunks - 1) * (chunk - motion)
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(settings={**pipe.config.settings, "max_history_frames": settings["max_history_frames"]})
    lcu = pipe.context_encoder
    rng = np.random.default_rng(0)
    rows = {name: rng.standard_normal((num_frames, 3, 32)).astype(np.float32) for name in ("avatar", "user")}
    small = astronaut_face()
    calls = []
    hooks = [
        lcu.register_forward_pre_hook(lambda m, a, kw: calls.append([kw["user_audio"].shape[1]]), with_kwargs=True),
        lcu.audio_norm.register_forward_pre_hook(lambda m, a: calls[-1].append(a[0].shape[1])),  # B, T, audio_dim
        lcu.video_proj.register_forward_pre_hook(lambda m, a: calls[-1].append(a[0].shape[0])),  # B·T, G, C_v
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.session"):
            session = pipe.start_session(
                reference_image=small,
                understanding=torch.zeros(2, 32),
                emotion="calm",
                generator=torch.Generator().manual_seed(0),
                num_frames=num_frames,
                height=16,
                width=16,
                num_frames_per_chunk=chunk,
                motion_frames=motion,
                user_video_size=16,
                num_inference_steps=1,
                output_type="latent",
                frame_inputs=False,
            )
        rendered = 0
        for first in range(0, num_frames, stride):
            stop = min(num_frames, first + stride)
            session.push(
                avatar_audio_features=rows["avatar"][first:stop],
                user_audio_features=rows["user"][first:stop],
                user_video=np.repeat(small[None], stop - first, axis=0),
                user_landmarks=np.full((stop - first, 478, 2), 32.0, np.float32),
            )
            rendered += len(list(session))
        session.close()
        rendered += len(list(session))
    finally:
        for hook in hooks:
            hook.remove()
    assert rendered == num_chunks == len(calls)
    return [tuple(c) for c in calls], caplog.text


def astronaut_face() -> np.ndarray:
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut()[::8, ::8])  # 64²


def test_shipped_settings_encode_the_whole_history_at_a_constant_lcu_cost_per_chunk(caplog):
    """With the shipped 1.3B description's settings (33-frame chunks, one motion frame, the whole history:
    ``max_history_frames`` None), every chunk's LCU receives the history from frame 0 (1,281 frames by chunk 40) and
    encodes the same number of frames at chunk 40 as at chunk 1: the state's open 16-frame block, the new frames and
    the audio windows' 2 frames before them, never more than 15 + 2 + 32 + 2 = 51. No warning is logged."""
    settings = _shipped_settings()
    assert settings["max_history_frames"] is None and (settings["num_frames_per_chunk"], settings["motion_frames"]) == (
        33,
        1,
    )
    calls, logged = _lcu_frames_per_chunk(41, settings, caplog)
    assert [c[0] for c in calls] == [33 + 32 * c for c in range(41)]  # the whole history reaches the LCU
    assert calls[0] == (33, 33, 33)
    encoded = [c[1:] for c in calls[1:]]
    assert set(encoded) == {(51, 49)}, encoded  # audio: 16 + 32 + 1 + 2 window frames; video: 16 + 32 + 1
    assert "max_history_frames" not in logged


def test_a_capped_model_is_served_with_the_caps_exact_window_at_a_bounded_cost(caplog):
    """A model trained with ``max_history_frames = W`` gets exactly the last ``W`` frames at every chunk (the window it
    was trained on): ``min(stop, W)`` frames encoded per chunk, bounded by ``W`` and constant once the conversation is
    longer, not the carried state's ~one chunk; the session warns about that cost at its start."""
    settings = {**_shipped_settings(), "max_history_frames": 100}
    calls, logged = _lcu_frames_per_chunk(8, settings, caplog)
    assert calls == [(n, n, n) for n in (33, 65, 97, 100, 100, 100, 100, 100)]
    assert "max_history_frames=100" in logged and "constant cost per chunk" in logged
