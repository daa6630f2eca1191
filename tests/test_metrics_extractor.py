"""Motion extraction: head pose from landmarks, pose-normalised expression, a synthetic talking head, FLAME input."""

import cv2
import numpy as np
import pytest
from scipy.interpolate import LinearNDInterpolator

from echo.metrics import extractor as ex
from echo.metrics.motion import pcc


def _rotation(yaw, pitch, roll):
    """R = Rz(roll) Ry(yaw) Rx(pitch), angles in degrees."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _project(points, rotation, translation, size):
    focal = float(size)
    cam = points @ rotation.T + translation
    return np.stack([focal * cam[:, 0] / cam[:, 2] + size / 2, focal * cam[:, 1] / cam[:, 2] + size / 2], 1)


def test_head_pose_recovers_known_rotations_of_the_canonical_face():
    model = ex.canonical_pose_points(camera_frame=True)
    angles = [(0, 0, 0), (20, 0, 0), (-15, 10, 5), (5, -12, -8)]
    landmarks = np.full((len(angles), ex.NUM_LANDMARKS, 2), 0.0)
    for t, (yaw, pitch, roll) in enumerate(angles):
        landmarks[t, list(ex.POSE_LANDMARK_INDICES)] = _project(
            model, _rotation(yaw, pitch, roll), np.array([1.0, -2.0, 45.0]), 256
        )
    pose = ex.head_pose_from_landmarks(landmarks, (256, 256))
    np.testing.assert_allclose(pose[:, :3], np.array(angles, dtype=float), atol=0.05)
    np.testing.assert_allclose(pose[:, 3:], np.tile([1.0, -2.0, 45.0], (len(angles), 1)), atol=0.05)
    # a frame without a face gives NaN, not an error
    landmarks[1] = np.nan
    assert np.isnan(ex.head_pose_from_landmarks(landmarks, (256, 256))[1]).all()


def test_expression_is_invariant_to_head_pose_and_scale():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(ex.NUM_LANDMARKS, 3)) * 20 + 128
    base[list(ex.POSE_LANDMARK_INDICES)] = ex.canonical_pose_points(camera_frame=True) * 10 + 128
    mouth = np.zeros_like(base)
    mouth[[13, 14, 17, 0]] = [[0, 3, 0], [0, -3, 0], [0, 4, 0], [0, -2, 0]]  # an expression: open the mouth
    frames = np.stack([base, base + mouth, base])
    # move the head rigidly (rotation + scale + shift) in the second copy
    r = _rotation(15, -10, 5)
    moved = np.stack([1.3 * (f - 128) @ r.T + 140 for f in frames])
    e1 = ex.expression_from_landmarks(frames)
    e2 = ex.expression_from_landmarks(moved)
    np.testing.assert_allclose(e1, e2, atol=1e-8)
    assert np.abs(e1[1] - e1[0]).max() > 0.1  # the expression itself is kept
    with pytest.raises(ValueError, match=r"\(T, 478, 3\)"):
        ex.align_landmarks(frames[..., :2])


def test_interpolate_missing_frames():
    x = np.array([[0.0], [np.nan], [2.0], [np.nan]])
    np.testing.assert_allclose(ex.interpolate_missing(x), [[0.0], [1.0], [2.0], [2.0]])
    with pytest.raises(ValueError, match="no frame"):
        ex.interpolate_missing(np.full((3, 2), np.nan))


@pytest.fixture(scope="module")
def synthetic_yaw_video():
    """The astronaut's face turned by a known yaw curve: landmarks lifted to 3D with MediaPipe's z, rotated about
    the vertical axis, projected, and the image warped piecewise-affinely from the original to the moved points."""
    import skimage.data

    image = skimage.data.astronaut()[10:266, 95:351]  # 256² around the face
    landmarks = ex.MediaPipeMotionExtractor(static_image_mode=True).detect(image[None])[0]
    assert np.isfinite(landmarks).all(), "MediaPipe found no face in the astronaut photo"
    src = landmarks[::4]
    centre = src.mean(0)
    size = image.shape[0]
    border = np.array(
        [
            [0, 0],
            [size - 1, 0],
            [0, size - 1],
            [size - 1, size - 1],
            [size / 2, 0],
            [size / 2, size - 1],
            [0, size / 2],
            [size - 1, size / 2],
        ]
    )
    gy, gx = np.mgrid[0:size, 0:size]
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64)
    yaws = 20.0 * np.sin(np.linspace(0, 2 * np.pi, 24)) + 5.0 * np.sin(np.linspace(0, 6 * np.pi, 24))
    frames = []
    for yaw in yaws:
        dst = (src - centre) @ _rotation(yaw, 0, 0).T + centre
        # output pixel → input pixel, interpolated over the triangulated moved landmarks
        mapping = LinearNDInterpolator(np.vstack([dst[:, :2], border]), np.vstack([src[:, :2], border]))(grid)
        mapping = mapping.astype(np.float32).reshape(size, size, 2)
        frames.append(
            cv2.remap(image, mapping[..., 0], mapping[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        )
    return np.stack(frames), yaws


def test_extractor_recovers_known_yaw_curve(synthetic_yaw_video):
    frames, yaws = synthetic_yaw_video
    coeffs = ex.MediaPipeMotionExtractor()(frames)
    assert coeffs.pose.shape == (len(frames), 6) and np.isfinite(coeffs.pose).all()
    corr = np.corrcoef(coeffs.pose[:, 0], yaws)[0, 1]
    assert corr >= 0.9, f"yaw correlation {corr:.3f}"
    # yaw, not pitch or roll, carries the motion
    assert np.std(coeffs.pose[:, 0]) > 3 * max(np.std(coeffs.pose[:, 1]), np.std(coeffs.pose[:, 2]))
    # relative to the eye distance, the pose-normalised expression moves far less with the head turn than the raw
    # image landmarks do (the synthetic face has no expression change)
    raw = coeffs.landmarks[..., :2]
    raw_eye = np.linalg.norm(raw[:, 33] - raw[:, 263], axis=-1).mean()
    exp = coeffs.expression.reshape(len(frames), ex.NUM_LANDMARKS, 3)[..., :2]
    canonical_eye = 2 * ex.CANONICAL_POSE_LANDMARKS[263][0]
    relative_raw = np.std(raw, 0).mean() / raw_eye
    relative_exp = np.std(exp, 0).mean() / canonical_eye
    assert relative_exp < 0.5 * relative_raw, (relative_exp, relative_raw)
    assert coeffs.expression.shape == (len(frames), ex.NUM_LANDMARKS * 3)


def test_landmark_pca_keeps_structured_variation():
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(2, 30))
    frames = rng.normal(size=(100, 2)) @ basis + 0.001 * rng.normal(size=(100, 30))
    pca = ex.LandmarkPCA(num_components=2).fit(frames)
    codes = pca.transform(frames)
    recon = codes @ pca.components + pca.mean
    assert np.abs(recon - frames).max() < 0.01
    # the basis is orthonormal and ordered: the first code carries the most variance
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(2), atol=1e-10)
    assert codes[:, 0].var() >= codes[:, 1].var()
    # the basis spans the structured variation: new frames from the same two factors keep their norm in the codes
    # (an orthogonal change of coordinates), while a direction orthogonal to the basis is dropped
    other = rng.normal(size=(50, 2)) @ basis
    centred = other - other.mean(0)
    assert np.linalg.norm(pca.transform(other) - pca.transform(other).mean(0)) == pytest.approx(
        np.linalg.norm(centred), rel=1e-3
    )
    orthogonal = rng.normal(size=30)
    orthogonal -= basis.T @ np.linalg.lstsq(basis.T, orthogonal, rcond=None)[0]
    assert np.abs(pca.transform(pca.mean + orthogonal[None])).max() < 1e-2 * np.linalg.norm(orthogonal)
    # PCA codes keep the correlations a metric reads: two sequences with correlated factors stay correlated
    factors = rng.normal(size=(60, 2))
    a, b = factors @ basis, (factors + 0.1 * rng.normal(size=(60, 2))) @ basis
    assert pcc(pca.transform(a), pca.transform(b)) > 0.9


def test_flame_adapter(tmp_path):
    rng = np.random.default_rng(2)
    exp, pose = rng.normal(size=(7, 50)), rng.normal(size=(7, 6))
    adapter = ex.FlameCoefficientAdapter()
    coeffs = adapter.from_array(np.concatenate([exp, pose], 1))
    np.testing.assert_array_equal(coeffs.expression, exp)
    np.testing.assert_array_equal(coeffs.pose, pose)
    np.savez(tmp_path / "clip.npz", expcode=exp, posecode=pose)
    np.testing.assert_array_equal(adapter.load(str(tmp_path / "clip.npz")).pose, pose)
    np.save(tmp_path / "clip56.npy", np.concatenate([exp, pose], 1))
    np.testing.assert_array_equal(adapter.load(str(tmp_path / "clip56.npy")).expression, exp)
    with pytest.raises(ValueError, match=r"expected \(T, 56\)"):
        adapter.from_array(exp)
    np.savez(tmp_path / "bad.npz", shape=exp)
    with pytest.raises(KeyError, match="expcode"):
        adapter.load(str(tmp_path / "bad.npz"))


def test_pose_sign_conventions():
    """yaw > 0 moves the nose tip to the image's left, pitch > 0 moves it down, roll > 0 turns the face clockwise."""
    model = ex.canonical_pose_points(camera_frame=True)
    nose = ex.POSE_LANDMARK_INDICES.index(4)
    right_eye, left_eye = ex.POSE_LANDMARK_INDICES.index(33), ex.POSE_LANDMARK_INDICES.index(263)
    centre = np.array([0.0, 0.0, 45.0])
    frontal = _project(model, _rotation(0, 0, 0), centre, 256)
    assert _project(model, _rotation(15, 0, 0), centre, 256)[nose, 0] < frontal[nose, 0]
    assert _project(model, _rotation(0, 15, 0), centre, 256)[nose, 1] > frontal[nose, 1]
    rolled = _project(model, _rotation(0, 0, 15), centre, 256)
    assert rolled[left_eye, 1] > rolled[right_eye, 1]  # the image-right eye drops: clockwise


def test_head_rotation_from_3d_landmarks_recovers_a_known_rotation():
    """Canonical face points rotated by known yaw, pitch, roll (R = Rz·Ry·Rx) and placed in image axes: the fit
    gives the angles back, without the mirrored solutions of a 2-D perspective fit."""
    from echo.metrics.extractor import (
        NUM_LANDMARKS,
        POSE_LANDMARK_INDICES,
        canonical_pose_points,
        head_rotation_from_landmarks3d,
    )

    angles = np.array([[0.0, 0.0, 0.0], [12.0, -7.0, 4.0], [-25.0, 15.0, -9.0]])
    canonical = canonical_pose_points(camera_frame=False)
    landmarks = np.zeros((len(angles), NUM_LANDMARKS, 3))
    for t, (yaw, pitch, roll) in enumerate(angles):
        points = 6.0 * canonical @ _rotation(yaw, pitch, roll).T + np.array([64.0, -60.0, 0.0])
        landmarks[t, list(POSE_LANDMARK_INDICES)] = points * np.array([1.0, -1.0, -1.0])  # canonical → image axes
    np.testing.assert_allclose(head_rotation_from_landmarks3d(landmarks), angles, atol=1e-6)
    landmarks[1] = np.nan
    assert np.isnan(head_rotation_from_landmarks3d(landmarks)[1]).all()
