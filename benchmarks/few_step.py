"""The few-step student beside its teacher on the held-out demo conversations: quality and seconds of compute.

    python benchmarks/few_step.py [--pipeline models/echo-demo] [--student DIR/few_step] [--seconds 6]
        [--steps 1,2,4] [--timing-seconds 2] [--threads 1] [--out outputs/few_step/eval]

1. Quality: each regular held-out conversation (``data/demo/prepared/heldout``, its first ``--seconds``; the example
   folders and ground truth of `benchmarks/demo_behaviour.py`, shared with it under ``--out``) is rendered by the
   teacher at its saved sampler (``generated/full``, the same renders as demo_behaviour's ``full`` set: reused when
   present) and by the student in few-step mode at each of ``--steps`` (``generated/student<n>``), one seed (0),
   and scored by ``echo-eval --behaviour`` (face rate, lip sync r, listening ratio, PSNR; the mouth box r of
   demo_behaviour beside them).
2. Speed: the first ``--timing-seconds`` of the first conversation rendered by each mode in this process
   (``--threads`` CPU threads), timed as a whole and per component (generator forwards, VAE decode, VAE encode of
   the condition and user frames, LCU, wav2vec2): seconds of compute per second of video (the real-time factor:
   ≤ 1 keeps up with 25 fps) and avatar frames per wall second.

Prints the table; the last line holds the figures as ``name=value`` (``<set>_<metric>``, ``<set>_rtf``, ``<set>_fps``,
``goal_fps=25``), also written to ``<out>/few_step_figures.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

from pipelines import EchoPipeline
from pipelines.demo import read_example
from pipelines.few_step import FEW_STEP_DIR
from pipelines.render import write_atomically

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_behaviour import evaluate, mouth_sync, prepare  # noqa: E402  (a sibling script, not a package)

TEACHER = "full"  # demo_behaviour's name for the model's own renders at its saved settings
COMPONENTS = {  # component → (attribute of the pipeline, method)
    "generator": ("transformer", "forward"),
    "vae_decode": ("vae", "decode"),
    "vae_encode": ("vae", "encode"),
    "lcu": ("context_encoder", "forward"),
    "audio_encoder": ("audio_encoder", "forward"),
}


class ComponentTimer:
    """Wall seconds and calls of each pipeline component (`COMPONENTS`), by wrapping its method on the instance."""

    def __init__(self, pipe: EchoPipeline):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        for name, (attribute, method) in COMPONENTS.items():
            module = getattr(pipe, attribute, None)
            if module is not None:
                setattr(module, method, self._wrap(name, getattr(module, method)))

    def _wrap(self, name, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def set_mode(pipe: EchoPipeline, name: str) -> None:
    """``full``: the teacher's sampler; ``student<n>``: few-step mode at n steps."""
    if name == TEACHER:
        pipe.disable_few_step()
    else:
        pipe.enable_few_step(int(name.removeprefix("student")))


def render_set(pipe, out: Path, names: list[str], mode: str) -> None:
    set_mode(pipe, mode)
    for name in names:
        path = out / "generated" / mode / f"{name}.mp4"
        if path.is_file():
            continue
        _, inputs = read_example(out / "examples" / name)
        start = time.perf_counter()
        frames = pipe(**inputs, generator=torch.Generator().manual_seed(0)).frames[0]
        print(f"rendered {mode}/{name} in {time.perf_counter() - start:.1f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, frames, inputs["avatar_audio"])


def time_mode(pipe, timer: ComponentTimer, example: Path, seconds: float, mode: str) -> dict:
    """Seconds of compute per second of video of one mode on the first ``seconds`` of ``example``, per component."""
    set_mode(pipe, mode)
    _, inputs = read_example(example)
    frames = min(int(round(seconds * 25)), inputs["num_frames"])
    for key in ("avatar_audio", "user_audio"):
        inputs[key] = inputs[key][: frames * 640]
    for key in ("user_video", "user_landmarks"):
        inputs[key] = inputs[key][:frames]
    inputs["num_frames"] = frames
    timer.reset()
    start = time.perf_counter()
    video = pipe(**inputs, generator=torch.Generator().manual_seed(0)).frames[0]
    wall = time.perf_counter() - start
    duration = len(video) / 25
    row = {"rtf": wall / duration, "fps": len(video) / wall, "frames": len(video)}
    row["forwards_per_chunk"] = timer.calls["generator"] / max(timer.calls["vae_decode"], 1)  # one decode a chunk
    for name in COMPONENTS:
        row[f"{name}_rtf"] = timer.seconds[name] / duration
    row["other_rtf"] = row["rtf"] - sum(row[f"{name}_rtf"] for name in COMPONENTS)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(ROOT / "models" / "echo-demo"))
    parser.add_argument("--student", default=None, help="few-step folder (default: <pipeline>/few_step)")
    parser.add_argument("--heldout", default=str(ROOT / "data" / "demo" / "prepared" / "heldout"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "few_step" / "eval"))
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each held-out conversation rendered")
    parser.add_argument("--steps", default=None, help="student step counts (default: all it was trained for)")
    parser.add_argument("--timing-seconds", type=float, default=2.0, help="video timed per mode (first conversation)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    regular, _ = prepare(Path(args.heldout), out, args.seconds, args.seconds)
    pipe = EchoPipeline.from_pretrained(args.pipeline, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    student = Path(args.student) if args.student else Path(args.pipeline) / FEW_STEP_DIR
    few_step = pipe.load_few_step_weights(student, enable=False)
    steps = few_step.num_steps if args.steps is None else [few_step.check_steps(int(n)) for n in args.steps.split(",")]
    modes = [TEACHER, *(f"student{n}" for n in steps)]

    # 1. Renders and scores
    for mode in modes:
        render_set(pipe, out, regular, mode)
    reports = {mode: evaluate(out, out / "generated" / mode, out / f"report_{mode}.json") for mode in modes}
    for mode, report in reports.items():
        report["aggregate"]["mouth_darkness_r"] = mouth_sync(out, out / "generated" / mode, regular)

    # 2. Timing (after the renders: the same process, warm)
    timer = ComponentTimer(pipe)
    timing = {mode: time_mode(pipe, timer, out / "examples" / regular[0], args.timing_seconds, mode) for mode in modes}

    settings = pipe.settings
    labels = {TEACHER: f"teacher ({settings.num_inference_steps} steps, guided)"}
    labels.update({f"student{n}": f"student {n} step{'s' if n > 1 else ''}" for n in steps})
    metrics = ("face_rate", "lip_sync_r", "mouth_darkness_r", "listening_ratio", "psnr")
    header = ["set", "fwd/chunk", *metrics, "s/s video", "fps", "gen", "decode", "encode", "lcu+audio", "other"]
    rows = [header]
    figures = {}
    for mode in modes:
        agg, t = reports[mode]["aggregate"], timing[mode]
        cells = [labels[mode], f"{t['forwards_per_chunk']:.0f}"]
        for key in metrics:
            value = agg.get(key)
            cells.append("n/a" if value is None else f"{value:.3f}")
            if value is not None:
                figures[f"{mode}_{key}"] = round(float(value), 4)
        cells += [f"{t['rtf']:.2f}", f"{t['fps']:.2f}", f"{t['generator_rtf']:.2f}", f"{t['vae_decode_rtf']:.2f}"]
        cells += [f"{t['vae_encode_rtf']:.2f}", f"{t['lcu_rtf'] + t['audio_encoder_rtf']:.2f}", f"{t['other_rtf']:.2f}"]
        rows.append(cells)
        figures.update({f"{mode}_rtf": round(t["rtf"], 3), f"{mode}_fps": round(t["fps"], 3)})
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(
        f"held-out: {', '.join(regular)} (first {args.seconds:g} s each, seed 0); timing: first "
        f"{args.timing_seconds:g} s of {regular[0]}, {torch.get_num_threads()} thread(s); columns gen … other: seconds "
        "of compute per second of video by component"
    )
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    for mode in modes[1:]:
        for key in ("face_rate", "lip_sync_r"):
            teacher, value = figures.get(f"{TEACHER}_{key}"), figures.get(f"{mode}_{key}")
            if teacher is not None and value is not None:
                figures[f"{mode}_{key}_vs_teacher"] = round(value / teacher, 3) if teacher else None
    figures["goal_fps"] = 25
    timing_json = {mode: {k: round(float(v), 4) for k, v in t.items()} for mode, t in timing.items()}
    (out / "few_step_figures.json").write_text(json.dumps({"figures": figures, "timing": timing_json}, indent=1))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
