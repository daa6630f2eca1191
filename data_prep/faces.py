"""Face detection, tracking, square cropping and face-mesh landmarks.

Backends:
- ``"mediapipe"`` (default): MediaPipe face detection (full-range model) for the boxes and MediaPipe face mesh with
  refined irises (478 points) for the landmarks. Both ship inside the ``mediapipe`` wheel.
- ``"face_alignment"``: boxes from the 68 2D landmarks of the ``face-alignment`` package (the paper's choice); the
  478 mesh landmarks still come from MediaPipe because the masks of `echo.masks` use the face-mesh topology.

Tracking keeps one face per frame: the detection that overlaps the previous box most (the highest score on the first
frame, or after a gap). Missing detections are filled by linear interpolation between neighbouring frames; box
centres and sizes are then smoothed with a Gaussian over time, and each crop is a square of side
``crop_scale × max(box width, box height)`` centred on the smoothed face centre, padded with black outside the frame.
"""

from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 478


class FaceMesh:
    """MediaPipe face mesh (478 points with irises), one face, in pixel coordinates of the given frame.

    Args:
        static_image_mode (`bool`, defaults to `False`): run the detector on every frame instead of tracking. A new
            instance per clip keeps results independent of what was processed before (reproducible reruns).
    """

    def __init__(self, static_image_mode: bool = False, min_confidence: float = 0.5):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image_mode,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """`(H, W, 3)` uint8 RGB → `(478, 2)` float32 (x, y) pixels, all NaN when no face is found."""
        result = self._mesh.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return np.full((NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
        height, width = image.shape[:2]
        points = result.multi_face_landmarks[0].landmark
        return np.array([[p.x * width, p.y * height] for p in points], dtype=np.float32)

    def with_depth(self, image: np.ndarray) -> np.ndarray | None:
        """`(478, 3)` float32 (x, y, z) in pixels (z scaled by the width, as MediaPipe does), or `None`."""
        result = self._mesh.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return None
        height, width = image.shape[:2]
        points = result.multi_face_landmarks[0].landmark
        return np.array([[p.x * width, p.y * height, p.z * width] for p in points], dtype=np.float32)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceMesh:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MediaPipeFaceDetector:
    """MediaPipe face detection: `(H, W, 3)` RGB → `(N, 5)` rows ``[x0, y0, x1, y1, score]`` in pixels."""

    def __init__(self, min_confidence: float = 0.5, model_selection: int = 1):
        import mediapipe as mp

        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=model_selection, min_detection_confidence=min_confidence
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        result = self._detector.process(np.ascontiguousarray(image))
        height, width = image.shape[:2]
        rows = []
        for detection in result.detections or []:
            box = detection.location_data.relative_bounding_box
            x0, y0 = box.xmin * width, box.ymin * height
            rows.append([x0, y0, x0 + box.width * width, y0 + box.height * height, detection.score[0]])
        return np.asarray(rows, dtype=np.float32).reshape(-1, 5)

    def close(self) -> None:
        self._detector.close()


class FaceAlignmentDetector:
    """Boxes from the 68 landmarks of the ``face-alignment`` package (imported lazily).

    ``face-alignment`` downloads its weights (an S3FD detector and a 2D FAN) on first use into the torch hub cache,
    which fails offline. Install it with ``pip install face-alignment`` and pre-download the weights once on a
    machine with network access: ``python -c "import face_alignment as fa;
    fa.FaceAlignment(fa.LandmarksType.TWO_D, device='cpu')"``, then copy ``~/.cache/torch/hub/checkpoints`` over.
    """

    def __init__(self, device: str = "cpu"):
        try:
            import face_alignment
        except ImportError as error:
            raise ImportError(
                "The 'face_alignment' face backend needs the face-alignment package: `pip install face-alignment`. "
                "Its weights download on first use; pre-download them where there is network access with "
                "`python -c \"import face_alignment as fa; fa.FaceAlignment(fa.LandmarksType.TWO_D, device='cpu')\"` "
                "and copy ~/.cache/torch/hub/checkpoints to this machine, or use --face-backend mediapipe."
            ) from error
        try:
            self._model = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device)
        except Exception as error:  # urllib/torch.hub raise many types when offline; re-raise with the fix.
            raise RuntimeError(
                "face-alignment could not load its weights (they download on first use, which fails offline). "
                "Pre-download them with network access: `python -c \"import face_alignment as fa; "
                "fa.FaceAlignment(fa.LandmarksType.TWO_D, device='cpu')\"` and copy ~/.cache/torch/hub/checkpoints "
                f"here, or use --face-backend mediapipe. Original error: {error}"
            ) from error

    def __call__(self, image: np.ndarray) -> np.ndarray:
        landmarks = self._model.get_landmarks_from_image(image) or []
        rows = [[*points.min(axis=0), *points.max(axis=0), 1.0] for points in landmarks]
        return np.asarray(rows, dtype=np.float32).reshape(-1, 5)

    def close(self) -> None:
        pass


def build_detector(backend: str = "mediapipe", min_confidence: float = 0.5):
    """A face detector by name: ``"mediapipe"`` or ``"face_alignment"``."""
    if backend == "mediapipe":
        return MediaPipeFaceDetector(min_confidence=min_confidence)
    if backend == "face_alignment":
        return FaceAlignmentDetector()
    raise ValueError(f"`face_backend` is {backend!r}, expected 'mediapipe' or 'face_alignment'.")


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-6)


def track_faces(detections: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Keep one face per frame.

    Args:
        detections (`list` of `np.ndarray` of shape `(N_t, 5)`): per frame ``[x0, y0, x1, y1, score]`` rows.

    Returns:
        `(boxes, found)`: `(T, 4)` float32 boxes (NaN where nothing was kept) and a `(T,)` bool array.
    """
    boxes = np.full((len(detections), 4), np.nan, dtype=np.float32)
    previous = None
    for t, rows in enumerate(detections):
        if len(rows) == 0:
            continue
        if previous is not None:
            overlap = _iou(previous, rows[:, :4])
            choice = int(overlap.argmax()) if overlap.max() > 0 else int(rows[:, 4].argmax())
        else:
            choice = int(rows[:, 4].argmax())
        boxes[t] = rows[choice, :4]
        previous = boxes[t]
    return boxes, np.isfinite(boxes).all(axis=1)


def smooth_crop_boxes(boxes: np.ndarray, crop_scale: float = 1.8, sigma: float = 2.0) -> np.ndarray:
    """Square crop boxes from tracked face boxes: fill gaps, smooth centre and size over time, scale.

    Args:
        boxes (`np.ndarray` of shape `(T, 4)`): ``[x0, y0, x1, y1]`` per frame, NaN where no face was found (at
            least one row must be finite).
        crop_scale (`float`, defaults to 1.8): crop side over the larger side of the face box.
        sigma (`float`, defaults to 2.0): standard deviation in frames of the temporal Gaussian (0 = no smoothing).

    Returns:
        `np.ndarray` of shape `(T, 4)` float32: square ``[x0, y0, x1, y1]`` boxes (may extend past the frame).
    """
    from scipy.ndimage import gaussian_filter1d

    boxes = np.asarray(boxes, dtype=np.float64)
    found = np.isfinite(boxes).all(axis=1)
    if not found.any():
        raise ValueError("`boxes` has no finite row: no face was found in any frame.")
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    frames = np.arange(len(boxes))
    tracks = []
    for values in (centre_x, centre_y, side):
        values = np.interp(frames, frames[found], values[found])
        if sigma > 0 and len(values) > 1:
            values = gaussian_filter1d(values, sigma, mode="nearest")
        tracks.append(values)
    centre_x, centre_y, side = tracks
    half = side * crop_scale / 2
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1).astype(np.float32)


def crop_frame(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crop the square ``box`` (`[x0, y0, x1, y1]` pixels) from `(H, W, 3)` RGB and resize it to `(size, size, 3)`.

    Pixels outside the frame are black. The mapping is the affine ``(x, y) ↦ ((x − x0)·s, (y − y0)·s)`` with
    ``s = size / (x1 − x0)``, so landmarks transform the same way (see `crop_to_source`).
    """
    import cv2

    x0, y0, x1, _ = (float(v) for v in box)
    scale = size / (x1 - x0)
    matrix = np.array([[scale, 0.0, -x0 * scale], [0.0, scale, -y0 * scale]], dtype=np.float64)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    if scale < 0.5:  # INTER_AREA is only honoured by warpAffine for moderate ratios: pre-shrink the source.
        factor = int(1 / scale) // 2 * 2 or 1
        small = cv2.resize(image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
        matrix = matrix @ np.diag([factor, factor, 1.0])
        image = small
    return cv2.warpAffine(
        image, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def crop_to_source(points: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Map `(..., 2)` points from a `size × size` crop of ``box`` back to source-frame pixels."""
    box = np.asarray(box, dtype=np.float32)
    scale = (box[2] - box[0]) / size
    return points * scale + box[:2]


def source_to_crop(points: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Map `(..., 2)` source-frame pixels into a `size × size` crop of ``box``."""
    box = np.asarray(box, dtype=np.float32)
    scale = size / (box[2] - box[0])
    return (points - box[:2]) * scale
