"""The accepted input forms (`pipelines.inputs`): every bad value of `EchoPipeline.__call__`, `start_session` and
`EchoSession.push` is a `ValueError` naming the argument, raised before any work; accepted forms of one input give
the same frames (uint8 / [0, 1] float / PIL / [−1, 1] tensor images, int16 / float audio, 16 kHz / 44.1 kHz audio).

Tiny components (configs/models/tiny.yaml) at 32², 5-frame chunks with 1 motion frame, 1 step.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines import EchoPipeline
from pipelines import inputs as accepted
from tests.tiny_models import tiny_components_as_trained

SETTINGS = dict(height=32, width=32, num_frames_per_chunk=5, motion_frames=1, user_video_size=32, num_inference_steps=1)


@pytest.fixture(scope="module")
def pipe():
    # ECHO additions acting as after training: equal frames from two forms of an input mean equal inputs
    components = tiny_components_as_trained()
    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _speech(rate: int, seconds: float) -> np.ndarray:
    """A voiced, syllable-modulated tone, sampled at ``rate`` from the same continuous signal."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def conversation():
    from skimage.data import astronaut

    from echo.encoding import detect_face_landmarks

    image = astronaut()[::4, ::4]  # 128² RGB, a real face
    small = image[::2, ::2]  # 64² user frames
    rng = np.random.default_rng(0)
    return {
        "reference_image": image,
        "reference_landmarks": detect_face_landmarks(image),
        "avatar_audio": _speech(16_000, 0.36),  # 9 frames
        "user_video": np.stack([np.roll(small, shift=3 * k, axis=1) for k in range(9)]),
        "user_audio": (0.1 * rng.standard_normal(5760)).astype(np.float32),
        "user_landmarks": np.repeat(detect_face_landmarks(image)[None] / 2, 9, axis=0),
        "understanding": torch.randn(4, 32, generator=torch.Generator().manual_seed(0)),
        "emotion": "calm",
    }


def _render(pipe, conversation, **overrides):
    kwargs = {**conversation, **SETTINGS, "output_type": "pt", "generator": torch.Generator().manual_seed(0)}
    return pipe(**{**kwargs, **overrides}).frames


class _NoWork:
    """Counts the generator's forward calls: a refused input must be refused before any denoising."""

    def __init__(self, pipe):
        self.calls = 0
        self.handle = pipe.transformer.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# The table of refused values
# ----------------------------------------------------------------------------------------------------------------

IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
IMAGE[8:24, 8:24] = 200
TENSOR_01 = torch.from_numpy(IMAGE).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]: not [-1, 1]

# (argument, bad value, a fragment of the expected message besides the argument's name)
BAD_CALL_ARGUMENTS = [
    ("reference_image", IMAGE.astype(np.float32), "looks like [0, 255]"),
    ("reference_image", IMAGE.astype(np.float64) / 127.5 - 1, "looks like [-1, 1]"),
    ("reference_image", TENSOR_01, "no negative value"),
    ("reference_image", TENSOR_01 * 255, "outside [-1, 1]"),
    ("reference_image", np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    ("reference_image", torch.zeros(32, 32, 3) - 0.5, "channels-first"),
    ("reference_image", np.zeros((3, 32, 32), np.uint8), "channels-last"),
    ("reference_image", np.full((32, 32, 3), 300, np.int32), "0 … 255"),
    ("reference_image", PIL.Image.new("F", (32, 32)), "not 8-bit"),
    ("reference_image", "avatar.png", "load_image"),
    ("reference_image", [[1, 2], [3, 4]], "expected a PIL image"),
    ("avatar_audio", np.full(640, np.nan, np.float32), "NaN"),
    ("avatar_audio", np.r_[np.zeros(639), np.inf].astype(np.float32), "infinite"),
    ("avatar_audio", np.zeros((640, 2), np.float32), "Several channels"),
    ("avatar_audio", (np.ones(640) * 20_000).astype(np.float32), "integer PCM"),
    ("avatar_audio", np.zeros(640, np.uint8), "neither float, int16 nor int32"),
    ("avatar_audio", "avatar.wav", "load_wav"),
    ("avatar_audio", {"waveform": [0.0]}, "mono waveform"),
    ("user_audio", torch.full((640,), float("nan")), "NaN"),
    ("user_video", np.zeros((9, 64, 64, 3), np.float32) + 128, "looks like [0, 255]"),
    ("user_video", torch.rand(9, 3, 64, 64), "no negative value"),
    ("user_video", np.zeros((64, 64, 3), np.uint8), "One frame"),
    ("user_video", [IMAGE, IMAGE[:16]], "different sizes"),
    ("user_video", [IMAGE, IMAGE.astype(np.float32)], "user_video[1]"),
    ("audio_guidance_scale", float("nan"), "finite number >= 0"),
    ("audio_guidance_scale", -1.0, "finite number >= 0"),
    ("audio_guidance_scale", float("inf"), "finite number >= 0"),
    ("audio_guidance_scale", "4.5", "finite number >= 0"),
    ("user_guidance_scale", float("nan"), "finite number >= 0"),
    ("user_guidance_scale", -0.5, "finite number >= 0"),
    ("num_inference_steps", 0, "integer >= 1"),
    ("num_inference_steps", 1.5, "integer >= 1"),
    ("num_inference_steps", "2", "integer >= 1"),
    ("num_inference_steps", True, "integer >= 1"),
    ("num_frames", 0, "integer >= 1"),
    ("num_frames", 5.0, "integer >= 1"),
    ("height", 40, "multiple of 16"),
    ("height", -16, "multiple of 16"),
    ("height", "32", "multiple of 16"),
    ("width", 0, "multiple of 16"),
    ("num_frames_per_chunk", "5", "integer >= 1"),
    ("num_frames_per_chunk", 6, "4k + 1"),
    ("motion_frames", 4, "4(m − 1) + 1"),
    ("user_video_size", 12, "multiple of 8"),
    ("max_sequence_length", 0, "integer >= 1"),
    ("emotion", 3, "a str, or a list of str"),
    ("emotion", ["calm", 3], "item 1"),
    ("default_emotion", 3, "a str"),
    ("sampling_rate", 16, "looks like kHz"),
    ("sampling_rate", "16000", "integer rate in Hz"),
    ("sampling_rate", 44_100.5, "integer rate in Hz"),
    ("generator", [torch.Generator()], "torch.Generator"),
    ("reference_landmarks", np.full((478, 2), np.nan), "NaN"),
    ("reference_landmarks", "landmarks.npy", "(478, 2)"),
    ("user_landmarks", np.zeros((9, 68, 2)), "(9, 478, 2)"),
    ("understanding", torch.full((4, 32), float("nan")), "NaN"),
    ("understanding", torch.zeros(4, 7), "(N_s, 32)"),
    ("callback_on_step_end", 3, "callable"),
]


@pytest.mark.parametrize(
    "argument, value, fragment", BAD_CALL_ARGUMENTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_CALL_ARGUMENTS)]
)
def test_call_refuses_bad_values_naming_the_argument_before_any_work(pipe, conversation, argument, value, fragment):
    with _NoWork(pipe) as work, pytest.raises(ValueError) as error:
        _render(pipe, conversation, **{argument: value})
    message = str(error.value)
    assert f"`{argument}" in message, message
    assert fragment in message, message
    assert work.calls == 0


def test_audio_features_with_nan_are_refused(pipe, conversation):
    rows = pipe.encode_audio(conversation["avatar_audio"], 9)
    rows[3] = float("nan")
    with pytest.raises(ValueError, match="`avatar_audio_features`.*NaN"):
        _render(pipe, conversation, avatar_audio=None, avatar_audio_features=rows)


SESSION_ARGUMENTS = [
    (name, value, fragment)
    for name, value, fragment in BAD_CALL_ARGUMENTS
    if name not in ("avatar_audio", "user_audio", "user_video", "user_landmarks", "callback_on_step_end", "generator")
] + [("generator", [torch.Generator()], "torch.Generator"), ("with_user", "yes", "True, False or None")]


@pytest.mark.parametrize(
    "argument, value, fragment", SESSION_ARGUMENTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(SESSION_ARGUMENTS)]
)
def test_start_session_refuses_bad_values_naming_the_argument(pipe, conversation, argument, value, fragment):
    kwargs = {key: conversation[key] for key in ("reference_image", "reference_landmarks", "understanding")}
    kwargs = {**kwargs, **SETTINGS, argument: value}
    with pytest.raises(ValueError) as error:
        pipe.start_session(**kwargs)
    assert f"`{argument}" in str(error.value) and fragment in str(error.value), str(error.value)


PUSH_ARGUMENTS = [
    (name, value, fragment)
    for name, value, fragment in BAD_CALL_ARGUMENTS
    if name in ("avatar_audio", "user_audio", "user_video", "sampling_rate")
] + [
    ("avatar_audio_features", np.full((5, 3, 32), np.nan, np.float32), "NaN"),
    ("user_audio_features", "rows.npy", "per-frame wav2vec2 rows"),
    ("dialogue", [{"speaker": "user", "start": "soon", "end": 1.0, "text": "hi"}], "finite number of seconds"),
    ("dialogue", [{"speaker": "user", "start": 0.0, "end": 1.0, "text": 3}], "strings"),
]


@pytest.mark.parametrize(
    "argument, value, fragment", PUSH_ARGUMENTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(PUSH_ARGUMENTS)]
)
def test_push_refuses_bad_values_naming_the_argument_and_changes_nothing(pipe, conversation, argument, value, fragment):
    session = pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        understanding=conversation["understanding"],
        **SETTINGS,
    )
    piece = {"avatar_audio": conversation["avatar_audio"][:640]}
    if argument != "user_video":
        piece.update(user_video=conversation["user_video"][:1], user_landmarks=conversation["user_landmarks"][:1])
    piece[argument] = value
    with pytest.raises(ValueError) as error:
        session.push(**piece)
    assert f"`{argument}" in str(error.value) and fragment in str(error.value), str(error.value)
    assert session.avatar_audio.num_samples == 0 and len(session.user.frames) == 0


def test_session_stream_rate_is_fixed_by_its_first_piece(pipe, conversation):
    session = pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        with_user=False,
        **SETTINGS,
    )
    session.push(avatar_audio=_speech(44_100, 0.1), sampling_rate=44_100)
    with pytest.raises(ValueError, match="`avatar_audio` piece at `sampling_rate` = 16000 Hz after pieces at 44100"):
        session.push(avatar_audio=_speech(16_000, 0.1))
    with pytest.raises(ValueError, match="num_frames"):
        session.close(num_frames=0)


def test_a_refused_close_changes_nothing(pipe, conversation):
    """`close()` refused (no user frame yet) leaves the session as it was: 16 kHz audio may still follow, and the
    length is the audio's at the close that succeeds."""
    session = pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        understanding=conversation["understanding"],
        **SETTINGS,
    )
    session.push(avatar_audio=conversation["avatar_audio"][:3200])  # 5 frames
    with pytest.raises(ValueError, match="user_video"):
        session.close()
    assert not session.closed and session.num_frames is None
    session.push(
        avatar_audio=conversation["avatar_audio"][3200:],
        user_audio=conversation["user_audio"],
        user_video=conversation["user_video"],
        user_landmarks=conversation["user_landmarks"],
    )
    session.close()
    assert session.closed and session.num_frames == 9


# ----------------------------------------------------------------------------------------------------------------
# Accepted forms give the same result
# ----------------------------------------------------------------------------------------------------------------


def test_image_forms_convert_to_the_same_uint8():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    forms = {
        "uint8": image,
        "int64": image.astype(np.int64),
        "float32 [0, 1]": image.astype(np.float32) / 255,
        "float64 [0, 1]": image / 255.0,
        "PIL": PIL.Image.fromarray(image),
        "PIL RGBA": PIL.Image.fromarray(image).convert("RGBA"),
        "uint8 tensor": torch.from_numpy(image).permute(2, 0, 1),
        "float tensor [-1, 1]": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
        "float16 tensor [-1, 1]": (torch.from_numpy(image).permute(2, 0, 1).double() / 127.5 - 1).to(torch.float16),
    }
    for name, form in forms.items():
        np.testing.assert_array_equal(accepted.to_uint8_image(form), image, err_msg=name)
    # a video: each frame by the same rule
    video = np.stack([image, 255 - image])
    for form in (
        video,
        video / 255.0,
        list(video),
        [PIL.Image.fromarray(f) for f in video],
        torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1,
    ):
        np.testing.assert_array_equal(accepted.to_uint8_video(form), video)


def test_reference_image_forms_give_the_same_frames_and_float_images_find_the_face(pipe, conversation):
    """A uint8 image, the same image as floats in [0, 1] (float32 and float64), as PIL and as a [−1, 1] tensor give
    the same frames. The landmarks are detected (MediaPipe) on each: a float image in [0, 1] is converted to uint8
    before detection, so the face is found."""
    image = conversation["reference_image"]
    call = dict(reference_landmarks=None, num_frames=5, user_video=None, user_audio=None)
    expected = _render(pipe, conversation, reference_image=image, **call)
    forms = {
        "float32": image.astype(np.float32) / 255,
        "float64": image / 255.0,
        "PIL": PIL.Image.fromarray(image),
        "tensor": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
    }
    for name, form in forms.items():
        frames = _render(pipe, conversation, reference_image=form, **call)
        torch.testing.assert_close(frames, expected, atol=1e-6, rtol=0, msg=name)
    # ... and the reference matters, so equal frames mean equal inputs
    other = _render(pipe, conversation, reference_image=np.ascontiguousarray(image[:, ::-1]), **call)
    assert (other - expected).abs().max() > 1e-3


def test_user_video_forms_and_int16_audio_give_the_same_frames(pipe, conversation):
    expected = _render(pipe, conversation)
    video = conversation["user_video"]
    for name, form in {
        "float [0, 1]": video / 255.0,
        "PIL list": [PIL.Image.fromarray(frame) for frame in video],
        "tensor [-1, 1]": torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1,
    }.items():
        torch.testing.assert_close(_render(pipe, conversation, user_video=form), expected, atol=0, rtol=0, msg=name)
    # int16 PCM is the same audio as its float samples / 32768
    pcm = (conversation["avatar_audio"] * 32767).round().astype(np.int16)
    torch.testing.assert_close(
        _render(pipe, conversation, avatar_audio=pcm),
        _render(pipe, conversation, avatar_audio=pcm.astype(np.float32) / 32768),
        atol=0,
        rtol=0,
    )


def test_audio_at_44_1_khz_is_resampled_to_the_same_length_and_features(pipe, conversation):
    """The same speech sampled at 16 kHz and at 44.1 kHz: ``sampling_rate=44100`` gives the same number of frames
    (0.68 s: 17, not the 47 that 44.1k samples read as 16 kHz would give) and nearly the same wav2vec2 features."""
    seconds = 0.68
    low, high = _speech(16_000, seconds), _speech(44_100, seconds)
    resampled = accepted.to_16khz(high, "avatar_audio", 44_100)
    assert len(resampled) == len(low) == 10_880
    assert np.abs(resampled - low)[200:-200].max() < 1e-3  # the same signal
    call = dict(user_video=None, user_audio=None, num_frames=None, motion_frames=1)
    frames_low = _render(pipe, conversation, avatar_audio=low, **call)
    frames_high = _render(pipe, conversation, avatar_audio=high, sampling_rate=44_100, **call)
    assert frames_low.shape[1] == frames_high.shape[1] == 17
    features_low = pipe.encode_audio(low, 17)
    features_high = pipe.encode_audio(high, 17, sampling_rate=44_100)
    relative = (features_high - features_low).norm() / features_low.norm()
    assert relative < 0.05, float(relative)
    assert (pipe.encode_audio(_speech(16_000, seconds) * 0 + 0.1, 17) - features_low).norm() / features_low.norm() > 0.2


def test_a_session_resamples_pieces_exactly_as_the_whole(pipe, conversation):
    """A session fed 44.1 kHz audio in pieces of 441 samples holds exactly the 16 kHz samples of the whole resampled
    at once (the resampler's state runs across pieces; its tail comes at `close`), so its length is the same."""
    audio = _speech(44_100, 0.68)
    session = pipe.start_session(
        reference_image=conversation["reference_image"],
        reference_landmarks=conversation["reference_landmarks"],
        with_user=False,
        sampling_rate=44_100,
        **SETTINGS,
    )
    for first in range(0, len(audio), 441):
        session.push(avatar_audio=audio[first : first + 441])
    session.close()
    whole = accepted.to_16khz(audio, "avatar_audio", 44_100)
    np.testing.assert_array_equal(session.avatar_audio.waveform(), whole)
    assert session.num_frames == 17


def test_numbers_accept_numpy_scalars_and_refuse_bools():
    assert accepted.check_int(np.int64(3), "n") == 3 and type(accepted.check_int(np.int64(3), "n")) is int
    assert accepted.check_scale(np.float32(1.5), "s") == 1.5 and accepted.check_scale(2, "s") == 2.0
    assert accepted.check_sampling_rate(44_100.0) == 44_100
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ValueError, match="`n`"):
            accepted.check_int(bad, "n")
    with pytest.raises(ValueError, match="`s`"):
        accepted.check_scale(False, "s")


def test_audio_forms_convert_to_the_same_float_waveform():
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32768, 1000).astype(np.int16)
    expected = pcm.astype(np.float32) / 32768
    forms = {
        "int16": pcm,
        "int32": pcm.astype(np.int32) << 16,
        "float64": pcm / 32768.0,
        "tensor": torch.from_numpy(expected),
        "float16 tensor": torch.from_numpy(expected).half(),
        "list": (pcm / 32768.0).tolist(),
        "(1, n)": expected[None],
        "(n, 1)": expected[:, None],
    }
    for name, form in forms.items():
        waveform = accepted.to_waveform(form, "audio")
        assert waveform.dtype == np.float32 and waveform.shape == (1000,), name
        np.testing.assert_allclose(waveform, expected, atol=1e-3 if "float16" in name else 1e-7, err_msg=name)
