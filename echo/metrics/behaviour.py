"""Behaviour measures of a rendered conversation: does the avatar talk with its audio and listen to the user?

These are the measures of the demo model's report (``docs/demo_model.md``), computed from the generated frames, the
ground-truth frames and both participants' audio:

- **lip sync**: Pearson r between the avatar's mouth opening (MediaPipe inner-lip gap / face height, per frame) and
  its own speech envelope (short-time RMS per frame, `echo.audio.frame_rms`), over the frames of its speaking turns;
- **listening**: head-motion energy (frame-to-frame change of the head pose, averaged over 0.2 s: yaw, pitch, roll in
  degrees from a 3-D fit of the face mesh, and the face-centre translation in face heights) while the user speaks
  and the avatar does not, divided by the same during mutual silence (neither has spoken within 0.2 s);
- **identity and quality**: PSNR and SSIM against the ground-truth frames, and the share of frames with a face;
- **long video**: the face-detection rate and PSNR of the first and last ``window`` seconds.

Speaking turns come from the audio: a participant speaks on a frame whose RMS is above ``vad_ratio`` times the
95th percentile of its track's RMS, smoothed by a ``vad_hold``-frame majority window.
"""

from __future__ import annotations

import numpy as np

from ..audio import frame_rms
from ..masks import NUM_LANDMARKS
from .extractor import MediaPipeMotionExtractor, head_rotation_from_landmarks3d

UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14
LEFT_MOUTH_CORNER, RIGHT_MOUTH_CORNER = 78, 308  # inner-lip corners
FOREHEAD, CHIN = 10, 152
POSE_SMOOTHING = 5  # frames (0.2 s at 25 fps) the head pose is averaged over before its frame-to-frame change
STATE_MARGIN_SECONDS = 0.2  # listening / mutual-silence frames lie this far from the other states' speech


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1] != NUM_LANDMARKS or landmarks.shape[2] < 2:
        raise ValueError(f"`landmarks` has shape {landmarks.shape}, expected (T, {NUM_LANDMARKS}, 2 or 3) pixels.")
    return landmarks


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap divided by face height (forehead 10 to chin 152) per frame, `(T,)`; NaN where no face."""
    points = _check_landmarks(landmarks)[..., :2]
    gap = np.linalg.norm(points[:, LOWER_INNER_LIP] - points[:, UPPER_INNER_LIP], axis=-1)
    height = np.linalg.norm(points[:, CHIN] - points[:, FOREHEAD], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return gap / height


def mouth_darkness(frames: np.ndarray, reference_landmarks: np.ndarray) -> np.ndarray:
    """Mouth opening read from pixels, `(T,)`: 1 − the mean brightness (0-1) of a box around the reference image's
    inner lips (its mouth corners, 78 and 308, and inner-lip midpoints, 13 and 14), in every frame.

    An open mouth shows the dark mouth cavity. Unlike `mouth_opening` it needs no face mesh on the generated frames,
    so it still reads a soft render where MediaPipe finds no face; it assumes the head stays near the reference pose.

    Args:
        frames (`np.ndarray` of shape `(T, H, W, 3)` uint8): the rendered avatar, at the reference image's size.
        reference_landmarks (`np.ndarray` of shape `(478, 2|3)`): the reference image's landmarks in pixels.
    """
    frames = np.asarray(frames)
    points = np.asarray(reference_landmarks, dtype=np.float64)[:, :2]
    corners, lips = points[[LEFT_MOUTH_CORNER, RIGHT_MOUTH_CORNER]], points[[UPPER_INNER_LIP, LOWER_INNER_LIP]]
    x0, x1 = int(np.floor(corners[:, 0].min())), int(np.ceil(corners[:, 0].max()))
    half = max(2.0, 0.35 * (x1 - x0))  # half the box height: a wide-open mouth fits
    centre = lips[:, 1].mean()
    y0, y1 = max(0, int(np.floor(centre - half))), min(frames.shape[1], int(np.ceil(centre + half)))
    x0, x1 = max(0, x0), min(frames.shape[2], x1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"the reference's mouth box ({x0}:{x1}, {y0}:{y1}) lies outside the {frames.shape[1:3]} frames."
        )
    return 1.0 - frames[:, y0:y1, x0:x1].reshape(len(frames), -1).mean(axis=1) / 255.0


def head_pose(landmarks: np.ndarray) -> np.ndarray:
    """`(T, 5)`: yaw, pitch, roll in degrees (`echo.metrics.extractor.head_rotation_from_landmarks3d`) and the face
    centre (mean landmark) in face heights, x and y; NaN where no face."""

    points = _check_landmarks(landmarks)
    if points.shape[2] != 3:
        raise ValueError(f"`landmarks` has shape {points.shape}: the head pose needs the face mesh's z, (T, 478, 3).")
    angles = head_rotation_from_landmarks3d(points)
    height = np.linalg.norm(points[:, CHIN, :2] - points[:, FOREHEAD, :2], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = points[..., :2].mean(axis=1) / np.nanmedian(height)
    return np.concatenate([angles, centre], axis=1)


def motion_energy(pose: np.ndarray, angle_weight: float = 1.0 / 10.0, smooth: int = POSE_SMOOTHING) -> np.ndarray:
    """Frame-to-frame squared pose change, `(T,)` (frame 0 repeats frame 1; NaN where a frame in reach has no face).

    Angles count in units of 10 degrees, the centre in face heights, so a 10° turn weighs like a shift by one face
    height. The pose is first averaged over ``smooth`` frames (centred): per-frame landmark jitter, which at 128² is
    as large as a slow nod's step, would otherwise dominate the energy of a still head.
    """
    pose = np.asarray(pose, dtype=np.float64)
    scaled = np.concatenate([pose[:, :3] * angle_weight, pose[:, 3:]], axis=1)
    if smooth > 1 and len(scaled) >= smooth:
        kernel = np.ones(smooth) / smooth
        scaled = np.stack([np.convolve(column, kernel, mode="same") for column in scaled.T], axis=1)
        half = smooth // 2  # the edges average fewer frames: repeat the first and last full averages
        scaled[:half], scaled[len(scaled) - half :] = scaled[half], scaled[len(scaled) - half - 1]
    step = np.sum(np.diff(scaled, axis=0) ** 2, axis=1)
    return np.concatenate([step[:1], step]) if len(step) else np.zeros(len(pose))


def voice_activity(waveform: np.ndarray, num_frames: int, ratio: float = 0.2, hold: int = 5) -> np.ndarray:
    """Per-frame speech activity `(T,)` bool of a 16 kHz waveform: RMS above ``ratio`` × the track's 95th percentile,
    then a centred majority filter over ``hold`` frames (short gaps inside words stay speech)."""
    rms = frame_rms(np.asarray(waveform, dtype=np.float32), num_frames)
    level = np.percentile(rms, 95)
    active = rms > ratio * level if level > 0 else np.zeros(num_frames, dtype=bool)
    if hold > 1:
        kernel = np.ones(hold) / hold
        active = np.convolve(active.astype(np.float64), kernel, mode="same") > 0.5
    return active


def conversation_states(
    avatar_speaking: np.ndarray, user_speaking: np.ndarray, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Listening and mutual-silence frames `(T,)` bool from both participants' voice activity.

    Listening: the user speaks and the avatar has not spoken within ``margin`` frames; mutual silence: neither has
    spoken within ``margin`` frames. The margin keeps the pauses between a speaker's words (where a talking head is
    still moving with its speech) out of "silence" and the avatar's own turn edges out of "listening".
    """

    def near(active: np.ndarray) -> np.ndarray:
        active = np.asarray(active, dtype=bool)
        if margin <= 0:
            return active
        return np.convolve(active.astype(np.float64), np.ones(2 * margin + 1), mode="same") > 0

    avatar_near, user_near = near(avatar_speaking), near(user_speaking)
    return np.asarray(user_speaking, dtype=bool) & ~avatar_near, ~avatar_near & ~user_near


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r over the frames where both are finite; `None` with fewer than 3 frames or a constant input."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return None
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return None if denominator == 0 else float((a * b).sum() / denominator)


def lip_sync_r(opening: np.ndarray, avatar_rms: np.ndarray, speaking: np.ndarray) -> float | None:
    """Pearson r between mouth opening and the avatar's RMS over its speaking frames."""
    speaking = np.asarray(speaking, dtype=bool)
    return pearson(np.asarray(opening)[speaking], np.asarray(avatar_rms)[speaking])


def per_latent_frame(signal: np.ndarray, temporal_compression: int = 4) -> np.ndarray:
    """A per-frame signal `(T,)` as it would be if it changed once per latent frame: frame 0 alone, then the mean of
    each run of frames ``4j − 3 … 4j`` (the frames latent frame ``j`` covers), interpolated linearly back to every
    frame between the runs' centres (NaN frames left out of the means).

    The ground truth's mouth opening held this way scores what a mouth that moves only at the latent frame rate
    (6.25 Hz at 25 fps) can score on `lip_sync_r`: the speech RMS within speech varies from frame to frame, and a VAE
    that does not carry motion inside a latent frame cannot show that part.
    """
    signal = np.asarray(signal, dtype=np.float64)
    if signal.ndim != 1 or len(signal) < 2:
        raise ValueError(f"`signal` has shape {signal.shape}, expected (T,) with T >= 2.")
    runs = [np.arange(1)] + [
        np.arange(start, min(start + temporal_compression, len(signal)))
        for start in range(1, len(signal), temporal_compression)
    ]
    centres = np.array([run.mean() for run in runs])
    means = np.array([np.nanmean(signal[run]) if np.isfinite(signal[run]).any() else np.nan for run in runs])
    keep = np.isfinite(means)
    if keep.sum() < 2:
        return np.full(len(signal), np.nan)
    return np.interp(np.arange(len(signal)), centres[keep], means[keep])


def listening_ratio(energy: np.ndarray, user_speaking: np.ndarray, silence: np.ndarray) -> float | None:
    """Mean head-motion energy while the user speaks (and the avatar does not) over the same in mutual silence."""
    energy = np.asarray(energy, dtype=np.float64)
    listening = np.asarray(user_speaking, dtype=bool)
    silence = np.asarray(silence, dtype=bool)
    a, b = energy[listening & np.isfinite(energy)], energy[silence & np.isfinite(energy)]
    if len(a) < 3 or len(b) < 3 or b.mean() == 0:
        return None
    return float(a.mean() / b.mean())


def psnr(generated: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 frames `(T, H, W, 3)` over the whole clip (mean squared error over all pixels)."""
    diff = np.asarray(generated, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM (scikit-image, RGB, data range 255) over the frames."""
    from skimage.metrics import structural_similarity

    return float(
        np.mean([structural_similarity(g, r, channel_axis=-1, data_range=255) for g, r in zip(generated, reference)])
    )


def conversation_behaviour(
    generated: np.ndarray,
    reference: np.ndarray | None,
    avatar_audio: np.ndarray,
    user_audio: np.ndarray,
    landmarks: np.ndarray | None = None,
    fps: float = 25.0,
    window_seconds: float = 10.0,
) -> dict:
    """All behaviour measures of one rendered conversation.

    Args:
        generated (`np.ndarray` of shape `(T, H, W, 3)` uint8): the avatar as rendered.
        reference (`np.ndarray` of shape `(T, H, W, 3)` uint8, *optional*): its ground truth (PSNR / SSIM).
        avatar_audio, user_audio (`np.ndarray`): 16 kHz mono waveforms of both participants (the clip's span).
        landmarks (`np.ndarray` of shape `(T, 478, 3)`, *optional*): the generated frames' landmarks (when not
            given: MediaPipe's face mesh per frame in static-image mode; NaN rows where no face).
        window_seconds (`float`, defaults to 10): length of the first / last windows of the long-video check.

    Returns:
        `dict` with ``lip_sync_r``, ``listening_ratio``, ``face_rate``, ``psnr``, ``ssim``, ``num_frames`` and, for
        clips longer than two windows, ``first_face_rate``, ``last_face_rate``, ``first_psnr``, ``last_psnr``.
    """
    generated = np.asarray(generated)
    num_frames = len(generated)
    if landmarks is None:
        landmarks = MediaPipeMotionExtractor(static_image_mode=True, fill_missing=False).detect(generated)
    has_face = np.isfinite(np.asarray(landmarks, dtype=np.float64)[..., :2]).all(axis=(1, 2))
    avatar_speaking = voice_activity(avatar_audio, num_frames)
    user_speaking = voice_activity(user_audio, num_frames)
    energy = motion_energy(head_pose(landmarks))
    listening, silence = conversation_states(avatar_speaking, user_speaking, int(round(STATE_MARGIN_SECONDS * fps)))
    result = {
        "num_frames": num_frames,
        "lip_sync_r": lip_sync_r(mouth_opening(landmarks), frame_rms(avatar_audio, num_frames), avatar_speaking),
        "listening_ratio": listening_ratio(energy, listening, silence),
        "face_rate": float(has_face.mean()),
    }
    if reference is not None:
        reference = np.asarray(reference)[:num_frames]
        result["psnr"] = psnr(generated, reference)
        result["ssim"] = ssim(generated, reference)
    window = int(round(window_seconds * fps))
    if num_frames >= 2 * window:
        result["first_face_rate"] = float(has_face[:window].mean())
        result["last_face_rate"] = float(has_face[-window:].mean())
        if reference is not None:
            result["first_psnr"] = psnr(generated[:window], reference[:window])
            result["last_psnr"] = psnr(generated[-window:], reference[-window:])
    return result
