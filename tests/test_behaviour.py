"""Behaviour measures of the demo report (echo.metrics.behaviour): lip sync, listening, quality, long video."""

import numpy as np
import pytest

from echo.audio import SAMPLE_RATE, frame_rms
from echo.metrics import behaviour


@pytest.fixture(scope="module")
def conversation(tmp_path_factory):
    from synthetic.conversations import make_conversation

    return make_conversation(tmp_path_factory.mktemp("behaviour"), seconds=6.0, size=128, seed=3)


def _wave(conversation, participant):
    from scipy.io import wavfile

    rate, data = wavfile.read(conversation.audios[participant])
    assert rate == SAMPLE_RATE
    return data.astype(np.float32) / 32768.0 if data.dtype == np.int16 else data.astype(np.float32)


def test_mouth_opening_is_the_inner_lip_gap_over_face_height():
    landmarks = np.zeros((2, 478, 2))
    landmarks[:, behaviour.FOREHEAD] = [50, 10]
    landmarks[:, behaviour.CHIN] = [50, 110]  # face height 100
    landmarks[:, behaviour.UPPER_INNER_LIP] = [50, 80]
    landmarks[0, behaviour.LOWER_INNER_LIP] = [50, 80]
    landmarks[1, behaviour.LOWER_INNER_LIP] = [50, 92]
    np.testing.assert_allclose(behaviour.mouth_opening(landmarks), [0.0, 0.12])


def test_lip_sync_r_of_the_ground_truth_follows_its_speech_and_not_the_other_speaker(conversation):
    """The synthetic ground truth opens its mouth with its own speech: r is high with its own audio, and the other
    participant's audio (whom it listens to) does not explain it."""
    a, b = conversation.participants
    opening = behaviour.mouth_opening(conversation.landmarks[a])
    wave_a, wave_b = _wave(conversation, a), _wave(conversation, b)
    speaking = behaviour.voice_activity(wave_a, conversation.num_frames)
    assert 0.2 < speaking.mean() < 0.8
    own = behaviour.lip_sync_r(opening, frame_rms(wave_a, conversation.num_frames), speaking)
    other = behaviour.pearson(opening, frame_rms(wave_b, conversation.num_frames))
    assert own > 0.5
    assert other < own - 0.4


def test_listening_ratio_is_motion_energy_while_the_user_speaks_over_mutual_silence():
    num_frames = 40
    pose = np.zeros((num_frames, 5))
    user_speaking = np.zeros(num_frames, dtype=bool)
    user_speaking[:20] = True
    pose[:20, 1] = np.where(np.arange(20) % 2, 10.0, 0.0)  # 10° pitch steps while the user speaks: energy 1 per frame
    pose[20:, 3] = np.where(np.arange(20) % 2, 0.5, 0.0)  # half a face height steps in silence: energy 0.25
    energy = behaviour.motion_energy(pose, smooth=1)
    np.testing.assert_allclose(energy[2:19], 1.0)
    np.testing.assert_allclose(energy[22:], 0.25)
    ratio = behaviour.listening_ratio(energy, user_speaking, ~user_speaking)
    assert ratio == pytest.approx((energy[:20].mean()) / energy[20:].mean())
    assert 3.0 < ratio < 5.0
    assert behaviour.listening_ratio(energy, user_speaking, np.zeros(num_frames, dtype=bool)) is None


def test_motion_energy_averages_out_landmark_jitter_but_keeps_a_nod():
    """A still head with ±0.5° frame-to-frame jitter against a 4° nod per second: unsmoothed, the jitter's energy
    rivals the nod's; averaged over 5 frames, the nod is worth many times the jitter."""
    time = np.arange(100) / 25.0
    jitter = np.zeros((100, 5))
    jitter[:, 1] = np.where(np.arange(100) % 2, 0.5, -0.5)
    nod = np.zeros((100, 5))
    nod[:, 1] = 4.0 * np.sin(2 * np.pi * time)
    raw = behaviour.motion_energy(nod, smooth=1).mean() / behaviour.motion_energy(jitter, smooth=1).mean()
    smoothed = behaviour.motion_energy(nod).mean() / behaviour.motion_energy(jitter).mean()
    assert raw < 1.0
    assert smoothed > 20 * raw


def test_conversation_states_keep_pauses_between_words_out_of_mutual_silence():
    avatar = np.zeros(60, dtype=bool)
    user = np.zeros(60, dtype=bool)
    avatar[0:10] = avatar[13:20] = True  # the avatar's turn with a 3-frame pause between words
    user[35:45] = True  # the user's turn after a long mutual silence
    listening, silence = behaviour.conversation_states(avatar, user, margin=5)
    assert not silence[10:13].any()  # the pause inside the avatar's turn is not mutual silence
    assert silence[25:30].all() and silence[50:].all() and not silence[:25].any() and not silence[30:50].any()
    assert listening[35:45].all() and not listening[:35].any() and not listening[45:].any()
    no_margin_listening, no_margin_silence = behaviour.conversation_states(avatar, user, margin=0)
    assert no_margin_silence[10:13].all() and no_margin_listening.sum() == 10


def test_voice_activity_marks_speech_and_bridges_short_gaps():
    rng = np.random.default_rng(0)
    num_frames = 50
    wave = rng.normal(0, 1e-4, num_frames * 640).astype(np.float32)
    wave[10 * 640 : 30 * 640] += 0.3 * np.sin(np.arange(20 * 640) * 0.05).astype(np.float32)
    wave[19 * 640 : 20 * 640] = 0  # a one-frame gap inside the word
    active = behaviour.voice_activity(wave, num_frames)
    assert active[12:28].all() and not active[:8].any() and not active[32:].any()


def test_psnr_and_ssim_of_identical_and_shifted_frames():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert behaviour.psnr(frames, frames) == float("inf")
    noisy = np.clip(frames.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = np.mean((noisy.astype(float) - frames) ** 2)
    assert behaviour.psnr(noisy, frames) == pytest.approx(10 * np.log10(255**2 / mse))
    assert behaviour.ssim(frames, frames) == pytest.approx(1.0)
    assert behaviour.ssim(rng.integers(0, 256, frames.shape, dtype=np.uint8), frames) < 0.1


def test_conversation_behaviour_on_the_ground_truth_video(conversation):
    """MediaPipe on the ground-truth video itself: a face on every frame, lip sync with its own audio, and the long
    video keys for a clip of more than two windows."""
    from echo.media import read_video

    a, b = conversation.participants
    frames = read_video(conversation.videos[a])[0]
    result = behaviour.conversation_behaviour(
        frames, frames, _wave(conversation, a), _wave(conversation, b), window_seconds=2.0
    )
    assert result["face_rate"] == 1.0
    assert result["lip_sync_r"] > 0.5
    assert result["psnr"] == float("inf") and result["ssim"] == pytest.approx(1.0)
    assert result["first_face_rate"] == result["last_face_rate"] == 1.0


def test_echo_eval_behaviour_reports_every_clip_and_survives_a_corrupt_one(conversation, tmp_path):
    """`echo-eval --behaviour` on the ground truth against itself: per-clip rows and the mean in the JSON and the
    Markdown; a corrupt generated clip is listed with its reason while the others are still scored."""
    import json
    import shutil

    from echo.metrics.cli import main

    a, b = conversation.participants
    folders = {k: tmp_path / k for k in ("generated", "reference", "audio", "user_audio")}
    for folder in folders.values():
        folder.mkdir()
    for clip in ("c1", "c2"):
        for k in ("generated", "reference"):
            shutil.copyfile(conversation.videos[a], folders[k] / f"{clip}.mp4")
        shutil.copyfile(conversation.audios[a], folders["audio"] / f"{clip}.wav")
        shutil.copyfile(conversation.audios[b], folders["user_audio"] / f"{clip}.wav")
    (folders["generated"] / "c2.mp4").write_bytes(b"not a video")
    out = tmp_path / "report.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in folders.items()]
    assert main([*args, "--behaviour", f"--out={out}", f"--markdown={tmp_path / 'report.md'}", "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert set(report["clips"]) == {"c1"} and set(report["failed"]) == {"c2"}
    assert report["aggregate"]["lip_sync_r"] == pytest.approx(report["clips"]["c1"]["lip_sync_r"])
    assert report["clips"]["c1"]["lip_sync_r"] > 0.5
    markdown = (tmp_path / "report.md").read_text()
    assert "| c1 |" in markdown and "c2:" in markdown and not list(tmp_path.glob(".*.tmp"))


def test_mouth_darkness_reads_an_open_mouth_from_pixels(conversation):
    """On the synthetic ground truth, the darkness of the reference's mouth box follows the avatar's own speech
    envelope (as the face mesh's lip gap does), and a frame with that box painted black reads as fully open."""
    from echo.media import read_video

    a, b = conversation.participants
    frames = read_video(conversation.videos[a])[0]
    reference = conversation.landmarks[a][0]
    darkness = behaviour.mouth_darkness(frames, reference)
    wave_a, wave_b = _wave(conversation, a), _wave(conversation, b)
    speaking = behaviour.voice_activity(wave_a, conversation.num_frames)
    own = behaviour.pearson(darkness[speaking], frame_rms(wave_a, conversation.num_frames)[speaking])
    other = behaviour.pearson(darkness, frame_rms(wave_b, conversation.num_frames))
    assert own > 0.3
    assert other < own - 0.3
    black = frames[:1].copy()
    x = reference[[behaviour.LEFT_MOUTH_CORNER, behaviour.RIGHT_MOUTH_CORNER], 0]
    y = reference[[behaviour.UPPER_INNER_LIP, behaviour.LOWER_INNER_LIP], 1].mean()
    black[:, int(y) - 20 : int(y) + 20, int(x.min()) - 2 : int(x.max()) + 3] = 0
    assert behaviour.mouth_darkness(black, reference)[0] == 1.0


def test_per_latent_frame_holds_a_signal_once_per_latent_frame():
    from echo.metrics.behaviour import per_latent_frame

    # Latent frame 0 is frame 0; latent frame j covers frames 4j-3 .. 4j: a signal constant on those runs comes back
    # the same at the runs' centres, linearly between them.
    runs = [np.array([0])] + [np.arange(1 + 4 * j, 5 + 4 * j) for j in range(4)]
    levels = [0.0, 1.0, 3.0, 3.0, 0.0]
    signal = np.zeros(17)
    for run, level in zip(runs, levels):
        signal[run] = level
    held = per_latent_frame(signal)
    assert held[0] == 0 and held[10] == 3  # a centre (9 .. 12: 10.5) holds its run's level ... between two 3s: 3
    np.testing.assert_allclose(held[[1, 2]], [0.4, 0.8])  # from frame 0 (0) to the centre 2.5 (1)
    # Frame-to-frame alternation inside a run is gone: what a 4x-compressed latent that moves once per latent frame
    # cannot show.
    fast = np.tile([0.0, 1.0], 20)[:33]
    fast[0] = 0.5
    np.testing.assert_allclose(per_latent_frame(fast), 0.5)
    with_gap = signal.copy()
    with_gap[5:9] = np.nan  # a run without a face: interpolated over
    assert np.isfinite(per_latent_frame(with_gap)).all()
    with pytest.raises(ValueError, match="signal"):
        per_latent_frame(np.zeros((3, 2)))
