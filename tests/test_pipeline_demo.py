"""echo-demo end to end: synthetic conversation → tiny pipeline from configs → mp4, with the untrained notice."""

import json

import pytest

from pipelines import demo
from pipelines.video_io import probe_mp4


def _check(out, capsys, num_frames, size):
    printed = capsys.readouterr().out
    assert "untrained until a trained demo checkpoint exists" in printed
    info = probe_mp4(out / "demo.mp4")
    assert info["num_frames"] == num_frames and info["fps"] == 25.0
    assert (info["width"], info["height"]) == (2 * size, size)  # user | avatar
    assert abs(info["audio_seconds"] - num_frames / 25) <= 1024 / 16_000
    assert (out / "pipeline" / "model_index.json").is_file()
    entry = json.loads((out / "manifest.jsonl").read_text())
    assert all((out / entry[key]).is_file() for key in ("reference_image", "avatar_audio", "user_video", "user_audio"))


def test_demo_light(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--seconds", "0.68", "--size", "32", "--source-size", "64", "--steps", "1",
                      "--frames-per-chunk", "9", "--motion-frames", "5"]) == 0  # fmt: skip
    _check(out, capsys, num_frames=17, size=32)


def test_demo_renders_at_the_model_settings_by_default(tmp_path, capsys):
    """Without --size / --frames-per-chunk / --motion-frames the demo renders with the `settings:` of the model
    description (configs/models/tiny.yaml: 64², 9-frame chunks, 1 motion frame), saved with the pipeline."""
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--seconds", "0.68", "--source-size", "64", "--steps", "1"]) == 0
    _check(out, capsys, num_frames=17, size=64)
    saved = json.loads((out / "pipeline" / "model_index.json").read_text())["settings"]
    assert (saved["resolution"], saved["num_frames_per_chunk"], saved["motion_frames"]) == (64, 9, 1)


@pytest.mark.slow
def test_demo_default_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out)]) == 0
    _check(out, capsys, num_frames=100, size=64)
