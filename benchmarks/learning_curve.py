"""The demo model's learning curve: face rate, lip sync r and PSNR on the held-out set against training CPU-hours.

    python benchmarks/learning_curve.py [--stage-dir outputs/demo/stage1] [--out outputs/demo/curve]
        [--seconds 8] [--steps 4] [--every 1] [--ceiling NAME=PIPELINE]

1. Every ``checkpoint-N/`` of a stage-1 run is exported (``echo-export``, fp32, with the VAE the recipe ships:
   ``--vae``, default the decoder stage's ``outputs/demo/vae_decoder``) and renders the first ``--seconds`` of each regular held-out conversation with its
   own audio (``benchmarks/demo_behaviour.py``'s example folders and renderer; a stage-1 model has no user branch, so
   the user's streams are left out of its call).
2. ``echo-eval --behaviour`` scores each point: face rate, lip sync r within speech, PSNR / SSIM against the
   held-out video, and the mouth box r (mouth opening read from pixels against the speech envelope).
3. The VAE's ceiling: the same held-out frames encoded and decoded chunk by chunk (the chunks the pipeline renders,
   posterior mode) and scored the same way: no generator can do better than its VAE. A row is kept with the VAE's
   fingerprint (`training.latent_cache.vae_fingerprint`, decoder included) and scored again when that VAE changes.
   Row ``vae_ceiling`` is the VAE the checkpoints ship; ``--ceiling NAME=PIPELINE`` adds another pipeline folder's
   (``shipped=models/echo-demo``).
4. Row ``truth_per_latent_frame`` (lip sync r only): the ground truth's own mouth opening held once per latent frame
   (`echo.metrics.behaviour.per_latent_frame`): what a mouth that moves at the latent frame rate, 6.25 Hz, can score
   against the frame-by-frame speech RMS.

The x axis is stage 1's CPU-hours: the training loop's wall seconds saved with each checkpoint (``training_state.json``
``train_seconds``, resumes included) times its processes (one CPU thread each on a CPU). The data, VAE and decoder
stages come before every point (their times are in ``outputs/demo/recipe_state.json``). Points already scored are
kept in ``<out>/curve.json`` (written atomically), so a rerun scores only new checkpoints.

Prints the table and, last, ``name=value`` figures of the newest point.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_behaviour import evaluate, mouth_sync, prepare  # noqa: E402

from echo.atomic import write_text_atomic  # noqa: E402
from echo.audio import frame_rms  # noqa: E402
from echo.chunks import TEMPORAL_COMPRESSION, chunk_schedule  # noqa: E402
from echo.encoding import decode_latents, encode_latents, frames_to_tensor  # noqa: E402
from echo.media import read_audio  # noqa: E402
from echo.metrics.behaviour import lip_sync_r, mouth_opening, per_latent_frame, voice_activity  # noqa: E402
from echo.metrics.extractor import MediaPipeMotionExtractor  # noqa: E402
from pipelines import EchoPipeline  # noqa: E402
from pipelines.demo import read_example  # noqa: E402
from pipelines.render import write_atomically  # noqa: E402
from pipelines.video_io import read_frames  # noqa: E402
from training.export import export_pipeline  # noqa: E402
from training.latent_cache import vae_fingerprint  # noqa: E402

USER_INPUTS = ("user_video", "user_audio", "user_landmarks", "understanding", "emotion")
MEASURES = ("face_rate", "lip_sync_r", "mouth_darkness_r", "psnr", "ssim")


def checkpoints(stage_dir: Path, every: int) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run's ``checkpoint-N/`` folders, every ``every``-th counted back from the newest."""
    found = []
    for folder in stage_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / "training_state.json").is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)[::-1][::every][::-1]


def train_seconds(folder: Path) -> tuple[float, int]:
    """The checkpoint's training-loop wall seconds and its number of processes (one RNG file per rank)."""
    state = folder / "training_state.json"
    seconds = json.loads(state.read_text()).get("train_seconds", 0.0) if state.is_file() else 0.0
    return float(seconds), max(1, len(list(folder.glob("rng_state_*.safetensors"))))


def render_stage1(pipe, example: Path, out_path: Path, steps: int) -> float:
    """One held-out conversation rendered by a stage-1 pipeline (the avatar's audio and reference only)."""
    _, inputs = read_example(example)
    for name in USER_INPUTS:
        inputs.pop(name, None)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    frames = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames[0]
    write_atomically(out_path, frames, inputs["avatar_audio"])
    return time.perf_counter() - start


@torch.no_grad()
def reconstruct(vae, frames: np.ndarray, settings) -> np.ndarray:
    """``frames`` `(T, H, W, 3)` uint8 through the VAE chunk by chunk, posterior mode: the pipeline's chunks, each
    encoded from the ground truth as a window of training is and decoded as a render's chunk is; a chunk's motion
    frames are the previous chunk's (kept once, as in a render)."""
    size = settings.resolution
    out = []
    for start, stop in chunk_schedule(len(frames), settings.num_frames_per_chunk, settings.motion_frames):
        chunk = frames[start:stop]
        if len(chunk) < settings.num_frames_per_chunk:  # the last chunk: pad by repeating the last frame
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], settings.num_frames_per_chunk - len(chunk), 0)])
        video = frames_to_tensor(chunk, size).permute(1, 0, 2, 3)[None]  # 1, 3, T, H, W
        decoded = decode_latents(vae, encode_latents(vae, video))[0].permute(1, 2, 3, 0)  # T, H, W, 3
        decoded = ((decoded.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        keep = decoded[: min(stop, len(frames)) - start]
        out.append(keep if not out else keep[settings.motion_frames :])
    return np.concatenate(out)[: len(frames)]


def truth_per_latent_frame(eval_dir: Path, names: list[str]) -> float | None:
    """Mean over clips of the lip sync r of the ground truth's mouth opening held per latent frame
    (`echo.metrics.behaviour.per_latent_frame`): what a mouth that moves only at the latent frame rate scores."""
    values = []
    extractor = MediaPipeMotionExtractor(static_image_mode=True, fill_missing=False)
    for name in names:
        frames = read_frames(eval_dir / "ground_truth" / f"{name}.mp4")
        landmarks = extractor.detect(frames)
        audio = read_audio(eval_dir / "audio" / f"{name}.wav")
        opening = per_latent_frame(mouth_opening(landmarks), TEMPORAL_COMPRESSION)
        r = lip_sync_r(opening, frame_rms(audio, len(frames)), voice_activity(audio, len(frames)))
        if r is not None:
            values.append(r)
    return float(np.mean(values)) if values else None


def score(eval_dir: Path, folder: Path, names: list[str], report: Path) -> dict:
    result = evaluate(eval_dir, folder, report)["aggregate"]
    result["mouth_darkness_r"] = mouth_sync(eval_dir, folder, names)
    return {k: result.get(k) for k in MEASURES}


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage-dir", default=str(ROOT / "outputs" / "demo" / "stage1"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo" / "curve"))
    parser.add_argument("--heldout", default=str(ROOT / "data" / "demo" / "prepared" / "heldout"))
    parser.add_argument("--seconds", type=float, default=8.0, help="first seconds of each regular held-out clip")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of each render")
    parser.add_argument("--vae", default=str(ROOT / "outputs" / "demo" / "vae_decoder"), help="VAE folder to ship")
    parser.add_argument(
        "--ceiling",
        action="append",
        default=[],
        metavar="NAME=PIPELINE",
        help="also score this pipeline folder's VAE reconstruction as row NAME (e.g. shipped=models/echo-demo)",
    )
    parser.add_argument("--every", type=int, default=1, help="score every n-th checkpoint (the newest always)")
    args = parser.parse_args(argv)

    stage_dir, out = Path(args.stage_dir), Path(args.out)
    if not Path(args.heldout).is_dir():
        parser.error(
            f"--heldout {args.heldout} is not a folder of prepared held-out clips; the recipe's data stage writes it "
            "(python -m training.demo_recipe --only data)"
        )
    eval_dir = out / "eval"
    names, _ = prepare(Path(args.heldout), eval_dir, args.seconds, args.seconds)
    curve_path = out / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.is_file() else {"points": {}}
    pipe = None
    for step, folder in checkpoints(stage_dir, args.every):
        key = folder.name
        if key in curve["points"]:
            seconds, processes = train_seconds(folder)  # a point scored by an earlier version: x from the checkpoint
            curve["points"][key]["cpu_hours"] = round(seconds * processes / 3600, 3)
            continue
        seconds, processes = train_seconds(folder)
        pipeline_dir = out / "pipelines" / key
        if not (pipeline_dir / "model_index.json").is_file():
            export_pipeline(folder, pipeline_dir, overwrite=True, vae_dir=args.vae if Path(args.vae).is_dir() else None)
        pipe = EchoPipeline.from_pretrained(str(pipeline_dir), use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        generated = out / "generated" / key
        render_time = sum(
            render_stage1(pipe, eval_dir / "examples" / name, generated / f"{name}.mp4", args.steps)
            for name in names
            if not (generated / f"{name}.mp4").is_file()
        )
        point = score(eval_dir, generated, names, out / "reports" / f"{key}.json")
        point.update(
            step=step,
            cpu_hours=round(seconds * processes / 3600, 3),
            render_seconds=round(render_time, 1),
        )
        curve["points"][key] = point
        write_text_atomic(curve_path, json.dumps(curve, indent=1))
        print(f"{key}: {point}", flush=True)

    ceilings = dict(item.split("=", 1) for item in args.ceiling)
    if pipe is not None:
        ceilings.setdefault("vae_ceiling", pipe)
    for name, source in ceilings.items():
        source = source if isinstance(source, EchoPipeline) else EchoPipeline.from_pretrained(source)
        fingerprint = vae_fingerprint(source.vae, include_decoder=True)
        if curve.get(name, {}).get("vae") == fingerprint:
            continue
        folder = out / "generated" / name  # another VAE than the one scored under this name: start over
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        for clip in names:
            if not (folder / f"{clip}.mp4").is_file():
                frames = read_frames(eval_dir / "reference" / f"{clip}.mp4")
                _, inputs = read_example(eval_dir / "examples" / clip)
                reconstruction = reconstruct(source.vae, frames, source.settings)
                write_atomically(folder / f"{clip}.mp4", reconstruction, inputs["avatar_audio"])
        curve[name] = score(eval_dir, folder, names, out / "reports" / f"{name}.json")
        curve[name]["vae"] = fingerprint
        write_text_atomic(curve_path, json.dumps(curve, indent=1))
    if "ground_truth" not in curve:
        curve["ground_truth"] = score(eval_dir, eval_dir / "ground_truth", names, out / "reports" / "ground_truth.json")
        write_text_atomic(curve_path, json.dumps(curve, indent=1))

    if "truth_per_latent_frame" not in curve:  # the ground truth's mouth, moving once per latent frame: lip sync only
        curve["truth_per_latent_frame"] = {k: None for k in MEASURES}
        curve["truth_per_latent_frame"]["lip_sync_r"] = truth_per_latent_frame(eval_dir, names)
        write_text_atomic(curve_path, json.dumps(curve, indent=1))

    rows = [("point", "step", "CPU-h", "face rate", "lip sync r", "mouth box r", "PSNR", "SSIM")]
    points = sorted(curve["points"].items(), key=lambda item: item[1]["cpu_hours"])
    for key, p in points:
        rows.append((key, str(p["step"]), f"{p['cpu_hours']:.2f}", *(fmt(p[k]) for k in MEASURES)))
    for name in [key for key in curve if key != "points"]:  # the VAE ceilings and the ground truth
        rows.append((name, "", "", *(fmt(curve[name][k]) for k in MEASURES)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    if points:
        key, newest = points[-1]
        figures = {f"newest_{k}": newest[k] for k in ("step", "cpu_hours", "face_rate", "lip_sync_r", "psnr")}
        figures["points"] = len(points)
        print(" ".join(f"{k}={v if v is None else round(float(v), 4)}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
