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

Second table: the user history at the shipped settings of ``--history-model`` (configs/models/wan2.1-t2v-1.3b.yaml:
33-frame chunks, one motion frame, 128² user frames, ``max_history_frames`` as the description sets it, null = the
whole history), its LCU at its real width (random weights), over chunks 0-40 of a session fed one chunk's frames at a
time (precomputed wav2vec2-base-shaped rows; the generator and VAE stay tiny, rendering ``--size``², since only the
LCU is measured). Per chunk: the history it receives, the frames its LCU encodes and its LCU seconds (best of
``--repeats`` sessions). ``history_cost_ratio_last_first`` = LCU seconds of chunks 31-40 over chunks 1-10 (≈ 1: flat),
``history_frames_ratio_last_first`` the same for the frames encoded (timing-free). ``--history-max-frames W`` serves
a capped model instead (the pre-fix 1500 shows a cost growing with the conversation).

    python benchmarks/streaming.py [--chunks 41] [--repeats 3] [--steps 2] [--size 32] [--history-only]

Few-step mode beside the teacher: ``--pipeline DIR`` with a few-step student in ``DIR/few_step`` (written by
``python -m training.distill``; docs/few_step.md), e.g. ``--pipeline models/echo-demo``, renders the model's own
example conversation (``DIR/example``, its first ``--few-step-chunks`` chunks) at the model's own settings
(resolution, chunk length, motion frames) through a session fed one frame at a time, once with the teacher (its
saved steps and guidance) and once with the student at each of its step counts, and prints each chunk's compute
seconds side by side. fps = avatar frames / wall seconds of the whole session (audio encoder, user tokens, LCU,
denoising, VAE encode and decode: everything a live render does; one process, ``--threads`` CPU threads). The last
line holds ``student_fps=<the student's default step count> teacher_fps=...`` and the other counts.

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
from echo.settings import EchoSettings
from pipelines import EchoPipeline
from pipelines.demo import read_example
from pipelines.few_step import FEW_STEP_DIR

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
    parser.add_argument(
        "--history-model",
        default=str(ROOT / "configs" / "models" / "wan2.1-t2v-1.3b.yaml"),
        help="model description whose settings and LCU the history table measures",
    )
    parser.add_argument(
        "--history-max-frames",
        type=int,
        default=None,
        help="serve a model capped at this many history frames (default: the description's setting)",
    )
    parser.add_argument("--history-only", action="store_true", help="only the history table (skips the tiny runs)")
    parser.add_argument(
        "--few-step-chunks",
        type=int,
        default=8,
        help="chunks of DIR/example rendered by teacher and student when --pipeline DIR has a few_step/ student",
    )
    return parser.parse_args()


def push_frame_by_frame(session, inputs: dict, num_frames: int) -> list:
    """Feeds ``inputs`` to ``session`` one frame at a time (as a live source would), renders every chunk as soon as it
    is complete, closes the session and returns all its chunks."""
    chunks = []
    for frame in range(num_frames):
        samples = slice(frame * SAMPLES_PER_FRAME, (frame + 1) * SAMPLES_PER_FRAME)
        session.push(
            avatar_audio=inputs["avatar_audio"][samples],
            user_audio=inputs["user_audio"][samples],
            user_video=inputs["user_video"][frame : frame + 1],
            user_landmarks=inputs["user_landmarks"][frame : frame + 1],
            sampling_rate=SAMPLES_PER_FRAME * 25,  # 16 kHz: 640 samples per frame at 25 fps
        )
        chunks += list(session)
    session.close()
    return chunks + list(session)


def few_step_session(pipe, inputs: dict, num_frames: int) -> tuple[list, float]:
    """A session at the model's settings fed one frame at a time, each chunk rendered when complete; returns the
    chunks and the wall seconds of the whole session."""
    start = time.perf_counter()
    session = pipe.start_session(
        reference_image=inputs["reference_image"],
        reference_landmarks=inputs.get("reference_landmarks"),
        generator=torch.Generator().manual_seed(0),
        num_frames=num_frames,
        frame_inputs=inputs.get("frame_inputs", True),
        understanding=inputs.get("understanding"),
        output_type="np",
    )
    chunks = push_frame_by_frame(session, inputs, num_frames)
    return chunks, time.perf_counter() - start


def few_step_comparison(args) -> None:
    """Per-chunk compute seconds and fps of the teacher and the few-step student of ``args.pipeline``."""
    folder = Path(args.pipeline)
    torch.set_num_threads(args.threads)
    pipe = EchoPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    few_step = pipe.load_few_step_weights(folder / FEW_STEP_DIR, enable=False)
    settings = pipe.settings
    _, inputs = read_example(folder / "example")
    lcu = pipe.context_encoder
    if lcu is not None and lcu.config.use_understanding and inputs.get("understanding") is None:
        inputs["understanding"] = torch.zeros(8, lcu.config.understanding_dim)  # the cost is the same
    stride = settings.num_frames_per_chunk - settings.motion_frames
    num_frames = min(settings.num_frames_per_chunk + (args.few_step_chunks - 1) * stride, inputs["num_frames"])
    runs = {}
    pipe.disable_few_step()
    few_step_session(pipe, inputs, settings.num_frames_per_chunk)  # warm-up: one chunk
    runs["teacher"] = few_step_session(pipe, inputs, num_frames)
    for steps in few_step.num_steps:
        pipe.enable_few_step(steps)
        runs[f"student{steps}"] = few_step_session(pipe, inputs, num_frames)
    names = list(runs)
    print(
        f"pipeline={folder} size={settings.resolution} chunk={settings.num_frames_per_chunk} "
        f"motion={settings.motion_frames} frames={num_frames} threads={torch.get_num_threads()} "
        f"teacher: {settings.num_inference_steps} steps x guidance passes (s_a={settings.audio_guidance_scale}, "
        f"s_u={settings.user_guidance_scale}); student{{n}}: n steps x 1 pass"
    )
    print("| chunk | frames | " + " | ".join(f"{n} s" for n in names) + " |")
    print("|------:|-------:|" + "|".join("-" * (len(n) + 3) + ":" for n in names) + "|")
    for c, chunk in enumerate(runs["teacher"][0]):
        cells = " | ".join(f"{runs[n][0][c].compute_seconds:>{len(n) + 2}.3f}" for n in names)
        print(f"| {c:>5} | {len(chunk.frames):>6} | {cells} |")
    fps = {n: sum(len(chunk.frames) for chunk in chunks) / wall for n, (chunks, wall) in runs.items()}
    print(
        f"student_fps={fps[f'student{few_step.default_steps}']:.3f} teacher_fps={fps['teacher']:.3f} "
        + " ".join(f"{n}_fps={value:.3f}" for n, value in fps.items() if n != "teacher")
        + f" student_steps={few_step.default_steps} real_time_fps=25"
    )


def build_pipeline(args, device, dtype):

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
    chunks = push_frame_by_frame(session, inputs, num_frames)
    assert session.done and len(chunks) == args.chunks, (len(chunks), args.chunks)
    return chunks


def history_pipeline(args, device, dtype):
    """The tiny components with the settings and the LCU of ``--history-model``, the generator's interface widths
    (audio rows, context width) matched to that LCU, and a wav2vec2-base-shaped audio encoder (never run: rows are
    pushed precomputed)."""

    real, description = load_model_config(args.history_model), load_model_config(TINY)
    settings = EchoSettings.from_dict(real["settings"]).to_dict()
    if args.history_max_frames is not None:
        settings["max_history_frames"] = args.history_max_frames
    history_keys = ("num_frames_per_chunk", "motion_frames", "user_video_size", "max_history_frames")
    description["settings"].update({key: settings[key] for key in history_keys})
    lcu_config = real["context_encoder"]["config"]
    description["context_encoder"]["config"] = dict(lcu_config)
    interface = ("audio_dim", "audio_num_layers", "audio_window", "context_dim")
    description["transformer"]["config"].update({key: real["transformer"]["config"][key] for key in interface})
    description["audio_encoder"]["config"] = {}  # Wav2Vec2Config defaults = wav2vec2-base (12 layers + 1, 768)
    pipe = EchoPipeline(**load_components(description, torch_dtype=dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, EchoSettings.from_dict(description["settings"])


def history_cost(args, device, dtype) -> tuple[list[tuple], dict]:
    """Per chunk 0-40 at ``--history-model``'s settings: (chunk, history frames, LCU frames encoded, LCU seconds)."""
    pipe, settings = history_pipeline(args, device, dtype)
    chunk, motion = settings.num_frames_per_chunk, settings.motion_frames
    stride, num_chunks = chunk - motion, 41
    num_frames = chunk + (num_chunks - 1) * stride
    lcu = pipe.context_encoder
    rng = np.random.default_rng(0)
    rows = {
        name: rng.standard_normal((num_frames, lcu.config.audio_num_layers, lcu.config.audio_dim)).astype(np.float32)
        for name in ("avatar", "user")
    }
    from skimage.data import astronaut

    size = settings.user_video_size
    face = np.ascontiguousarray(astronaut()[:: 512 // size, :: 512 // size])  # size², already a head crop
    landmarks = np.full((1, 478, 2), size / 2, dtype=np.float32)  # a point face: empty masks, the cost is the same
    understanding = torch.zeros(8, lcu.config.understanding_dim)
    log = []

    def start(module, fn_args, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        log.append({"history": kwargs["user_audio"].shape[1], "start": time.perf_counter()})

    def count(module, fn_args):
        log[-1]["encoded"] = fn_args[0].shape[1]

    def stop(module, fn_args, output):
        if device.type == "cuda":
            torch.cuda.synchronize()
        log[-1]["seconds"] = time.perf_counter() - log[-1]["start"]

    handles = [
        lcu.register_forward_pre_hook(start, with_kwargs=True),
        lcu.audio_norm.register_forward_pre_hook(count),
        lcu.register_forward_hook(stop),
    ]
    runs = []
    try:
        for _ in range(args.repeats):
            log.clear()
            session = pipe.start_session(
                reference_image=face,
                understanding=understanding,
                emotion="calm",
                generator=torch.Generator().manual_seed(0),
                num_frames=num_frames,
                height=args.size,
                width=args.size,
                num_inference_steps=1,
                output_type="latent",
                frame_inputs=False,
            )
            for first in range(0, num_frames, stride):
                last = min(num_frames, first + stride)
                session.push(
                    avatar_audio_features=rows["avatar"][first:last],
                    user_audio_features=rows["user"][first:last],
                    user_video=np.repeat(face[None], last - first, axis=0),
                    user_landmarks=np.repeat(landmarks, last - first, axis=0),
                )
                list(session)
            session.close()
            list(session)
            assert len(log) == num_chunks, (len(log), num_chunks)
            runs.append([dict(entry) for entry in log])
    finally:
        for handle in handles:
            handle.remove()
    table = [
        (c, runs[0][c]["history"], runs[0][c]["encoded"], min(run[c]["seconds"] for run in runs))
        for c in range(num_chunks)
    ]
    first, last = table[1:11], table[31:41]
    figures = {
        "history_cost_ratio_last_first": sum(r[3] for r in last) / sum(r[3] for r in first),
        "history_frames_ratio_last_first": sum(r[2] for r in last) / sum(r[2] for r in first),
        "history_max_lcu_frames": max(r[2] for r in table),
        "history_max_frames": settings.max_history_frames,
    }
    return table, figures


def print_history_table(args, table, figures):
    print(
        f"history: settings of {Path(args.history_model).name} (LCU at its width; max_history_frames="
        f"{figures['history_max_frames']}), repeats={args.repeats}"
    )
    print("| chunk | history frames | LCU frames encoded | LCU s |")
    print("|------:|---------------:|-------------------:|------:|")
    for c, history, encoded, seconds in table[1:]:
        print(f"| {c:>5} | {history:>14} | {encoded:>18} | {seconds:.4f} |")


def main():
    args = parse_args()
    if args.pipeline and (Path(args.pipeline) / FEW_STEP_DIR).is_dir():
        few_step_comparison(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.chunks < 41:
        raise SystemExit(f"--chunks is {args.chunks}: chunk 40 is measured, so at least 41.")
    history_table, history_figures = history_cost(args, device, dtype)
    history_line = (
        f"history_cost_ratio_last_first={history_figures['history_cost_ratio_last_first']:.3f} "
        f"history_frames_ratio_last_first={history_figures['history_frames_ratio_last_first']:.3f} "
        f"history_max_lcu_frames={history_figures['history_max_lcu_frames']}"
    )
    if args.history_only:
        print_history_table(args, history_table, history_figures)
        print(history_line)
        return
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

    handles = [
        lcu.register_forward_pre_hook(keep_inputs, with_kwargs=True),
        lcu.audio_norm.register_forward_pre_hook(count_rows),
    ]

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

    print(
        f"model={label} device={device.type} dtype={str(dtype).replace('torch.', '')} size={args.size} "
        f"steps={args.steps} chunk={args.frames_per_chunk} motion={args.motion_frames} frames={num_frames} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    print("| chunk | history frames | LCU frames encoded | chunk wall s | LCU s (state) | LCU s (full history) |")
    print("|------:|---------------:|-------------------:|-------------:|--------------:|---------------------:|")
    for c, history, encoded, seconds, lcu_state, lcu_full in rows:
        print(f"| {c:>5} | {history:>14} | {encoded:>18} | {seconds:>12.4f} | {lcu_state:>13.4f} | {lcu_full:>20.4f} |")
    early, late = wall[2], wall[40]
    max_lcu_frames = max(entry["rows"] for entry in lcu_log)
    lcu_full_ratio = rows[[r[0] for r in rows].index(40)][5] / rows[[r[0] for r in rows].index(2)][5]
    print_history_table(args, history_table, history_figures)
    print(
        f"chunk2_s={early:.4f} chunk40_s={late:.4f} late_over_early={late / early:.3f} "
        f"max_lcu_frames={max_lcu_frames} "
        f"first_frame_latency_s={latency:.4f} real_time_factor={rtf:.3f} "
        f"lcu_full_history_late_over_early={lcu_full_ratio:.2f} {history_line}"
    )


if __name__ == "__main__":
    main()
