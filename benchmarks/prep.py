"""Throughput of data preparation: face detection + crop + landmarks (+ masks), wav2vec2 features, video encoding.

    python benchmarks/prep.py [--seconds 4] [--size 512]

Runs on a synthetic conversation (the astronaut photo animated to espeak-ng speech, 25 fps, ``--source-size``²
frames) with the real MediaPipe models. Stages, in frames per second of one process:

- ``detect``: MediaPipe face detection on every decoded source frame (the tracking pass);
- ``crop_landmarks``: square crop resized to ``--size``² plus the 478 face-mesh landmarks on the crop;
- ``crop_masks``: both of the above plus lip/face mask rasterisation at ``--size``² (`echo.masks.rasterize_masks`),
  i.e. everything per video frame except decoding and encoding;
- ``wav2vec2``: per-frame features of ``--seconds`` of speech; the tiny random config of ``configs/models/tiny.yaml``
  on CPU, the wav2vec2-base shape (12 layers × 768, random weights) in bf16 when CUDA is available;
- ``encode``: H.264 encoding of the ``--size``² crops.

The last line holds the headline figures as ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(function, *args, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        result = function(*args)
    return result, (time.perf_counter() - start) / repeat


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=512)
    args = parser.parse_args(argv)

    from data_prep.audio_features import Wav2Vec2Features
    from data_prep.faces import FaceMesh, MediaPipeFaceDetector, crop_frame, smooth_crop_boxes, track_faces
    from data_prep.media import read_video, read_wav, write_video
    from data_prep.synthetic import make_conversation
    from data_prep.testing import save_tiny_wav2vec2, tiny_audio_encoder_config
    from echo.masks import rasterize_masks

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        conversation = make_conversation(tmp / "src", "pairs", seconds=args.seconds, size=args.source_size, seed=0)
        frames = read_video(conversation.videos["A"])
        audio, _ = read_wav(conversation.audios["A"])
        num_frames = len(frames)

        # 1. Detection + tracking + smoothing over the clip.
        detector = MediaPipeFaceDetector()
        detector(frames[0])  # graph warm-up
        start = time.perf_counter()
        boxes, _ = track_faces([detector(frame) for frame in frames])
        crop_boxes = smooth_crop_boxes(boxes)
        detect_s = time.perf_counter() - start
        detector.close()

        # 2. Crop + landmarks (a fresh tracker per clip, as prep does).
        start = time.perf_counter()
        with FaceMesh() as mesh:
            crops = [crop_frame(frame, box, args.size) for frame, box in zip(frames, crop_boxes)]
            landmarks = np.stack([mesh(crop) for crop in crops])
        crop_landmarks_s = time.perf_counter() - start

        # 3. Masks at the crop size.
        _, masks_s = _timed(rasterize_masks, landmarks, args.size, args.size)

        # 4. Encoding.
        _, encode_s = _timed(write_video, tmp / "crop.mp4", np.stack(crops))

        # 5. wav2vec2 features.
        if cuda:
            from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

            folder = tmp / "wav2vec2-base-shape"
            Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(folder)
            Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(folder)
            features = Wav2Vec2Features(folder, device="cuda")
            features.model.to(torch.bfloat16)
            w2v_name = "wav2vec2-base shape, bf16, cuda"
        else:
            folder = save_tiny_wav2vec2(tmp / "wav2vec2-tiny")
            features = Wav2Vec2Features(folder, num_threads=1)
            w2v_name = f"tiny (hidden {tiny_audio_encoder_config()['hidden_size']}), fp32, cpu, 1 thread"
        features(audio, num_frames)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        _, w2v_s = _timed(features, audio, num_frames, repeat=3)

    fps = {
        "detect": num_frames / detect_s,
        "crop_landmarks": num_frames / crop_landmarks_s,
        "masks": num_frames / masks_s,
        "crop_masks": num_frames / (detect_s + crop_landmarks_s + masks_s),
        "wav2vec2": num_frames / w2v_s,
        "encode": num_frames / encode_s,
    }
    print(f"{num_frames} frames, source {args.source_size}², crops {args.size}², torch threads "
          f"{torch.get_num_threads()}, device {'cuda' if cuda else 'cpu'}")
    print(f"{'stage':<16}{'frames/s':>10}  notes")
    notes = {
        "detect": "MediaPipe face detection + tracking + smoothing",
        "crop_landmarks": f"crop to {args.size}² + 478 face-mesh landmarks",
        "masks": f"lip/face masks at {args.size}²",
        "crop_masks": "detect + crop + landmarks + masks (goal ≥ 25)",
        "wav2vec2": w2v_name,
        "encode": "libx264, one thread",
    }
    for name, value in fps.items():
        print(f"{name:<16}{value:>10.1f}  {notes[name]}")
    print(" ".join(f"{name}_fps={value:.1f}" for name, value in fps.items()))


if __name__ == "__main__":
    main()
