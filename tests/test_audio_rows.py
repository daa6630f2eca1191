"""The per-frame wav2vec2 rows have one definition (`echo.audio.audio_frame_features`), computed over the whole
conversation track with a fixed look-ahead: echo-prep's stored rows, the offline call's and a session's fed in pieces
are the same rows; a row never reads audio more than ``AUDIO_LOOKAHEAD_FRAMES`` = 49 frames after its frame; one
resampler gives the same samples whole or in pieces.

One synthetic conversation of 80 frames (3.2 s, 22.05 kHz source audio) prepared by echo-prep into clips of 18 frames
(clip edges inside the 25-frame audio blocks), with the tiny audio encoder of ``configs/models/tiny.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.media import load_audio, read_wav
from echo import clip_format
from echo.audio import (
    AUDIO_BLOCK_FRAMES,
    AUDIO_LOOKAHEAD_FRAMES,
    SAMPLES_PER_FRAME,
    StreamResampler,
    audio_frame_features,
    audio_track_features,
    final_rows,
    resample_audio,
)
from pipelines import EchoPipeline
from pipelines.inputs import to_16khz
from tests.tiny_models import tiny_components_as_trained

FRAMES, CLIP, RATE = 80, 18, 22_050


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from data_prep.testing import make_tiny_conversation_clips

    # The session's base folder is shared by every test module, so the conversation is prepared once per run.
    return make_tiny_conversation_clips(tmp_path_factory.getbasetemp() / "echo_audio_rows")


@pytest.fixture(scope="module")
def pipe(prepared):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    components = tiny_components_as_trained()
    encoder = prepared.parent / "wav2vec2"  # the audio encoder echo-prep loaded
    components["audio_encoder"] = Wav2Vec2Model.from_pretrained(encoder, use_safetensors=True).eval()
    components["feature_extractor"] = Wav2Vec2FeatureExtractor.from_pretrained(encoder)
    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _source(prepared: Path, participant: str) -> np.ndarray:
    waveform, rate = read_wav(prepared.parent / "source" / "conv0005" / f"{participant}.wav")
    assert rate == RATE
    return waveform


def _stored_rows(prepared: Path, avatar: str, role: str) -> np.ndarray:
    """The ``role`` rows echo-prep wrote in the clips with ``avatar`` as the avatar, clip after clip: conversation
    frames 0 … 79."""
    clips = sorted(prepared.glob(f"conv0005_{avatar}_c*"))
    assert [clip_format.read_clip(c).start_frame for c in clips] == [0, 18, 36, 54, 72]
    return np.concatenate([np.load(c / f"{role}_w2v.npy") for c in clips])


def _assert_stored_equal(stored: np.ndarray, rows: torch.Tensor):
    """echo-prep stores float16: each stored row is the float16 rounding of a value within 1e-5 of ``rows``."""
    assert stored.dtype == np.float16 and stored.shape == tuple(rows.shape)
    exact = rows.numpy()
    half_ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float32) / 2
    assert (np.abs(stored.astype(np.float32) - exact) <= half_ulp + 1e-5).all()
    assert np.array_equal(stored, exact.astype(np.float16))  # here, bit for bit the float16 of the same float32 rows


@pytest.fixture(scope="module")
def reference():
    from skimage.data import astronaut

    from echo.encoding import detect_face_landmarks

    image = astronaut()  # a real face, 512²
    return {"reference_image": image, "reference_landmarks": detect_face_landmarks(image)}


def _session_rows(pipe, reference, waveform, piece: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """The avatar rows of a session fed ``waveform`` at 22.05 kHz in pieces of ``piece`` samples: the rows final after
    each push (`echo.audio.final_rows`), and all rows after `close`."""
    session = pipe.start_session(
        **reference, with_user=False, height=32, width=32, num_frames_per_chunk=9, motion_frames=5, frame_inputs=False
    )
    early = []
    for first in range(0, len(waveform), piece):
        session.push(avatar_audio=waveform[first : first + piece], sampling_rate=RATE)
        final = int(min(session.avatar_audio.rows_final(False), FRAMES))
        if final:
            early.append((session.avatar_audio.num_samples, session.avatar_audio.encode(final, pipe).clone()))
    session.close(num_frames=FRAMES)
    return session.avatar_audio.encode(FRAMES, pipe), early


def test_prepared_rows_equal_the_offline_and_session_rows(prepared, pipe, reference):
    """For both participants, as avatar and as user, the rows echo-prep wrote clip by clip are the rows of the whole
    track that the offline call (`EchoPipeline.encode_audio`, what `__call__` feeds) and a session fed 22.05 kHz pieces
    of 1000 samples compute; the rows a session has final before the end of input are already those rows."""
    for participant in ("A", "B"):
        source = _source(prepared, participant)
        offline = pipe.encode_audio(source, FRAMES, sampling_rate=RATE)  # FRAMES, NL, D
        _assert_stored_equal(_stored_rows(prepared, participant, "avatar"), offline)
        _assert_stored_equal(_stored_rows(prepared, "AB".replace(participant, ""), "user"), offline)
        streamed, early = _session_rows(pipe, reference, source, 1000)
        assert torch.equal(streamed, offline)
        assert [len(rows) for _, rows in early][-1] == 50 and early[0][1].shape[0] == AUDIO_BLOCK_FRAMES
        for num_samples, rows in early:
            assert rows.shape[0] == final_rows(num_samples)
            assert torch.equal(rows, offline[: rows.shape[0]])
    # The stored rows are not those of each clip's audio encoded alone (the definition echo-prep had before).
    clip = sorted(prepared.glob("conv0005_A_c0001"))[0]
    per_clip = audio_track_features(
        pipe.audio_encoder, pipe.feature_extractor, clip_format.read_clip_wav(clip, "avatar"), CLIP
    )
    assert (per_clip - torch.from_numpy(np.load(clip / "avatar_w2v.npy").astype(np.float32))).abs().max() > 1e-2


@pytest.mark.parametrize("t", [74, 75, 60, 30])
def test_changing_the_audio_after_frame_t_changes_no_row_before_t_minus_the_look_ahead(prepared, pipe, t):
    """Audio from frame ``t`` on replaced by noise: rows before ``t − 49`` are bit for bit unchanged; the first
    changed row is the first of the earliest block whose right context reaches frame ``t`` (row 25 for t = 74, where
    the bound is met exactly; row 50 for t = 75, one frame past block 1's context; row 25 for t = 60; row 0 for
    t = 30), so a wider look-ahead, or a narrower one, fails this test."""
    source = resample_audio(_source(prepared, "A"), RATE)
    changed = source.copy()
    noise = np.random.default_rng(t).standard_normal(len(source) - t * SAMPLES_PER_FRAME).astype(np.float32)
    changed[t * SAMPLES_PER_FRAME :] = 0.3 * noise
    before = audio_track_features(pipe.audio_encoder, pipe.feature_extractor, source, FRAMES)
    after = audio_track_features(pipe.audio_encoder, pipe.feature_extractor, changed, FRAMES)
    differs = (before - after).abs().flatten(1).amax(1) > 0  # FRAMES
    first_changed = int(differs.nonzero()[0])
    assert AUDIO_LOOKAHEAD_FRAMES == 49
    assert not differs[: max(0, t - AUDIO_LOOKAHEAD_FRAMES)].any()
    earliest_block = max(0, -(-(t - AUDIO_LOOKAHEAD_FRAMES) // AUDIO_BLOCK_FRAMES))
    assert first_changed == AUDIO_BLOCK_FRAMES * earliest_block
    assert differs[first_changed:].all()  # every later row reads the changed audio


def test_rows_of_any_range_are_the_rows_of_the_whole_track(prepared, pipe):
    """A range that starts and ends inside blocks, and a waveform that dropped its oldest samples (a session's
    buffer), give the whole track's rows: the rows depend on the frame only, not on what else is encoded."""
    source = resample_audio(_source(prepared, "B"), RATE)
    model, extractor = pipe.audio_encoder, pipe.feature_extractor
    whole = audio_track_features(model, extractor, source, FRAMES)
    assert torch.equal(audio_frame_features(model, extractor, source, 13, 61), whole[13:61])
    offset = 25 * SAMPLES_PER_FRAME  # block 2's left context starts at frame 25
    assert torch.equal(audio_frame_features(model, extractor, source[offset:], 50, FRAMES, offset), whole[50:])
    with pytest.raises(ValueError, match="after the context"):
        audio_frame_features(model, extractor, source[offset:], 49, 50, offset)


@pytest.mark.parametrize("rate", [22_050, 44_100, 48_000, 8_000])
def test_one_resampler_gives_the_same_samples_whole_or_in_pieces(tmp_path, rate):
    """`echo.audio.StreamResampler` fed pieces of irregular sizes gives exactly the samples of the whole waveform
    resampled at once (`resample_audio`), which is what echo-prep (`load_audio`), the offline call (`to_16khz`) and a
    session (its stream's resampler) compute."""
    rng = np.random.default_rng(rate)
    seconds = 1.3
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    whole = resample_audio(wave, rate)
    assert abs(len(whole) - seconds * 16_000) <= 64
    resampler, pieces, first = StreamResampler(rate), [], 0
    while first < len(wave):
        size = int(rng.integers(1, 3000))
        pieces.append(resampler(wave[first : first + size]))
        first += size
    pieces.append(resampler.flush())
    assert np.array_equal(np.concatenate(pieces), whole)
    assert np.array_equal(to_16khz(wave, "avatar_audio", rate), whole)
    if rate >= 16_000:  # echo-prep refuses sources below 16 kHz
        clip_format.write_wav(tmp_path / "a.wav", wave, rate)
        stored, _ = read_wav(tmp_path / "a.wav")  # 16-bit PCM on disk
        assert np.array_equal(load_audio(tmp_path / "a.wav"), resample_audio(stored, rate))
