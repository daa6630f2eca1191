"""Interactive mode: per-chunk cost of an `EchoSession` over a long conversation, first-frame latency, real-time factor.

A conversation of ``--chunks`` chunks (default 41: chunk 40 ends at frame 329, 13 s, with 9-frame chunks and 1 motion
frame) is pushed into a session one frame (40 ms of audio, one user frame) at a time, as a live source would, and each
chunk is rendered as soon as its inputs are complete (`EchoPipeline.start_session`, waveforms encoded as a stream).
Per chunk: the wall time of its rendering (audio encoding, user video tokens, LCU, three-pass guided denoising, VAE
decoding), the frames the LCU encodes (its Mamba state is carried; the open 16-frame scan block is re-run for a
result bit-identical to the full-history LCU, so this is bounded by 16 + a chunk, whatever the conversation's
length), and, for reference, the time the LCU takes over the whole history (what every chunk paid before the state
was carried). The headline figure is ``late_over_early`` = wall time of chunk 40 / chunk 2 (medians over
``--repeats`` runs): ≈ 1 when a chunk's cost does not depend on how long the conversation has been.
``max_lcu_frames`` is the most frames the LCU encoded for one chunk over the whole conversation (timing-free: bounded
by 16 + a chunk + the audio window's look-ahead).

- ``first_frame_latency_s``: from the arrival of the first chunk's last input to its frames (the first chunk also
  encodes the reference and its audio blocks);
- ``real_time_factor``: rendering seconds per second of video (below 1 keeps up with the conversation).

CPU (default): the tiny components of ``configs/models/tiny.yaml`` at ``--size`` (32²), float32, one thread. GPU: the
generator at Wan2.1-T2V-1.3B width with random weights (`benchmarks/sampling.py`'s description), bfloat16, 512².

    python benchmarks/streaming.py [--chunks 41] [--repeats 3] [--steps 2] [--size 32]

The last line holds the headline figures as ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echo.components import load_components, load_model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny.yaml"
SAMPLES_PER_FRAME = 640


def parse_args():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=41, help="chunks of the conversation (chunk 40 is measured)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the conversation; medians are reported")
    parser.add_argument("--frames-per-chunk", type=int, default=33 if cuda else 9)
    parser.add_argument("--motion-frames", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4 if cuda else 2)
    parser.add_argument("--size", type=int, default=512 if cuda else 32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the tiny model runs fastest)")
    parser.add_argument("--pipeline", default=None, help="a saved EchoPipeline folder instead of random weights")
    return parser.parse_args()


def build_pipeline(args, device, dtype):
    from pipelines import EchoPipeline

    if args.pipeline:
        return EchoPipeline.from_pretrained(args.pipeline, torch_dtype=dtype).to(device), "saved pipeline"
    if device.type == "cuda":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sampling import wan13b_description

        description, label = wan13b_description(), "wan2.1-1.3b width"
    else:
        description, label = load_model_config(TINY), "tiny"
    pipe = EchoPipeline(**load_components(description, torch_dtype=dtype)).to(device)
    return pipe, label


def conversation(num_frames: int, understanding_dim: int) -> dict:
    """The astronaut photo as the avatar, a voiced tone for its speech, noise for the user's, a moving user face."""
    from skimage.data import astronaut

    image = astronaut()
    t = np.arange(num_frames * SAMPLES_PER_FRAME) / 16_000
    landmarks = np.full((478, 2), 256.0, dtype=np.float32)  # a point face: empty masks, the cost is the same
    return {
        "reference_image": image,
        "reference_landmarks": landmarks,
        "avatar_audio": (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32),
        "user_audio": (0.05 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32),
        "user_video": np.stack([np.roll(image[::8, ::8], 2 * k, axis=1) for k in range(num_frames)]),
        "user_landmarks": np.repeat(landmarks[None] / 8, num_frames, axis=0),
        "understanding": torch.zeros(8, understanding_dim),
    }


def run_session(pipe, inputs, num_frames, args):
    """Pushes the conversation one frame at a time, rendering every chunk as soon as it is complete."""
    session = pipe.start_session(
        reference_image=inputs["reference_image"],
        reference_landmarks=inputs["reference_landmarks"],
        understanding=inputs["understanding"],
        emotion="calm and attentive",
        generator=torch.Generator().manual_seed(0),
        num_frames=num_frames,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        audio_guidance_scale=4.5,
        user_guidance_scale=2.0,
        num_frames_per_chunk=args.frames_per_chunk,
        motion_frames=args.motion_frames,
        output_type=None,
    )
    chunks = []
    for frame in range(num_frames):
        samples = slice(frame * SAMPLES_PER_FRAME, (frame + 1) * SAMPLES_PER_FRAME)
        session.push(avatar_audio=inputs["avatar_audio"][samples], user_audio=inputs["user_audio"][samples],
                     user_video=inputs["user_video"][frame : frame + 1],
                     user_landmarks=inputs["user_landmarks"][frame : frame + 1])  # fmt: skip
        chunks += list(session)
    session.close()
    chunks += list(session)
    assert session.done and len(chunks) == args.chunks, (len(chunks), args.chunks)
    return chunks


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.chunks < 41:
        raise SystemExit(f"--chunks is {args.chunks}: chunk 40 is measured, so at least 41.")
    pipe, label = build_pipeline(args, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    stride = args.frames_per_chunk - args.motion_frames
    num_frames = args.frames_per_chunk + (args.chunks - 1) * stride
    inputs = conversation(num_frames, pipe.context_encoder.config.understanding_dim)

    # LCU per chunk: the frames it encodes and the inputs it gets (to time the full-history forward afterwards)
    lcu = pipe.context_encoder
    lcu_log = []

    def count_rows(module, fn_args):
        lcu_log[-1]["rows"] = fn_args[0].shape[1]

    def keep_inputs(module, fn_args, kwargs):
        lcu_log.append({"kwargs": kwargs})

    handles = [lcu.register_forward_pre_hook(keep_inputs, with_kwargs=True),
               lcu.audio_norm.register_forward_pre_hook(count_rows)]  # fmt: skip

    # 1. Warm-up, then the timed runs (medians per chunk)
    run_session(pipe, inputs, num_frames, args)
    runs = []
    for _ in range(args.repeats):
        lcu_log.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(run_session(pipe, inputs, num_frames, args))
    for handle in handles:
        handle.remove()
    wall = [statistics.median(run[c].compute_seconds for run in runs) for c in range(args.chunks)]
    latency = statistics.median(run[0].latency for run in runs)
    rtf = statistics.median(sum(c.compute_seconds for c in run) / (num_frames / 25) for run in runs)

    # 2. The LCU over the whole history (what each chunk cost before the state was carried), for reference
    def lcu_seconds(kwargs, full):
        call = {k: v for k, v in kwargs.items() if not (full and k in ("state", "save_state_at"))}
        if full:
            call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            with torch.no_grad():
                lcu(**call)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    shown = [c for c in (0, 1, 2, 10, 20, 30, 31, 32, 40, args.chunks - 1) if c < args.chunks]
    shown = sorted(set(shown))
    rows = []
    for c in shown:
        kwargs = lcu_log[c]["kwargs"]
        history = kwargs["user_audio"].shape[1]
        rows.append((c, history, lcu_log[c]["rows"], wall[c], lcu_seconds(kwargs, False), lcu_seconds(kwargs, True)))

    print(f"model={label} device={device.type} dtype={str(dtype).replace('torch.', '')} size={args.size} "
          f"steps={args.steps} chunk={args.frames_per_chunk} motion={args.motion_frames} frames={num_frames} "
          f"repeats={args.repeats} threads={torch.get_num_threads()}")  # fmt: skip
    print("| chunk | history frames | LCU frames encoded | chunk wall s | LCU s (state) | LCU s (full history) |")
    print("|------:|---------------:|-------------------:|-------------:|--------------:|---------------------:|")
    for c, history, encoded, seconds, lcu_state, lcu_full in rows:
        print(f"| {c:>5} | {history:>14} | {encoded:>18} | {seconds:>12.4f} | {lcu_state:>13.4f} | {lcu_full:>20.4f} |")
    early, late = wall[2], wall[40]
    max_lcu_frames = max(entry["rows"] for entry in lcu_log)
    lcu_full_ratio = rows[[r[0] for r in rows].index(40)][5] / rows[[r[0] for r in rows].index(2)][5]
    print(
        f"chunk2_s={early:.4f} chunk40_s={late:.4f} late_over_early={late / early:.3f} "
        f"max_lcu_frames={max_lcu_frames} "
        f"first_frame_latency_s={latency:.4f} real_time_factor={rtf:.3f} "
        f"lcu_full_history_late_over_early={lcu_full_ratio:.2f}"
    )


if __name__ == "__main__":
    main()
