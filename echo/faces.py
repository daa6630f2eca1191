"""Face-mesh landmarks of echo-prep's crops.

Detection, tracking, causal box smoothing and square head crops live in `echo.framing`, the one home that echo-prep
(`data_prep.stages`) and `pipelines.EchoPipeline` both call, so the model reads the same framing in training and at
inference. This module holds MediaPipe's face mesh (478 points with irises), which echo-prep runs on its crops and
the synthetic conversations (`synthetic`) on their identities.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import numpy as np

NUM_LANDMARKS = 478

# What MediaPipe 0.10.21's C++ side prints while each graph starts (its calculators open): absl logging, called before
# `absl::InitializeLog`, writes straight to file descriptor 2. No switch reaches it (measured: GLOG_minloglevel,
# TF_CPP_MIN_LOG_LEVEL, ABSL_MIN_LOG_LEVEL and Python's absl.logging.set_verbosity change nothing), so
# `quiet_mediapipe` drops these lines, and only these, from what a graph's start writes.
MEDIAPIPE_NOISE = re.compile(
    r"^(W0000 .*inference_feedback_manager\.cc:\d+\] Feedback manager requires"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    # The face-mesh graph of MediaPipe's solutions API never passes IMAGE_DIMENSIONS; its ROIs are square here.
    r"|W0000 .*landmark_projection_calculator\.cc:\d+\] Using NORM_RECT without IMAGE_DIMENSIONS)"
)


@contextlib.contextmanager
def quiet_mediapipe():
    """Run a MediaPipe graph's start (`MediaPipeGraph`) with file descriptor 2 captured, then write back every captured line
    but MediaPipe's start-up noise (`MEDIAPIPE_NOISE`). Anything else written to stderr meanwhile (by any thread) is
    kept, only delayed to the end of the block; Python warnings and logging are untouched."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not MEDIAPIPE_NOISE.match(line))
            if kept:
                os.write(2, kept.encode())


class MediaPipeGraph:
    """A MediaPipe solution (``FaceMesh``, ``FaceDetection``) built and warmed up on one blank image inside
    `quiet_mediapipe`: its calculators open on graph threads, at a moment of their own between the constructor and
    the end of the first `process`, which is when MediaPipe writes its start-up noise (the face mesh adds a line on its
    first face, so calls stay quieted until one is found). A blank image holds no face, so the warm-up leaves no
    tracking state behind.

    Args:
        factory (`Callable[[], Any]`): builds the solution, e.g. ``lambda: mp.solutions.face_mesh.FaceMesh(...)``.
    """

    def __init__(self, factory):
        with quiet_mediapipe():
            self.graph = factory()
            self.graph.process(np.zeros((64, 64, 3), dtype=np.uint8))
        self._seen_face = False

    def process(self, image: np.ndarray):
        if self._seen_face:
            return self.graph.process(image)
        with quiet_mediapipe():  # the face mesh's projection warns once, on its first face
            result = self.graph.process(image)
        self._seen_face = bool(getattr(result, "multi_face_landmarks", None) or getattr(result, "detections", None))
        return result

    def close(self) -> None:
        self.graph.close()

    def __enter__(self) -> MediaPipeGraph:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaceMesh:
    """MediaPipe face mesh (478 points with irises), one face, in pixel coordinates of the given frame.

    Args:
        static_image_mode (`bool`, defaults to `False`): run the detector on every frame instead of tracking. A new
            instance per clip keeps results independent of what was processed before (reproducible reruns).
    """

    def __init__(self, static_image_mode: bool = False, min_confidence: float = 0.5):
        import mediapipe as mp

        self._mesh = MediaPipeGraph(
            lambda: mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static_image_mode,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
            )
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
