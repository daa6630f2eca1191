"""A fresh machine (Python and make, no espeak-ng, no sox) runs the suite: the synthetic speech the tests and
`echo-demo --config` say ships as espeak-ng's own recordings (synthetic/speech), the same samples espeak-ng gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthetic import conversations as synthetic
from synthetic.conversations import (
    SENTENCES,
    SPEECH_DIR,
    VOICES,
    DialogueStyle,
    _dialogue,
    _espeak,
    ship_speech,
    speech_key,
    speech_pcm,
    synthesize_speech,
)
from tests.test_synthetic import STYLED_DIALOGUE, STYLED_SECONDS, STYLED_SEED

ROOT = Path(__file__).resolve().parents[1]
# espeak-ng and sox with their aliases: what a fresh machine lacks.
MISSING_PROGRAMS = {"espeak-ng", "espeak", "speak", "speak-ng", "sox", "soxi", "play", "rec"}
HAS_ESPEAK = synthetic.shutil.which("espeak-ng") is not None


@pytest.fixture(scope="module")
def fresh_path(tmp_path_factory) -> str:
    """A PATH of links to every program on this one except espeak-ng and sox, as on a fresh machine."""
    folder = tmp_path_factory.mktemp("fresh_bin")
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(entry):
            continue
        for program in os.scandir(entry):
            link = folder / program.name
            if program.name in MISSING_PROGRAMS or os.path.lexists(link) or not os.access(program.path, os.X_OK):
                continue
            link.symlink_to(program.path)
    return str(folder)


def _tracks(seed: int, seconds: float, style: DialogueStyle | None = None) -> tuple[list[dict], list[np.ndarray]]:
    """The dialogue `make_conversation(seed=seed, seconds=seconds, dialogue=style)` speaks (its first random draws)."""
    return _dialogue(round(seconds * 25) / 25, np.random.default_rng(seed), 16_000, style)


def test_the_default_dialogue_and_the_tests_utterances_ship(tmp_path, monkeypatch):
    """Every sentence of the default dialogue in both voices is recorded (so every seed and length of
    `make_conversation`'s default dialogue is covered); the index names each file by its key; the folder is small."""
    index = json.loads((SPEECH_DIR / "index.json").read_text())
    for key, utterance in index.items():
        assert speech_key(utterance["text"], utterance["voice"], utterance["speed"]) == key, utterance
    assert sorted(p.stem for p in SPEECH_DIR.glob("*.flac")) == sorted(index)
    for voice in VOICES:
        for text in SENTENCES:
            assert speech_key(text, voice, 170) in index, (text, voice)
    size = sum(p.stat().st_size for p in SPEECH_DIR.iterdir())
    assert size < 3e6, size

    # A recorded utterance is read, never re-synthesised (the same audio on every machine, whatever espeak-ng version
    # it has); the log the set is collected with gets one line per utterance spoken.
    def no_espeak(*args):
        raise AssertionError(f"espeak-ng ran for a recorded utterance {args}")

    monkeypatch.setattr(synthetic, "_espeak", no_espeak)
    log = tmp_path / "speech.jsonl"
    monkeypatch.setenv(synthetic.SPEECH_LOG_ENV, str(log))
    synthesize_speech(SENTENCES[0], VOICES[1])
    _tracks(3, 3.2)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"text": SENTENCES[0], "voice": VOICES[1], "speed": 170}
    assert len(lines) >= 3 and all(speech_key(**line) in index for line in lines)


def test_conversations_need_no_espeak_ng_or_sox_and_sound_as_with_it(fresh_path, monkeypatch, tmp_path):
    """Without espeak-ng and sox on PATH the tests' dialogues are spoken from the recordings; with espeak-ng (and no
    recordings) they are the same samples."""
    cases = [(seed, 6.0, None) for seed in range(12)] + [(STYLED_SEED, STYLED_SECONDS, STYLED_DIALOGUE)]
    with monkeypatch.context() as patch:
        patch.setenv("PATH", fresh_path)
        assert synthetic.shutil.which("espeak-ng") is None and synthetic.shutil.which("sox") is None
        shipped = [_tracks(seed, seconds, style) for seed, seconds, style in cases]
    for segments, tracks in shipped:
        assert len(segments) >= 2 and all(np.abs(track).max() > 0.1 for track in tracks)
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed: the recordings cannot be compared with it")
    monkeypatch.setattr(synthetic, "SPEECH_DIR", tmp_path / "no_recordings")
    monkeypatch.delenv(synthetic.SPEECH_RECORDED_ONLY_ENV, raising=False)
    for (seed, seconds, style), (segments, tracks) in zip(cases, shipped):
        live_segments, live_tracks = _tracks(seed, seconds, style)
        assert live_segments == segments, seed
        for track, live in zip(tracks, live_tracks):
            np.testing.assert_array_equal(track, live)


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed")
def test_every_recording_is_what_espeak_ng_says(fresh_path, tmp_path, monkeypatch):
    """Each shipped clip is espeak-ng's output sample for sample, and `ship_speech` records a new one losslessly."""
    index = json.loads((SPEECH_DIR / "index.json").read_text())
    for utterance in index.values():
        pcm, rate = speech_pcm(utterance["text"], utterance["voice"], utterance["speed"])
        live, live_rate = _espeak(utterance["text"], utterance["voice"], utterance["speed"])
        assert rate == live_rate == 22_050 and np.array_equal(pcm, live), utterance

    new = {"text": "A sentence that is not shipped.", "voice": "en-us+f3", "speed": 160}
    (path,) = ship_speech([new], tmp_path)
    assert path.name == f"{speech_key(**new)}.flac"
    assert json.loads((tmp_path / "index.json").read_text()) == {path.stem: new}
    for rate in (16_000, 22_050, 48_000):
        with monkeypatch.context() as patch:  # the recording, read back without espeak-ng
            patch.setattr(synthetic, "SPEECH_DIR", tmp_path)
            patch.setenv("PATH", fresh_path)
            recorded = synthesize_speech(new["text"], new["voice"], rate, new["speed"])
        with monkeypatch.context() as patch:  # espeak-ng itself
            patch.setattr(synthetic, "SPEECH_DIR", tmp_path / "no_recordings")
            patch.delenv(synthetic.SPEECH_RECORDED_ONLY_ENV, raising=False)
            live = synthesize_speech(new["text"], new["voice"], rate, new["speed"])
        np.testing.assert_array_equal(recorded, live)


def test_unrecorded_speech_without_espeak_ng_says_how_to_install_it(fresh_path, monkeypatch):
    monkeypatch.delenv(synthetic.SPEECH_RECORDED_ONLY_ENV, raising=False)
    monkeypatch.setenv("PATH", fresh_path)
    with pytest.raises(RuntimeError, match=r"clip of 'Never recorded\.'.*not installed.*apt-get install espeak-ng"):
        synthesize_speech("Never recorded.")


def test_recorded_only_refuses_espeak_ng_for_unrecorded_speech(monkeypatch):
    """.ci/run's ECHO_SPEECH_RECORDED_ONLY=1: a test saying something unrecorded fails in CI, where espeak-ng is
    installed, as it would on a fresh machine; recorded speech is unaffected."""
    monkeypatch.setenv(synthetic.SPEECH_RECORDED_ONLY_ENV, "1")
    with pytest.raises(RuntimeError, match=r"clip of 'Never recorded\.'.*ECHO_SPEECH_RECORDED_ONLY.*ship_speech"):
        synthesize_speech("Never recorded.")
    assert len(synthesize_speech(SENTENCES[1], VOICES[0])) > 8_000


def test_a_fresh_machine_runs_the_tiny_prepared_set_test(fresh_path):
    """The fixture behind most of the suite (a synthetic conversation prepared by echo-prep), run by pytest in a
    process whose PATH has no espeak-ng and no sox."""
    env = {k: v for k, v in os.environ.items() if k != synthetic.SPEECH_LOG_ENV}
    env["PATH"] = fresh_path
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_data_prep.py::test_tiny_prepared_set_for_other_tests",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
