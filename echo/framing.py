# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""Head framing: face detection, tracking, causal box smoothing and square head crops, for echo-prep and the pipeline.

The model is trained on echo-prep's square head crops; `pipelines.EchoPipeline` frames a raw reference photo and a
raw user video with this same code, so both read the same crops (`data_prep` and `pipelines` both call it).

Per frame ``t`` (a photo is a video of one frame):

1. **Detection.** A frame whose longer side exceeds ``detect_max_side`` (640) is downscaled (OpenCV ``INTER_AREA``)
   for the detector; the boxes are scaled back to source pixels. Detectors: ``"mediapipe"`` (default, MediaPipe face
   detection, full-range model) or ``"face_alignment"`` (the box of the 68 landmarks of ``face-alignment``).
2. **Tracking.** One face per frame, the participant's: on the first frame with a face, the **largest** detection
   (box area; the participant faces the camera, nearer than anyone behind or beside them); on every later frame, the
   detection that overlaps the last kept box most. A frame in which no detection overlaps it (the participant's face
   missed or hidden, someone else's face found) is a frame without the participant's face: the last kept box is
   held, never moved to another person, and the frame does not count as found (echo-prep fails a participant found
   in fewer than ``min_face_ratio`` of the frames, naming the video).
3. **Smoothing, causal.** The box centre ``(x, y)`` and size ``s = max(width, height)`` are smoothed by a one-sided
   exponential filter, ``m_t = m_{t−1} + α (b_t − m_{t−1})`` with ``α = 1 − 2^(−1 / smooth_half_life)``, started at
   the first detected box. ``smooth_half_life = 2`` frames (``α ≈ 0.293``, a mean lag of ``(1 − α) / α ≈ 2.4`` frames,
   ~100 ms at 25 fps; ``0`` = no smoothing). The crop box of frame ``t`` depends on frames ``0 … t`` only: no
   look-ahead, so a live session computes it when the frame arrives, and the state (`FramingState`) carried from
   piece to piece makes a video framed in pieces give exactly the crops of the whole.
4. **Crop box.** A square of side ``crop_scale · s`` (``crop_scale = 1.8``) centred on the smoothed centre, which may
   extend past the frame (padded with black, `crop_frame`). Before the first detected face (no face yet) the crop box
   is the largest centred square of the frame.

The reference image must show a face (`frame_image` raises a `ValueError` naming the argument); a video's frames
without a face are framed by rule 2 and 4. MediaPipe and OpenCV come with the ``prep`` extra (``pip install -e
.[prep]``); they are imported only where they are used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from echo.faces import MediaPipeGraph

CROP_SCALE = 1.8  # crop side over the larger side of the face box
SMOOTH_HALF_LIFE = 2.0  # frames of the causal exponential smoothing of the boxes (0: none)
DETECT_MAX_SIDE = 640  # frames are downscaled to this longer side for detection
FACE_BACKENDS = ("mediapipe", "face_alignment")

_PREP_EXTRA = (
    "`pip install -e .[prep]` (or `pip install 'echo-ihg[prep]'`); or, when the reference image and the user's frames "
    "are already echo-prep head crops, pass `frame_inputs=False` to skip framing"
)


def _import_mediapipe():
    try:
        import mediapipe as mp
    except ImportError as error:
        raise ImportError(f"Face detection for head framing needs MediaPipe: {_PREP_EXTRA}.") from error
    return mp


def _import_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError(f"Head framing needs OpenCV: {_PREP_EXTRA}.") from error
    return cv2


class MediaPipeFaceDetector:
    """MediaPipe face detection: `(H, W, 3)` RGB → `(N, 5)` rows ``[x0, y0, x1, y1, score]`` in pixels. Each image is
    detected on its own (no tracking inside MediaPipe), so results do not depend on the images seen before."""

    def __init__(self, min_confidence: float = 0.5, model_selection: int = 1):
        # MediaPipe is an optional dependency (the `prep` extra): imported here, where a detector is made.
        mp = _import_mediapipe()
        self._detector = MediaPipeGraph(
            lambda: mp.solutions.face_detection.FaceDetection(
                model_selection=model_selection, min_detection_confidence=min_confidence
            )
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
                'Pre-download them with network access: `python -c "import face_alignment as fa; '
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
    """A face detector by name: ``"mediapipe"`` or ``"face_alignment"`` (`FACE_BACKENDS`)."""
    if backend == "mediapipe":
        return MediaPipeFaceDetector(min_confidence=min_confidence)
    if backend == "face_alignment":
        return FaceAlignmentDetector()
    raise ValueError(f"`face_backend` is {backend!r}, expected 'mediapipe' or 'face_alignment'.")


def detect_faces(detector, image: np.ndarray, max_side: int | None = DETECT_MAX_SIDE) -> np.ndarray:
    """Face boxes of one `(H, W, 3)` uint8 RGB frame in its pixels: `(N, 5)` float32 ``[x0, y0, x1, y1, score]``,
    detected on the frame downscaled to ``max_side`` (OpenCV ``INTER_AREA``) when its longer side is longer."""
    scale = 1.0
    if max_side is not None and max(image.shape[:2]) > max_side:
        cv2 = _import_cv2()
        factor = max_side / max(image.shape[:2])
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        scale = image.shape[0] / small.shape[0]
        image = small
    rows = detector(image)
    rows[:, :4] *= scale
    return rows


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-6)


def select_face(rows: np.ndarray, previous: np.ndarray | None) -> np.ndarray | None:
    """Tracking (rule 2): the participant's `(4,)` box among the `(N, 5)` detections: without ``previous`` (no face
    yet) the largest one; with it, the one that overlaps ``previous`` most. `None` when ``rows`` is empty, or when no
    detection overlaps ``previous`` (another person's face is not the participant's)."""
    if len(rows) == 0:
        return None
    if previous is None:
        areas = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
        return np.asarray(rows[int(areas.argmax()), :4], dtype=np.float32)
    overlap = _iou(previous, rows[:, :4])
    if overlap.max() <= 0:
        return None
    return np.asarray(rows[int(overlap.argmax()), :4], dtype=np.float32)


def smoothing_alpha(half_life: float) -> float:
    """The exponential filter's weight of a new box: ``1 − 2^(−1 / half_life)``, 1 (no smoothing) for 0."""
    if not half_life >= 0:
        raise ValueError(f"`smooth_half_life` is {half_life}, expected a number of frames >= 0.")
    return 1.0 if half_life == 0 else 1.0 - 2.0 ** (-1.0 / half_life)


@dataclass(frozen=True)
class FramingState:
    """What the framing of frame ``t + 1`` needs of frames ``0 … t``: the last kept face box ``[x0, y0, x1, y1]``
    (`None` before the first face) and the smoothed ``(centre x, centre y, size)`` (`None` likewise)."""

    previous: tuple[float, float, float, float] | None = None
    smoothed: tuple[float, float, float] | None = None


def advance(
    state: FramingState,
    box: np.ndarray | None,
    frame_size: tuple[int, int],
    crop_scale: float = CROP_SCALE,
    smooth_half_life: float = SMOOTH_HALF_LIFE,
) -> tuple[np.ndarray, FramingState]:
    """One frame of rules 2-4: the tracked face ``box`` `(4,)` of the frame (or `None`: none detected) → its square
    crop box `(4,)` float32 in pixels of a frame of ``frame_size`` `(H, W)`, and the state for the next frame."""
    if box is None and state.previous is not None:
        box = np.asarray(state.previous)  # a missed detection holds the last kept box
    if box is None:  # no face yet: the largest centred square of the frame
        height, width = frame_size
        side = min(height, width)
        crop = [(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2]
        return np.asarray(crop, dtype=np.float32), state
    box = np.asarray(box, dtype=np.float64)
    measured = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max(box[2] - box[0], box[3] - box[1])])
    if state.smoothed is None:
        smoothed = measured
    else:
        previous = np.asarray(state.smoothed)
        smoothed = previous + smoothing_alpha(smooth_half_life) * (measured - previous)
    centre_x, centre_y, side = smoothed
    half = side * crop_scale / 2
    crop = np.array([centre_x - half, centre_y - half, centre_x + half, centre_y + half], dtype=np.float32)
    return crop, FramingState(tuple(float(v) for v in box), tuple(float(v) for v in smoothed))


def smooth_crop_boxes(
    boxes: np.ndarray,
    frame_size: tuple[int, int],
    crop_scale: float = CROP_SCALE,
    smooth_half_life: float = SMOOTH_HALF_LIFE,
    state: FramingState | None = None,
) -> tuple[np.ndarray, FramingState]:
    """Square crop boxes of tracked face boxes, frame after frame (`advance`: hold gaps, smooth causally, scale).

    Args:
        boxes (`np.ndarray` of shape `(T, 4)`): tracked ``[x0, y0, x1, y1]`` per frame, NaN where no face was found.
        frame_size (`tuple[int, int]`): `(H, W)` of the frames (for the crop before the first face).
        crop_scale (`float`, defaults to 1.8), smooth_half_life (`float`, defaults to 2.0): see the module docstring.
        state (`FramingState`, *optional*): the state after the frames before these (a new track by default).

    Returns:
        `(crop_boxes, state)`: `(T, 4)` float32 square boxes (may extend past the frame) and the state after them.
    """
    state = FramingState() if state is None else state
    crops = np.zeros((len(boxes), 4), dtype=np.float32)
    for t, box in enumerate(np.asarray(boxes, dtype=np.float32)):
        crops[t], state = advance(
            state, box if np.isfinite(box).all() else None, frame_size, crop_scale, smooth_half_life
        )
    return crops, state


class FaceFramer:
    r"""Frames a video (or a photo) frame by frame: detection, tracking, causal smoothing, square crop boxes (the
    module docstring's rules). Holds the detector (made on first use); the track's state is passed in and returned,
    so a caller can frame a stream in pieces and commit the state only when it accepts the piece.

    Args:
        face_backend (`str`, defaults to `"mediapipe"`): ``"mediapipe"`` or ``"face_alignment"``.
        crop_scale (`float`, defaults to 1.8): crop side over the larger side of the face box.
        smooth_half_life (`float`, defaults to 2.0): half-life in frames of the causal box smoothing (0: none).
        detect_max_side (`int`, defaults to 640): frames are downscaled to this longer side for detection.
        min_confidence (`float`, defaults to 0.5): the detector's threshold.
    """

    def __init__(
        self,
        face_backend: str = "mediapipe",
        crop_scale: float = CROP_SCALE,
        smooth_half_life: float = SMOOTH_HALF_LIFE,
        detect_max_side: int = DETECT_MAX_SIDE,
        min_confidence: float = 0.5,
    ):
        if face_backend not in FACE_BACKENDS:
            raise ValueError(f"`face_backend` is {face_backend!r}, expected one of {list(FACE_BACKENDS)}.")
        smoothing_alpha(smooth_half_life)  # checks it
        self.face_backend, self.crop_scale, self.smooth_half_life = face_backend, crop_scale, smooth_half_life
        self.detect_max_side, self.min_confidence = detect_max_side, min_confidence
        self._detector = None

    def detect(self, image: np.ndarray) -> np.ndarray:
        """`(N, 5)` face boxes of one frame in its pixels (`detect_faces`)."""
        if self._detector is None:
            self._detector = build_detector(self.face_backend, self.min_confidence)
        return detect_faces(self._detector, image, self.detect_max_side)

    def track(
        self, frames: Iterable[np.ndarray], state: FramingState | None = None
    ) -> tuple[np.ndarray, np.ndarray, FramingState]:
        """Crop boxes of the next frames of a stream.

        Args:
            frames (iterable of `np.ndarray` `(H, W, 3)` uint8 RGB): the frames, in order (an array `(T, H, W, 3)`
                or any iterable, e.g. a decoder's frames).
            state (`FramingState`, *optional*): the state after the stream's earlier frames (a new stream by default).

        Returns:
            `(crop_boxes, found, state)`: `(T, 4)` float32 square boxes in source pixels, `(T,)` bool (a face was
            detected in the frame) and the state after these frames.
        """
        state = FramingState() if state is None else state
        crops, found = [], []
        for image in frames:
            previous = None if state.previous is None else np.asarray(state.previous, dtype=np.float32)
            box = select_face(self.detect(image), previous)
            crop, state = advance(state, box, image.shape[:2], self.crop_scale, self.smooth_half_life)
            crops.append(crop)
            found.append(box is not None)
        return np.asarray(crops, dtype=np.float32).reshape(-1, 4), np.asarray(found, dtype=bool), state

    def frame(
        self, frames: np.ndarray, size: int, state: FramingState | None = None
    ) -> tuple[np.ndarray, np.ndarray, FramingState]:
        """Head crops of the next frames `(T, H, W, 3)` uint8 of a stream: `(T, size, size, 3)` uint8 crops, their
        `(T, 4)` boxes, and the state after them (see `track`)."""
        boxes, _, state = self.track(frames, state)
        crops = (
            np.stack([crop_frame(image, box, size) for image, box in zip(frames, boxes)])
            if len(boxes)
            else (np.zeros((0, size, size, 3), dtype=np.uint8))
        )
        return crops, boxes, state

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def __enter__(self) -> FaceFramer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frame_image(image: np.ndarray, size: int, name: str = "reference_image", framer: FaceFramer | None = None):
    """The head crop of one photo `(H, W, 3)` uint8 RGB: `(size, size, 3)` uint8 and its `(4,)` box in the photo's
    pixels, framed as echo-prep frames a video's first frame. A photo without a face is a `ValueError` naming
    ``name``."""
    owned = framer is None
    framer = FaceFramer() if owned else framer
    try:
        boxes, found, _ = framer.track([image])
    finally:
        if owned:
            framer.close()
    if not found[0]:
        raise ValueError(
            f"`{name}`: no face was found in this {image.shape[0]}x{image.shape[1]} image, so it cannot be framed as "
            f"the model's training crops (a square of {framer.crop_scale}x the face box, echo-prep's framing). Pass a "
            "photo in which the face is visible, or `frame_inputs=False` if it already is a head crop."
        )
    return crop_frame(image, boxes[0], size), boxes[0]


def crop_frame(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crop the square ``box`` (`[x0, y0, x1, y1]` pixels) from `(H, W, 3)` RGB and resize it to `(size, size, 3)`.

    Pixels outside the frame are black. The mapping is the affine ``(x, y) ↦ ((x − x0)·s, (y − y0)·s)`` with
    ``s = size / (x1 − x0)``, so landmarks transform the same way (see `crop_to_source`).
    """
    cv2 = _import_cv2()
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
    """Map `(..., 2)` points from a `size × size` crop of ``box`` back to source-frame pixels; ``box`` is `(4,)`, or
    `(..., 4)` broadcast against the points' leading axes (e.g. `(T, 1, 4)` boxes for `(T, 478, 2)` landmarks)."""
    box = np.asarray(box, dtype=np.float32)
    scale = (box[..., 2:3] - box[..., 0:1]) / size
    return points * scale + box[..., :2]


def source_to_crop(points: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Map `(..., 2)` source-frame pixels into a `size × size` crop of ``box`` (`(4,)`, or `(..., 4)` broadcast as in
    `crop_to_source`)."""
    box = np.asarray(box, dtype=np.float32)
    scale = size / (box[..., 2:3] - box[..., 0:1])
    return (points - box[..., :2]) * scale
