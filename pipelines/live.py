"""``echo-live``: replay a conversation through an interactive session at real-time pace and report its latency.

```
echo-live --pipeline DIR --manifest conversations.jsonl [--id ID] [--out avatar.mp4] [--speed 1 | --no-wait]
          [--piece-frames 1] [--report report.json] [echo-render's model options]
```

The conversation is one entry of an ``echo-render`` manifest (the first, or ``--id``). A feeder thread pushes it into
an `EchoSession` (`EchoPipeline.start_session`) as a live source would: every ``--piece-frames`` frames of the user's
video with the matching audio of both speakers (640 samples per frame), each piece when its last frame has happened
(``--speed`` times real time; ``--no-wait`` pushes as fast as possible), and every transcript segment just before the
media it starts in. The main thread renders each chunk as soon as its inputs are complete. ``--out`` and ``--report``
must name files in existing folders: they are checked before anything renders.

Per chunk it prints when the chunk's last input arrived, the **latency** from that arrival to the chunk's first output
frame (the rendering time plus any wait behind the previous chunk), the compute time, and the **lag**: how far behind
the conversation the chunk's frames are ready (output time − the time its last frame was spoken, in conversation
seconds; it includes the audio rows' look-ahead, up to 51 frames after a chunk's last frame: see
`pipelines.session`). The summary gives the **real-time factor** (compute seconds per second of video: below 1 keeps
up) and ends with one line of ``name=value`` figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from echo.audio import FPS

from .render import (
    add_model_arguments,
    build_helpers,
    check_model_options,
    load_pipeline,
    model_options,
    positive_float,
    positive_int,
    read_entry,
    read_manifest,
    write_atomically,
)
from .session import SAMPLES_PER_FRAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echo-live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="folder of a saved EchoPipeline (save_pretrained)")
    parser.add_argument("--manifest", required=True, help="echo-render JSON-lines manifest")
    parser.add_argument("--id", default=None, help="the entry to replay (default: the first)")
    parser.add_argument("--out", default=None, help="write the rendered avatar here (mp4), optional")
    parser.add_argument("--report", default=None, help="write the per-chunk figures here (JSON), optional")
    parser.add_argument("--speed", type=positive_float, default=1.0, help="replay speed, times real time (default: 1)")
    parser.add_argument("--no-wait", action="store_true", help="push every piece at once, as fast as possible")
    parser.add_argument(
        "--piece-frames", type=positive_int, default=1, help="frames per pushed piece (default: 1, 40 ms)"
    )
    return add_model_arguments(parser)


def replay(session, inputs: dict, piece_frames: int, speed: float | None) -> tuple[list, float]:
    """Feeds ``inputs`` (`read_entry`'s) into ``session`` from a thread at ``speed`` times real time (``None``: at
    once) while rendering here. Returns the chunks and the replay's start time (`time.perf_counter`)."""
    if piece_frames < 1:
        raise ValueError(f"`--piece-frames` is {piece_frames}, expected at least 1.")
    if speed is not None and not speed > 0:
        raise ValueError(f"`--speed` is {speed}, expected a positive number (or --no-wait).")
    num_frames = len(inputs["user_video"])
    for name in ("avatar_audio", "user_audio"):  # the audio tracks may run longer than the video
        num_frames = max(num_frames, -(-len(inputs[name]) // SAMPLES_PER_FRAME))
    segments = sorted(inputs.get("dialogue") or [], key=lambda s: float(s["start"]))
    failure = []
    start_time = time.perf_counter()

    def feed():
        try:
            pending = list(segments)
            for first in range(0, num_frames, piece_frames):
                stop = min(num_frames, first + piece_frames)
                if speed is not None:  # the piece is pushed when its last frame has happened
                    time.sleep(max(0.0, start_time + stop / FPS / speed - time.perf_counter()))
                while pending and float(pending[0]["start"]) * FPS < stop:
                    session.push(dialogue=[pending.pop(0)])
                samples = slice(first * SAMPLES_PER_FRAME, stop * SAMPLES_PER_FRAME)
                piece = {"avatar_audio": inputs["avatar_audio"][samples], "user_audio": inputs["user_audio"][samples]}
                if first < len(inputs["user_video"]):
                    piece["user_video"] = inputs["user_video"][first:stop]
                    if inputs.get("user_landmarks") is not None:
                        piece["user_landmarks"] = inputs["user_landmarks"][first:stop]
                session.push(**piece)
            session.close()
        except Exception as error:  # re-raised by the main thread
            failure.append(error)

    feeder = threading.Thread(target=feed, name="echo-live-feeder", daemon=True)
    feeder.start()
    chunks = []
    while not session.done:
        if failure:
            raise failure[0]
        chunk = session.pull(timeout=0.5)
        if chunk is not None:
            chunks.append(chunk)
    feeder.join()
    if failure:
        raise failure[0]
    return chunks, start_time


def summarize(chunks: list, start_time: float, speed: float | None) -> tuple[list[dict], dict]:
    """Per-chunk rows and the summary figures (seconds; the lag only for a paced replay)."""
    rows = []
    for chunk in chunks:
        last_frame = chunk.first_frame + chunk.num_frames  # conversation frames covered so far
        spoken_at = float("nan") if speed is None else last_frame / FPS / speed
        rows.append(
            {
                "chunk": chunk.index,
                "frames": chunk.num_frames,
                "first_frame": chunk.first_frame,
                "inputs_complete_s": chunk.inputs_complete_at - start_time,
                "latency_s": chunk.latency,
                "compute_s": chunk.compute_seconds,
                "lag_s": chunk.finished_at - start_time - spoken_at,
            }
        )
    video_seconds = sum(row["frames"] for row in rows) / FPS
    compute = sum(row["compute_s"] for row in rows)
    summary = {
        "chunks": len(rows),
        "video_s": video_seconds,
        "first_frame_latency_s": rows[0]["latency_s"] if rows else float("nan"),
        "mean_latency_s": float(np.mean([r["latency_s"] for r in rows])) if rows else float("nan"),
        "max_latency_s": max((r["latency_s"] for r in rows), default=float("nan")),
        "real_time_factor": compute / video_seconds if video_seconds else float("nan"),
        "final_lag_s": rows[-1]["lag_s"] if rows else float("nan"),
    }
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value in (("--out", args.out), ("--report", args.report)):  # checked before anything renders
        if value is not None and (Path(value).is_dir() or not Path(value).parent.is_dir()):
            state = (
                "is a folder" if Path(value).is_dir() else f"lies in {str(Path(value).parent)!r}, which is not a folder"
            )
            parser.error(f"{option} {value!r} {state}: give a file path in an existing folder (create it first).")
    manifest = Path(args.manifest)
    entries = [(number, entry, error) for number, entry, error in read_manifest(manifest)]
    chosen = [e for e in entries if args.id is None or (e[1] is not None and str(e[1].get("id")) == args.id)]
    if not chosen:
        raise SystemExit(f"echo-live: no entry with id {args.id!r} in {str(manifest)!r}")
    number, entry, error = chosen[0]
    if error is not None:
        raise SystemExit(f"echo-live: {error}")
    inputs = read_entry(entry, manifest.resolve().parent)

    pipe = load_pipeline(args.pipeline, args.device, args.dtype, args.cpu_offload)
    try:
        check_model_options(pipe, args)
    except ValueError as error:
        parser.error(str(error))  # exit code 2
    helpers = build_helpers(args)
    session = pipe.start_session(
        reference_image=inputs["reference_image"],
        reference_landmarks=inputs.get("reference_landmarks"),
        understanding=inputs.get("understanding"),
        emotion=inputs["emotion"],
        num_frames=inputs["num_frames"],
        sampling_rate=inputs["sampling_rate"],
        generator=torch.Generator().manual_seed(args.seed),
        **model_options(args),
        output_type="np",
        **helpers,
    )
    speed = None if args.no_wait else args.speed
    chunks, start_time = replay(session, inputs, args.piece_frames, speed)
    rows, summary = summarize(chunks, start_time, speed)

    pace = "as fast as possible" if speed is None else f"{speed:g}x real time"
    print(f"echo-live: {entry.get('id', f'line{number}')!r}, pieces of {args.piece_frames} frames, {pace}")
    print(f"{'chunk':>5} {'frames':>6} {'inputs_at_s':>11} {'latency_s':>9} {'compute_s':>9} {'lag_s':>7}")
    for row in rows:
        print(
            f"{row['chunk']:>5} {row['frames']:>6} {row['inputs_complete_s']:>11.3f} {row['latency_s']:>9.3f} "
            f"{row['compute_s']:>9.3f} {row['lag_s']:>7.3f}"
        )
    if args.out:
        frames = np.concatenate([chunk.frames for chunk in chunks])
        write_atomically(Path(args.out), frames, inputs["avatar_audio"])
    if args.report:
        Path(args.report).write_text(json.dumps({"chunks": rows, "summary": summary}, indent=1) + "\n")
    print(
        " ".join(
            f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in summary.items()
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
