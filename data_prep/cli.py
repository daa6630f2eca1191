"""``echo-prep``: conversations → prepared clip folders.

    echo-prep --input DIR --layout {seamless,pairs} --out DIR [--workers N] [--stages clips,latents,omni,emotion,emotion_embeds,user_tokens]
              [--wav2vec2 FOLDER] [--size 512] [--clip-seconds 10] ...

Conversations are processed by a process pool (``--workers 1`` runs inline), with a progress bar. The run ends with a
table of the failed inputs (conversation, offending file, reason), also written to ``<out>/prep_summary.json``::

    {"layout", "input", "conversations", "clips_written", "clips_skipped",
     "failed": [{"input": <conversation id>, "file": <file name>, "reason": <message>}]}

A failure in one conversation never stops the others. Rerunning the same command resumes: stale ``.tmp-*`` folders
of an interrupted run are removed, finished clip folders are kept as they are and only missing ones are written.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.caches import DEFAULT_OMNI_STRIDE
from data_prep.faces import build_detector
from data_prep.layouts import Conversation, find_conversations
from data_prep.media import MediaError
from data_prep.stages import CACHE_STAGES, CORE_STAGE, PrepOptions, prepare_conversation


@dataclass
class PrepSummary:
    layout: str
    input: str
    conversations: int = 0
    clips_written: list[str] = field(default_factory=list)
    clips_skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)


def _failure(conversation: Conversation, error: BaseException) -> dict:
    """``{"input", "file", "reason"}`` for a failed conversation; the file is the one the message names."""
    message = str(error)
    names = {path.name for path in conversation.files()}
    head = message.split(":", 1)[0].strip()
    if isinstance(error, MediaError) and head in names:
        return {"input": conversation.id, "file": head, "reason": message.split(":", 1)[1].strip()}
    # Not a known source problem: keep the type and the last frame so the report is actionable.
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return {"input": conversation.id, "file": "", "reason": f"{type(error).__name__}: {message}{location}"}


def _work(conversation: Conversation, out_dir: str, options: PrepOptions):
    try:
        return conversation.id, prepare_conversation(conversation, out_dir, options), None
    except Exception as error:  # reported per input in the summary; the run continues with the others
        return conversation.id, None, _failure(conversation, error)


def run_prep(
    input_dir: str | Path,
    layout: str,
    out_dir: str | Path,
    options: PrepOptions,
    workers: int = 1,
    progress: bool = True,
    on_clip=None,
) -> PrepSummary:
    """Prepare every conversation under ``input_dir`` into ``out_dir``; returns (and writes) the run summary.

    Args:
        workers (`int`, defaults to 1): processes; 1 runs inline in this process.
        on_clip (`callable`, *optional*): ``on_clip(clip_id, tmp_dir)`` before each clip's atomic rename (inline runs
            only; see `data_prep.stages.prepare_conversation`).
    """
    from tqdm.auto import tqdm

    # Fail fast on a missing face backend (e.g. face-alignment not installed) instead of once per conversation.
    build_detector(options.face_backend).close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    conversations, layout_failures = find_conversations(input_dir, layout)
    summary = PrepSummary(layout=layout, input=str(input_dir), conversations=len(conversations))
    summary.failed += [asdict(f) for f in layout_failures]
    bar = tqdm(total=len(conversations), desc="echo-prep", unit="conv", disable=not progress)

    def record(result, failure):
        if failure is not None:
            summary.failed.append(failure)
        else:
            summary.clips_written.extend(result.written)
            summary.clips_skipped.extend(result.skipped)
        bar.update(1)

    if workers <= 1:
        for conversation in conversations:
            try:
                record(prepare_conversation(conversation, out_dir, options, on_clip=on_clip), None)
            except Exception as error:  # reported per input; the run continues with the others
                record(None, _failure(conversation, error))
    else:
        # Spawned (not forked) workers: the parent may hold torch / MediaPipe threads that a fork would copy mid-state.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_work, c, str(out_dir), options) for c in conversations]
            for future in as_completed(futures):
                _, result, failure = future.result()
                record(result, failure)
    bar.close()
    summary.failed.sort(key=lambda f: (f["input"], f["file"]))
    summary.clips_written.sort()
    summary.clips_skipped.sort()
    (out_dir / "prep_summary.json").write_text(json.dumps(asdict(summary), indent=1))
    return summary


def format_summary(summary: PrepSummary) -> str:
    lines = [
        f"conversations: {summary.conversations}  clips written: {len(summary.clips_written)}  "
        f"clips already present: {len(summary.clips_skipped)}  failed inputs: {len(summary.failed)}"
    ]
    if summary.failed:
        width_input = max(len("input"), *(len(f["input"]) for f in summary.failed))
        width_file = max(len("file"), *(len(f["file"]) for f in summary.failed))
        lines.append(f"{'input':<{width_input}}  {'file':<{width_file}}  reason")
        for f in summary.failed:
            lines.append(f"{f['input']:<{width_input}}  {f['file']:<{width_file}}  {f['reason']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "echo-prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="folder of conversations")
    parser.add_argument("--layout", required=True, choices=["seamless", "pairs"])
    parser.add_argument("--out", required=True, help="folder of prepared clip folders")
    parser.add_argument(
        "--wav2vec2", default="facebook/wav2vec2-base-960h",
        help="Wav2Vec2Model folder, or a model id already in the Hugging Face cache (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (1 = inline)")
    parser.add_argument("--stages", default=CORE_STAGE,
                        help=f"comma-separated subset of {','.join([CORE_STAGE, *CACHE_STAGES])}")
    parser.add_argument("--size", type=int, default=512, help="side of the square crops")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--min-clip-seconds", type=float, default=1.0, help="shortest kept last clip")
    parser.add_argument("--crop-scale", type=float, default=1.8, help="crop side / larger face-box side")
    parser.add_argument("--smooth-sigma", type=float, default=2.0, help="temporal box smoothing, frames")
    parser.add_argument("--face-backend", default="mediapipe", choices=["mediapipe", "face_alignment"])
    parser.add_argument("--min-face-ratio", type=float, default=0.5, help="fail below this fraction of face frames")
    parser.add_argument("--av-tolerance", type=float, default=0.1, help="seconds audio may fall short of video")
    parser.add_argument("--asr-model", default=None, help="Whisper folder for conversations without transcripts")
    parser.add_argument("--vae", default=None, help="AutoencoderKLWan folder (stages 'latents', 'user_tokens')")
    parser.add_argument("--omni-model", default=None, help="Qwen-Omni folder (stage 'omni')")
    parser.add_argument("--emotion-model", default=None, help="causal LM folder or http(s) endpoint (stage 'emotion')")
    parser.add_argument("--emotion-served-model", default="default", help="model name at the --emotion-model endpoint")
    parser.add_argument("--text-encoder", default=None,
                        help="T5/UMT5 encoder folder, or a pipeline folder with text_encoder/ (stage 'emotion_embeds')")
    parser.add_argument("--text-encoder-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the text encoder and of the cached embeddings (default: %(default)s)")
    parser.add_argument("--default-emotion", default="neutral",
                        help="training's data.default_emotion, also cached by 'emotion_embeds' (default: %(default)s)")
    parser.add_argument("--user-video-size", type=int, default=64,
                        help="training's data.user_video_size, for stage 'user_tokens' (default: %(default)s)")
    parser.add_argument("--omni-stride", type=int, default=DEFAULT_OMNI_STRIDE,
                        help="frames between the understanding entries of stage 'omni', each Φ of the user's media "
                             "from the conversation's start to its end frame (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker process")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = PrepOptions(
        wav2vec2=args.wav2vec2,
        size=args.size,
        clip_seconds=args.clip_seconds,
        min_clip_seconds=args.min_clip_seconds,
        crop_scale=args.crop_scale,
        smooth_sigma=args.smooth_sigma,
        face_backend=args.face_backend,
        min_face_ratio=args.min_face_ratio,
        av_tolerance=args.av_tolerance,
        asr_model=args.asr_model,
        stages=[s.strip() for s in args.stages.split(",") if s.strip()],
        vae=args.vae,
        omni_model=args.omni_model,
        emotion_model=args.emotion_model,
        emotion_served_model=args.emotion_served_model,
        text_encoder=args.text_encoder,
        text_encoder_dtype=args.text_encoder_dtype,
        default_emotion=args.default_emotion,
        user_video_size=args.user_video_size,
        omni_stride=args.omni_stride,
        device=args.device,
        threads=args.threads,
    )
    summary = run_prep(args.input, args.layout, args.out, options, workers=args.workers,
                       progress=not args.no_progress)
    print(format_summary(summary))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
