"""Synthetic dyadic conversations: a real face photo animated into talking and listening video, with real speech.

Two participants take turns saying short English sentences, spoken by espeak-ng (its recordings of the default
dialogue and of the tests' utterances ship in ``synthetic/speech``, so those need no espeak-ng; see `speech_pcm`).
Each participant is a face photo that ships with an installed package (an `Identity`: ``skimage.data.astronaut()``,
``skimage.data.camera()`` in grey, matplotlib's ``grace_hopper.jpg``; mirrored, hue-shifted, zoomed or shifted),
animated by moving its MediaPipe face-mesh landmarks and warping the photo piecewise-affinely over a triangulation of
those landmarks:

- **talking**: the jaw, lower lip and chin open with the participant's own speech envelope (short-time RMS per
  frame), and the mouth interior between the inner lip contours is painted dark;
- **listening**: nods and a slight smile (mouth corners out and up) while the other participant speaks;
- **head sway**: a slow head yaw / pitch (rotating the landmarks with their MediaPipe depth) and translation, scaled
  per conversational state (own speech, listening, mutual silence) by the participant's `MotionStyle`.

By default (``identities=(0, 1)``, no styles) the conversation is the original one: the astronaut and its mirrored,
hue-shifted copy, one sentence per turn at 170 words per minute with short pauses, and a constant sway. The demo set
(`synthetic.demo_set`) passes a `DialogueStyle` (sentence pool, voices and speaking rates, turns of several
sentences, long mutual silences) and a `MotionStyle` per participant (amplitudes and speeds; nearly still in mutual
silence) drawn from its seed, so that listening behaviour differs visibly between the other one speaking and silence.

The animated landmark positions are exact by construction (the warp maps every rest landmark to its animated
position), so they are returned as ground truth: `SyntheticConversation.landmarks[p]` is `(T, 478, 2)` in pixels of
the written video, and `SyntheticConversation.mouth_masks(p)` rasterises the known mouth region from them with the
same rule as `echo.masks.rasterize_masks`.

Layouts written (`make_conversation(layout=...)`), both read by `data_prep.layouts`:

- ``"pairs"``: ``<out_dir>/<name>/{A.mp4, A.wav, B.mp4, B.wav, transcript.json}`` (or the speech muxed into the
  mp4s, ``audio_in_video=True``) with
  ``{"segments": [{"speaker": "A"|"B", "start", "end", "text"}]}`` (seconds).
- ``"seamless"``: ``<out_dir>/V00_S0001_I<interaction:08d>_P<p:04d>A.{mp4,wav,json}`` for the two participants; the
  json holds ``{"id", "metadata:transcript": [{"start", "end", "transcript", "words": [{"word", "start", "end"}]}],
  "metadata:vad": [{"start", "end"}]}`` (seconds, this participant only).

A ground-truth file ``<out_dir>/<conversation_id>.truth.npz`` (landmarks, speech envelopes) is written beside the
layout; the layout readers ignore it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from echo.audio import resample_audio
from echo.clip_format import write_wav
from echo.faces import FaceMesh
from echo.masks import FACE_OVAL, rasterize_masks
from echo.media import write_video

SENTENCES = (
    "Hello there, how are you today?",
    "I am doing well, thank you.",
    "That sounds really great.",
    "Tell me more about your trip.",
    "We walked along the river all morning.",
    "Really? What did you see?",
    "Mostly birds, and a few boats.",
    "I would love to go there one day.",
    "You should, it is very quiet.",
    "Yes, I think I will.",
    "What are you working on now?",
    "A small project about faces.",
)
VOICES = ("en-us+m3", "en-us+f3")

# A larger pool for the demo set's training conversations (it includes SENTENCES) ...
TRAIN_SENTENCES = SENTENCES + (
    "Good morning, did you sleep well?",
    "Not really, the neighbours were loud.",
    "Have you had lunch yet?",
    "I made soup with the last of the carrots.",
    "The train was late again this morning.",
    "Do you want to come for a walk later?",
    "I finished the book you gave me.",
    "How did it end?",
    "Everyone went home, and nothing changed.",
    "That is a strange ending for a story.",
    "My sister is visiting next week.",
    "We could all have dinner together.",
    "I think it will rain this afternoon.",
    "Then we should take an umbrella.",
    "Did you hear the news about the bridge?",
    "They are going to paint it blue.",
    "What time does the shop close?",
    "At six, but on Sundays it opens late.",
    "I need to buy bread and some apples.",
    "Can you help me move the table?",
    "Of course, just tell me when.",
    "The garden looks lovely in spring.",
    "We planted tomatoes and some beans.",
    "My cat sleeps on the window all day.",
    "That sounds like a good life.",
    "Let me think about it for a moment.",
    "I am not sure that is a good idea.",
    "Well, we could try it once.",
    "Music helps me concentrate at work.",
    "Which songs do you listen to?",
    "Mostly old jazz records from my father.",
    "Shall we meet again on Friday?",
)
# ... and sentences that only the demo set's held-out conversations say.
HELDOUT_SENTENCES = (
    "The lighthouse was painted white last summer.",
    "Could you pass me the map, please?",
    "We missed the ferry by two minutes.",
    "My grandmother knits scarves for the whole family.",
    "The museum opens a new room in October.",
    "I prefer tea without sugar.",
    "Our team won the match on Saturday.",
    "The mountain road was covered in fog.",
    "Someone left a bicycle by the gate.",
    "I keep forgetting where I put my keys.",
    "The bakery on the corner sells warm pretzels.",
    "Please remind me to call the dentist.",
)


@dataclass(frozen=True)
class Identity:
    """A face photo that ships with an installed package, as one participant's base frame.

    Attributes:
        source (`str`): ``"astronaut"`` (`skimage.data.astronaut`), ``"camera"`` (`skimage.data.camera`, grey → RGB)
            or ``"grace_hopper"`` (matplotlib's sample ``grace_hopper.jpg``).
        mirror (`bool`): flip left-right.
        hue (`int`): hue rotation in OpenCV units (0-179; 8 ≈ 16°).
        zoom (`float`): > 1 zooms in on the face (a smaller window), < 1 out (the photo's border is reflected).
        offset (`tuple[float, float]`): the window's shift (x, y) as a fraction of its side.
    """

    source: str = "astronaut"
    mirror: bool = False
    hue: int = 0
    zoom: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)


# Square window (centre x, centre y, side) of each source photo holding the head with some shoulders and background.
SOURCE_WINDOWS = {
    "astronaut": (224.0, 160.0, 320.0),
    "camera": (228.0, 168.0, 200.0),
    "grace_hopper": (264.0, 240.0, 500.0),
}
IDENTITIES = {
    "astronaut": Identity("astronaut"),
    "astronaut_mirror_hue": Identity("astronaut", mirror=True, hue=8),
    "astronaut_warm": Identity("astronaut", hue=172),
    "astronaut_green": Identity("astronaut", mirror=True, hue=22),
    "astronaut_zoom": Identity("astronaut", zoom=1.3, offset=(0.0, 0.04)),
    "astronaut_wide": Identity("astronaut", mirror=True, zoom=0.85, offset=(0.0, 0.08)),
    "astronaut_shift": Identity("astronaut", offset=(0.12, 0.06)),
    "camera": Identity("camera"),
    "camera_mirror": Identity("camera", mirror=True, zoom=1.1),
    "grace_hopper": Identity("grace_hopper"),
    "grace_hopper_mirror": Identity("grace_hopper", mirror=True, hue=6, offset=(-0.06, 0.0)),
}
# The two participants of the original conversation (`make_conversation`'s default `identities=(0, 1)`).
LEGACY_IDENTITIES = ("astronaut", "astronaut_mirror_hue")


@dataclass(frozen=True)
class DialogueStyle:
    """How the dialogue is spoken: the sentence pool, voices, speaking rates, turn lengths and pauses.

    The defaults are the original dialogue: one sentence per turn, 170 words per minute, short pauses.

    Attributes:
        sentences (`tuple[str, ...]`): the pool the turns draw from (a random order per conversation, cycled).
        voices (`tuple[str, str]`): espeak-ng voices of the two participants.
        speeds (`tuple[int, int]`): espeak-ng speaking rates (words per minute) of the two participants.
        gap (`tuple[float, float]`): silence between two turns, seconds, uniform in this range.
        long_gap_prob (`float`): probability that a gap is a long mutual silence instead, drawn from ``long_gap``.
        long_gap (`tuple[float, float]`): seconds of a long mutual silence.
        sentences_per_turn (`tuple[int, int]`): a turn says between these many sentences (inclusive) in one breath.
    """

    sentences: tuple[str, ...] = SENTENCES
    voices: tuple[str, str] = VOICES
    speeds: tuple[int, int] = (170, 170)
    gap: tuple[float, float] = (0.15, 0.4)
    long_gap_prob: float = 0.0
    long_gap: tuple[float, float] = (1.0, 3.0)
    sentences_per_turn: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class MotionStyle:
    """Head motion of one participant. The defaults are the original animation (a constant sway).

    Attributes:
        sway_deg (`tuple[float, float]`): amplitude of the slow yaw and pitch sway, degrees.
        sway_periods (`tuple[float, float]`): periods of the yaw and pitch sway, seconds.
        nod_deg (`float`): amplitude of the listening nods (pitch, downwards half-waves), degrees.
        nod_period (`float`): seconds per nod.
        smile (`float`): smile strength while listening (0-1).
        shift (`float`): amplitude of the head translation, fraction of the frame side.
        gains (`tuple[float, float, float]`): sway (and translation) scale while the participant speaks, while it
            listens (the other one speaks) and in mutual silence.
        speech_bob_deg (`float`): pitch that follows the participant's own speech envelope, degrees.
    """

    sway_deg: tuple[float, float] = (4.0, 3.0)
    sway_periods: tuple[float, float] = (3.3, 2.7)
    nod_deg: float = 4.0
    nod_period: float = 1.1
    smile: float = 0.8
    shift: float = 0.02
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    speech_bob_deg: float = 0.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> MotionStyle:
        """A random conversational style: varied amplitudes and speeds, nods while listening, still in silence."""
        return cls(
            sway_deg=(float(rng.uniform(2.0, 5.5)), float(rng.uniform(1.5, 4.0))),
            sway_periods=(float(rng.uniform(1.6, 4.0)), float(rng.uniform(1.4, 3.5))),
            nod_deg=float(rng.uniform(3.0, 7.0)),
            nod_period=float(rng.uniform(0.7, 1.5)),
            smile=float(rng.uniform(0.3, 1.0)),
            shift=float(rng.uniform(0.01, 0.03)),
            gains=(float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.0, 0.08))),
            speech_bob_deg=float(rng.uniform(0.5, 2.5)),
        )


# MediaPipe face-mesh rings used by the animator.
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_CORNERS = (61, 291)
# The astronaut's head (rows, cols) inside `skimage.data.astronaut()` used as the base frame.
BASE_WINDOW = (slice(0, 320), slice(64, 384))


@dataclass
class SyntheticConversation:
    """What `make_conversation` wrote, with the ground truth of its animation.

    Attributes:
        conversation_id (`str`): the pairs folder name or the Seamless ``V_S_I`` prefix.
        participants (`list[str]`): participant ids (``["A", "B"]`` or Seamless ``P<p>A`` ids).
        videos, audios (`dict[str, Path]`): written files per participant.
        transcript (`list[dict]`): ``{"speaker", "start", "end", "text"}`` segments, seconds.
        landmarks (`dict[str, np.ndarray]`): `(T, 478, 2)` animated landmark positions per participant (video pixels).
        envelope (`dict[str, np.ndarray]`): `(T,)` mouth opening in [0, 1] per participant.
        fps, sample_rate, size, num_frames: the written streams' parameters.
    """

    conversation_id: str
    participants: list[str]
    videos: dict[str, Path]
    audios: dict[str, Path]
    transcript: list[dict]
    landmarks: dict[str, np.ndarray]
    envelope: dict[str, np.ndarray]
    fps: float
    sample_rate: int
    size: int
    num_frames: int
    files: list[Path] = field(default_factory=list)

    def mouth_masks(self, participant: str, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Known mouth region per frame, `(T, H, W)` bool: `echo.masks.rasterize_masks` lip rule on the truth."""

        height = height or self.size
        width = width or self.size
        lip, _ = rasterize_masks(self.landmarks[participant], height, width, source_size=(self.size, self.size))
        return lip


# ----------------------------------------------------------------------------------------------------------------
# Speech
# ----------------------------------------------------------------------------------------------------------------

# espeak-ng's own output (22.05 kHz 16-bit mono PCM, FLAC-compressed, lossless) for every utterance the default
# dialogue, the test suite and `echo-demo --config` say, so that they need no espeak-ng (see speech/README.md).
SPEECH_DIR = Path(__file__).with_name("speech")
# With this environment variable set to a file, every `speech_pcm` call appends its utterance to it as a JSON line
# ``{"text", "voice", "speed"}``: how the shipped set is collected (`ship_speech` records the log).
SPEECH_LOG_ENV = "ECHO_SPEECH_LOG"
# Set to 1, an utterance without a shipped clip is an error even where espeak-ng is installed (.ci/run sets it: the
# suite must pass on a machine without espeak-ng).
SPEECH_RECORDED_ONLY_ENV = "ECHO_SPEECH_RECORDED_ONLY"


def speech_key(text: str, voice: str, speed: int) -> str:
    """File stem of the shipped clip of one utterance: a hash of ``(text, voice, speed)``."""
    return hashlib.sha256(json.dumps([text, voice, int(speed)]).encode()).hexdigest()[:24]


def _espeak(text: str, voice: str, speed: int) -> tuple[np.ndarray, int]:
    """espeak-ng's PCM `(N,)` int16 and its sample rate."""
    from scipy.io import wavfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(int(speed)), "-w", str(path), text], check=True, capture_output=True
        )
        rate, pcm = wavfile.read(path)
    assert pcm.dtype == np.int16 and pcm.ndim == 1, f"espeak-ng wrote {pcm.dtype} {pcm.shape}, expected mono int16"
    return pcm, int(rate)


def _read_flac(path: Path) -> tuple[np.ndarray, int]:
    """A mono 16-bit FLAC file as `(N,)` int16 PCM and its sample rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        pcm = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
        rate = stream.codec_context.sample_rate
    assert pcm.dtype == np.int16, f"{path.name}: {pcm.dtype} samples, expected 16-bit PCM"
    return pcm, int(rate)


def _write_flac(path: Path, pcm: np.ndarray, rate: int) -> None:
    """Write `(N,)` int16 PCM as mono FLAC (lossless)."""
    import av

    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono", options={"compression_level": "12"})
        stream.format = "s16"
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def speech_pcm(text: str, voice: str = VOICES[0], speed: int = 170) -> tuple[np.ndarray, int]:
    """espeak-ng's rendering of ``text``: `(N,)` int16 PCM and its rate (22050 Hz), untrimmed.

    The shipped clip when there is one (the same audio on every machine, whatever espeak-ng version is installed),
    espeak-ng otherwise.

    Raises:
        `RuntimeError`: no clip is shipped for the utterance and espeak-ng is not installed, or
            ``ECHO_SPEECH_RECORDED_ONLY=1``.
    """
    if log := os.environ.get(SPEECH_LOG_ENV):
        with open(log, "a") as handle:
            handle.write(json.dumps({"text": text, "voice": voice, "speed": int(speed)}) + "\n")
    shipped = SPEECH_DIR / f"{speech_key(text, voice, speed)}.flac"
    if shipped.is_file():
        return _read_flac(shipped)
    missing = f"No recorded clip of {text!r} (voice {voice!r}, speed {speed}) ships in {SPEECH_DIR}"
    if os.environ.get(SPEECH_RECORDED_ONLY_ENV, "0") not in ("", "0"):
        raise RuntimeError(
            f"{missing} and {SPEECH_RECORDED_ONLY_ENV} is set, so espeak-ng may not speak it: whatever the test suite "
            "says must be recorded, to run without espeak-ng; record it with `synthetic.conversations.ship_speech` "
            "(synthetic/speech/README.md)."
        )
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            f"{missing} and espeak-ng is not installed. The shipped clips cover the default dialogue (`SENTENCES`, "
            "`VOICES`, 170 words per minute), the test suite and `echo-demo --config`; other dialogues (the demo set "
            "of `make train-demo`, custom `DialogueStyle`s) need espeak-ng: `sudo apt-get install espeak-ng` "
            "(Debian/Ubuntu), `brew install espeak-ng` (macOS)."
        )
    return _espeak(text, voice, speed)


def synthesize_speech(text: str, voice: str = VOICES[0], sample_rate: int = 16_000, speed: int = 170) -> np.ndarray:
    """Speak ``text`` (espeak-ng, or its shipped recording, see `speech_pcm`); mono float32 at ``sample_rate``,
    leading and trailing silence trimmed."""
    pcm, rate = speech_pcm(text, voice, speed)
    waveform = resample_audio(pcm.astype(np.float32) / 32768.0, rate, sample_rate)
    loud = np.flatnonzero(np.abs(waveform) > 0.01)
    return waveform[loud[0] : loud[-1] + 1] if loud.size else waveform


def ship_speech(utterances, folder: str | Path = SPEECH_DIR) -> list[Path]:
    """Record ``utterances`` (``{"text", "voice", "speed"}`` mappings, e.g. the lines of an ``ECHO_SPEECH_LOG``) with
    espeak-ng into ``folder`` as ``<speech_key>.flac``, and list them all in ``folder/index.json``; returns the new
    files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    written = []
    for item in utterances:
        text, voice, speed = item["text"], item["voice"], int(item["speed"])
        key = speech_key(text, voice, speed)
        if key in index and (folder / f"{key}.flac").is_file():
            continue
        pcm, rate = _espeak(text, voice, speed)
        _write_flac(folder / f"{key}.flac", pcm, rate)
        index[key] = {"text": text, "voice": voice, "speed": speed}
        written.append(folder / f"{key}.flac")
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=1) + "\n")
    return written


def _dialogue(
    seconds: float, rng: np.random.Generator, sample_rate: int, style: DialogueStyle | None = None
) -> tuple[list[dict], list[np.ndarray]]:
    """Alternating turns filling ``seconds``; returns transcript segments and one audio track per participant.

    A turn is one segment: one to ``style.sentences_per_turn[1]`` sentences spoken in one espeak-ng call. With the
    default style the random draws (and so the dialogue of a seed) are those of the original generator.
    """
    style = style or DialogueStyle()
    total = int(round(seconds * sample_rate))
    tracks = [np.zeros(total, dtype=np.float32), np.zeros(total, dtype=np.float32)]
    segments = []
    sentences = style.sentences
    order = rng.permutation(len(sentences))
    time = float(rng.uniform(0.1, 0.3))
    turn = 0
    spoken = 0
    low, high = style.sentences_per_turn
    while time < seconds - 0.3:
        speaker = turn % 2
        count = int(rng.integers(low, high + 1)) if high > low else low
        text = " ".join(sentences[order[(spoken + k) % len(order)]] for k in range(count))
        spoken += count
        speech = synthesize_speech(text, style.voices[speaker], sample_rate, speed=style.speeds[speaker])
        start = int(round(time * sample_rate))
        stop = min(total, start + len(speech))
        tracks[speaker][start:stop] = speech[: stop - start] * 0.8
        segments.append({"speaker": speaker, "start": start / sample_rate, "end": stop / sample_rate, "text": text})
        if style.long_gap_prob > 0 and rng.uniform() < style.long_gap_prob:
            gap = float(rng.uniform(*style.long_gap))
        else:
            gap = float(rng.uniform(*style.gap))
        time = stop / sample_rate + gap
        turn += 1
    return segments, tracks


def speech_envelope(waveform: np.ndarray, num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """Mouth opening per frame in [0, 1]: RMS per frame, normalised by its 95th percentile, lightly smoothed."""
    hop = sample_rate / fps
    rms = np.array(
        [np.sqrt(np.mean(waveform[int(t * hop) : int((t + 1) * hop)] ** 2) + 1e-12) for t in range(num_frames)]
    )
    reference = np.percentile(rms[rms > 1e-3], 95) if (rms > 1e-3).any() else 1.0
    opening = np.clip(rms / reference, 0.0, 1.0)
    opening[rms < 1e-3] = 0.0
    return np.convolve(np.pad(opening, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid").astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Faces
# ----------------------------------------------------------------------------------------------------------------


def identity_image(identity: Identity) -> np.ndarray:
    """The square base photo of ``identity`` at its window's native resolution, `(S, S, 3)` uint8 RGB."""
    import cv2
    import skimage.data

    if identity.source == "astronaut":
        image = skimage.data.astronaut()
    elif identity.source == "camera":
        image = np.repeat(skimage.data.camera()[..., None], 3, axis=2)
    elif identity.source == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            image = np.asarray(Image.open(handle).convert("RGB"))
    else:
        raise ValueError(f"identity source is {identity.source!r}, expected one of {sorted(SOURCE_WINDOWS)}")
    centre_x, centre_y, side = SOURCE_WINDOWS[identity.source]
    if identity.source == "astronaut" and identity.zoom == 1.0 and tuple(identity.offset) == (0.0, 0.0):
        window = image[BASE_WINDOW]  # the original base frame, pixel for pixel
    else:
        # Window of side `side / zoom` around the shifted centre; outside the photo its border is reflected.
        size = int(round(side))
        crop = side / identity.zoom
        x0 = centre_x + identity.offset[0] * crop - crop / 2
        y0 = centre_y + identity.offset[1] * crop - crop / 2
        scale = size / crop
        matrix = np.array([[scale, 0.0, -x0 * scale], [0.0, scale, -y0 * scale]])
        window = cv2.warpAffine(
            image,
            matrix,
            (size, size),
            flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_REFLECT_101,
        )
    window = np.ascontiguousarray(window)
    if identity.mirror:
        window = np.ascontiguousarray(window[:, ::-1])
    if identity.hue:
        hsv = cv2.cvtColor(window, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + identity.hue) % 180
        window = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return window


def _identity(identity: int | str | Identity) -> Identity:
    if isinstance(identity, Identity):
        return identity
    if isinstance(identity, (int, np.integer)):
        if not 0 <= identity < len(LEGACY_IDENTITIES):
            raise ValueError(
                f"identity {identity} is not 0 or 1 (the original participants); name one of {sorted(IDENTITIES)}"
            )
        identity = LEGACY_IDENTITIES[identity]
    if identity not in IDENTITIES:
        raise ValueError(f"identity {identity!r} is unknown; expected one of {sorted(IDENTITIES)}")
    return IDENTITIES[identity]


@functools.lru_cache(maxsize=16)
def base_face(variant: int | str | Identity, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The base frame of identity ``variant`` at ``size``², and its `(478, 3)` landmarks (x, y, z pixels).

    ``variant`` is an `Identity`, a name in `IDENTITIES`, or 0 / 1 (the original astronaut and its mirrored,
    hue-shifted copy).
    """
    import cv2

    image = identity_image(_identity(variant))
    with FaceMesh(static_image_mode=True) as mesh:
        landmarks = mesh.with_depth(image)
    if landmarks is None:
        raise RuntimeError(f"MediaPipe found no face in synthetic identity {variant!r}.")
    scale = size / image.shape[0]
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return image, landmarks * scale


class FaceAnimator:
    """Animate one base face: `render(opening, smile, yaw, pitch, shift)` → frame `(S, S, 3)` and landmarks.

    The control points are the 478 landmarks, a ring around the head that follows the head motion at 60 % (hair and
    neck move along) and fixed points on the frame border; their Delaunay triangulation at rest is kept, and each
    frame is the piecewise-affine warp that takes every rest triangle to its animated position.
    """

    def __init__(self, variant: int | str | Identity, size: int):
        from scipy.spatial import Delaunay

        self.image, rest = base_face(variant, size)
        # Mouth interior: dark red on a colour photo, dark grey on a grey one.
        grey = bool(np.ptp(self.image.astype(np.int16), axis=2).max() <= 2)
        self.mouth_colour = (40, 40, 40) if grey else (70, 20, 30)
        self.size = size
        self.rest = rest.astype(np.float64)  # 478, 3
        xy = self.rest[:, :2]
        self.centre = self.rest.mean(axis=0)
        lips = xy[list(LIPS_OUTER_LOWER)]
        self.mouth_width = float(np.linalg.norm(xy[61] - xy[291]))
        oval = xy[list(FACE_OVAL)]
        self.face_height = float(oval[:, 1].max() - oval[:, 1].min())
        self.mouth_centre = lips.mean(axis=0)
        ring = self.centre[:2] + 1.5 * (oval - self.centre[:2])
        ring = ring[(ring > 1).all(axis=1) & (ring < size - 2).all(axis=1)]
        edge = np.linspace(0, size - 1, 6)
        border = np.concatenate(
            [
                np.stack([edge, np.zeros(6)], 1),
                np.stack([edge, np.full(6, size - 1.0)], 1),
                np.stack([np.zeros(4), edge[1:-1]], 1),
                np.stack([np.full(4, size - 1.0), edge[1:-1]], 1),
            ]
        )
        self.num_ring = len(ring)
        self.controls = np.concatenate([xy, ring, border])  # N, 2
        self.triangles = Delaunay(self.controls).simplices
        # Jaw weights: 1 on the lower lip, falling off below the upper lip and away from the mouth laterally.
        upper = xy[list(LIPS_INNER_UPPER)][:, 1].mean()
        below = np.clip((xy[:, 1] - upper) / (0.12 * self.face_height), 0.0, 1.0)
        lateral = np.exp(-(((xy[:, 0] - self.mouth_centre[0]) / (1.3 * self.mouth_width)) ** 2))
        self.jaw = below * lateral
        self.jaw[list(LIPS_INNER_UPPER)] = 0.0
        self.jaw[[i for i in LIPS_OUTER_LOWER + LIPS_INNER_LOWER if i not in MOUTH_CORNERS + (78, 308)]] = 1.0
        self.jaw[list(MOUTH_CORNERS) + [78, 308]] = 0.5
        self.smile = np.exp(-((np.linalg.norm(xy - xy[61], axis=1) / (0.25 * self.mouth_width)) ** 2)) - np.exp(
            -((np.linalg.norm(xy - xy[291], axis=1) / (0.25 * self.mouth_width)) ** 2)
        )  # +1 near the left corner, −1 near the right one
        ys, xs = np.mgrid[0:size, 0:size]
        self.pixels = np.stack([xs.ravel(), ys.ravel(), np.ones(size * size)], axis=1)  # HW, 3

    def landmarks(self, opening: float, smile: float, yaw: float, pitch: float, shift: np.ndarray) -> np.ndarray:
        """Animated `(478, 2)` landmark positions (pixels); angles in radians, ``shift`` `(2,)` pixels."""
        points = self.rest.copy()
        points[:, 1] += opening * 0.45 * self.mouth_width * self.jaw
        points[:, 0] -= smile * 0.10 * self.mouth_width * self.smile
        points[:, 1] -= smile * 0.06 * self.mouth_width * np.abs(self.smile)
        centred = points - self.centre
        cos_y, sin_y, cos_p, sin_p = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
        x = centred[:, 0] * cos_y + centred[:, 2] * sin_y
        z = -centred[:, 0] * sin_y + centred[:, 2] * cos_y
        y = centred[:, 1] * cos_p - z * sin_p
        return np.stack([x, y], axis=1) + self.centre[:2] + shift

    def render(self, opening: float, smile: float, yaw: float, pitch: float, shift: np.ndarray):
        """One frame: `((S, S, 3) uint8, (478, 2) float32 landmarks)`."""
        import cv2

        points = self.landmarks(opening, smile, yaw, pitch, shift)
        head = points[list(FACE_OVAL)] - self.rest[list(FACE_OVAL), :2]
        ring_motion = 0.6 * head[: self.num_ring] if self.num_ring == len(FACE_OVAL) else 0.6 * head.mean(0)
        controls = self.controls.copy()
        controls[:478] = points
        controls[478 : 478 + self.num_ring] += ring_motion
        # Affine map of each animated triangle back to its rest triangle: source = A @ [x, y, 1].
        dst = controls[self.triangles]  # K, 3, 2
        src = self.controls[self.triangles]
        dst_h = np.concatenate([dst, np.ones((*dst.shape[:2], 1))], axis=2)  # K, 3, 3
        affine = np.linalg.solve(dst_h, src).transpose(0, 2, 1)  # K, 2, 3
        label = np.full((self.size, self.size), -1, dtype=np.int32)
        for k, triangle in enumerate(np.round(dst * 16).astype(np.int32)):
            cv2.fillConvexPoly(label, triangle, k, lineType=cv2.LINE_8, shift=4)
        label = label.ravel()
        inside = label >= 0
        source = self.pixels[:, :2].copy()
        source[inside] = np.einsum("nij,nj->ni", affine[label[inside]], self.pixels[inside])
        maps = source.reshape(self.size, self.size, 2).astype(np.float32)
        frame = cv2.remap(self.image, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if opening > 0.05:
            inner = np.concatenate([points[list(LIPS_INNER_UPPER)], points[list(LIPS_INNER_LOWER)][::-1]])
            cv2.fillPoly(frame, [np.round(inner * 16).astype(np.int32)], self.mouth_colour, cv2.LINE_AA, shift=4)
        return frame, points.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Conversation
# ----------------------------------------------------------------------------------------------------------------


def make_conversation(
    out_dir: str | Path,
    layout: str = "pairs",
    seconds: float = 4.0,
    size: int = 256,
    seed: int = 0,
    fps: float = 25.0,
    sample_rate: int = 16_000,
    name: str | None = None,
    interaction: int = 1,
    audio_in_video: bool = False,
    identities: tuple[int | str | Identity, int | str | Identity] = (0, 1),
    dialogue: DialogueStyle | None = None,
    motion: tuple[MotionStyle, MotionStyle] | None = None,
) -> SyntheticConversation:
    """Write one synthetic two-person conversation in ``layout`` under ``out_dir``.

    Args:
        out_dir (`str` or `Path`): the layout root (created if needed).
        layout (`str`, defaults to `"pairs"`): ``"pairs"`` or ``"seamless"`` (see the module docstring).
        seconds (`float`, defaults to 4.0): conversation length.
        size (`int`, defaults to 256): square video side in pixels (even).
        seed (`int`, defaults to 0): chooses sentences, pauses and head-motion phases.
        fps (`float`, defaults to 25.0): video frame rate (other rates exercise the 25 fps resampling of prep).
        sample_rate (`int`, defaults to 16000): the WAV files' rate.
        name (`str`, *optional*): pairs folder name, defaults to ``conv<seed:04d>``.
        interaction (`int`, defaults to 1): Seamless interaction number ``I<interaction:08d>``.
        audio_in_video (`bool`, defaults to `False`): pairs layout only; mux each speech track into its mp4 (AAC at
            ``sample_rate``) instead of writing a separate wav.
        identities (`tuple`, defaults to `(0, 1)`): the two participants' faces: `Identity` objects, names in
            `IDENTITIES`, or 0 / 1 (the astronaut and its mirrored, hue-shifted copy).
        dialogue (`DialogueStyle`, *optional*): sentences, voices, speaking rates, turn lengths and pauses; defaults to
            the original dialogue.
        motion (`tuple[MotionStyle, MotionStyle]`, *optional*): head motion per participant; defaults to the
            original animation (a constant sway, nods and a smile while the other one speaks).

    Returns:
        `SyntheticConversation` with the written paths and the animation's ground truth.
    """
    if layout not in ("pairs", "seamless"):
        raise ValueError(f"`layout` is {layout!r}, expected 'pairs' or 'seamless'.")
    if size % 2:
        raise ValueError(f"`size` is {size}, expected an even number (yuv420p).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_frames = int(round(seconds * fps))

    # 1. Dialogue: alternating turns of real speech, one track per participant.
    segments, tracks = _dialogue(num_frames / fps, rng, 16_000, dialogue)
    openings = [speech_envelope(track, num_frames, fps, 16_000) for track in tracks]

    # 2. Animation: talking follows the own envelope, listening nods and smiles while the other one speaks, the sway
    # is scaled by the conversational state (own speech, listening, mutual silence).
    time = np.arange(num_frames) / fps
    styles = motion or (MotionStyle(), MotionStyle())
    frames, landmarks = [], []
    for p in range(2):
        animator = FaceAnimator(identities[p], size)
        style = styles[p]
        phase = rng.uniform(0, 2 * np.pi, size=4)
        if style.gains[0] == style.gains[1] == style.gains[2]:  # the original animation: a constant sway
            other_speaks = np.convolve(openings[1 - p] > 0.05, np.ones(9) / 9, mode="same")
            gain = np.full(num_frames, style.gains[0])
        else:
            speaking, other_speaks = _conversation_states(openings[p], openings[1 - p], fps)
            gain = np.dot(style.gains, [speaking, other_speaks, 1 - speaking - other_speaks])
        yaw = np.deg2rad(style.sway_deg[0]) * gain * np.sin(2 * np.pi * time / style.sway_periods[0] + phase[0])
        pitch = np.deg2rad(style.sway_deg[1]) * gain * np.sin(2 * np.pi * time / style.sway_periods[1] + phase[1])
        pitch += (
            np.deg2rad(style.nod_deg)
            * other_speaks
            * np.maximum(0, np.sin(2 * np.pi * time / style.nod_period + phase[2]))
        )
        if style.speech_bob_deg:
            bob = np.convolve(openings[p], np.ones(5) / 5, mode="same")
            pitch += np.deg2rad(style.speech_bob_deg) * bob
        smile = style.smile * other_speaks
        shift = (
            style.shift
            * size
            * gain[:, None]
            * np.stack([np.sin(2 * np.pi * time / 4.1 + phase[3]), np.sin(2 * np.pi * time / 3.7)], 1)
        )
        rendered = [animator.render(openings[p][t], smile[t], yaw[t], pitch[t], shift[t]) for t in range(num_frames)]
        frames.append(np.stack([r[0] for r in rendered]))
        landmarks.append(np.stack([r[1] for r in rendered]))

    # 3. Files in the requested layout.
    written = []
    if layout == "pairs":
        conversation_id = name or f"conv{seed:04d}"
        participants = ["A", "B"]
        folder = out_dir / conversation_id
        folder.mkdir(parents=True, exist_ok=True)
        stems = [folder / p for p in participants]
        transcript = [{**s, "speaker": participants[s["speaker"]]} for s in segments]
        (folder / "transcript.json").write_text(json.dumps({"segments": transcript}, indent=1))
        written.append(folder / "transcript.json")
    else:
        conversation_id = f"V00_S0001_I{interaction:08d}"
        participants = [f"P{2 * interaction - 1 + p:04d}A" for p in range(2)]
        stems = [out_dir / f"{conversation_id}_{p}" for p in participants]
        transcript = [{**s, "speaker": participants[s["speaker"]]} for s in segments]
        for p, stem in enumerate(stems):
            own = [s for s in segments if s["speaker"] == p]
            entries = [
                {
                    "start": s["start"],
                    "end": s["end"],
                    "transcript": s["text"],
                    "words": _word_times(s["text"], s["start"], s["end"]),
                }
                for s in own
            ]
            vad = [{"start": s["start"], "end": s["end"]} for s in own]
            payload = {"id": stem.name, "metadata:transcript": entries, "metadata:vad": vad}
            stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
            written.append(stem.with_suffix(".json"))
    videos, audios = {}, {}
    if audio_in_video and layout != "pairs":
        raise ValueError("`audio_in_video` applies to the pairs layout; the Seamless layout has a wav per participant.")
    for p, stem in enumerate(stems):
        track = resample_audio(tracks[p], 16_000, sample_rate)
        videos[participants[p]] = stem.with_suffix(".mp4")
        if audio_in_video:
            audios[participants[p]] = videos[participants[p]]
            write_video(videos[participants[p]], frames[p], fps=fps, audio=track, sample_rate=sample_rate)
        else:
            audios[participants[p]] = stem.with_suffix(".wav")
            write_video(videos[participants[p]], frames[p], fps=fps)
            write_wav(audios[participants[p]], track, sample_rate)
        written += sorted({videos[participants[p]], audios[participants[p]]})

    conversation = SyntheticConversation(
        conversation_id=conversation_id,
        participants=participants,
        videos=videos,
        audios=audios,
        transcript=transcript,
        landmarks=dict(zip(participants, landmarks)),
        envelope=dict(zip(participants, openings)),
        fps=fps,
        sample_rate=sample_rate,
        size=size,
        num_frames=num_frames,
        files=written,
    )
    np.savez(
        out_dir / f"{conversation_id}.truth.npz",
        **{f"landmarks_{p}": landmarks[i] for i, p in enumerate(participants)},
        **{f"envelope_{p}": openings[i] for i, p in enumerate(participants)},
    )
    return conversation


def _conversation_states(own: np.ndarray, other: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame weights `(T,)` of speaking and listening (mutual silence is the rest) from the two envelopes.

    A participant speaks where its envelope is above 0.05, held through the short breaks between words and smoothed
    over ~0.5 s so that the head eases in and out of stillness.
    """
    width = max(3, int(round(0.5 * fps)) | 1)
    kernel = np.ones(width) / width
    speaking = np.clip(np.convolve((own > 0.05).astype(np.float64), kernel, mode="same") * 2, 0, 1)
    listening = np.clip(np.convolve((other > 0.05).astype(np.float64), kernel, mode="same") * 2, 0, 1)
    return speaking, np.minimum(listening, 1 - speaking)


def _word_times(text: str, start: float, end: float) -> list[dict]:
    """Spread the words of ``text`` over ``[start, end]`` proportionally to their length."""
    words = text.split()
    weights = np.array([len(w) + 1 for w in words], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0], np.cumsum(weights) / weights.sum()])
    return [{"word": w, "start": float(a), "end": float(b)} for w, a, b in zip(words, edges[:-1], edges[1:])]
