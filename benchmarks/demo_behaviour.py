"""Behaviour of the trained demo model on the held-out conversations: lip sync, listening, quality, long video.

    python benchmarks/demo_behaviour.py [--pipeline models/echo-demo] [--heldout data/demo/prepared/heldout]
        [--out outputs/demo/eval] [--seconds 20] [--long-seconds 60] [--steps N]

1. Each held-out conversation (avatar ``A``; ``data/demo/prepared/heldout``, written by ``make train-demo``; none of
   its sentences, speaking rates or seeds occur in training) is written as an example folder
   (`pipelines.demo.write_example`, its first ``--seconds``), with its ground truth: ``reference/<clip>.mp4`` (the
   avatar's real video), ``audio/<clip>.wav`` and ``user_audio/<clip>.wav``.
2. The model renders each conversation three times: ``full`` (the avatar's audio and the user), ``no_audio`` (the
   avatar's audio replaced by silence: the audio condition carries nothing) and ``no_user`` (``user_guidance_scale
   = 0``: the user condition dropped), and the long conversation once over ``--long-seconds``.
3. ``echo-eval --behaviour`` scores each set (and the ground truth against itself); the commands are printed, so the
   report's numbers are reproduced by running them again on ``<out>``. Beside them, the "mouth box r": mouth
   opening read from pixels (`echo.metrics.behaviour.mouth_darkness`) against the speech envelope, all frames.

Prints a table and, last, the headline figures as ``name=value``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echo import clip_format
from echo.audio import frame_rms
from echo.media import read_audio
from echo.metrics.behaviour import mouth_darkness, pearson, voice_activity
from echo.metrics.cli import main as echo_eval
from pipelines.demo import read_example, write_example
from pipelines.render import write_atomically
from pipelines.video_io import read_frames, write_mp4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(heldout: Path, out: Path, seconds: float, long_seconds: float) -> tuple[list[str], str | None]:
    """Example folders and ground-truth files of the held-out conversations; returns the clip names (regular, long)."""

    clips = sorted(p for p in heldout.iterdir() if (p / "meta.json").is_file() and "_A_" in p.name)
    regular, long = [], None
    for clip in clips:
        is_long = "long" in clip.name
        name = clip.name
        length = long_seconds if is_long else seconds
        if is_long:
            long = name
        else:
            regular.append(name)
        if (out / "examples" / name / "manifest.jsonl").is_file() and (out / "user_audio" / f"{name}.wav").is_file():
            continue  # written by an earlier run (a rerun, or a parallel run over other variants)
        example = write_example(clip, out / "examples" / name, seconds=length)
        frames = clip_format.read_video_frames(
            clip / "avatar.mp4", list(range(len(np.load(example / "user_landmarks.npy"))))
        )
        (out / "reference").mkdir(parents=True, exist_ok=True)
        write_mp4(out / "reference" / f"{name}.mp4", frames)
        for role, folder in (("avatar", "audio"), ("user", "user_audio")):
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / f"{name}.wav").write_bytes((example / f"{role}.wav").read_bytes())
        if not is_long:
            (out / "ground_truth").mkdir(parents=True, exist_ok=True)  # the regular clips, scored as a "generated" set
            (out / "ground_truth" / f"{name}.mp4").write_bytes((out / "reference" / f"{name}.mp4").read_bytes())
    return regular, long


def render(pipe, example: Path, out_path: Path, steps: int | None, variant: str) -> float:
    """Render one example folder to ``out_path``; returns the wall time."""

    if out_path.is_file():
        return 0.0
    _, inputs = read_example(example)
    audio = inputs["avatar_audio"]
    if variant == "no_audio":
        inputs["avatar_audio"] = np.zeros_like(audio)
    kwargs = {"user_guidance_scale": 0.0} if variant == "no_user" else {}
    start = time.perf_counter()
    frames = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).frames[0]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out_path, frames, audio)
    return time.perf_counter() - start


def frame_strips(out: Path, name: str, folder: Path, count: int = 6) -> list[Path]:
    """PNG strips of ``count`` frames where the avatar speaks and where it listens to the user (top row: ground truth,
    bottom row: the model), from the ``full`` render of clip ``name``; frames evenly spaced over each state."""
    import PIL.Image

    generated = read_frames(out / "generated" / "full" / f"{name}.mp4")
    truth = read_frames(out / "reference" / f"{name}.mp4")[: len(generated)]
    avatar = voice_activity(read_audio(out / "audio" / f"{name}.wav"), len(generated))
    user = voice_activity(read_audio(out / "user_audio" / f"{name}.wav"), len(generated))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for state, frames in (("speaking", np.flatnonzero(avatar & ~user)), ("listening", np.flatnonzero(user & ~avatar))):
        if len(frames) < count:
            continue
        picks = frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]
        strip = np.concatenate([np.concatenate(list(rows[picks]), axis=1) for rows in (truth, generated)], axis=0)
        path = folder / f"demo_{state}.png"
        PIL.Image.fromarray(strip).save(path)
        paths.append(path)
        print(f"{state} strip: {path} (frames {picks.tolist()}; top: ground truth, bottom: model)")
    return paths


def evaluate(out: Path, generated: Path, report: Path) -> dict:

    args = [
        f"--generated={generated}",
        f"--reference={out / 'reference'}",
        f"--audio={out / 'audio'}",
        f"--user-audio={out / 'user_audio'}",
        "--behaviour",
        f"--out={report}",
        "--quiet",
    ]
    print("echo-eval " + " ".join(args))
    echo_eval(args)
    return json.loads(report.read_text())


def mouth_sync(out: Path, folder: Path, names: list[str]) -> float | None:
    """Mean over clips of Pearson r between `echo.metrics.behaviour.mouth_darkness` (mouth opening read from the
    pixels of the reference's mouth box) and the avatar's speech envelope, over all frames (speech and pauses): a
    face mesh cannot read soft frames, the mouth box can."""

    values = []
    for name in names:
        path = folder / f"{name}.mp4"
        if not path.is_file():
            continue
        frames = read_frames(path)
        darkness = mouth_darkness(frames, np.load(out / "examples" / name / "reference_landmarks.npy"))
        r = pearson(darkness, frame_rms(read_audio(out / "audio" / f"{name}.wav"), len(frames)))
        if r is not None:
            values.append(r)
    return float(np.mean(values)) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(ROOT / "models" / "echo-demo"))
    parser.add_argument("--heldout", default=str(ROOT / "data" / "demo" / "prepared" / "heldout"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo" / "eval"))
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each regular held-out conversation")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="length of the long-video check")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's setting)")
    parser.add_argument("--variants", default="full,no_audio,no_user,long")
    parser.add_argument("--strips", default=None, help="also write PNG frame strips of speaking and listening here")
    args = parser.parse_args(argv)

    from diffusers import DiffusionPipeline

    out = Path(args.out)
    regular, long = prepare(Path(args.heldout), out, args.seconds, args.long_seconds)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    variants = args.variants.split(",")
    times = {}
    for variant in variants:
        names = [long] if variant == "long" else regular
        for name in names:
            if name is None:
                continue
            seconds = render(
                pipe, out / "examples" / name, out / "generated" / variant / f"{name}.mp4", args.steps, variant
            )
            times[f"{variant}/{name}"] = seconds
            print(f"rendered {variant}/{name} in {seconds:.1f} s", flush=True)

    if args.strips and "full" in variants and regular:
        frame_strips(out, regular[0], Path(args.strips))
    reports = {"ground_truth": evaluate(out, out / "ground_truth", out / "report_ground_truth.json")}
    for variant in variants:
        reports[variant] = evaluate(out, out / "generated" / variant, out / f"report_{variant}.json")
    for name, report in reports.items():  # the mouth box, read from pixels, over the regular clips
        folder = out / "ground_truth" if name == "ground_truth" else out / "generated" / name
        report["aggregate"]["mouth_darkness_r"] = mouth_sync(out, folder, regular)
    rows = [("set", "lip sync r", "mouth box r", "listening ratio", "face rate", "PSNR", "SSIM")]
    for name, report in reports.items():
        agg = report["aggregate"]
        rows.append(
            (
                name,
                *(
                    f"{agg[k]:.3f}" if agg.get(k) is not None else "n/a"
                    for k in ("lip_sync_r", "mouth_darkness_r", "listening_ratio", "face_rate", "psnr", "ssim")
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    figures = {}
    for name, report in reports.items():
        for key in (
            "lip_sync_r",
            "mouth_darkness_r",
            "listening_ratio",
            "face_rate",
            "psnr",
            "ssim",
            "first_face_rate",
            "last_face_rate",
            "first_psnr",
            "last_psnr",
        ):
            value = report["aggregate"].get(key)
            if value is not None:
                figures[f"{name}_{key}"] = round(float(value), 4)
    (out / "figures.json").write_text(json.dumps({"figures": figures, "render_seconds": times}, indent=1))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
