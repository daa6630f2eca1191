"""Face-mesh landmarks of echo-prep's crops.

Detection, tracking, causal box smoothing and square head crops live in `echo.framing`, the one home that echo-prep
(`data_prep.stages`) and `pipelines.EchoPipeline` both call, so the model reads the same framing in training and at
inference. This module holds what only data preparation needs: MediaPipe's face mesh (478 points with irises) on the
crops.
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
