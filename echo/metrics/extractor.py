"""Facial-motion coefficients from video without downloaded weights, and an adapter for FLAME/3DMM coefficients.

The paper scores motion on EMOCA's FLAME parameters (50-d expression, 6-d pose). EMOCA needs its own checkpoints, so
this module offers two routes to the `(T, D)` sequences that `echo.metrics.motion` expects:

1. `MediaPipeMotionExtractor`: MediaPipe face mesh (478 landmarks, shipped inside the ``mediapipe`` wheel) →
   - **pose** `(T, 6)`: yaw, pitch, roll in degrees and translation (x, y, z, in the canonical model's centimetres)
     from ``cv2.solvePnP`` of a stable subset of landmarks against MediaPipe's canonical face model;
   - **expression** `(T, 478·3)`: the 3D landmarks aligned to the canonical pose (similarity transform on the stable
     subset, so rotation, translation and scale are removed), minus a neutral shape (the sequence mean, or a shape
     the caller gives, e.g. the reference image's), flattened; optionally reduced by a `LandmarkPCA` fitted on the
     ground truth.
2. `FlameCoefficientAdapter`: FLAME / 3DMM coefficients computed elsewhere (EMOCA's ``expcode`` / ``posecode``, or any
   `(T, D)` arrays) split into the same `MotionCoefficients`.

Camera model for ``solvePnP``: a pinhole with focal length ``max(H, W)`` pixels and the principal point at the image
centre (no calibration is known for generated videos). Angles: the rotation ``R`` from the canonical face to the
camera (x right, y down, z forward) is decomposed as ``R = Rz(roll) · Ry(yaw) · Rx(pitch)``; yaw > 0 turns the face
towards the image's left (the subject's right), pitch > 0 lowers the nose (looking down), roll > 0 turns the face
clockwise in the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echo.faces import MediaPipeGraph

NUM_LANDMARKS = 478

# A stable subset of MediaPipe's canonical face model (little expression-driven motion: nose bridge and tip, eye
# corners, forehead, temples). Coordinates are the vertices of
# ``mediapipe/modules/face_geometry/data/canonical_face_model.obj`` (Apache-2.0, vertex i = landmark i), in cm, with
# x to the subject's left (image right), y up and z towards the viewer. The right-hand points 263, 362 and 356 are the
# mirror images (x → −x) of 33, 133 and 127 in that model.
CANONICAL_POSE_LANDMARKS: dict[int, tuple[float, float, float]] = {
    1: (0.000000, -1.126865, 7.475604),
    4: (0.000000, -0.463170, 7.586580),
    5: (0.000000, 0.365669, 7.242870),
    6: (0.000000, 2.473255, 5.788627),
    8: (0.000000, 4.019042, 5.284764),
    9: (0.000000, 4.885979, 5.385258),
    10: (0.000000, 8.261778, 4.481535),
    168: (0.000000, 3.271027, 5.236015),
    195: (0.000000, 1.059413, 6.774605),
    197: (0.000000, 1.728369, 6.316750),
    33: (-4.445859, 2.663991, 3.173422),
    263: (4.445859, 2.663991, 3.173422),
    133: (-1.856432, 2.585245, 3.757904),
    362: (1.856432, 2.585245, 3.757904),
    127: (-7.743095, 2.364999, -2.005167),
    356: (7.743095, 2.364999, -2.005167),
}
POSE_LANDMARK_INDICES = tuple(CANONICAL_POSE_LANDMARKS)


def canonical_pose_points(camera_frame: bool = True) -> np.ndarray:
    """The canonical subset `(K, 3)`; with ``camera_frame`` in OpenCV camera axes (x right, y down, z forward)."""
    points = np.array([CANONICAL_POSE_LANDMARKS[i] for i in POSE_LANDMARK_INDICES], dtype=np.float64)
    if camera_frame:
        points = points * np.array([1.0, -1.0, -1.0])
    return points


@dataclass
class MotionCoefficients:
    """Motion of one clip.

    Args:
        expression (`np.ndarray` of shape `(T, D_exp)`).
        pose (`np.ndarray` of shape `(T, D_pose)`): yaw, pitch, roll (degrees), tx, ty, tz for the MediaPipe route;
            FLAME's 6-d pose (global and jaw axis-angle) for the FLAME route.
        landmarks (`np.ndarray` of shape `(T, 478, 3)`, *optional*): the raw detections, NaN where no face.
    """

    expression: np.ndarray
    pose: np.ndarray
    landmarks: np.ndarray | None = None

    def __post_init__(self):
        if self.expression.ndim != 2 or self.pose.ndim != 2 or len(self.expression) != len(self.pose):
            raise ValueError(
                f"`expression` {self.expression.shape} and `pose` {self.pose.shape} must be (T, D) arrays with the "
                "same number of frames T."
            )

    def __len__(self) -> int:
        return len(self.pose)

    def truncate(self, num_frames: int) -> MotionCoefficients:
        lm = None if self.landmarks is None else self.landmarks[:num_frames]
        return MotionCoefficients(self.expression[:num_frames], self.pose[:num_frames], lm)


def interpolate_missing(x: np.ndarray) -> np.ndarray:
    """Fill NaN rows of a `(T, ...)` array by linear interpolation over time (edges: nearest valid row).

    Raises a ValueError when no row is valid (no face in the whole clip).
    """
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(len(x), -1)
    valid = np.isfinite(flat).all(1)
    if not valid.any():
        raise ValueError(f"no frame of the (T={len(x)}) sequence has a detected face; cannot extract motion.")
    if valid.all():
        return x
    t = np.arange(len(x))
    out = np.stack([np.interp(t, t[valid], flat[valid, j]) for j in range(flat.shape[1])], axis=1)
    return out.reshape(x.shape)


def rotation_to_euler(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of ``R = Rz(roll) · Ry(yaw) · Rx(pitch)``."""
    r = rotation
    yaw = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    pitch = np.arctan2(r[2, 1], r[2, 2])
    roll = np.arctan2(r[1, 0], r[0, 0])
    return float(np.degrees(yaw)), float(np.degrees(pitch)), float(np.degrees(roll))


def head_pose_from_landmarks(landmarks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Head pose per frame from face-mesh landmarks by ``cv2.solvePnP`` against the canonical face.

    Args:
        landmarks (`np.ndarray` of shape `(T, 478, 2)` or `(T, 478, 3)`): pixel coordinates (only x, y are used);
            NaN rows (no face) give NaN poses.
        image_size (`tuple[int, int]`): (height, width) of the frames, for the pinhole camera.
    Returns:
        `np.ndarray` of shape `(T, 6)`: yaw, pitch, roll (degrees), tx, ty, tz (cm, camera frame).
    """
    import cv2

    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1] != NUM_LANDMARKS or landmarks.shape[2] not in (2, 3):
        raise ValueError(f"`landmarks` has shape {landmarks.shape}, expected (T, {NUM_LANDMARKS}, 2 or 3) pixels.")
    height, width = image_size
    focal = float(max(height, width))
    camera = np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])
    model = canonical_pose_points(camera_frame=True)
    poses = np.full((len(landmarks), 6), np.nan)
    for t, frame in enumerate(landmarks):
        image_points = frame[list(POSE_LANDMARK_INDICES), :2]
        if not np.isfinite(image_points).all():
            continue
        ok, rvec, tvec = cv2.solvePnP(model, image_points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok:
            continue
        rotation, _ = cv2.Rodrigues(rvec)
        poses[t, :3] = rotation_to_euler(rotation)
        poses[t, 3:] = tvec.reshape(3)
    return poses


IMAGE_TO_CANONICAL = np.array([1.0, -1.0, -1.0])  # image axes (y down, z away) → canonical (y up, z to the viewer)


def _fit_to_canonical(frame: np.ndarray, canonical: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity transform (scale, rotation, shift) that best maps one frame's `(478, 3)` pixel landmarks, in
    canonical axes, onto ``canonical`` (`canonical_pose_points(camera_frame=False)`; MediaPipe's z as depth)."""
    points = frame[list(POSE_LANDMARK_INDICES)] * IMAGE_TO_CANONICAL
    return _similarity_transform(points, canonical)


def head_rotation_from_landmarks3d(landmarks: np.ndarray) -> np.ndarray:
    """Head rotation per frame from the face mesh's 3-D landmarks: yaw, pitch, roll (degrees) of the similarity
    transform that best maps the canonical face's stable subset onto the frame's (Umeyama, MediaPipe's z as depth).

    Unlike `head_pose_from_landmarks` (a perspective-n-point fit of the 2-D points), a least-squares fit in 3-D has
    one solution: ``solvePnP`` flips between mirrored solutions (roll ≈ 0° and ≈ 160°) on some small faces, which
    reads as huge frame-to-frame motion.

    Args:
        landmarks (`np.ndarray` of shape `(T, 478, 3)`): pixels, z scaled like x (`MediaPipeMotionExtractor.detect`);
            NaN rows (no face) give NaN.

    Returns:
        `np.ndarray` of shape `(T, 3)`: yaw, pitch, roll in degrees.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"`landmarks` has shape {landmarks.shape}, expected (T, {NUM_LANDMARKS}, 3) with z.")
    canonical = canonical_pose_points(camera_frame=False)
    out = np.full((len(landmarks), 3), np.nan)
    for t, frame in enumerate(landmarks):
        if np.isfinite(frame[list(POSE_LANDMARK_INDICES)]).all():
            # The head's rotation maps the canonical face onto the frame: the inverse of the frame's fit to the
            # canonical face (the least-squares rotation of the inverse fit is exactly the transpose).
            out[t] = rotation_to_euler(_fit_to_canonical(frame, canonical)[1].T)
    return out


def _similarity_transform(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama (1991): scale s, rotation R, translation t minimising |s·R·source + t − target|² over `(K, 3)` points."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    xs, xt = source - mu_s, target - mu_t
    cov = xt.T @ xs / len(source)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / (xs**2).sum(1).mean()
    return float(scale), rotation, mu_t - scale * rotation @ mu_s


def align_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Remove rotation, translation and scale: `(T, 478, 3)` pixel landmarks → canonical-frame shapes `(T, 478, 3)`.

    The MediaPipe z (same scale as x) is used for depth. Each frame is mapped to the canonical model's frame (cm, y
    up) by the similarity transform that best fits its stable subset to `CANONICAL_POSE_LANDMARKS`. NaN frames stay
    NaN.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 3):
        raise ValueError(
            f"`landmarks` has shape {landmarks.shape}, expected (T, {NUM_LANDMARKS}, 3): expression alignment needs "
            "the face mesh's z coordinate."
        )
    canonical = canonical_pose_points(camera_frame=False)
    out = np.full_like(landmarks, np.nan)
    for t, frame in enumerate(landmarks):
        if np.isfinite(frame).all():
            scale, rotation, shift = _fit_to_canonical(frame, canonical)
            out[t] = scale * (frame * IMAGE_TO_CANONICAL) @ rotation.T + shift
    return out


def expression_from_landmarks(landmarks: np.ndarray, neutral: np.ndarray | None = None) -> np.ndarray:
    """Pose-normalised landmark offsets: `(T, 478, 3)` pixels → `(T, 478·3)` (cm of the canonical face).

    Args:
        landmarks (`np.ndarray` of shape `(T, 478, 3)`).
        neutral (`np.ndarray` of shape `(478, 3)`, *optional*): an aligned neutral shape (e.g. `align_landmarks` of
            the reference image's landmarks) to subtract. Defaults to the mean aligned shape of the sequence, which
            removes the identity's face shape but also any expression held through the whole clip.
    """
    aligned = align_landmarks(landmarks)
    if neutral is None:
        valid = np.isfinite(aligned).all(axis=(1, 2))
        if not valid.any():
            raise ValueError("no frame of `landmarks` has a face; cannot build an expression sequence.")
        neutral = aligned[valid].mean(0)
    neutral = np.asarray(neutral, dtype=np.float64)
    if neutral.shape != (NUM_LANDMARKS, 3):
        raise ValueError(f"`neutral` has shape {neutral.shape}, expected ({NUM_LANDMARKS}, 3).")
    return (aligned - neutral).reshape(len(aligned), -1)


class LandmarkPCA:
    """PCA of expression offsets, fitted on ground-truth frames so that all methods share one basis.

    Args:
        num_components (`int`, defaults to 50): matches FLAME's 50 expression coefficients.
    """

    def __init__(self, num_components: int = 50):
        self.num_components = num_components
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None  # k, D

    def fit(self, frames: np.ndarray) -> LandmarkPCA:
        """Fit on `(N, D)` frames (pool the ground-truth clips)."""
        x = np.asarray(frames, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"`frames` has shape {x.shape}, expected (N >= 2, D).")
        k = min(self.num_components, *x.shape)
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[:k]
        return self

    def transform(self, frames: np.ndarray) -> np.ndarray:
        """`(N, D)` → `(N, k)`."""
        if self.components is None:
            raise RuntimeError("`LandmarkPCA.transform` called before `fit`.")
        return (np.asarray(frames, dtype=np.float64) - self.mean) @ self.components.T


class MediaPipeMotionExtractor:
    """Head pose and expression from RGB frames with MediaPipe face mesh (no downloads: models ship in the wheel).

    Args:
        refine_landmarks (`bool`, defaults to `True`): 478 points (iris included), as in data preparation.
        static_image_mode (`bool`, defaults to `False`): `False` tracks across frames (faster, smoother).
        min_detection_confidence (`float`, defaults to 0.5).
        fill_missing (`bool`, defaults to `True`): interpolate frames without a face from their neighbours (a clip
            with no face at all raises a ValueError); `False` keeps NaN rows.
    """

    def __init__(
        self,
        refine_landmarks: bool = True,
        static_image_mode: bool = False,
        min_detection_confidence: float = 0.5,
        fill_missing: bool = True,
    ):
        self.refine_landmarks = refine_landmarks
        self.static_image_mode = static_image_mode
        self.min_detection_confidence = min_detection_confidence
        self.fill_missing = fill_missing

    def detect(self, frames: np.ndarray) -> np.ndarray:
        """`(T, H, W, 3)` uint8 RGB → landmarks `(T, 478, 3)` in pixels (z scaled like x), NaN where no face."""
        import mediapipe as mp

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"`frames` has shape {frames.shape}, expected (T, H, W, 3) RGB uint8.")
        height, width = frames.shape[1:3]
        out = np.full((len(frames), NUM_LANDMARKS, 3), np.nan, dtype=np.float64)
        scale = np.array([width, height, width], dtype=np.float64)
        build = lambda: mp.solutions.face_mesh.FaceMesh(  # noqa: E731
            static_image_mode=self.static_image_mode,
            max_num_faces=1,
            refine_landmarks=self.refine_landmarks,
            min_detection_confidence=self.min_detection_confidence,
        )
        with MediaPipeGraph(build) as mesh:  # its start-up noise on stderr dropped (`echo.faces.quiet_mediapipe`)
            for t, frame in enumerate(frames):
                result = mesh.process(np.ascontiguousarray(frame, dtype=np.uint8))
                if not result.multi_face_landmarks:
                    continue
                points = result.multi_face_landmarks[0].landmark
                if len(points) != NUM_LANDMARKS:
                    raise ValueError(
                        f"face mesh returned {len(points)} landmarks, expected {NUM_LANDMARKS} "
                        "(use refine_landmarks=True)."
                    )
                out[t] = np.array([(p.x, p.y, p.z) for p in points]) * scale
        return out

    def __call__(self, frames: np.ndarray, neutral: np.ndarray | None = None) -> MotionCoefficients:
        """`(T, H, W, 3)` uint8 RGB → `MotionCoefficients` (pose `(T, 6)`, expression `(T, 1434)`)."""
        landmarks = self.detect(frames)
        filled = interpolate_missing(landmarks) if self.fill_missing else landmarks
        pose = head_pose_from_landmarks(filled, image_size=frames.shape[1:3])
        expression = expression_from_landmarks(filled, neutral=neutral)
        return MotionCoefficients(expression=expression, pose=pose, landmarks=landmarks)


class FlameCoefficientAdapter:
    """FLAME / 3DMM coefficients computed elsewhere (EMOCA, DECA, Deep3DFace …) as `MotionCoefficients`.

    Args:
        expression_dims (`int`, defaults to 50): FLAME expression size used by the paper (50-d exp + 6-d pose).
        pose_dims (`int`, defaults to 6).
    """

    EXPRESSION_KEYS = ("expression", "exp", "expcode")
    POSE_KEYS = ("pose", "posecode")

    def __init__(self, expression_dims: int = 50, pose_dims: int = 6):
        self.expression_dims = expression_dims
        self.pose_dims = pose_dims

    def from_arrays(self, expression: np.ndarray, pose: np.ndarray) -> MotionCoefficients:
        """`(T, expression_dims)` and `(T, pose_dims)` arrays → `MotionCoefficients`."""
        expression = np.asarray(expression, dtype=np.float64)
        pose = np.asarray(pose, dtype=np.float64)
        if expression.ndim != 2 or expression.shape[1] != self.expression_dims:
            raise ValueError(f"`expression` has shape {expression.shape}, expected (T, {self.expression_dims}).")
        if pose.ndim != 2 or pose.shape[1] != self.pose_dims:
            raise ValueError(f"`pose` has shape {pose.shape}, expected (T, {self.pose_dims}).")
        return MotionCoefficients(expression=expression, pose=pose)

    def from_array(self, coefficients: np.ndarray) -> MotionCoefficients:
        """One `(T, expression_dims + pose_dims)` array, expression first (the paper's 56-d layout)."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        total = self.expression_dims + self.pose_dims
        if coefficients.ndim != 2 or coefficients.shape[1] != total:
            raise ValueError(
                f"`coefficients` has shape {coefficients.shape}, expected (T, {total}) = expression "
                f"({self.expression_dims}) then pose ({self.pose_dims})."
            )
        return self.from_arrays(coefficients[:, : self.expression_dims], coefficients[:, self.expression_dims :])

    def load(self, path: str) -> MotionCoefficients:
        """Read a ``.npy`` `(T, 56)` array or a ``.npz`` with expression (``expression``/``exp``/``expcode``) and pose
        (``pose``/``posecode``) arrays."""
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(f"{path!r} is not a readable motion-coefficient array ({error}).") from error
        if isinstance(data, np.ndarray):
            return self.from_array(data)
        keys = set(data.files)
        exp_key = next((k for k in self.EXPRESSION_KEYS if k in keys), None)
        pose_key = next((k for k in self.POSE_KEYS if k in keys), None)
        if exp_key is None or pose_key is None:
            raise KeyError(
                f"{path} holds keys {sorted(keys)}; expected one of {self.EXPRESSION_KEYS} and one of {self.POSE_KEYS}."
            )
        return self.from_arrays(data[exp_key], data[pose_key])


__all__ = [
    "CANONICAL_POSE_LANDMARKS",
    "FlameCoefficientAdapter",
    "LandmarkPCA",
    "MediaPipeMotionExtractor",
    "MotionCoefficients",
    "align_landmarks",
    "expression_from_landmarks",
    "head_pose_from_landmarks",
    "interpolate_missing",
    "rotation_to_euler",
]
