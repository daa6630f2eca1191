"""Inputs are framed as the model was trained: `EchoPipeline` crops a raw photo and a raw user video with echo-prep's
face detection, crop box and smoothing (`echo.framing`), so the reference and the user's frames it computes with are
echo-prep's crops of the same pictures; the smoothing is causal, so a live session framed piece by piece agrees."""

import numpy as np
import pytest
import torch

from data_prep import stages
from echo.encoding import frames_to_tensor
from echo.framing import CROP_SCALE, smooth_crop_boxes
from pipelines import EchoPipeline
from tests.tiny_models import tiny_components_as_trained

pytest.importorskip("mediapipe")

GRID = 4  # the tiny model renders 64² (its settings.resolution): 4 × 4 tokens
MASKS = dict(lip_mask=torch.zeros(GRID, GRID), face_mask=torch.ones(GRID, GRID))  # no face mesh on 64² crops


@pytest.fixture(scope="module")
def pipe():
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _face(side: int) -> np.ndarray:
    import cv2
    from skimage.data import astronaut

    return cv2.resize(astronaut(), (side, side), interpolation=cv2.INTER_AREA)  # a real face photo, resized


def _canvas(face: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """A 640 × 480 picture (grey background) with ``face`` pasted at ``(x0, y0)``."""
    canvas = np.full((480, 640, 3), 90, dtype=np.uint8)
    canvas[y0 : y0 + face.shape[0], x0 : x0 + face.shape[1]] = face
    return canvas


@pytest.fixture(scope="module")
def photo():
    return _canvas(_face(300), 320, 150)  # the face in the lower right, far from the centre


@pytest.fixture(scope="module")
def video():
    """12 raw frames, 640 × 480, the face moving right and up by 25 and 8 px per frame."""
    face = _face(240)
    return np.stack([_canvas(face, 20 + 25 * k, 200 - 8 * k) for k in range(12)])


def _prep_crops(frames: np.ndarray, size: int) -> np.ndarray:
    """echo-prep's step 4 and 5 on these frames: its crop boxes (`data_prep.stages.detect_crop_boxes`, with its
    default options) and its crops at ``size``, the clip size of the model's training data."""
    options = stages.PrepOptions(wav2vec2="unused", size=size)
    boxes = stages.detect_crop_boxes(iter(frames), "raw.mp4", options)
    return np.stack([stages.crop_frame(frame, box, options.size) for frame, box in zip(frames, boxes)])


def test_raw_photo_gives_the_reference_condition_of_echo_preps_crop(pipe, photo):
    """The reference the pipeline conditions on (`EchoSession.context.reference`, what `chunk_condition` encodes) is exactly
    echo-prep's crop of the photo, read as training reads its frames (`frames_to_tensor` to the model's size). Exact:
    both run the same detection, box and crop code on the same pixels."""
    size = pipe.settings.resolution
    crop = _prep_crops(photo[None], size)[0]  # S, S, 3
    session = pipe.start_session(reference_image=photo, with_user=False, **MASKS)
    expected = frames_to_tensor(crop[None], (size, size))  # 1, 3, S, S in [-1, 1]
    torch.testing.assert_close(session.context.reference.cpu(), expected, rtol=0, atol=0)
    # ... and not the squashed photo, which it used to be (the face is off-centre: they differ widely)
    squashed = pipe.prepare_reference(photo, size, size)
    assert (squashed - expected).abs().mean() > 0.1
    # Already-framed inputs pass through: the prepared crop itself, with `frame_inputs=False`
    given = pipe.start_session(reference_image=crop, with_user=False, frame_inputs=False, **MASKS)
    torch.testing.assert_close(given.context.reference.cpu(), expected, rtol=0, atol=0)


def test_raw_user_video_gives_echo_preps_crops_offline_and_in_pieces(pipe, photo, video):
    """The user's frames the LCU reads (the session's buffered frames, from which `_encode_user_video` makes its VAE
    tokens and the understanding model reads) are echo-prep's crops of the raw video, exactly, whether the video is
    pushed at once (what `__call__` does: a session fed everything in one push) or piece by piece as a live session
    receives it: the framing's state is carried from piece to piece. Exact: the same code on the same pixels."""
    size = pipe.settings.resolution
    expected = _prep_crops(video, size)  # T, S, S, 3
    dim = pipe.context_encoder.config.understanding_dim
    for pieces in ([12], [5, 1, 6]):
        session = pipe.start_session(reference_image=photo, understanding=torch.zeros(4, dim), **MASKS)
        start = 0
        for length in pieces:
            session.push(user_video=video[start : start + length])
            start += length
        np.testing.assert_array_equal(session.user.frames.view(0, len(video)).numpy(), expected)


def test_reference_without_a_face_is_a_clear_error(pipe):
    rng = np.random.default_rng(0)
    blank = np.clip(90 + 20 * rng.standard_normal((480, 640, 3)), 0, 255).astype(np.uint8)  # noise, no face
    message = r"`reference_image`: no face was found in this 480x640 image.*frame_inputs=False"
    with pytest.raises(ValueError, match=message):
        pipe.start_session(reference_image=blank, with_user=False, **MASKS)
    t = np.arange(16_000 * 9 // 25) / 16_000
    with pytest.raises(ValueError, match=message):
        pipe(reference_image=blank, avatar_audio=(0.1 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), **MASKS)


def test_box_smoothing_is_causal_and_resumable():
    """Changing frame 20's face box changes no crop box before frame 20 (no look-ahead), and the boxes framed in two
    pieces, the state carried, are those of the whole track."""
    rng = np.random.default_rng(0)
    centre = np.stack([np.linspace(200, 300, 30), np.linspace(150, 180, 30)], axis=1) + rng.normal(0, 4, (30, 2))
    boxes = np.concatenate([centre - 40, centre + 40], axis=1).astype(np.float32)
    boxes[[3, 11, 12]] = np.nan  # missed detections
    crops, _ = smooth_crop_boxes(boxes, (480, 640))
    changed = boxes.copy()
    changed[20] += 30.0
    after, _ = smooth_crop_boxes(changed, (480, 640))
    np.testing.assert_array_equal(after[:20], crops[:20])
    assert np.abs(after[20] - crops[20]).min() > 1.0
    first, state = smooth_crop_boxes(boxes[:13], (480, 640))
    rest, _ = smooth_crop_boxes(boxes[13:], (480, 640), state=state)
    np.testing.assert_array_equal(np.concatenate([first, rest]), crops)
    side = crops[:, 2] - crops[:, 0]
    np.testing.assert_allclose(side, CROP_SCALE * 80, rtol=1e-5)  # 1.8 × the 80 px face box, square
