"""Inputs of a short render of the tiny pipeline (`tests.tiny_models`), for tests that compare two renders."""

import numpy as np
import torch

from echo.masks import NUM_LANDMARKS


def tiny_render_inputs(num_frames: int = 9, understanding_dim: int = 32, seed: int = 0) -> dict:
    """`EchoPipeline.__call__` arguments for a 32² render of ``num_frames`` frames with every condition (avatar audio,
    user video and audio, understanding tokens of ``understanding_dim``, token-grid lip and face masks), 2 denoising
    steps and ``"pt"`` output, without face detection (user landmarks given on a circle; random images taken as head
    crops, ``frame_inputs=False``); each render passes its own ``generator``."""
    rng = np.random.default_rng(seed)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    samples = num_frames * 640  # 16 kHz at 25 fps
    angles = np.linspace(0, 2 * np.pi, NUM_LANDMARKS, endpoint=False)
    circle = 32 + 12 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # a face of 24 px in the 64² user frames
    lip = torch.zeros(2, 2)  # 32² → 2 × 2 tokens; the lower row is the mouth
    lip[1] = 1.0
    return dict(
        reference_image=image,
        avatar_audio=(0.1 * rng.standard_normal(samples)).astype(np.float32),
        user_video=np.stack([np.roll(image, k, axis=1) for k in range(num_frames)]),
        user_audio=(0.1 * rng.standard_normal(samples)).astype(np.float32),
        user_landmarks=np.repeat(circle[None], num_frames, axis=0),
        understanding=torch.from_numpy(rng.standard_normal((4, understanding_dim)).astype(np.float32)),
        lip_mask=lip,
        face_mask=1 - lip,
        num_frames=num_frames,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
        frame_inputs=False,
    )
