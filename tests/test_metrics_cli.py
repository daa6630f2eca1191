"""``echo-eval`` end to end on tiny clips with tiny random feature networks, and its handling of bad input."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from echo.metrics import cli, motion, video
from echo.metrics.networks import FEATURE_NETWORKS

TINY = {
    "inception": dict(width_multiplier=1 / 16, input_size=75),
    "i3d": dict(width_multiplier=1 / 16, num_classes=16, input_size=32),
    "arcface": dict(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_dim=32, input_size=32),
    "syncnet": dict(width_multiplier=1 / 16, embedding_dim=32),
}
NAMES = ("clip_a", "clip_b")
T = 10


def _write_clip(folder, name, rng, num_frames=T, motion_offset=0.0):
    base = rng.uniform(0, 1, size=(8, 8, 3))
    frames = np.stack([np.kron(np.roll(base, t, 0), np.ones((6, 6, 1))) for t in range(num_frames)])
    audio = rng.normal(scale=0.1, size=num_frames * 640).astype(np.float32)
    video.write_video(os.path.join(folder, f"{name}.mp4"), (200 * frames + 20).astype(np.uint8), audio=audio)
    t = np.arange(num_frames)[:, None]
    exp = np.sin(0.3 * t * (1 + np.arange(50))[None] / 10 + rng.uniform(0, 6)) + motion_offset
    pose = np.cos(0.2 * t * (1 + np.arange(6))[None] / 3 + rng.uniform(0, 6))
    np.savez(os.path.join(folder, f"{name}.npz"), expcode=exp, posecode=pose)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for sub in ("reference", "user", "weights"):
        os.makedirs(root / sub)
    for name in NAMES:
        _write_clip(root / "reference", name, rng)
        _write_clip(root / "user", name, rng)
    shutil.copytree(root / "reference", root / "copy")  # a "generated" set identical to the ground truth
    for i, (name, config) in enumerate(TINY.items()):
        torch.manual_seed(i)
        FEATURE_NETWORKS[name](**config).eval().save_to_folder(str(root / "weights"))
    return root


def _args(root, generated="copy", **extra):
    argv = [
        "--generated",
        str(root / generated),
        "--reference",
        str(root / "reference"),
        "--motion-source",
        "files",
        "--fvd-clip-length",
        "4",
        "--frame-stride",
        "2",
        "--kmeans-init",
        "2",
        "--quiet",
    ]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


@pytest.fixture(scope="module")
def copy_report(data):
    out = data / "out" / "report.json"
    assert cli.main(_args(data, user=data / "user", weights=data / "weights", out=out, markdown=data / "t.md")) == 0
    with open(out) as f:
        return json.load(f)


def test_perfect_copy_scores_like_the_ground_truth(copy_report, data):
    agg, table = copy_report["aggregate"], copy_report["table"]
    assert set(copy_report["clips"]) == set(NAMES)
    assert table["rPCC"] == pytest.approx(0.0, abs=1e-12)
    assert agg["mse_expression"] == 0.0 and abs(agg["fd_pose"]) < 1e-8
    assert agg["sid_expression"] == pytest.approx(agg["sid_expression_ground_truth"])
    assert agg["var_pose"] == pytest.approx(agg["var_pose_ground_truth"])
    assert abs(table["FID"]) < 1e-6 and abs(table["FVD"]) < 1e-6
    assert copy_report["unavailable"] == {}
    # CSIM per clip is the frame-vs-first-ground-truth-frame cosine, computed the same way directly
    from echo.metrics.networks import load_feature_network

    arcface = load_feature_network("arcface", str(data / "weights"))
    frames, _ = video.read_video(str(data / "copy" / "clip_a.mp4"))
    assert copy_report["clips"]["clip_a"]["csim"] == pytest.approx(video.csim(arcface, frames, frames[0]), abs=1e-6)
    assert copy_report["clips"]["clip_a"]["csim"] < 1.0  # the clip moves, so later frames differ from frame 0
    assert np.isfinite(table["LSE-D"]) and table["LSE-C"] >= 0
    markdown = (data / "t.md").read_text()
    assert "| rPCC ↓ | SID ↑ | Var ↑ | FID ↓ | FVD ↓ | CSIM ↑ | LSE-D ↓ | LSE-C ↑ |" in markdown
    assert "n/a" not in markdown


def test_worse_motion_scores_worse(data, tmp_path):
    rng = np.random.default_rng(5)
    os.makedirs(tmp_path / "gen")
    for name in NAMES:
        shutil.copy(data / "reference" / f"{name}.mp4", tmp_path / "gen")
        # static motion: no diversity, no variance, no correlation with the user
        np.savez(
            tmp_path / "gen" / f"{name}.npz", expcode=np.zeros((T, 50)) + rng.normal(size=50), posecode=np.zeros((T, 6))
        )
    report = cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "gen", user=data / "user", out="")))
    agg = report["aggregate"]
    assert agg["var_expression"] == 0.0 < agg["var_expression_ground_truth"]
    assert agg["sid_expression"] < agg["sid_expression_ground_truth"]
    assert agg["rpcc_expression"] > 0 and agg["mse_expression"] > 0
    reference = {
        n: motion.pcc(
            np.load(data / "reference" / f"{n}.npz")["expcode"], np.load(data / "user" / f"{n}.npz")["expcode"]
        )
        for n in NAMES
    }
    # a constant avatar has PCC 0 with the user, so rPCC = |PCC(gt, user)|
    assert agg["rpcc_expression"] == pytest.approx(np.mean([abs(v) for v in reference.values()]))


def test_altered_videos_score_worse_and_match_the_direct_metrics(data, tmp_path):
    """A generated set that differs from the ground truth (brightened, mirrored frames): FID and FVD above the copy's
    zero and equal to the metrics computed directly on the decoded clips; CSIM is the generated frames' similarity to
    the first ground-truth frame."""
    from echo.metrics.networks import load_feature_network

    os.makedirs(tmp_path / "gen")
    decoded = {}
    for name in NAMES:
        frames, _ = video.read_video(str(data / "reference" / f"{name}.mp4"))
        altered = np.clip(frames.astype(int) + 50, 0, 255).astype(np.uint8)[:, :, ::-1]
        video.write_video(
            str(tmp_path / "gen" / f"{name}.mp4"),
            altered,
            audio=video.read_audio(str(data / "reference" / f"{name}.mp4")),
        )
        shutil.copy(data / "reference" / f"{name}.npz", tmp_path / "gen")
        decoded[name] = (video.read_video(str(tmp_path / "gen" / f"{name}.mp4"))[0], frames)
    report = cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "gen", weights=data / "weights", out="")))
    nets = {n: load_feature_network(n, str(data / "weights")) for n in ("inception", "i3d", "arcface", "syncnet")}
    gen, ref = [decoded[n][0] for n in NAMES], [decoded[n][1] for n in NAMES]
    assert report["table"]["FID"] > 1e-3
    assert report["table"]["FID"] == pytest.approx(video.fid(nets["inception"], gen, ref, frame_stride=2), rel=1e-6)
    assert report["table"]["FVD"] > 1e-3
    assert report["table"]["FVD"] == pytest.approx(video.fvd(nets["i3d"], gen, ref, clip_length=4), rel=1e-6)
    for name, (g, r) in decoded.items():
        assert report["clips"][name]["csim"] == pytest.approx(video.csim(nets["arcface"], g, r[0]), abs=1e-6)
        # LSE of the generated frames with the audio muxed into the generated clip
        sync = video.lse(nets["syncnet"], g, video.read_audio(str(tmp_path / "gen" / f"{name}.mp4")))
        assert report["clips"][name]["lse_d"] == pytest.approx(sync["lse_d"], rel=1e-6)
        assert report["clips"][name]["lse_c"] == pytest.approx(sync["lse_c"], rel=1e-6, abs=1e-9)
    assert report["table"]["CSIM"] < 1.0 - 1e-4


def test_uncomputable_columns_are_marked_with_a_reason(data, tmp_path):
    partial = tmp_path / "weights"
    os.makedirs(partial)
    shutil.copy(data / "weights" / "inception.safetensors", partial)
    shutil.copy(data / "weights" / "inception.json", partial)
    report = cli.evaluate(cli.parse_args(_args(data, weights=partial, out="")))
    assert report["table"]["FID"] is not None
    for column in ("rPCC", "FVD", "CSIM", "LSE-D", "LSE-C"):
        assert report["table"][column] is None and column in report["unavailable"]
    assert "--user" in report["unavailable"]["rPCC"]
    assert str(partial / "syncnet.safetensors") in report["unavailable"]["LSE-D"]
    assert "| n/a |" in report["markdown"] and "- FVD: n/a" in report["markdown"]
    no_weights = cli.evaluate(cli.parse_args(_args(data, out="")))
    assert "no --weights folder" in no_weights["unavailable"]["FID"]


def test_bad_input(data, tmp_path, caplog):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no .mp4"):
        cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "empty", out="")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "missing", out="")))
    # mismatched names: unmatched ones are skipped with a warning naming them; nothing in common is an error
    os.makedirs(tmp_path / "renamed")
    shutil.copy(data / "copy" / "clip_a.mp4", tmp_path / "renamed" / "clip_a.mp4")
    shutil.copy(data / "copy" / "clip_a.npz", tmp_path / "renamed" / "clip_a.npz")
    shutil.copy(data / "copy" / "clip_b.mp4", tmp_path / "renamed" / "other.mp4")
    with caplog.at_level(logging.WARNING, logger="echo.metrics"):
        report = cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "renamed", out="")))
    assert list(report["clips"]) == ["clip_a"]
    assert "other" in caplog.text and "clip_b" in caplog.text
    os.makedirs(tmp_path / "strangers")
    shutil.copy(data / "copy" / "clip_b.mp4", tmp_path / "strangers" / "zzz.mp4")
    with pytest.raises(ValueError, match="no clip name is common"):
        cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "strangers", out="")))
    # different lengths: an error naming the clip, or truncation on request
    os.makedirs(tmp_path / "short")
    _write_clip(tmp_path / "short", "clip_a", np.random.default_rng(1), num_frames=T - 3)
    with pytest.raises(ValueError, match="clip 'clip_a' has different lengths"):
        cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "short", out="")))
    report = cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "short", length_mismatch="truncate", out="")))
    assert report["clips"]["clip_a"]["num_frames"] == T - 3


def _astronaut_clip(shifts):
    import cv2
    import skimage.data

    image = skimage.data.astronaut()
    crops = [image[10 + dy : 266 + dy, 95 + dx : 351 + dx] for dx, dy in shifts]
    return np.stack([cv2.resize(c, (160, 160), interpolation=cv2.INTER_AREA) for c in crops])


def test_mediapipe_route_end_to_end(tmp_path):
    """Landmark motion from real face frames: a copy of the ground truth scores rPCC = MSE = 0, and a generated
    clip that moves less than the ground truth gets a lower pose variance."""
    t = np.arange(16)
    moving = [(int(12 * np.sin(0.5 * i)), int(6 * np.cos(0.3 * i))) for i in t]
    still = [(int(2 * np.sin(0.5 * i)), 0) for i in t]
    for sub, shifts in (("reference", moving), ("user", moving[::-1]), ("still", still)):
        os.makedirs(tmp_path / sub)
        video.write_video(str(tmp_path / sub / "clip.mp4"), _astronaut_clip(shifts))
    argv = [
        "--reference",
        str(tmp_path / "reference"),
        "--user",
        str(tmp_path / "user"),
        "--kmeans-init",
        "2",
        "--expression-components",
        "8",
        "--quiet",
        "--out",
        "",
    ]
    copy = cli.evaluate(cli.parse_args(["--generated", str(tmp_path / "reference"), *argv]))
    assert copy["table"]["rPCC"] == pytest.approx(0.0, abs=1e-12)
    assert copy["aggregate"]["mse_pose"] == 0.0 and copy["aggregate"]["mse_expression"] == 0.0
    still_report = cli.evaluate(cli.parse_args(["--generated", str(tmp_path / "still"), *argv]))
    clip = still_report["clips"]["clip"]
    assert clip["var_pose"] < 0.5 * clip["var_pose_ground_truth"]
    assert still_report["aggregate"]["mse_pose"] > 0


def test_too_few_samples_and_short_coefficients(data, tmp_path):
    os.makedirs(tmp_path / "one")
    for ext in ("mp4", "npz"):
        shutil.copy(data / "copy" / f"clip_a.{ext}", tmp_path / "one")
    report = cli.evaluate(
        cli.parse_args(_args(data, generated=tmp_path / "one", weights=data / "weights", fvd_clip_length=16, out=""))
    )
    assert report["table"]["FVD"] is None and "at least 2 samples" in report["unavailable"]["FVD"]
    assert report["table"]["FID"] is not None
    np.savez(tmp_path / "one" / "clip_a.npz", expcode=np.zeros((T - 1, 50)), posecode=np.zeros((T - 1, 6)))
    with pytest.raises(ValueError, match="clip 'clip_a': the generated motion coefficients have 9 frames"):
        cli.evaluate(cli.parse_args(_args(data, generated=tmp_path / "one", out="")))
