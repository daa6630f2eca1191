"""echo-prep end to end on synthetic conversations: format, alignment, masks, Seamless pairing, resume, bad inputs."""

import json
import shutil
import wave

import numpy as np
import pytest

from data_prep.cli import main, run_prep
from data_prep.layouts import find_conversations
from data_prep.media import SAMPLE_RATE, probe_video, read_video, read_wav, resample_indices, write_video, write_wav
from data_prep.stages import PrepOptions
from data_prep.testing import make_tiny_prepared_set, save_tiny_wav2vec2
from data_prep.transcripts import read_seamless_json
from echo import clip_format
from echo.framing import source_to_crop
from echo.masks import rasterize_masks
from synthetic.conversations import make_conversation


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


@pytest.fixture(scope="module")
def prepared_512(tmp_path_factory, encoder):
    """A 2 s conversation filmed at 30 fps with 22.05 kHz audio, prepared to 512² at 25 fps."""
    root = tmp_path_factory.mktemp("e2e")
    conversation = make_conversation(root / "src", "pairs", seconds=2.0, size=192, seed=1, fps=30, sample_rate=22_050)
    options = PrepOptions(wav2vec2=str(encoder), size=512, clip_seconds=10.0)
    summary = run_prep(root / "src", "pairs", root / "out", options, progress=False)
    assert summary.failed == []
    return conversation, root / "out"


def test_end_to_end_512_at_25_fps(prepared_512):
    conversation, out = prepared_512
    num_frames = 50  # 2 s at 25 fps, from 60 source frames at 30 fps
    clips = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.is_dir())
    assert clips == ["conv0001_A_c0000", "conv0001_B_c0000"]
    for clip in clips:
        meta = json.loads((out / clip / "meta.json").read_text())
        assert (meta["fps"], meta["num_frames"], meta["sample_rate"], meta["size"]) == (25, num_frames, 16_000, 512)
        for role in ("avatar", "user"):
            probe = probe_video(out / clip / f"{role}.mp4")
            assert len(probe["times"]) == num_frames and probe["fps"] == 25
            assert (probe["width"], probe["height"]) == (512, 512)
            audio, rate = read_wav(out / clip / f"{role}.wav")
            assert rate == SAMPLE_RATE and len(audio) == num_frames * SAMPLE_RATE // 25
            features = np.load(out / clip / f"{role}_w2v.npy")
            assert features.shape == (num_frames, 3, 32) and features.dtype == np.float16  # exactly T rows
            landmarks = np.load(out / clip / f"{role}_landmarks.npy")
            assert landmarks.shape == (num_frames, 478, 2) and np.isfinite(landmarks).all()
            assert len(meta[role]["crop_boxes"]) == num_frames
        # Read back through the format's owner: the track of the clip is its conversation and avatar.
        record = clip_format.read_clip(out / clip)
        assert (record.conversation, record.avatar, record.start_frame) == ("conv0001", clip.split("_")[1], 0)
        assert clip_format.read_w2v(out / clip, "user", num_frames).dtype == np.float16
    assert [p.name for p in clip_format.list_clip_folders(out)] == clips


def test_prepared_audio_is_the_source_audio_resampled(prepared_512):
    """The 22.05 kHz source, resampled to 16 kHz, is what the clip's wav holds (same speech, same timing)."""
    conversation, out = prepared_512
    source, rate = read_wav(conversation.audios["A"])
    clip, _ = read_wav(out / "conv0001_A_c0000" / "avatar.wav")
    from data_prep.media import resample_audio

    expected = resample_audio(source, rate)[: len(clip)]
    assert np.abs(clip - expected).max() < 2e-3  # 16-bit quantisation twice


def test_lip_mask_from_saved_landmarks_overlaps_the_animated_mouth(prepared_512):
    """Lip masks rasterised from avatar_landmarks.npy vs. the known animated mouth, in crop pixels: IoU ≥ 0.5."""
    conversation, out = prepared_512
    for participant in conversation.participants:
        clip = out / f"conv0001_{participant}_c0000"
        meta = json.loads((clip / "meta.json").read_text())
        boxes = np.asarray(meta["avatar"]["crop_boxes"], dtype=np.float32)
        # Prepared frame k shows the source frame nearest to k / 25 s.
        index = resample_indices(np.arange(conversation.num_frames) / conversation.fps, meta["num_frames"])
        truth = np.stack(
            [source_to_crop(conversation.landmarks[participant][i], boxes[k], 512) for k, i in enumerate(index)]
        )
        predicted, _ = rasterize_masks(np.load(clip / "avatar_landmarks.npy"), 512, 512)
        known, _ = rasterize_masks(truth, 512, 512)
        iou = (predicted & known).sum((1, 2)) / (predicted | known).sum((1, 2))
        assert iou.min() >= 0.5, (participant, iou.min())
        # Frame by frame, not just on average: the lip area follows the known mouth's (opening, head motion), so
        # landmarks saved out of frame order (or of another participant) fail here.
        area_corr = np.corrcoef(predicted.sum((1, 2)), known.sum((1, 2)))[0, 1]
        assert area_corr > 0.7, (participant, area_corr)
        # The masks move with the mouth: the opening frames have a larger lip area than the closed ones.
        envelope = conversation.envelope[participant][index]
        if envelope.max() > 0.5:
            assert predicted[envelope > 0.5].sum((1, 2)).mean() > predicted[envelope < 0.02].sum((1, 2)).mean()


def test_the_two_assignments_of_a_conversation_swap_roles(prepared_512):
    """Clip A/B and clip B/A hold the same streams with avatar and user swapped, and swapped transcript roles."""
    _, out = prepared_512
    a, b = out / "conv0001_A_c0000", out / "conv0001_B_c0000"
    assert (a / "user.mp4").read_bytes() == (b / "avatar.mp4").read_bytes()
    assert (a / "avatar.mp4").read_bytes() != (b / "avatar.mp4").read_bytes()
    np.testing.assert_array_equal(np.load(a / "user_w2v.npy"), np.load(b / "avatar_w2v.npy"))
    np.testing.assert_array_equal(np.load(a / "user_landmarks.npy"), np.load(b / "avatar_landmarks.npy"))
    ta = json.loads((a / "transcript.json").read_text())["segments"]
    tb = json.loads((b / "transcript.json").read_text())["segments"]
    swap = {"avatar": "user", "user": "avatar"}
    assert [(swap[s["speaker"]], s["text"]) for s in ta] == [(s["speaker"], s["text"]) for s in tb]


def test_features_follow_the_clip_audio(prepared_512, encoder):
    """avatar_w2v.npy is the loaded encoder applied to avatar.wav, not to the user's audio."""
    from data_prep.audio_features import Wav2Vec2Features

    _, out = prepared_512
    clip = out / "conv0001_A_c0000"
    features = Wav2Vec2Features(encoder, num_threads=1)
    own = features(read_wav(clip / "avatar.wav")[0], 0, 50).astype(np.float32)
    other = features(read_wav(clip / "user.wav")[0], 0, 50).astype(np.float32)
    saved = np.load(clip / "avatar_w2v.npy").astype(np.float32)
    assert np.abs(saved - own).mean() < 0.1 * np.abs(saved - other).mean()


def test_wav2vec2_rows_are_exactly_one_per_frame(encoder):
    from data_prep.audio_features import Wav2Vec2Features

    features = Wav2Vec2Features(encoder, num_threads=1)
    rng = np.random.default_rng(0)
    for num_frames in (1, 7, 24, 33):  # within one block, across a block edge
        assert features(rng.standard_normal(num_frames * 640).astype(np.float32), 0, num_frames).shape[0] == num_frames
    # Several 25-frame blocks: exactly T rows; audio shorter than T is silence after its end; any range of frames.
    wave = rng.standard_normal(70 * 640 - 100).astype(np.float32)
    assert features(wave, 0, 70).shape == (70, 3, 32)
    np.testing.assert_array_equal(features(wave, 13, 61), features(wave, 0, 70)[13:61])


def test_resampling_to_25_fps_takes_the_nearest_frame():
    times = np.arange(90) / 30.0
    index = resample_indices(times, 75)
    brute = np.abs(times[None] - (np.arange(75) / 25.0)[:, None]).argmin(axis=1)
    np.testing.assert_array_equal(index, brute)
    # A 25 fps source maps onto itself.
    np.testing.assert_array_equal(resample_indices(np.arange(40) / 25.0, 40), np.arange(40))


def test_seamless_layout_pairs_participants_and_reads_transcripts_and_vad(tmp_path, encoder):
    root = tmp_path / "seamless"
    first = make_conversation(root, "seamless", seconds=1.0, size=128, seed=2, interaction=1)
    second = make_conversation(root, "seamless", seconds=1.0, size=128, seed=4, interaction=2)
    # A participant whose partner is missing (a third interaction) and a file that is not a Seamless id.
    shutil.copyfile(first.videos["P0001A"], root / "V00_S0001_I00000003_P0005B.mp4")
    shutil.copyfile(first.videos["P0001A"], root / "notes.mp4")
    conversations, failures = find_conversations(root, "seamless")
    assert [c.id for c in conversations] == ["V00_S0001_I00000001", "V00_S0001_I00000002"]
    assert [[p.id for p in c.participants] for c in conversations] == [["P0001A", "P0002A"], ["P0003A", "P0004A"]]
    assert all(p.audio is not None and p.metadata is not None for c in conversations for p in c.participants)
    assert [(f.input, f.file) for f in failures] == [("V00_S0001_I00000003", "V00_S0001_I00000003_P0005B.mp4")]

    options = PrepOptions(wav2vec2=str(encoder), size=64, clip_seconds=1.0)
    summary = run_prep(root, "seamless", tmp_path / "out", options, progress=False)
    assert len(summary.clips_written) == 4 and [f["input"] for f in summary.failed] == ["V00_S0001_I00000003"]
    for conversation in (first, second):
        avatar, user = conversation.participants
        clip = tmp_path / "out" / f"{conversation.conversation_id}_{avatar}_c0000"
        meta = json.loads((clip / "meta.json").read_text())
        assert meta["avatar"]["participant"] == avatar and meta["user"]["participant"] == user
        assert meta["source"]["avatar_video"] == conversation.videos[avatar].name
        transcript = json.loads((clip / "transcript.json").read_text())
        own, own_vad = read_seamless_json(conversation.videos[avatar].with_suffix(".json"))
        other, other_vad = read_seamless_json(conversation.videos[user].with_suffix(".json"))
        assert [s["text"] for s in transcript["segments"] if s["speaker"] == "avatar"] == [s["text"] for s in own]
        assert [s["text"] for s in transcript["segments"] if s["speaker"] == "user"] == [s["text"] for s in other]
        assert transcript["vad"]["avatar"] == [[round(v["start"], 4), round(min(v["end"], 1.0), 4)] for v in own_vad]
        assert transcript["vad"]["user"] == [[round(v["start"], 4), round(min(v["end"], 1.0), 4)] for v in other_vad]


class _Killed(KeyboardInterrupt):
    """Stands for a kill: not an `Exception`, so the run does not record it as a failed input and stops."""


def _tree(root):
    return {p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "prep_summary.json"}


def test_resume_after_a_kill_gives_the_uninterrupted_outputs(tmp_path, encoder):
    make_conversation(tmp_path / "src", "pairs", seconds=1.44, size=128, seed=6)
    options = PrepOptions(wav2vec2=str(encoder), size=64, clip_seconds=0.48, min_clip_seconds=0.48)
    reference = run_prep(tmp_path / "src", "pairs", tmp_path / "full", options, progress=False)
    assert len(reference.clips_written) == 6  # 3 clips × 2 avatar/user assignments
    # The three clips of an assignment form one track, in conversation order, each starting where the last ended.
    track = clip_format.conversation_siblings(clip_format.read_clip(tmp_path / "full" / "conv0006_A_c0002"))
    assert [(r.path.name, r.start_frame) for r in track] == [(f"conv0006_A_c000{k}", 12 * k) for k in range(3)]

    written = []

    def kill_during_fourth_clip(clip, tmp_dir):
        written.append(clip)
        # The fourth clip folder is complete in its tmp folder but not renamed yet: the first window's two
        # assignments are done, the second window's first assignment is done, its second one is not.
        if len(written) == 4:
            raise _Killed

    with pytest.raises(_Killed):
        run_prep(
            tmp_path / "src", "pairs", tmp_path / "resumed", options, progress=False, on_clip=kill_during_fourth_clip
        )
    finished = sorted(p for p in (tmp_path / "resumed").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in finished] == sorted(written[:3])
    assert len(list((tmp_path / "resumed").glob(".tmp-*"))) == 1  # the half-done clip is not visible as a clip
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for d in finished for p in d.iterdir()}

    resumed = run_prep(tmp_path / "src", "pairs", tmp_path / "resumed", options, progress=False)
    assert sorted(resumed.clips_skipped) == sorted(written[:3])
    assert sorted(resumed.clips_written) == sorted(set(reference.clips_written) - set(written[:3]))
    assert not list((tmp_path / "resumed").glob(".tmp-*"))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # finished clips untouched
    full, again = _tree(tmp_path / "full"), _tree(tmp_path / "resumed")
    assert full.keys() == again.keys()
    for name in full:
        assert full[name].read_bytes() == again[name].read_bytes(), name

    # A third run finds the conversation done and rewrites nothing.
    third = run_prep(tmp_path / "src", "pairs", tmp_path / "resumed", options, progress=False)
    assert third.clips_written == [] and len(third.clips_skipped) == 6


def test_bad_inputs_are_reported_by_file_and_the_rest_completes(tmp_path, encoder, capsys):
    good = make_conversation(tmp_path / "base", "pairs", seconds=1.0, size=128, seed=8)
    base = good.videos["A"].parent
    src = tmp_path / "src"

    def copy(name):
        shutil.copytree(base, src / name)
        return src / name

    copy("good")
    (copy("corrupt_mp4") / "A.mp4").write_bytes(base.joinpath("A.mp4").read_bytes()[:600])
    write_video(copy("no_face") / "B.mp4", np.full((25, 128, 128, 3), 90, dtype=np.uint8))
    short, _ = read_wav(base / "A.wav")
    write_wav(copy("short_audio") / "A.wav", short[: len(short) // 2])
    with wave.open(str(copy("low_rate") / "B.wav"), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8_000)
        handle.writeframes(np.zeros(8_000, dtype="<i2").tobytes())
    (copy("bad_transcript") / "transcript.json").write_text('{"segments": [{"speaker": "A", "start": 0.1,')
    lonely = copy("one_video")
    (lonely / "B.mp4").unlink()

    code = main(
        [
            "--input",
            str(src),
            "--layout",
            "pairs",
            "--out",
            str(tmp_path / "out"),
            "--wav2vec2",
            str(encoder),
            "--size",
            "64",
            "--no-progress",
        ]
    )
    assert code == 1
    summary = json.loads((tmp_path / "out" / "prep_summary.json").read_text())
    failed = {f["input"]: f for f in summary["failed"]}
    expected = {
        "corrupt_mp4": ("A.mp4", "cannot decode"),
        "no_face": ("B.mp4", "face was found in 0 of 25 frames"),
        "short_audio": ("A.wav", "shorter than its video"),
        "low_rate": ("B.wav", "8000 Hz is below"),
        "bad_transcript": ("transcript.json", "unreadable transcript"),
        "one_video": ("one_video", "expected two videos"),
    }
    assert set(failed) == set(expected)
    printed = capsys.readouterr().out
    for name, (file, reason) in expected.items():
        assert failed[name]["file"] == file and reason in failed[name]["reason"], failed[name]
        assert any(name in line and file in line and reason in line for line in printed.splitlines()), name
    assert sorted(summary["clips_written"]) == ["good_A_c0000", "good_B_c0000"]
    assert (tmp_path / "out" / "good_A_c0000" / "meta.json").exists()


def test_tiny_prepared_set_for_other_tests(tmp_path):
    """The helper the training and pipeline tests use: two real prepared clips, avatar/user swapped."""
    clips = make_tiny_prepared_set(tmp_path, num_frames=21, size=64, seed=0)
    assert [c.name for c in clips] == ["conv0000_A_c0000", "conv0000_B_c0000"]
    for clip in clips:
        assert read_video(clip / "avatar.mp4").shape == (21, 64, 64, 3)
        assert np.load(clip / "avatar_w2v.npy").shape == (21, 3, 32)
    np.testing.assert_array_equal(np.load(clips[0] / "avatar_w2v.npy"), np.load(clips[1] / "user_w2v.npy"))


@pytest.mark.slow
def test_resume_after_a_real_sigkill(tmp_path, encoder):
    """echo-prep in a subprocess, SIGKILLed once its first clip folder appears, then rerun: same files as a full run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    make_conversation(tmp_path / "src", "pairs", seconds=2.4, size=128, seed=13)
    command = [
        sys.executable,
        "-m",
        "data_prep.cli",
        "--input",
        str(tmp_path / "src"),
        "--layout",
        "pairs",
        "--wav2vec2",
        str(encoder),
        "--size",
        "64",
        "--clip-seconds",
        "0.4",
        "--min-clip-seconds",
        "0.4",
        "--no-progress",
        "--out",
    ]
    subprocess.run([*command, str(tmp_path / "full")], check=True, capture_output=True)
    process = subprocess.Popen(
        [*command, str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "killed").is_dir() and any(
            not p.name.startswith(".") and p.is_dir() for p in (tmp_path / "killed").iterdir()
        ):
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = [p for p in (tmp_path / "killed").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert 0 < len(finished) < 12, "the kill should land part-way through the 12 clips"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for d in finished for p in d.iterdir()}
    subprocess.run([*command, str(tmp_path / "killed")], check=True, capture_output=True)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before
    full, again = _tree(tmp_path / "full"), _tree(tmp_path / "killed")
    assert full.keys() == again.keys()
    for name in full:
        assert full[name].read_bytes() == again[name].read_bytes(), name
