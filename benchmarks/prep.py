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

With ``--engines``, it then prepares ``--conversations`` synthetic conversations of ``--seconds`` each end to end with
``echo-prep`` (tiny wav2vec2, ``--size``² crops) three ways: ``--workers 1`` (inline), the local process pool
(``--workers N``) and Ray (``--engine ray``, a local cluster of N CPUs, N workers), timing each from the call to the
summary (pool and actor start-up included; Ray's own start-up is timed apart), and reports conversations per minute,
``core_s_per_conv_s`` (CPU core-seconds per second of conversation, both participants; the basis of the 1,000-hour
estimate in ``docs/cluster_prep.md``), and whether the three outputs are byte-identical.

    python benchmarks/prep.py --engines [--conversations 4] [--engine-workers 2]

The last line holds the headline figures as ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.audio_features import Wav2Vec2Features
from data_prep.cli import run_prep
from data_prep.media import read_video, read_wav, write_video
from data_prep.stages import PrepOptions
from data_prep.testing import save_tiny_wav2vec2, tiny_audio_encoder_config
from echo.faces import FaceMesh
from echo.framing import FaceFramer, crop_frame
from echo.masks import rasterize_masks
from synthetic.conversations import make_conversation


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
    parser.add_argument("--engines", action="store_true", help="also time echo-prep inline, on the pool and on Ray")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--engine-workers", type=int, default=2)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        conversation = make_conversation(tmp / "src", "pairs", seconds=args.seconds, size=args.source_size, seed=0)
        frames = read_video(conversation.videos["A"])
        audio, _ = read_wav(conversation.audios["A"])
        num_frames = len(frames)

        # 1. Detection + tracking + smoothing over the clip.
        framer = FaceFramer()
        framer.detect(frames[0])  # graph warm-up
        start = time.perf_counter()
        crop_boxes, _, _ = framer.track(frames)
        detect_s = time.perf_counter() - start
        framer.close()

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
        features(audio, 0, num_frames)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        _, w2v_s = _timed(features, audio, 0, num_frames, repeat=3)

    fps = {
        "detect": num_frames / detect_s,
        "crop_landmarks": num_frames / crop_landmarks_s,
        "masks": num_frames / masks_s,
        "crop_masks": num_frames / (detect_s + crop_landmarks_s + masks_s),
        "wav2vec2": num_frames / w2v_s,
        "encode": num_frames / encode_s,
    }
    print(
        f"{num_frames} frames, source {args.source_size}², crops {args.size}², torch threads "
        f"{torch.get_num_threads()}, device {'cuda' if cuda else 'cpu'}"
    )
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
    figures = {f"{name}_fps": f"{value:.1f}" for name, value in fps.items()}
    if args.engines:
        figures.update(engines(args))
    print(" ".join(f"{name}={value}" for name, value in figures.items()))


def engines(args) -> dict:
    """echo-prep end to end on ``args.conversations`` conversations: inline, pool and Ray; returns the figures."""
    import os

    try:
        import ray
    except ImportError:
        ray = None
    workers = args.engine_workers
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in range(args.conversations):
            make_conversation(tmp / "src", "pairs", seconds=args.seconds, size=args.source_size, seed=100 + seed)
        options = PrepOptions(wav2vec2=str(save_tiny_wav2vec2(tmp / "w2v")), size=args.size, clip_seconds=2.0)
        seconds, startup = {}, {}
        runs = [("inline", {"workers": 1}), ("pool", {"workers": workers})]
        if ray is not None:
            runs.append(("ray", {"workers": workers, "engine": "ray"}))
        for name, kwargs in runs:
            if name == "ray":
                start = time.perf_counter()
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                startup["ray"] = time.perf_counter() - start
            start = time.perf_counter()
            summary = run_prep(tmp / "src", "pairs", tmp / name, options, progress=False, **kwargs)
            seconds[name] = time.perf_counter() - start
            assert not summary.failed, summary.failed
            if name == "ray":
                ray.shutdown()

        def files(root):
            return {
                p.relative_to(root): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "prep_summary.json"
            }

        reference = files(tmp / "inline")
        identical = all(files(tmp / name) == reference for name in seconds)
    conversation_s = args.conversations * args.seconds
    print(
        f"\n{args.conversations} conversations of {args.seconds:g} s (source {args.source_size}², crops {args.size}², "
        f"tiny wav2vec2), {workers} workers, {os.cpu_count()} CPUs; outputs byte-identical: {identical}"
    )
    print(f"{'engine':<10}{'wall s':>8}{'conv/min':>10}{'core-s/conv-s':>15}  notes")
    notes = {
        "inline": "--workers 1, one process",
        "pool": f"--workers {workers}, spawned process pool",
        "ray": f"--engine ray, {workers} actors (Ray start-up {startup.get('ray', 0):.1f} s not included)",
    }
    figures = {}
    for name, wall in seconds.items():
        cores = 1 if name == "inline" else workers
        per_minute, core_s = 60 * args.conversations / wall, cores * wall / conversation_s
        print(f"{name:<10}{wall:>8.1f}{per_minute:>10.2f}{core_s:>15.2f}  {notes[name]}")
        figures[f"{name}_conv_per_min"] = f"{per_minute:.2f}"
        figures[f"{name}_core_s_per_conv_s"] = f"{core_s:.2f}"
    if ray is None:
        print("ray       (not installed: pip install 'echo-ihg[cluster]')")
    figures["ray_startup_s"] = f"{startup['ray']:.1f}" if "ray" in startup else "n/a"
    figures["engines_identical"] = int(identical)
    return figures


if __name__ == "__main__":
    main()
