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
    assert demo.main(["--out", str(out), "--config", str(demo.DEFAULT_CONFIG), "--seconds", "0.68", "--size", "32",
                      "--source-size", "64", "--steps", "1", "--frames-per-chunk", "9", "--motion-frames", "5"]) == 0  # fmt: skip
    _check(out, capsys, num_frames=17, size=32)


def test_demo_renders_at_the_model_settings_by_default(tmp_path, capsys):
    """Without --size / --frames-per-chunk / --motion-frames the demo renders with the `settings:` of the model
    description (configs/models/tiny.yaml: 64², 9-frame chunks, 1 motion frame), saved with the pipeline."""
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--config", str(demo.DEFAULT_CONFIG), "--seconds", "0.68",
                      "--source-size", "64", "--steps", "1"]) == 0  # fmt: skip
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
    assert demo.main(["--out", str(pipeline), "--config", str(demo.DEFAULT_CONFIG), "--seconds", "0.68",
                      "--source-size", "64", "--steps", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--pipeline", str(pipeline / "pipeline"), "--example", str(example),
                      "--steps", "1"]) == 0  # fmt: skip
    assert "weights are random" not in capsys.readouterr().out
    info = probe_mp4(out / "demo.mp4")
    assert info["num_frames"] == 12 and (info["width"], info["height"]) == (2 * 64, 64)
    entry = json.loads((out / "manifest.jsonl").read_text())
    assert entry["user_video"] == str((example / "user.mp4").resolve())


@pytest.mark.slow
def test_demo_default_renders_the_shipped_model(tmp_path):
    """`make demo`: the shipped trained model on its example conversation; a face (not noise) in the frames."""
    if not (demo.DEFAULT_PIPELINE / "model_index.json").is_file():
        pytest.skip("no shipped demo model (models/echo-demo)")
    from echo.metrics.extractor import MediaPipeMotionExtractor
    from pipelines.video_io import read_frames

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out)]) == 0
    frames = read_frames(out / "demo.mp4")
    avatar = frames[:, :, frames.shape[2] // 2 :]
    landmarks = MediaPipeMotionExtractor(static_image_mode=True, fill_missing=False).detect(avatar[::10])
    assert (~(landmarks != landmarks).any(axis=(1, 2))).mean() >= 0.9


@pytest.mark.slow
def test_shipped_model_opens_its_mouth_with_its_own_speech():
    """The shipped model on 2 s of its held-out example: the mouth opening of the rendered avatar (MediaPipe
    inner-lip gap / face height) correlates with the avatar's own speech envelope, and not with silence in its place.
    The threshold is below the report's goal (0.5) so that the check is robust to CPU numerics."""
    if not (demo.DEFAULT_PIPELINE / "model_index.json").is_file():
        pytest.skip("no shipped demo model (models/echo-demo)")
    import numpy as np
    import PIL.Image
    import torch
    from diffusers import DiffusionPipeline

    from echo.audio import frame_rms
    from echo.metrics.behaviour import mouth_opening, pearson
    from echo.metrics.extractor import MediaPipeMotionExtractor
    from pipelines.video_io import load_wav, read_frames

    example = demo.DEFAULT_PIPELINE / "example"
    pipe = DiffusionPipeline.from_pretrained(demo.DEFAULT_PIPELINE, use_safetensors=True)
    num_frames = 50
    audio = load_wav(example / "avatar.wav")[: num_frames * 640]
    inputs = dict(
        reference_image=np.asarray(PIL.Image.open(example / "reference.png").convert("RGB")),
        user_video=read_frames(example / "user.mp4")[:num_frames],
        user_audio=load_wav(example / "user.wav")[: num_frames * 640],
        reference_landmarks=np.load(example / "reference_landmarks.npy"),
        user_landmarks=np.load(example / "user_landmarks.npy")[:num_frames],
        num_frames=num_frames,
        output_type="np",
    )
    extractor = MediaPipeMotionExtractor(static_image_mode=True, fill_missing=False)
    envelope = frame_rms(audio, num_frames)
    correlations = {}
    for name, waveform in (("speech", audio), ("silence", np.zeros_like(audio))):
        frames = pipe(avatar_audio=waveform, generator=torch.Generator().manual_seed(0), **inputs).frames[0]
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        correlations[name] = pearson(mouth_opening(extractor.detect(frames)), envelope)
    assert correlations["speech"] is not None and correlations["speech"] > 0.3, correlations
    assert correlations["silence"] is None or correlations["silence"] < correlations["speech"] - 0.2, correlations
