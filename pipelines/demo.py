"""``echo-demo``: render a synthetic conversation end to end, offline, with a tiny ECHO model built from configs.

```
echo-demo --out demo_out          # what `make demo` runs
```

1. A two-person conversation is synthesised (`data_prep.synthetic.make_conversation`): a real face photo animated into
   talking and listening video, real speech from espeak-ng. Participant A is the avatar, B the user.
2. An `EchoPipeline` is built from ``configs/models/tiny.yaml`` (every component from its config, seeded random
   weights; nothing is downloaded; its ``settings:`` become the pipeline's defaults) and saved to ``<out>/pipeline``.
3. The avatar is rendered chunk by chunk from A's first frame and audio, listening to B's video and audio, and written
   to ``<out>/demo.mp4`` (B's video on the left, the avatar on the right, A's audio muxed in).
4. ``<out>/manifest.jsonl`` describes the same conversation for ``echo-render --pipeline <out>/pipeline``.

The weights are random, so the avatar does not look like anything yet: the demo shows that every stage runs and how
the outputs are laid out. Until a trained demo checkpoint exists, this is what it prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
UNTRAINED_NOTICE = (
    "NOTE: the model weights are random (built from {config}); they are untrained until a trained demo checkpoint "
    "exists, so the rendered avatar is noise-like. The demo checks that every stage runs end to end."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echo-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="model description (configs/models/*.yaml)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic conversation")
    # None = the model's setting (the `settings:` of --config), as in echo-render.
    parser.add_argument("--size", type=int, default=None,
                        help="rendered avatar side in pixels, a multiple of 16 (default: the model's resolution)")  # fmt: skip
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic conversation's videos")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: the model's)")
    parser.add_argument("--frames-per-chunk", type=int, default=None, help="default: the model's training window")
    parser.add_argument("--motion-frames", type=int, default=None, help="default: the model's")
    parser.add_argument("--user-video-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emotion", default=None, help="emotion text for every chunk (default: the pipeline's)")
    parser.add_argument(
        "--understanding-model", default=None,
        help="a local Qwen2.5-Omni folder for the HBCU tokens; without one the tiny LCU runs with use_understanding off",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    from data_prep.synthetic import make_conversation
    from echo.components import load_components, load_model_config

    from .pipeline_echo import EchoPipeline
    from .video_io import load_wav, read_frames, write_mp4

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    notice = UNTRAINED_NOTICE.format(config=args.config)
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
        from echo.understanding import OmniUnderstanding

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
    options = {"--height": args.size, "--width": args.size, "--steps": args.steps,
               "--frames-per-chunk": args.frames_per_chunk, "--motion-frames": args.motion_frames,
               "--user-video-size": args.user_video_size}  # fmt: skip
    given = "".join(f" {flag} {value}" for flag, value in options.items() if value is not None)
    print(f"      pipeline: {out / 'pipeline'}; batch rendering: echo-render --pipeline {out / 'pipeline'} "
          f"--manifest {out / 'manifest.jsonl'} --out {out / 'renders'}{given}")  # fmt: skip
    print(f"done in {time.perf_counter() - start:.1f} s")
    print(notice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
