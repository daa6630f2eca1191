# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""``echo-web``: a local web page where you talk with the avatar, live, through your camera and microphone.

```
echo-web --pipeline models/echo-demo [--port 8000] [--few-step 1|2|4 | --steps N --passes 3|2|1] [--reference photo.png]
         [--chat-base-url http://127.0.0.1:8080/v1 --chat-model NAME] [echo-render's model options]
```

Open the printed address, press Start and allow the camera and the microphone: they stream to an `EchoSession` as the
user (WebRTC, aiortc behind FastAPI: ``docs/web.md`` says why), the avatar's frames and voice stream back in sync,
and the page shows the measured latency and real-time factor. Type a sentence and the avatar says it (espeak-ng where
it is installed; upload a recording otherwise), or, with ``--chat-base-url``, ask an OpenAI-compatible chat endpoint
and the avatar says its answer.

A model slower than real time (the demo model on a CPU) still works: its frames arrive late, one chunk at a time, each
in sync with its voice. ``--few-step N`` renders with the model's distilled student (``<pipeline>/few_step``,
docs/few_step.md: N steps of one forward each); without one, ``--steps`` and ``--passes`` (or the guidance scales)
trade quality for speed. `render_options` is the one place where the session's render options are chosen.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from echo.audio import SAMPLE_RATE
from echo.framing import frame_image
from synthetic.conversations import synthesize_speech

from ..render import add_model_arguments, build_helpers, check_model_options, load_pipeline, model_options
from ..video_io import load_image
from .conversation import LiveConversation

CHAT_SYSTEM_PROMPT = (
    "You are the avatar in a live video call. Answer the user in one or two short spoken sentences, without "
    "markdown, lists or emoji."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echo-web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="folder of a saved EchoPipeline (e.g. models/echo-demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--reference",
        default=None,
        help="the avatar's photo (framed to the model's head crop); default: <pipeline>/example/reference.png",
    )
    parser.add_argument(
        "--passes",
        type=int,
        choices=(3, 2, 1),
        default=3,
        help="denoising passes per step: 3 = the model's guidance; 2 = the user's guidance scale set to the audio's "
        "(1.5x faster, lips still follow the voice); 1 = no guidance (3x faster, but the demo model's lips then no "
        "longer follow the voice: docs/web.md)",
    )
    parser.add_argument(
        "--few-step",
        type=int,
        choices=(1, 2, 4),
        default=None,
        help="render with the pipeline's few-step student (<pipeline>/few_step: N steps of one forward each, the "
        "live mode; docs/few_step.md) instead of the model's sampler",
    )
    parser.add_argument("--voice", default="en", help="espeak-ng voice for typed text (default: en)")
    parser.add_argument(
        "--chat-base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1"
    )
    parser.add_argument("--chat-model", default=None, help="the chat endpoint's model name")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return add_model_arguments(parser)


def render_options(args: argparse.Namespace, settings) -> dict:
    """The session's render options (`EchoPipeline.start_session` arguments) chosen from the command line and the
    model's settings: the one place they are chosen. ``None`` is the model's saved setting.

    ``--passes`` drops guidance passes (`EchoPipeline.guidance_weights` skips a pass of weight 0 in ``uncond +
    s_a (audio − uncond) + s_u (full − audio)``): 2 sets ``s_u = s_a`` (the ``audio`` pass's weight 0), 1 sets both
    to 1 (only ``full``)."""
    options = model_options(args)  # size, steps, guidance scales, chunk lengths
    if args.few_step is not None:  # the student folds the guidance in: one pass per step
        given = [flag for flag, value in (("--passes", args.passes != 3), ("--steps", args.steps is not None)) if value]
        given += [
            f"--{n.replace('_', '-')}" for n in ("audio_guidance_scale", "user_guidance_scale") if getattr(args, n)
        ]
        if given:
            raise ValueError(f"--few-step sets the steps and guidance itself: drop {', '.join(given)}.")
        return options
    if args.passes != 3:
        if args.user_guidance_scale is not None or (args.passes == 1 and args.audio_guidance_scale is not None):
            raise ValueError(
                f"--passes {args.passes} sets the guidance scales itself: give it or --user-guidance-scale "
                "(--audio-guidance-scale too with --passes 1), not both."
            )
        audio_scale = (
            args.audio_guidance_scale if args.audio_guidance_scale is not None else settings.audio_guidance_scale
        )
        options["audio_guidance_scale"] = options["user_guidance_scale"] = 1.0 if args.passes == 1 else audio_scale
    return options


def use_few_step(pipe, args: argparse.Namespace) -> None:
    """With ``--few-step N``: the pipeline's student (``<pipeline>/few_step``) loaded and switched on at N steps."""
    if args.few_step is None:
        return
    folder = Path(args.pipeline) / "few_step"
    if not (folder / "few_step.json").is_file():
        raise FileNotFoundError(
            f"{str(args.pipeline)!r} has no few_step/ student: distil one (docs/few_step.md) or drop --few-step."
        )
    pipe.load_few_step_weights(folder)
    pipe.enable_few_step(args.few_step)


def reference_inputs(args: argparse.Namespace, resolution: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The avatar's reference crop and its landmarks: ``--reference`` framed as echo-prep frames, or the pipeline's
    example (a head crop already, with its landmarks)."""
    if args.reference is not None:
        crop, _ = frame_image(np.asarray(load_image(args.reference)), resolution, name="--reference")
        return crop, None
    example = Path(args.pipeline) / "example"
    if not (example / "reference.png").is_file():
        raise FileNotFoundError(
            f"{str(args.pipeline)!r} has no example/reference.png: pass --reference PHOTO (a photo of the avatar's face)."
        )
    landmarks = example / "reference_landmarks.npy"
    return np.asarray(load_image(example / "reference.png")), np.load(landmarks) if landmarks.is_file() else None


def start_live_session(pipe, options: dict, reference: np.ndarray, landmarks, helpers: dict, seed: int = 0):
    """A new `LiveConversation` on a new session of ``pipe`` with the render ``options`` (`render_options`)."""
    holder = {}

    def stop_check(*callback_args):  # the conversation does not exist yet when the session is made
        return holder["conversation"].step_callback(*callback_args)

    session = pipe.start_session(
        reference_image=reference,
        reference_landmarks=landmarks,
        generator=torch.Generator().manual_seed(seed),
        sampling_rate=SAMPLE_RATE,
        output_type="np",
        frame_inputs=False,  # the reference is a crop; the conversation frames the camera itself
        callback_on_step_end=stop_check,
        callback_on_step_end_tensor_inputs=[],
        **options,
        **helpers,
    )
    holder["conversation"] = LiveConversation(session, resolution=session.settings.resolution)
    return holder["conversation"]


def text_to_speech(voice: str):
    """``text → (n,) float32 at 16 kHz`` with espeak-ng, and `None` with the reason where it is not installed."""
    if shutil.which("espeak-ng") is None:
        return None, "espeak-ng is not installed (`sudo apt-get install espeak-ng`); upload a recording instead"
    return (lambda text: synthesize_speech(text, voice=voice, sample_rate=SAMPLE_RATE)), ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # import here: the `web` extra is optional, and the CLI says how to install it
    from .app import ChatEndpoint, EchoWebServer, require_web_extra

    try:
        require_web_extra()
        import uvicorn
    except ImportError as error:
        parser.exit(2, f"echo-web: {error}\n")
    if bool(args.chat_base_url) != bool(args.chat_model):
        parser.error("--chat-base-url and --chat-model go together (the endpoint and its model's name).")
    log = logging.getLogger("echo-web")  # the server's own lines; aiortc's and uvicorn's stay at their levels
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline, args.device, args.dtype, args.cpu_offload)
    try:
        check_model_options(pipe, args)
        use_few_step(pipe, args)
        options = render_options(args, pipe.settings)
        settings, height, _ = pipe.resolve_settings(**options)
        reference, landmarks = reference_inputs(args, height)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    helpers = build_helpers(args)
    speak, why_not = text_to_speech(args.voice)
    chat = ChatEndpoint(args.chat_base_url, args.chat_model, CHAT_SYSTEM_PROMPT) if args.chat_base_url else None
    server = EchoWebServer(
        lambda: start_live_session(pipe, options, reference, landmarks, helpers, args.seed),
        speak=speak,
        chat=chat,
        speak_unavailable=why_not,
    )
    mode = f"few-step student, {args.few_step} steps" if args.few_step else f"{settings.num_inference_steps} steps"
    print(
        f"echo-web: {args.pipeline} at {height}x{height}, {mode}, "
        f"guidance {settings.audio_guidance_scale:g}/{settings.user_guidance_scale:g}: "
        f"open http://{args.host}:{args.port}/",
        flush=True,
    )
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
