"""``echo-demo``: render a conversation end to end, offline, with the trained demo model shipped in the repository.

```
echo-demo --out demo_out          # what `make demo` runs
```

With the shipped model (``models/echo-demo``, trained by ``make train-demo``; see ``docs/demo_model.md``):

1. The pipeline is loaded with `DiffusionPipeline.from_pretrained` (its saved settings are the defaults: 128², 33-frame
   chunks).
2. The shipped example conversation (``models/echo-demo/example``: a held-out conversation never seen in training;
   the avatar's reference frame and speech, the user's video and speech, face landmarks) is rendered chunk by chunk
   and written to ``<out>/demo.mp4`` (the user on the left, the avatar on the right, the avatar's audio muxed in).
3. ``<out>/manifest.jsonl`` describes the same conversation for ``echo-render --pipeline models/echo-demo``.

With ``--config configs/models/tiny.yaml`` (or when the shipped model is absent) a tiny pipeline with random weights is
built from the model description instead and a synthetic conversation is synthesised (espeak-ng speech); its avatar
is noise-like, which shows that every stage runs and how the outputs are laid out.
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
from echo.audio import FPS, SAMPLE_RATE
from echo.components import load_components, load_model_config
from echo.understanding import OmniUnderstanding
from synthetic.conversations import make_conversation

from .pipeline_echo import EchoPipeline
from .render import non_negative_int, positive_int, read_entry, read_manifest
from .video_io import load_wav, read_frames, write_mp4

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "models" / "tiny.yaml"
DEFAULT_PIPELINE = ROOT / "models" / "echo-demo"
EXAMPLE_FILES = ("reference.png", "reference_landmarks.npy", "avatar.wav", "user.mp4", "user.wav", "user_landmarks.npy")
UNTRAINED_NOTICE = (
    "NOTE: the model weights are random (built from {config}), so the rendered avatar is noise-like: this run checks "
    "that every stage runs end to end. When a trained demo model is in {pipeline}, `echo-demo` without --config "
    "renders it (docs/demo_model.md)."
)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="echo-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument(
        "--pipeline",
        default=None,
        help=f"a saved pipeline folder to render with (default: the shipped demo model {DEFAULT_PIPELINE.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--example",
        default=None,
        help="folder of the conversation to render with --pipeline (default: <pipeline>/example)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="build a pipeline with random weights from this model description (configs/models/*.yaml) instead, and "
        "render a synthetic conversation",
    )
    parser.add_argument("--seconds", type=positive_float, default=4.0, help="length of the synthetic conversation")
    # None = the model's setting (the `settings:` of --config), as in echo-render.
    parser.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="rendered avatar side in pixels, a multiple of 16 (default: the model's resolution)",
    )
    parser.add_argument(
        "--source-size", type=positive_int, default=256, help="side of the synthetic conversation's videos"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps per chunk (default: the model's)"
    )
    parser.add_argument(
        "--frames-per-chunk", type=positive_int, default=None, help="default: the model's training window"
    )
    parser.add_argument("--motion-frames", type=positive_int, default=None, help="default: the model's")
    parser.add_argument("--user-video-size", type=positive_int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--emotion", default=None, help="emotion text for every chunk (default: the pipeline's)")
    parser.add_argument(
        "--understanding-model",
        default=None,
        help="a local Qwen2.5-Omni folder for the HBCU tokens; without one the tiny LCU runs with use_understanding off",
    )
    return parser


def write_example(clip_dir: str | Path, out_dir: str | Path, seconds: float | None = None) -> Path:
    """Write a prepared clip folder's conversation as a demo example: the avatar's first frame (``reference.png``) and
    its landmarks, the avatar's speech, the user's video, speech and landmarks, cut to ``seconds``, plus
    ``manifest.jsonl`` (one `echo-render` entry with paths relative to the folder, ``"frame_inputs": false``: the
    frames are the clip's echo-prep crops already)."""
    import PIL.Image

    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = clip_format.read_clip(clip_dir)
    num_frames = record.num_frames if seconds is None else min(record.num_frames, int(round(seconds * FPS)))
    samples = num_frames * SAMPLE_RATE // FPS
    reference = clip_format.read_video_frames(clip_dir / clip_format.video_name("avatar"), [0])[0]
    PIL.Image.fromarray(reference).save(out_dir / "reference.png")
    np.save(out_dir / "reference_landmarks.npy", clip_format.read_landmarks(clip_dir, "avatar")[0])
    np.save(out_dir / "user_landmarks.npy", clip_format.read_landmarks(clip_dir, "user")[:num_frames])
    for role in ("avatar", "user"):
        wave, _ = clip_format.read_wav(clip_dir / clip_format.wav_name(role))
        clip_format.write_wav(out_dir / f"{role}.wav", wave[:samples])
    user = clip_format.read_video_frames(clip_dir / clip_format.video_name("user"), list(range(num_frames)))
    write_mp4(out_dir / "user.mp4", user)
    entry = {
        "id": record.path.name,
        "reference_image": "reference.png",
        "avatar_audio": "avatar.wav",
        "user_video": "user.mp4",
        "user_audio": "user.wav",
        "reference_landmarks": "reference_landmarks.npy",
        "user_landmarks": "user_landmarks.npy",
        "frame_inputs": False,
    }
    (out_dir / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    return out_dir


def read_example(example: str | Path) -> tuple[dict, dict]:
    """An example folder written by `write_example`: its ``manifest.jsonl`` entry and that entry as `EchoPipeline`
    arguments (`pipelines.render.read_entry`), ``num_frames`` the example's length (its user video's frames)."""

    example = Path(example)
    missing = [name for name in (*EXAMPLE_FILES, "manifest.jsonl") if not (example / name).is_file()]
    if missing:
        raise FileNotFoundError(f"example folder {str(example)!r} lacks {missing}; pass --example <folder>.")
    rows = read_manifest(example / "manifest.jsonl")
    if not rows or rows[0][1] is None:
        raise ValueError(f"{str(example / 'manifest.jsonl')!r}: {rows[0][2] if rows else 'no entry'}")
    entry = rows[0][1]
    inputs = read_entry(entry, example)
    inputs["num_frames"] = len(inputs["user_video"])
    return entry, inputs


def render_shipped(args: argparse.Namespace) -> int:
    """Render the example conversation (its ``manifest.jsonl`` entry, read by `echo-render`'s reader) with a saved
    (trained) pipeline."""
    from diffusers import DiffusionPipeline

    pipeline = Path(args.pipeline or DEFAULT_PIPELINE)
    example = Path(args.example) if args.example else pipeline / "example"
    entry, inputs = read_example(example)
    avatar_audio, user_video, num_frames = inputs["avatar_audio"], inputs["user_video"], inputs["num_frames"]
    inputs["emotion"] = args.emotion
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[1/3] loading the pipeline {pipeline} ...")
    pipe = DiffusionPipeline.from_pretrained(pipeline, use_safetensors=True)
    size = args.size or pipe.settings.resolution
    print(f"[2/3] rendering {num_frames} frames ({num_frames / 25:.1f} s) at {size}x{size} from {example} ...")
    output = pipe(
        **inputs,
        height=size,
        width=size,
        num_inference_steps=args.steps,
        num_frames_per_chunk=args.frames_per_chunk,
        motion_frames=args.motion_frames,
        user_video_size=args.user_video_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    video_path = write_mp4(out / "demo.mp4", output.frames[0], audio=avatar_audio, user_frames=user_video)
    entry = {
        k: str((example / v).resolve()) if k not in ("id", "dialogue", "frame_inputs") else v for k, v in entry.items()
    }
    (out / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    print(f"[3/3] wrote {video_path} (user left | avatar right, the avatar's audio)")
    print(
        f"      batch rendering: echo-render --pipeline {pipeline} --manifest {out / 'manifest.jsonl'} "
        f"--out {out / 'renders'}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config is None and (args.pipeline or (DEFAULT_PIPELINE / "model_index.json").is_file()):
        return render_shipped(args)
    if args.pipeline:
        raise ValueError("pass --pipeline or --config, not both.")
    args.config = args.config or str(DEFAULT_CONFIG)
    return render_random(args)


def render_random(args: argparse.Namespace) -> int:
    """Build a pipeline with random weights from ``args.config`` and render a synthetic conversation."""

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    notice = UNTRAINED_NOTICE.format(config=args.config, pipeline=DEFAULT_PIPELINE.relative_to(ROOT))
    print(notice)

    # 1. Synthetic conversation: A talks and listens (the avatar), B is the user
    print(f"[1/4] synthesising a {args.seconds:.1f} s conversation (espeak-ng speech, animated face photo) ...")
    conversation = make_conversation(
        out / "conversation", layout="pairs", seconds=args.seconds, size=args.source_size, seed=args.seed
    )
    avatar, user = conversation.participants
    avatar_audio = load_wav(conversation.audios[avatar])
    user_audio = load_wav(conversation.audios[user])
    user_video = read_frames(conversation.videos[user])
    reference = read_frames(conversation.videos[avatar])[0]
    reference_landmarks = conversation.landmarks[avatar][0]  # pixels of the reference frame
    user_landmarks = conversation.landmarks[user]
    dialogue = [{**s, "speaker": "avatar" if s["speaker"] == avatar else "user"} for s in conversation.transcript]

    # 2. Tiny pipeline from configs (random weights), saved for echo-render
    print(f"[2/4] building the pipeline from {args.config} ...")
    description = load_model_config(args.config)
    understanding_model = None
    if args.understanding_model:
        understanding_model = OmniUnderstanding.from_pretrained(args.understanding_model)
    elif "context_encoder" in description:
        description["context_encoder"].setdefault("config", {})["use_understanding"] = False
        print("      no --understanding-model: the LCU runs without understanding tokens (the 'w/o HBCU' switch)")
    pipe = EchoPipeline(**load_components(description))
    pipe.save_pretrained(out / "pipeline")

    # 3. Render
    size = args.size or pipe.settings.resolution
    print(f"[3/4] rendering {conversation.num_frames} frames at {size}x{size} ...")
    output = pipe(
        reference_image=reference,
        avatar_audio=avatar_audio,
        user_video=user_video,
        user_audio=user_audio,
        dialogue=dialogue,
        emotion=args.emotion,
        num_frames=conversation.num_frames,
        sampling_rate=SAMPLE_RATE,  # load_wav reads at the model's rate
        height=size,
        width=size,
        num_inference_steps=args.steps,
        num_frames_per_chunk=args.frames_per_chunk,
        motion_frames=args.motion_frames,
        user_video_size=args.user_video_size,
        generator=torch.Generator().manual_seed(args.seed),
        reference_landmarks=reference_landmarks,
        user_landmarks=user_landmarks,
        understanding_model=understanding_model,
    )
    video_path = write_mp4(out / "demo.mp4", output.frames[0], audio=avatar_audio, user_frames=user_video)

    # 4. A manifest of the same conversation for echo-render
    np.save(out / "conversation" / "reference_landmarks.npy", conversation.landmarks[avatar][0])
    np.save(out / "conversation" / "user_landmarks.npy", user_landmarks)
    import PIL.Image

    PIL.Image.fromarray(reference).save(out / "conversation" / "reference.png")
    folder = Path("conversation") / conversation.conversation_id
    entry = {
        "id": conversation.conversation_id,
        "reference_image": "conversation/reference.png",
        "avatar_audio": str(folder / f"{avatar}.wav"),
        "user_video": str(folder / f"{user}.mp4"),
        "user_audio": str(folder / f"{user}.wav"),
        "dialogue": dialogue,
        "reference_landmarks": "conversation/reference_landmarks.npy",
        "user_landmarks": "conversation/user_landmarks.npy",
    }
    (out / "manifest.jsonl").write_text(json.dumps(entry) + "\n")

    print(f"[4/4] wrote {video_path} ({conversation.num_frames} frames, 25 fps, user left | avatar right, A's audio)")
    options = {
        "--height": args.size,
        "--width": args.size,
        "--steps": args.steps,
        "--frames-per-chunk": args.frames_per_chunk,
        "--motion-frames": args.motion_frames,
        "--user-video-size": args.user_video_size,
    }
    given = "".join(f" {flag} {value}" for flag, value in options.items() if value is not None)
    print(
        f"      pipeline: {out / 'pipeline'}; batch rendering: echo-render --pipeline {out / 'pipeline'} "
        f"--manifest {out / 'manifest.jsonl'} --out {out / 'renders'}{given}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    print(notice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
