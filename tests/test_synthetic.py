"""The synthetic conversation generator: real speech, a real face animated by it, and both source layouts."""

import json
import re
import wave

import numpy as np
import pytest

from data_prep.media import probe_video, read_video, read_wav
from data_prep.transcripts import read_seamless_json
from echo.faces import FaceMesh
from synthetic.conversations import TRAIN_SENTENCES, DialogueStyle, MotionStyle, make_conversation


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_conversation(tmp_path_factory.mktemp("pairs"), layout="pairs", seconds=3.2, size=192, seed=3)


@pytest.fixture(scope="module")
def seamless(tmp_path_factory):
    root = tmp_path_factory.mktemp("seamless")
    return root, make_conversation(
        root, layout="seamless", seconds=1.6, size=128, seed=5, fps=30, sample_rate=22_050, interaction=7
    )


def _mouth_height(points):
    """Outer lip height: lower lip bottom (17) minus upper lip top (0), the extent the lip mask covers."""
    return points[..., 17, 1] - points[..., 0, 1]


def test_animation_follows_speech_and_is_seen_by_mediapipe(pairs):
    """MediaPipe, run on the written video, finds the animated landmarks; the mouth opens with the own speech."""
    for speaker in pairs.participants:
        frames = read_video(pairs.videos[speaker])
        assert frames.shape == (pairs.num_frames, 192, 192, 3)
        with FaceMesh(static_image_mode=True) as mesh:
            detected = np.stack([mesh(frame) for frame in frames])
        assert np.isfinite(detected).all(), f"MediaPipe lost the face of participant {speaker}"
        truth = pairs.landmarks[speaker]
        face_height = np.ptp(truth[0, :, 1])
        error = np.linalg.norm(detected - truth, axis=-1).mean(axis=1)
        assert error.max() < 0.05 * face_height, error.max() / face_height

        # The ground-truth mouth gap is the speech envelope (talking) and MediaPipe measures the same opening.
        envelope = pairs.envelope[speaker]
        assert envelope.max() > 0.5
        gap_truth, gap_seen = _mouth_height(truth), _mouth_height(detected)
        assert np.corrcoef(gap_truth, envelope)[0, 1] > 0.95
        assert np.corrcoef(gap_seen, envelope)[0, 1] > 0.85
        # Listening (silent) frames keep the mouth nearly closed; speaking frames open it.
        silent, loud = envelope < 0.02, envelope > 0.5
        assert silent.any() and loud.any()
        assert gap_seen[loud].mean() > gap_seen[silent].mean() + 0.03 * face_height


def test_speech_tracks_follow_the_transcript_turns(pairs):
    """Each wav holds speech inside its own transcript segments and silence elsewhere; turns do not overlap."""
    segments = sorted(pairs.transcript, key=lambda s: s["start"])
    assert {s["speaker"] for s in segments} == {"A", "B"}
    for first, second in zip(segments, segments[1:]):
        assert second["start"] >= first["end"] and second["speaker"] != first["speaker"]
    for speaker in pairs.participants:
        audio, rate = read_wav(pairs.audios[speaker])
        assert rate == 16_000 and len(audio) == round(pairs.num_frames / pairs.fps * rate)
        inside = np.zeros(len(audio), dtype=bool)
        for s in segments:
            if s["speaker"] == speaker:
                inside[int(s["start"] * rate) : int(s["end"] * rate)] = True
        assert np.sqrt(np.mean(audio[inside] ** 2)) > 0.02
        assert np.abs(audio[~inside]).max() == 0.0
    stored = json.loads((pairs.videos["A"].parent / "transcript.json").read_text())["segments"]
    assert stored == pairs.transcript


def test_ground_truth_file_matches_the_returned_truth(pairs):
    truth = np.load(pairs.videos["A"].parent.parent / f"{pairs.conversation_id}.truth.npz")
    for speaker in pairs.participants:
        np.testing.assert_array_equal(truth[f"landmarks_{speaker}"], pairs.landmarks[speaker])
        np.testing.assert_array_equal(truth[f"envelope_{speaker}"], pairs.envelope[speaker])


def test_participants_differ_but_share_the_dialogue(pairs):
    """The second participant is a distinct image (mirrored, hue-shifted) with its own voice track."""
    a, b = read_video(pairs.videos["A"])[0], read_video(pairs.videos["B"])[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
    audio_a, _ = read_wav(pairs.audios["A"])
    audio_b, _ = read_wav(pairs.audios["B"])
    assert np.abs(audio_a * audio_b).max() == 0.0  # never both speaking


def test_seamless_layout_files_and_schema(seamless):
    """File ids V_S_I_P<p>A, rates as requested, json with metadata:transcript and metadata:vad of that speaker."""
    root, conversation = seamless
    assert conversation.conversation_id == "V00_S0001_I00000007"
    assert conversation.participants == ["P0013A", "P0014A"]
    names = sorted(p.name for p in root.iterdir())
    for participant in conversation.participants:
        stem = f"{conversation.conversation_id}_{participant}"
        assert {f"{stem}.mp4", f"{stem}.wav", f"{stem}.json"} <= set(names)
        assert re.fullmatch(r"V\d+_S\d+_I\d+_P\d+[A-Z]?", stem)
        probe = probe_video(root / f"{stem}.mp4")
        assert len(probe["times"]) == conversation.num_frames == 48
        assert probe["fps"] == pytest.approx(30.0)
        with wave.open(str(root / f"{stem}.wav")) as handle:
            assert handle.getframerate() == 22_050
        segments, vad = read_seamless_json(root / f"{stem}.json")
        own = [s for s in conversation.transcript if s["speaker"] == participant]
        assert [s["text"] for s in segments] == [s["text"] for s in own]
        assert [(v["start"], v["end"]) for v in vad] == [(s["start"], s["end"]) for s in own]
        payload = json.loads((root / f"{stem}.json").read_text())
        for entry in payload["metadata:transcript"]:
            words = entry["words"]
            assert " ".join(w["word"] for w in words) == entry["transcript"]
            assert words[0]["start"] == pytest.approx(entry["start"]) and words[-1]["end"] == pytest.approx(
                entry["end"]
            )


# ----------------------------------------------------------------------------------------------------------------
# Variety for the demo set: identities, dialogue and motion styles
# ----------------------------------------------------------------------------------------------------------------


def test_every_identity_is_a_distinct_face_that_mediapipe_finds():
    from synthetic.conversations import IDENTITIES, base_face

    images = {}
    for name in IDENTITIES:
        image, landmarks = base_face(name, 128)  # raises when MediaPipe finds no face
        assert image.shape == (128, 128, 3) and landmarks.shape == (478, 3) and np.isfinite(landmarks).all()
        images[name] = image.astype(np.int16)
    names = sorted(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(images[a] - images[b]).mean() > 3, (a, b)
    assert np.ptp(images["camera"], axis=2).max() <= 2  # the grey photo stays grey
    # 0 and 1 are the original participants.
    np.testing.assert_array_equal(base_face(0, 128)[0], images["astronaut"])
    np.testing.assert_array_equal(base_face(1, 128)[0], images["astronaut_mirror_hue"])


# Long turns and only long pauses; its speech ships in synthetic/speech (tests/test_fresh_setup.py).
STYLED_DIALOGUE = DialogueStyle(
    sentences=TRAIN_SENTENCES,
    voices=("en-gb+m1", "en-us+f2"),
    speeds=(190, 220),
    long_gap_prob=1.0,
    long_gap=(1.4, 1.8),
    sentences_per_turn=(2, 2),
)
STYLED_SEED, STYLED_SECONDS = 11, 12.0


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    rng = np.random.default_rng(0)
    return make_conversation(
        tmp_path_factory.mktemp("styled"),
        seconds=STYLED_SECONDS,
        size=128,
        seed=STYLED_SEED,
        identities=("camera", "grace_hopper"),
        dialogue=STYLED_DIALOGUE,
        motion=(MotionStyle.sample(rng), MotionStyle.sample(rng)),
    )


def test_styled_dialogue_has_long_turns_and_mutual_silences(styled):
    segments = styled.transcript
    assert len(segments) >= 3
    for first, second in zip(segments, segments[1:]):
        assert second["speaker"] != first["speaker"]
        assert 1.4 - 1e-6 <= second["start"] - first["end"] <= 1.8 + 1e-6  # every pause is a long mutual silence
    assert all(len(re.findall(r"[.?!]", s["text"])) == 2 for s in segments[:-1])  # two sentences per turn


def test_styled_motion_nods_while_listening_and_stays_still_in_mutual_silence(styled):
    """Head motion (ground truth, away from the mouth) is several times larger while the other one speaks than in
    mutual silence: the listening behaviour a model must learn from the user condition."""
    frame_time = np.arange(styled.num_frames) / styled.fps

    def within(speakers: set, margin: float) -> np.ndarray:
        """Frames inside a segment of ``speakers`` widened by ``margin`` seconds (narrowed when negative)."""
        inside = np.zeros(styled.num_frames, dtype=bool)
        for s in styled.transcript:
            if s["speaker"] in speakers:
                inside |= (frame_time >= s["start"] - margin) & (frame_time <= s["end"] + margin)
        return inside

    for speaker in styled.participants:
        rigid = styled.landmarks[speaker][:, [1, 10, 33, 263]].mean(axis=1)  # nose tip, forehead, eye corners
        energy = np.linalg.norm(np.diff(rigid, axis=0), axis=1)  # T - 1
        listening = within(set(styled.participants) - {speaker}, -0.3)[1:]  # well inside the other one's turns
        silence = ~within(set(styled.participants), 0.4)[1:]  # far from anybody's speech
        assert listening.sum() > 25 and silence.sum() > 10
        assert energy[listening].mean() > 3 * energy[silence].mean(), (
            speaker,
            energy[listening].mean(),
            energy[silence].mean(),
        )
