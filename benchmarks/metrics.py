"""Throughput of the evaluation: feature networks of FID / FVD / CSIM / LSE, the MediaPipe motion extractor, SID.

CPU: tiny feature networks (random weights, the widths of the tests), float32. GPU (``torch.cuda.is_available()``):
the full-size public architectures (InceptionV3, I3D, iresnet100, SyncNet; random weights, same cost) in bfloat16.
The MediaPipe extractor always runs on the CPU (its models ship in the wheel).

Usage: ``python benchmarks/metrics.py [--frames 64] [--repeats 3] [--threads N]`` (on a shared CPU, ``--threads 1``
keeps the tiny networks from waiting on busy OpenMP workers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from echo.metrics import motion, video
from echo.metrics.extractor import MediaPipeMotionExtractor
from echo.metrics.networks import FEATURE_NETWORKS

CPU_CONFIGS = {
    "inception": dict(width_multiplier=1 / 16, input_size=75),
    "i3d": dict(width_multiplier=1 / 16, num_classes=16, input_size=64),
    "arcface": dict(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_dim=32, input_size=32),
    "syncnet": dict(width_multiplier=1 / 16, embedding_dim=32),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64, help="frames per measured clip")
    parser.add_argument("--size", type=int, default=256, help="frame size (pixels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(args.frames, args.size, args.size, 3), dtype=np.uint8)
    audio = rng.normal(scale=0.1, size=args.frames * 640).astype(np.float32)

    rows = []  # name, unit, items per run, seconds
    for name, config in CPU_CONFIGS.items():
        torch.manual_seed(0)
        model = FEATURE_NETWORKS[name](**({} if cuda else config)).eval().to(device=device, dtype=dtype)
        if name in ("inception", "arcface"):
            run, items, unit = (lambda m=model: video.image_features(m, frames)), args.frames, "frames"
        elif name == "i3d":
            run, items, unit = (
                (lambda m=model: video.video_features(m, frames, 16)),
                max(1, args.frames // 16),
                "16-frame windows",
            )
        else:
            run, items, unit = (lambda m=model: video.lse(m, frames, audio)), args.frames - 5, "5-frame windows"
        rows.append((name, unit, items, timed(run, args.repeats, cuda)))
        del model

    # MediaPipe face mesh + solvePnP + alignment on a real face photo (tracking mode, as echo-eval runs it)
    import skimage.data

    face = skimage.data.astronaut()[10:266, 95:351]
    face_clip = np.repeat(face[None], min(args.frames, 32), axis=0)
    extractor = MediaPipeMotionExtractor()
    rows.append(("mediapipe", "frames", len(face_clip), timed(lambda: extractor(face_clip), 1, False)))

    # SID: k-means (k = 15, n_init = 10) on 5000 ground-truth frames of 50-d expression
    gt = rng.normal(size=(5000, 50))
    rows.append(("sid_kmeans", "fits", 1, timed(lambda: motion.sid(gt[:1000], gt, num_clusters=15), 1, False)))

    print(f"device={device} dtype={str(dtype).replace('torch.', '')} {'full-size' if cuda else 'tiny'} networks")
    print(f"{'metric part':>12} {'unit':>18} {'items':>6} {'seconds':>9} {'items/s':>9}")
    for name, unit, items, seconds in rows:
        print(f"{name:>12} {unit:>18} {items:>6} {seconds:>9.3f} {items / seconds:>9.1f}")
    headline = {
        "inception_fps": rows[0][2] / rows[0][3],
        "i3d_windows_per_s": rows[1][2] / rows[1][3],
        "arcface_fps": rows[2][2] / rows[2][3],
        "syncnet_windows_per_s": rows[3][2] / rows[3][3],
        "mediapipe_fps": rows[4][2] / rows[4][3],
        "sid_kmeans_s": rows[5][3],
    }
    print(" ".join(f"{k}={v:.2f}" for k, v in headline.items()))


if __name__ == "__main__":
    main(parse_args())
