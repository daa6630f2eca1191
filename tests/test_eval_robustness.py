"""echo-eval with bad clips: a failing clip is reported while the others are scored; different resolutions are refused
(or resized on request)."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from echo.metrics import cli, video

T = 10


def _write_clip(folder, name, seed, side=48, motion=True):
    """A T-frame clip of moving blocks at ``side``² and its FLAME-like motion file."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, size=(8, 8, 3))
    frames = np.stack([np.kron(np.roll(base, t, 0), np.ones((side // 8, side // 8, 1))) for t in range(T)])
    video.write_video(os.path.join(folder, f"{name}.mp4"), (200 * frames + 20).astype(np.uint8))
    if motion:
        t = np.arange(T)[:, None]
        exp = np.sin(0.3 * t * (1 + np.arange(50))[None] / 10 + rng.uniform(0, 6))
        pose = np.cos(0.2 * t * (1 + np.arange(6))[None] / 3 + rng.uniform(0, 6))
        np.savez(os.path.join(folder, f"{name}.npz"), expcode=exp, posecode=pose)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_robustness") / "reference"
    root.mkdir()
    for seed, name in enumerate(("clip_a", "clip_b", "clip_c")):
        _write_clip(root, name, seed)
    return root


def _argv(generated, reference, *extra):
    return [
        "--generated",
        str(generated),
        "--reference",
        str(reference),
        "--motion-source",
        "files",
        "--kmeans-init",
        "2",
        "--quiet",
        *extra,
    ]


def test_a_failing_clip_is_reported_and_the_others_are_scored(reference, tmp_path):
    """A corrupt mp4 and a clip without motion coefficients: both listed with their reason (JSON and Markdown), the
    remaining clip scored alone; a set in which every clip fails is an error naming each."""
    generated = tmp_path / "generated"
    shutil.copytree(reference, generated)
    (generated / "clip_b.mp4").write_bytes((reference / "clip_b.mp4").read_bytes()[:400])  # truncated
    (generated / "clip_c.npz").unlink()
    out, markdown = tmp_path / "report.json", tmp_path / "report.md"
    assert cli.main(_argv(generated, reference, "--out", str(out), "--markdown", str(markdown))) == 0
    report = json.loads(out.read_text())
    assert set(report["clips"]) == {"clip_a"} and set(report["failed"]) == {"clip_b", "clip_c"}
    assert "clip_c.npz" in report["failed"]["clip_c"] and report["failed"]["clip_b"]
    # The aggregates are clip_a's alone (an exact copy of its ground truth).
    assert report["aggregate"]["mse_expression"] == 0.0
    assert report["settings"]["num_clips"] == 3 and report["settings"]["num_scored"] == 1
    text = markdown.read_text()
    failed_part = text.split("Failed clips", 1)[1]
    assert "- clip_b: " in failed_part and "- clip_c: " in failed_part and "clip_c.npz" in failed_part
    assert not list(tmp_path.glob(".*.tmp"))

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(generated / "clip_b.mp4", only_bad)
    with pytest.raises(ValueError, match=r"no clip could be scored:\n- clip_b: "):
        cli.evaluate(cli.parse_args(_argv(only_bad, reference, "--out", "")))


def test_a_faceless_clip_fails_alone_on_the_landmark_route(tmp_path):
    """MediaPipe route: a generated clip without a face is reported; the clip with a face is scored."""
    import cv2
    import skimage.data

    image = skimage.data.astronaut()
    faces = np.stack(
        [
            cv2.resize(image[10 + dy : 266 + dy, 95:351], (160, 160), interpolation=cv2.INTER_AREA)
            for dy in (0, 3, 6, 3, 0, -3, -6, -3, 0, 3, 6, 3, 0, -3, -6, -3)
        ]
    )
    for sub in ("reference", "generated"):
        (tmp_path / sub).mkdir()
        video.write_video(str(tmp_path / sub / "face.mp4"), faces)
    video.write_video(str(tmp_path / "reference" / "blank.mp4"), faces)
    video.write_video(str(tmp_path / "generated" / "blank.mp4"), np.full_like(faces, 128))
    report = cli.evaluate(
        cli.parse_args(
            [
                "--generated",
                str(tmp_path / "generated"),
                "--reference",
                str(tmp_path / "reference"),
                "--kmeans-init",
                "2",
                "--expression-components",
                "4",
                "--quiet",
                "--out",
                "",
            ]
        )
    )
    assert set(report["clips"]) == {"face"} and set(report["failed"]) == {"blank"}
    assert "clip 'blank' (generated)" in report["failed"]["blank"] and "face" in report["failed"]["blank"]
    assert "- blank: " in report["markdown"]


def test_different_resolutions_are_refused_or_resized_on_request(reference, tmp_path, caplog):
    generated = tmp_path / "generated"
    generated.mkdir()
    _write_clip(generated, "clip_a", 0, side=40)
    shutil.copy(reference / "clip_a.npz", generated)
    out = tmp_path / "report.json"
    with pytest.raises(ValueError, match=r"clip 'clip_a': generated 40×40, ground truth 48×48.*--resize-generated"):
        cli.evaluate(cli.parse_args(_argv(generated, reference, "--out", str(out))))
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="echo.metrics"):
        report = cli.evaluate(cli.parse_args(_argv(generated, reference, "--out", str(out), "--resize-generated")))
    assert set(report["clips"]) == {"clip_a"} and report["failed"] == {}
    assert "--resize-generated" in caplog.text and "clip 'clip_a': generated 40×40" in caplog.text
    assert report["settings"]["resize_generated"] is True
