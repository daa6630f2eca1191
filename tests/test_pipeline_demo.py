"""echo-demo end to end: the shipped trained model on its example conversation, and a tiny random pipeline from
configs on a synthetic conversation (with the random-weights notice)."""

import json

import pytest

from pipelines import demo
from pipelines.video_io import probe_mp4


def _check(out, capsys, num_frames, size):
    printed = capsys.readouterr().out
    assert "the model weights are random" in printed
    info = probe_mp4(out / "demo.mp4")
    assert info["num_frames"] == num_frames and info["fps"] == 25.0
    assert (info["width"], info["height"]) == (2 * size, size)  # user | avatar
    assert abs(info["audio_seconds"] - num_frames / 25) <= 1024 / 16_000
    assert (out / "pipeline" / "model_index.json").is_file()
    entry = json.loads((out / "manifest.jsonl").read_text())
    assert all((out / entry[key]).is_file() for key in ("reference_image", "avatar_audio", "user_video", "user_audio"))


def test_demo_light(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        demo.main(
            [
                "--out",
                str(out),
                "--config",
                str(demo.DEFAULT_CONFIG),
                "--seconds",
                "0.68",
                "--size",
                "32",
                "--source-size",
                "64",
                "--steps",
                "1",
                "--frames-per-chunk",
                "9",
                "--motion-frames",
                "5",
            ]
        )
        == 0
    )
    _check(out, capsys, num_frames=17, size=32)


def test_demo_renders_at_the_model_settings_by_default(tmp_path, capsys):
    """Without --size / --frames-per-chunk / --motion-frames the demo renders with the `settings:` of the model
    description (configs/models/tiny.yaml: 64², 9-frame chunks, 1 motion frame), saved with the pipeline."""
    out = tmp_path / "demo"
    assert (
        demo.main(
            [
                "--out",
                str(out),
                "--config",
                str(demo.DEFAULT_CONFIG),
                "--seconds",
                "0.68",
                "--source-size",
                "64",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    _check(out, capsys, num_frames=17, size=64)
    saved = json.loads((out / "pipeline" / "model_index.json").read_text())["settings"]
    assert (saved["resolution"], saved["num_frames_per_chunk"], saved["motion_frames"]) == (64, 9, 1)


def test_demo_renders_a_saved_pipeline_on_an_example_conversation(tmp_path, capsys):
    """The trained-model path of `echo-demo`: a saved pipeline folder renders an example folder written by
    `write_example` from a prepared clip (here the tiny random pipeline and a tiny prepared clip), at the pipeline's
    saved settings, and the manifest it writes points at the example's files."""
    from training.testing import make_tiny_training_set

    root = make_tiny_training_set(tmp_path / "prepared", num_frames=17)
    clip = sorted(p.parent for p in root.glob("*/meta.json"))[0]
    example = demo.write_example(clip, tmp_path / "example", seconds=0.5)
    assert {p.name for p in example.iterdir()} >= {*demo.EXAMPLE_FILES, "manifest.jsonl"}
    pipeline = tmp_path / "random"
    assert (
        demo.main(
            [
                "--out",
                str(pipeline),
                "--config",
                str(demo.DEFAULT_CONFIG),
                "--seconds",
                "0.68",
                "--source-size",
                "64",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "demo"
    assert (
        demo.main(
            ["--out", str(out), "--pipeline", str(pipeline / "pipeline"), "--example", str(example), "--steps", "1"]
        )
        == 0
    )
    assert "weights are random" not in capsys.readouterr().out
    info = probe_mp4(out / "demo.mp4")
    assert info["num_frames"] == 12 and (info["width"], info["height"]) == (2 * 64, 64)
    entry = json.loads((out / "manifest.jsonl").read_text())
    assert entry["user_video"] == str((example / "user.mp4").resolve())

    # The one reader of an example folder (echo-demo, the behaviour benchmark): its length is the example's
    entry, inputs = demo.read_example(example)
    assert entry["id"] == clip.name and inputs["num_frames"] == 12 and len(inputs["avatar_audio"]) == 12 * 640
    (example / "user.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['user.wav'\]"):
        demo.read_example(example)


@pytest.mark.slow
def test_demo_default_renders_the_shipped_model(tmp_path):
    """`make demo`: the shipped trained model on its example conversation shows the reference's face throughout, not
    noise: every sampled frame is close to the reference image (PSNR ≥ 14 dB, SSIM ≥ 0.45; a grey frame scores
    10.8 dB / 0.30 and noise 7.8 dB / 0.01 against it), and the face mesh finds a face in some of them (the frames
    are soft at 128²: docs/demo_model.md)."""
    if not (demo.DEFAULT_PIPELINE / "model_index.json").is_file():
        pytest.skip("no shipped demo model (models/echo-demo)")
    import numpy as np
    import PIL.Image

    from echo.metrics.behaviour import psnr, ssim
    from echo.metrics.extractor import MediaPipeMotionExtractor
    from pipelines.video_io import read_frames

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out)]) == 0
    frames = read_frames(out / "demo.mp4")
    avatar = frames[:, :, frames.shape[2] // 2 :][::10]
    reference = np.asarray(PIL.Image.open(demo.DEFAULT_PIPELINE / "example" / "reference.png").convert("RGB"))
    for frame in avatar:
        assert psnr(frame[None], reference[None]) >= 14.0 and ssim(frame[None], reference[None]) >= 0.45
    landmarks = MediaPipeMotionExtractor(static_image_mode=True, fill_missing=False).detect(avatar)
    assert np.isfinite(landmarks).all(axis=(1, 2)).any()


@pytest.mark.slow
def test_shipped_model_opens_its_mouth_with_its_own_speech():
    """The shipped model on its held-out example (8 s): the mouth opening of the rendered avatar follows the avatar's
    own speech envelope, and the difference from a render with that speech silenced (same seed, same user) follows it
    too, so the opening is driven by the audio, not by the time course of the render. Opening is read from pixels
    (`mouth_darkness`, the reference's mouth box), over all frames, speech and pauses. The face mesh finds a face in
    at least 90 % of the frames, and its inner-lip gap follows the speech RMS within speech (`lip_sync_r`, the
    behaviour report's measure). The thresholds are guards below the figures measured on this conversation's first
    8 s (mouth box r 0.846 and 0.846, face rate 1.000, lip sync r 0.182) so that the check is robust to CPU numerics;
    the demo's goal for lip sync r, 0.5 (a guard of 0.4), is not reached by this model (docs/demo_model.md)."""
    if not (demo.DEFAULT_PIPELINE / "model_index.json").is_file():
        pytest.skip("no shipped demo model (models/echo-demo)")

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from echo.audio import frame_rms
    from echo.metrics.behaviour import lip_sync_r, mouth_darkness, mouth_opening, pearson, voice_activity
    from echo.metrics.extractor import MediaPipeMotionExtractor

    example = demo.DEFAULT_PIPELINE / "example"
    pipe = DiffusionPipeline.from_pretrained(demo.DEFAULT_PIPELINE, use_safetensors=True)
    _, inputs = demo.read_example(example)
    audio = inputs.pop("avatar_audio")
    num_frames = inputs["num_frames"]
    reference_landmarks = inputs["reference_landmarks"]
    envelope = frame_rms(audio, num_frames)
    opening = {}
    for name, waveform in (("speech", audio), ("silence", np.zeros_like(audio))):
        frames = pipe(
            avatar_audio=waveform,
            num_inference_steps=4,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **inputs,
        ).frames[0]
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        opening[name] = mouth_darkness(frames, reference_landmarks)
        if name == "speech":
            landmarks = MediaPipeMotionExtractor(static_image_mode=True, fill_missing=False).detect(frames)
    with_speech = pearson(opening["speech"], envelope)
    driven = pearson(opening["speech"] - opening["silence"], envelope)
    assert with_speech > 0.25 and driven > 0.25, (with_speech, driven)
    face_rate = np.isfinite(landmarks[..., :2]).all(axis=(1, 2)).mean()
    lip_sync = lip_sync_r(mouth_opening(landmarks), envelope, voice_activity(audio, num_frames))
    assert face_rate >= 0.9 and lip_sync is not None and lip_sync > 0.1, (face_rate, lip_sync)
