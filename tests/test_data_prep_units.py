"""Parts of data preparation: audio policy, crops and boxes, transcripts, ASR, caches, face backends, process pool."""

import importlib.util
import json

import numpy as np
import pytest

from data_prep.media import MediaError, load_audio, read_wav, write_wav
from data_prep.stages import PrepOptions
from data_prep.testing import make_tiny_prepared_set, save_tiny_wav2vec2, save_tiny_whisper
from data_prep.transcripts import clip_transcript, read_pairs_transcript, read_seamless_json
from echo.framing import FaceAlignmentDetector, crop_frame, crop_to_source, smooth_crop_boxes, source_to_crop
from synthetic.conversations import make_conversation


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


def test_audio_above_16k_is_resampled_and_below_is_rejected(tmp_path):
    rate = 22_050
    time = np.arange(rate) / rate
    write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * time), rate)
    audio = load_audio(tmp_path / "tone.wav")
    assert len(audio) == 16_000
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)  # 1 s of audio: bin = Hz
    write_wav(tmp_path / "phone.wav", np.zeros(8_000), 8_000)
    with pytest.raises(MediaError, match=r"^phone\.wav: sample rate 8000 Hz is below"):
        load_audio(tmp_path / "phone.wav")


def test_crop_maps_pixels_like_the_landmark_transform():
    """A dot at source point p appears at source_to_crop(p) in the crop; crop_to_source inverts it."""
    image = np.zeros((240, 320, 3), dtype=np.uint8)
    point = np.array([201.0, 97.0])
    image[97, 201] = 255
    box = np.array([150.0, 40.0, 270.0, 160.0])  # 120 px square
    crop = crop_frame(image, box, 240)  # ×2 upscaling
    found = np.argwhere(crop[..., 0] == crop[..., 0].max()).mean(axis=0)[::-1]
    np.testing.assert_allclose(found, source_to_crop(point, box, 240), atol=1.0)
    np.testing.assert_allclose(crop_to_source(source_to_crop(point, box, 240), box, 240), point, atol=1e-4)
    # Outside the frame the crop is black.
    assert crop_frame(image, np.array([-100.0, -100.0, 20.0, 20.0]), 64)[:32, :32].max() == 0


def test_crop_boxes_hold_gaps_and_smooth_jitter_causally():
    rng = np.random.default_rng(0)
    centre = np.stack([np.linspace(100, 140, 60), np.full(60, 80.0)], axis=1)
    jitter = rng.normal(0, 3, size=(60, 2))
    boxes = np.concatenate([centre + jitter - 20, centre + jitter + 20], axis=1)
    boxes[20:26] = np.nan  # missed detections
    crops, _ = smooth_crop_boxes(boxes, (240, 320), crop_scale=2.0)  # causal, half-life 2 frames
    assert np.isfinite(crops).all()
    side = crops[:, 2] - crops[:, 0]
    np.testing.assert_allclose(side, crops[:, 3] - crops[:, 1], rtol=1e-5)  # square
    np.testing.assert_allclose(side, 80.0, rtol=1e-4)  # 2 × the 40 px face box
    smoothed = (crops[:, :2] + crops[:, 2:]) / 2
    # Root-mean-square error to the true track (≈ 0.95 σ without smoothing; 0.67 σ with the causal filter, whose
    # ~2.4-frame lag on this 0.68 px/frame drift costs what a centred filter would not) and frame-to-frame motion
    # (0.25 × the raw motion) both shrink.
    assert np.sqrt(((smoothed - centre) ** 2).mean()) < 0.75 * jitter.std()
    assert np.abs(np.diff(smoothed, axis=0)).mean() < 0.3 * np.abs(np.diff(centre + jitter, axis=0)).mean()
    # The gap holds the last detection (no look-ahead to the next one), not a jump to a default.
    assert np.abs(smoothed[20:26, 0] - centre[20:26, 0]).max() < 4.0


def test_transcript_readers_name_the_file_and_accept_word_lists(tmp_path):
    path = tmp_path / "transcript.json"
    path.write_text(json.dumps({"segments": [{"speaker": "C", "start": 0.0, "end": 1.0, "text": "hi"}]}))
    with pytest.raises(MediaError, match=r"^transcript\.json: segment speaker 'C' is not one of"):
        read_pairs_transcript(path, ["A", "B"])
    seamless = tmp_path / "V01_S0002_I00000003_P0004.json"
    seamless.write_text(
        json.dumps(
            {
                "metadata:transcript": [
                    {
                        "start": 0.5,
                        "end": 1.5,
                        "transcript": "",
                        "words": [
                            {"word": "good", "start": 0.5, "end": 0.9, "score": 0.9},
                            {"word": "morning", "start": 0.9, "end": 1.5, "score": 0.8},
                        ],
                    }
                ],
                "metadata:vad": [{"start": 0.4, "end": 1.6}],
            }
        )
    )
    segments, vad = read_seamless_json(seamless)
    assert segments == [{"start": 0.5, "end": 1.5, "text": "good morning"}] and vad == [{"start": 0.4, "end": 1.6}]
    seamless.write_text(json.dumps({"metadata:vad": [{"start": 2.0, "end": 1.0}]}))
    with pytest.raises(MediaError, match=r"^V01_S0002_I00000003_P0004\.json: `metadata:vad` entry ends"):
        read_seamless_json(seamless)


def test_clip_transcript_keeps_the_history_and_swaps_roles():
    segments = {
        "A": [{"start": 1.0, "end": 2.0, "text": "one"}, {"start": 9.0, "end": 9.5, "text": "late"}],
        "B": [{"start": 2.5, "end": 4.0, "text": "two"}],
    }
    vad = {"A": [{"start": 1.0, "end": 2.0}], "B": [{"start": 2.5, "end": 4.0}]}
    clip = clip_transcript(segments, vad, "B", "A", clip_start=3.0, clip_end=5.0, source="dataset")
    # Times relative to the clip start; the earlier turn is history (negative times); later speech is not included.
    assert clip["segments"] == [
        {"speaker": "user", "start": -2.0, "end": -1.0, "text": "one"},
        {"speaker": "avatar", "start": -0.5, "end": 1.0, "text": "two"},
    ]
    assert clip["vad"] == {"avatar": [[0.0, 1.0]], "user": []}


def test_asr_transcribes_conversations_without_transcripts(tmp_path, encoder):
    """No transcript: a Whisper model from a folder fills one in, one segment per speech region of each speaker."""
    conversation = make_conversation(tmp_path / "src", "pairs", seconds=2.4, size=128, seed=9)
    (conversation.videos["A"].parent / "transcript.json").unlink()
    whisper = save_tiny_whisper(tmp_path / "whisper")
    options = PrepOptions(wav2vec2=str(encoder), size=64, clip_seconds=2.4, asr_model=str(whisper))
    from data_prep.cli import run_prep

    summary = run_prep(tmp_path / "src", "pairs", tmp_path / "out", options, progress=False)
    assert summary.failed == []
    transcript = json.loads((tmp_path / "out" / "conv0009_A_c0000" / "transcript.json").read_text())
    assert transcript["transcript_source"] == "asr"
    truth = {"A": "avatar", "B": "user"}
    for segment in conversation.transcript:  # every spoken turn is found, by the right speaker, at the right time
        found = [
            s
            for s in transcript["segments"]
            if s["speaker"] == truth[segment["speaker"]] and s["start"] < segment["end"] and s["end"] > segment["start"]
        ]
        assert len(found) == 1
        assert abs(found[0]["start"] - segment["start"]) < 0.2 and abs(found[0]["end"] - segment["end"]) < 0.3


def test_reasoning_frames_are_the_latest_stride_end_on_the_conversations_clock(tmp_path):
    """The one rule of understanding and emotion timing (`echo.clip_format.reasoning_frame`): a window or chunk ending
    at frame t reads frame k·stride − 1 ≤ t, the latest; none before the first. Caches write exactly those frames."""
    from data_prep.caches import omni_entry_ends
    from echo import clip_format

    assert [clip_format.reasoning_frame(t, 25) for t in (0, 23, 24, 25, 48, 49, 50)] == [None, None, 24, 24, 24, 49, 49]
    assert [clip_format.reasoning_frame(t, 1) for t in (0, 5)] == [0, 5]
    assert clip_format.reasoning_frames(0, 200, 50) == [49, 99, 149, 199]
    assert clip_format.reasoning_frames(30, 60, 25) == [49]  # conversation frames of a clip starting at 30
    record = clip_format.ClipRecord(
        path=tmp_path, meta={}, num_frames=30, conversation="conv", avatar="A", start_frame=30
    )
    assert omni_entry_ends(record, 25) == [19]  # clip frame 19 = conversation frame 49
    with pytest.raises(ValueError, match="stride"):
        clip_format.reasoning_frame(3, 0)


@pytest.mark.skipif(importlib.util.find_spec("face_alignment") is not None, reason="face-alignment is installed")
def test_face_alignment_backend_explains_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install face-alignment") as error:
        FaceAlignmentDetector()
    assert "pre-download" in str(error.value) and "--face-backend mediapipe" in str(error.value)


@pytest.mark.slow
def test_process_pool_gives_the_inline_outputs(tmp_path, encoder):
    from data_prep.cli import run_prep

    for seed in (11, 12):
        make_conversation(tmp_path / "src", "pairs", seconds=1.0, size=128, seed=seed)
    options = PrepOptions(wav2vec2=str(encoder), size=64, clip_seconds=1.0)
    inline = run_prep(tmp_path / "src", "pairs", tmp_path / "inline", options, workers=1, progress=False)
    pooled = run_prep(tmp_path / "src", "pairs", tmp_path / "pool", options, workers=2, progress=False)
    assert inline.clips_written == pooled.clips_written and len(pooled.clips_written) == 4
    for clip in pooled.clips_written:
        for name in ("avatar.mp4", "user_w2v.npy", "avatar_landmarks.npy", "transcript.json"):
            assert (tmp_path / "inline" / clip / name).read_bytes() == (tmp_path / "pool" / clip / name).read_bytes()


def test_one_wav_reader_for_prep_and_training(tmp_path):
    """`data_prep.media.read_wav` is `echo.clip_format.read_wav` (PCM and float files give the same samples); a broken
    file is a `MediaError` starting with its name for echo-prep and a `ValueError` naming its path for training."""
    from scipy.io import wavfile

    from echo import clip_format

    rng = np.random.default_rng(0)
    samples = (rng.uniform(-0.5, 0.5, 1600) * 32767).round() / 32767
    write_wav(tmp_path / "pcm.wav", samples)
    wavfile.write(tmp_path / "float.wav", 16_000, samples.astype(np.float32))
    pcm, rate = read_wav(tmp_path / "pcm.wav")
    assert rate == 16_000 and np.abs(pcm - samples).max() < 1e-4
    np.testing.assert_allclose(clip_format.read_wav(tmp_path / "float.wav")[0], pcm, atol=1e-4)
    np.testing.assert_array_equal(clip_format.read_wav(tmp_path / "pcm.wav")[0], pcm)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    with pytest.raises(MediaError, match=r"^broken\.wav: cannot read WAV"):
        read_wav(tmp_path / "broken.wav")
    with pytest.raises(ValueError, match=r"broken\.wav.*cannot read WAV"):
        clip_format.read_wav(tmp_path / "broken.wav")


def test_caches_do_not_import_the_stages():
    """The import cycle between `data_prep.caches` and `data_prep.stages` is broken: caches stand alone."""
    import subprocess
    import sys

    code = (
        "import sys, types, data_prep.caches as caches\n"
        "try:\n    caches.run_stage('unknown', '.', types.SimpleNamespace(threads=1))\nexcept ValueError:\n    pass\n"
        "assert 'data_prep.stages' not in sys.modules, 'data_prep.caches imported data_prep.stages'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_wav_averages_channels(tmp_path):
    import wave

    stereo = np.stack([np.full(100, 1000, dtype="<i2"), np.full(100, -1000, dtype="<i2")], axis=1)
    with wave.open(str(tmp_path / "s.wav"), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(16_000)
        handle.writeframes(stereo.tobytes())
    audio, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16_000 and audio.shape == (100,) and np.abs(audio).max() == 0.0


def test_audio_muxed_in_the_video_is_used_when_there_is_no_wav(tmp_path, encoder):
    """Pairs layout without wav files: the mp4's AAC track (48 kHz) is decoded, resampled and aligned to the frames."""
    from data_prep.cli import run_prep
    from echo.audio import frame_rms

    conversation = make_conversation(
        tmp_path / "src", "pairs", seconds=1.6, size=128, seed=10, sample_rate=48_000, audio_in_video=True
    )
    assert not list((tmp_path / "src").rglob("*.wav"))
    options = PrepOptions(wav2vec2=str(encoder), size=64, clip_seconds=1.6)
    summary = run_prep(tmp_path / "src", "pairs", tmp_path / "out", options, progress=False)
    assert summary.failed == []
    for speaker in conversation.participants:
        clip = tmp_path / "out" / f"conv0010_{speaker}_c0000"
        assert json.loads((clip / "meta.json").read_text())["source"]["avatar_audio"] == f"{speaker}.mp4"
        audio, rate = read_wav(clip / "avatar.wav")
        assert rate == 16_000 and len(audio) == 40 * 640
        envelope = conversation.envelope[speaker]
        if envelope.max() > 0:  # the speech lands on the frames the mouth moves on
            assert np.corrcoef(frame_rms(audio, 40), envelope)[0, 1] > 0.9


def test_emotion_cache_stage_describes_each_window_from_its_history(tmp_path):
    """A local causal LM (tiny, from a folder) writes one text per reasoning frame of the stride, on the dialogue up to
    it; before anyone speaks, no window (the dataset and the session then use ``default_emotion``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.caches import run_stage
    from echo.components import build_tiny_tokenizer
    from echo.emotion import NEUTRAL_DESCRIPTION

    clips = make_tiny_prepared_set(tmp_path, num_frames=21, size=64, seed=0)
    tokenizer = build_tiny_tokenizer(model_max_length=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    ).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    options = PrepOptions(
        wav2vec2=str(tmp_path / "wav2vec2"), stages=["emotion"], emotion_model=str(tmp_path / "lm"), emotion_stride=5
    )
    path = run_stage("emotion", clips[0], options)
    written = json.loads(path.read_text())
    segments = json.loads((clips[0] / "transcript.json").read_text())["segments"]
    first_speech = min(s["start"] for s in segments)
    assert written["stride"] == 5
    assert [w["end_frame"] for w in written["windows"]] == [e for e in (4, 9, 14, 19) if first_speech < (e + 1) / 25]
    assert written["windows"]  # someone speaks in the clip
    for window in written["windows"]:
        assert window["text"].strip() and window["text"] != NEUTRAL_DESCRIPTION


@pytest.mark.slow
def test_omni_cache_stage_runs_the_thinker_on_the_user_stream(tmp_path):
    """``--stages clips,omni``: user_omni.safetensors holds, per stride, the thinker's states for the user's frames and
    audio up to the entry's end."""
    import torch

    from data_prep.cli import run_prep
    from echo import clip_format
    from echo.understanding import OmniUnderstanding
    from tests.test_understanding import build_omni_folder

    make_tiny_prepared_set(tmp_path, num_frames=13, size=64, seed=2)
    build_omni_folder(tmp_path / "omni")
    options = PrepOptions(
        wav2vec2=str(tmp_path / "wav2vec2"),
        size=64,
        clip_seconds=13 / 25,
        omni_stride=5,
        min_clip_seconds=13 / 25,
        stages=["clips", "omni"],
        omni_model=str(tmp_path / "omni"),
    )
    summary = run_prep(tmp_path / "source", "pairs", tmp_path / "prepared", options, progress=False)
    assert summary.failed == [] and len(summary.clips_skipped) == 2  # clips existed: only the cache was added
    thinker = OmniUnderstanding.from_pretrained(tmp_path / "omni")
    for clip in sorted((tmp_path / "prepared").glob("*_c0000")):
        index = clip_format.read_understanding_index(clip, 13)
        assert index.end_frames.tolist() == [4, 9] and not index.legacy
        frames = clip_format.read_video_frames(clip / "user.mp4", range(13))
        audio = clip_format.read_clip_wav(clip, "user")
        for entry, end in enumerate(index.end_frames.tolist()):
            expected = thinker(frames[: end + 1], audio[: (end + 1) * 640])
            torch.testing.assert_close(clip_format.read_understanding_entry(index, entry), expected)


def test_omni_cache_replaces_a_whole_clip_file_and_keeps_its_own(tmp_path):
    """A ``user_omni.safetensors`` of an older echo-prep (Φ over the whole clip, which training windows must not see) is
    read as one entry at the clip's last frame and rewritten by the stage; a per-stride file is kept."""
    import torch
    from safetensors.torch import save_file

    from data_prep.caches import cache_omni, omni_entry_ends
    from echo import clip_format

    clip = tmp_path / "conv_A_c0001"
    clip.mkdir()
    clip_format.write_meta(
        clip, {"num_frames": 10, "start_frame": 10, "source": {"conversation": "conv"}, "avatar": {"participant": "A"}}
    )
    save_file({"hidden_states": torch.ones(3, 4)}, str(clip / clip_format.USER_OMNI))
    index = clip_format.read_understanding_index(clip, 10)
    assert index.legacy and index.end_frames.tolist() == [9]

    class Recorder:  # stands for the thinker: one token row per frame it was given, valued by the audio length
        max_frames, hidden_size, calls = 4, 2, []

        def __call__(self, frames, audio):
            self.calls.append((len(frames), len(audio)))
            return torch.full((len(frames), 2), float(len(audio)))

    first = tmp_path / "conv_A_c0000"
    first.mkdir()
    clip_format.write_meta(
        first, {"num_frames": 10, "start_frame": 0, "source": {"conversation": "conv"}, "avatar": {"participant": "A"}}
    )
    for folder in (first, clip):
        from data_prep.media import write_video

        write_video(folder / "user.mp4", np.zeros((10, 32, 32, 3), np.uint8))
        write_wav(folder / "user.wav", np.zeros(10 * 640))
    record = clip_format.read_clip(clip)
    assert omni_entry_ends(record, 4) == [1, 5, 9]  # conversation frames 11, 15, 19
    recorder = Recorder()
    path = cache_omni(clip, recorder, stride=4)
    assert recorder.calls == [(4, 12 * 640), (4, 16 * 640), (4, 20 * 640)]  # from the conversation's start
    index = clip_format.read_understanding_index(clip, 10)
    assert not index.legacy and index.end_frames.tolist() == [1, 5, 9]
    assert clip_format.read_understanding_entry(index, 1).eq(16 * 640).all()
    stamp = path.stat().st_mtime_ns
    cache_omni(clip, recorder, stride=4)
    assert path.stat().st_mtime_ns == stamp and len(recorder.calls) == 3


def test_emotion_embeds_stage_caches_exactly_the_text_encoder_output(tmp_path):
    """Every text a window can use ("" , the default, each emotion.json window) is cached as the encoder gives it,
    once: a second run keeps the file."""
    import torch

    from data_prep.caches import run_stage
    from echo.clip_format import load_emotion_embeds
    from echo.emotion import EmotionTextEncoder
    from training.testing import save_tiny_text_encoder

    folder = save_tiny_text_encoder(tmp_path / "text")
    clip = tmp_path / "clip"
    clip.mkdir()
    texts = ["the avatar smiles and feels happy", "calm", "the avatar smiles and feels happy"]
    windows = [{"end_frame": 4 * i, "text": t} for i, t in enumerate(texts)]
    (clip / "emotion.json").write_text(json.dumps({"windows": windows}))
    options = PrepOptions(
        wav2vec2="unused", stages=["emotion_embeds"], text_encoder=str(folder), default_emotion="neutral"
    )
    path = run_stage("emotion_embeds", clip, options)
    encoder = EmotionTextEncoder.from_pretrained(folder, max_length=64)  # the tiny tokenizer's model_max_length
    for text in ["", "neutral", *texts]:
        torch.testing.assert_close(load_emotion_embeds(clip, text), encoder.encode(text)[0], rtol=0, atol=0)
    stamp = path.stat().st_mtime_ns
    assert run_stage("emotion_embeds", clip, options) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no embedding of the emotion text 'excited'.*emotion_embeds"):
        load_emotion_embeds(clip, "excited")
    with pytest.raises(ValueError, match="--text-encoder"):
        run_stage("emotion_embeds", clip, PrepOptions(wav2vec2="unused", stages=["emotion_embeds"]))


def test_user_tokens_stage_caches_exactly_the_lcu_tokens_of_the_dataset_frames(tmp_path, tmp_path_factory):
    """The cache is `encode_user_video` of every user frame as the dataset reads them (frames and face masks at
    --user-video-size, from the clip's first to its last frame), in the metadata's size; a second run keeps it."""
    import shutil

    import torch
    from diffusers import AutoencoderKLWan
    from safetensors import safe_open

    from data_prep.caches import run_stage
    from echo.data import read_user_frames
    from echo.encoding import encode_user_video
    from training.testing import make_tiny_training_set, save_tiny_vae

    root = make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)
    clip = tmp_path / "clip"
    shutil.copytree(sorted(p.parent for p in root.glob("*/meta.json"))[0], clip)
    folder = save_tiny_vae(tmp_path / "vae")
    options = PrepOptions(wav2vec2="unused", stages=["user_tokens"], vae=str(folder), user_video_size=32)
    path = run_stage("user_tokens", clip, options)
    frames, face_mask = read_user_frames(clip, 0, 17, 32, 64)  # the whole clip, read as the dataset reads it
    item = {"user_video": frames, "user_face_mask": face_mask}
    with torch.no_grad():
        tokens, mask = encode_user_video(
            AutoencoderKLWan.from_pretrained(folder).eval(), item["user_video"][None], item["user_face_mask"][None]
        )
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"user_video_size": "32"}
        torch.testing.assert_close(f.get_tensor("tokens"), tokens[0], rtol=0, atol=0)
        torch.testing.assert_close(f.get_tensor("face_mask"), mask[0], rtol=0, atol=0)
    assert mask.any() and not mask.all()
    stamp = path.stat().st_mtime_ns
    assert run_stage("user_tokens", clip, options) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="--vae"):
        run_stage("user_tokens", clip, PrepOptions(wav2vec2="unused", stages=["clips"]))
