"""``echo-prep``: conversations → prepared clip folders.

    echo-prep --input DIR --layout {seamless,pairs} --out DIR [--workers N] [--stages clips,latents,omni,emotion,emotion_embeds,user_tokens]
              [--wav2vec2 FOLDER] [--size 512] [--clip-seconds 10] [--overwrite] ...

Conversations are processed by a process pool (``--workers 1`` runs inline), with a progress bar. The run ends with a
table of the failed inputs (conversation, offending file, reason), also written to ``<out>/prep_summary.json``::

    {"layout", "input", "conversations", "clips_written", "clips_skipped",
     "failed": [{"input": <conversation id>, "file": <file name>, "reason": <message>}]}

A failure in one conversation never stops the others. Rerunning the same command resumes: stale ``.tmp-*`` folders
of an interrupted run are removed, finished clip folders are kept as they are and only missing ones are written.

Safety of the output folder:

- Options wrong for every clip (``--size 70``, ``--workers 0``) are refused before anything is read.
- ``<out>/prep_options.json`` records the options that shape the outputs; a rerun with other values is refused with
  the differing options named (use a new ``--out``, or ``--overwrite`` to delete the earlier clips and redo them).
- ``<out>/.echo-prep.lock`` names the running process (pid, host, start time). A run into a folder whose lock names a
  live process is refused; a lock left by a killed run is taken over with a notice.
- Pool workers die with the run: on Linux each asks the kernel for SIGKILL when its parent dies, and a run stopped
  by SIGTERM or Ctrl-C terminates its workers before it exits.
- ``prep_summary.json`` is written atomically; when it cannot be written (disk full) the failure table is printed
  anyway, with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.caches import DEFAULT_OMNI_STRIDE
from data_prep.faces import build_detector
from data_prep.layouts import Conversation, find_conversations
from data_prep.media import MediaError
from data_prep.stages import (
    CACHE_STAGES,
    CORE_STAGE,
    FACE_BACKENDS,
    PREP_OPTIONS,
    TEXT_ENCODER_DTYPES,
    OptionsMismatch,
    PrepOptions,
    prepare_conversation,
    record_options,
    write_atomic_text,
)
from echo import clip_format

logger = logging.getLogger("echo-prep")

LOCK = ".echo-prep.lock"
SUMMARY = "prep_summary.json"


@dataclass
class PrepSummary:
    layout: str
    input: str
    conversations: int = 0
    clips_written: list[str] = field(default_factory=list)
    clips_skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)


class OutputLocked(RuntimeError):
    """The output folder is being written by another live echo-prep run (named in the message)."""


class SummaryWriteError(OSError):
    """``prep_summary.json`` could not be written; ``summary`` holds the run's results all the same."""

    def __init__(self, path: Path, error: OSError, summary: PrepSummary):
        super().__init__(error.errno, f"could not write {str(path)!r}: {error.strerror or error}")
        self.summary = summary


# ----------------------------------------------------------------------------------------------------------------
# The lock of an output folder
# ----------------------------------------------------------------------------------------------------------------


def _process_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of a Linux process from ``/proc``; `None` elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def _lock_record() -> dict:
    stat = _process_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "process_start_ticks": stat[1] if stat else None,
        "command": sys.argv,
    }


def _lock_is_live(record: dict) -> bool:
    """Whether the process a lock record names still runs (on this host; a reused pid or a zombie does not count)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _process_stat(pid)
    if stat is not None:
        state, ticks = stat
        recorded = record.get("process_start_ticks")
        if state == "Z" or (recorded is not None and recorded != ticks):
            return False
    return True


def _describe(record: dict) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')!r}, started {record.get('started')}"


def acquire_lock(out_dir: Path) -> Path:
    """Create ``<out_dir>/.echo-prep.lock`` naming this process; returns its path.

    Raises:
        `OutputLocked`: the lock names a live process (or one on another host, which cannot be checked from here).
    """
    path = out_dir / LOCK
    record = _lock_record()
    tmp = out_dir / f"{LOCK}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, and the lock appears complete
                return path
            except FileExistsError:
                pass
            try:
                held = json.loads(path.read_text())
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                held = {}  # unreadable: a torn lock of a crashed run
            if not isinstance(held, dict):
                held = {}
            if held.get("host") not in (None, record["host"]):
                raise OutputLocked(
                    f"{str(out_dir)!r} is being written by echo-prep {_describe(held)} (lock {str(path)!r}); this "
                    "host cannot tell whether it still runs. Wait for it, use another --out, or delete the lock if "
                    "that run is gone."
                )
            if _lock_is_live(held):
                raise OutputLocked(
                    f"{str(out_dir)!r} is being written by another echo-prep run, {_describe(held)} (lock "
                    f"{str(path)!r}). Wait for it to finish (or stop it), or use another --out."
                )
            logger.warning("taking over the lock %s of an echo-prep run that no longer runs (%s)", path,
                           _describe(held) if held else "unreadable")  # fmt: skip
            stale = path.with_name(f"{LOCK}.stale.{os.getpid()}")
            try:
                os.rename(path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass
        raise OutputLocked(f"could not take the lock {str(path)!r}: other echo-prep runs keep taking it.")
    finally:
        tmp.unlink(missing_ok=True)


def release_lock(path: Path) -> None:
    """Remove the lock if it still names this process."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


# ----------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------


def _init_worker(parent: int) -> None:
    """Pool initializer: the worker dies with the parent (``PR_SET_PDEATHSIG`` = SIGKILL, Linux), so a killed run
    leaves no process writing into its output folder."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: cancel what has not started and kill the workers (their clips stay in ``.tmp-*`` folders)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=10)


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


def _remove_outputs(out_dir: Path) -> None:
    """``--overwrite``: delete what earlier echo-prep runs wrote into ``out_dir`` (clip folders, markers, records)."""
    clips = [p for p in out_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / clip_format.META).is_file()]  # fmt: skip
    logger.warning("--overwrite: deleting %d prepared clip folder(s) of an earlier run in %s", len(clips), out_dir)
    for folder in [*clips, out_dir / ".done", *out_dir.glob(".tmp-*")]:
        shutil.rmtree(folder, ignore_errors=True)
    for name in (PREP_OPTIONS, SUMMARY):
        (out_dir / name).unlink(missing_ok=True)


def run_prep(
    input_dir: str | Path,
    layout: str,
    out_dir: str | Path,
    options: PrepOptions,
    workers: int = 1,
    progress: bool = True,
    on_clip=None,
    overwrite: bool = False,
) -> PrepSummary:
    """Prepare every conversation under ``input_dir`` into ``out_dir``; returns (and writes) the run summary.

    Args:
        workers (`int`, defaults to 1): processes; 1 runs inline in this process.
        on_clip (`callable`, *optional*): ``on_clip(clip_id, tmp_dir)`` before each clip's atomic rename (inline runs
            only; see `data_prep.stages.prepare_conversation`).
        overwrite (`bool`, defaults to `False`): delete the outputs of earlier runs in ``out_dir`` first, instead of
            resuming (needed to rerun with other options, see `data_prep.stages.record_options`).

    Raises:
        `OutputLocked`: another live run writes ``out_dir``. `data_prep.stages.OptionsMismatch`: ``out_dir`` was
        prepared with other options. `SummaryWriteError`: ``prep_summary.json`` could not be written (its
        ``summary`` holds the results).
    """
    from tqdm.auto import tqdm

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` (--workers) is {workers!r}, expected a positive number of processes.")
    # Fail fast on a missing face backend (e.g. face-alignment not installed) instead of once per conversation.
    build_detector(options.face_backend).close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out_dir)
    try:
        # 1. The folder is ours: check (or clear) what earlier runs left, then record this run's options.
        if overwrite:
            _remove_outputs(out_dir)
        record_options(out_dir, options)
        for stale in out_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # 2. Conversations, inline or in a pool of workers that die with this process.
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

        if workers == 1:
            for conversation in conversations:
                try:
                    record(prepare_conversation(conversation, out_dir, options, on_clip=on_clip), None)
                except Exception as error:  # reported per input; the run continues with the others
                    record(None, _failure(conversation, error))
        else:
            # Spawned (not forked) workers: the parent may hold torch / MediaPipe threads a fork would copy mid-state.
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(os.getpid(),))  # fmt: skip
            try:
                futures = [pool.submit(_work, c, str(out_dir), options) for c in conversations]
                for future in as_completed(futures):
                    _, result, failure = future.result()
                    record(result, failure)
            except BaseException:  # SIGTERM (see `main`), Ctrl-C, a broken pool: no worker outlives the run
                _terminate(pool)
                raise
            pool.shutdown()
        bar.close()
        summary.failed.sort(key=lambda f: (f["input"], f["file"]))
        summary.clips_written.sort()
        summary.clips_skipped.sort()
        # 3. The summary, atomically: a failed write keeps the previous file (or none), never a truncated one.
        try:
            write_atomic_text(out_dir / SUMMARY, json.dumps(asdict(summary), indent=1))
        except OSError as error:
            raise SummaryWriteError(out_dir / SUMMARY, error, summary) from error
        return summary
    finally:
        release_lock(lock)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "echo-prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="folder of conversations")
    parser.add_argument("--layout", required=True, choices=["seamless", "pairs"])
    parser.add_argument("--out", required=True, help="folder of prepared clip folders")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the prepared clips of earlier runs in --out and prepare them again (needed to "
                             "rerun with other options)")  # fmt: skip
    parser.add_argument(
        "--wav2vec2", default="facebook/wav2vec2-base-960h",
        help="Wav2Vec2Model folder, or a model id already in the Hugging Face cache (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (1 = inline)")
    parser.add_argument("--stages", default=CORE_STAGE,
                        help=f"comma-separated subset of {','.join([CORE_STAGE, *CACHE_STAGES])}")
    parser.add_argument("--size", type=int, default=512, help="side of the square crops, a multiple of 16")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--min-clip-seconds", type=float, default=1.0, help="shortest kept last clip")
    parser.add_argument("--crop-scale", type=float, default=1.8, help="crop side / larger face-box side")
    parser.add_argument("--smooth-sigma", type=float, default=2.0, help="temporal box smoothing, frames")
    parser.add_argument("--face-backend", default="mediapipe", choices=list(FACE_BACKENDS))
    parser.add_argument("--min-face-ratio", type=float, default=0.5, help="fail below this fraction of face frames")
    parser.add_argument("--av-tolerance", type=float, default=0.1, help="seconds audio may fall short of video")
    parser.add_argument("--asr-model", default=None, help="Whisper folder for conversations without transcripts")
    parser.add_argument("--vae", default=None, help="AutoencoderKLWan folder (stages 'latents', 'user_tokens')")
    parser.add_argument("--omni-model", default=None, help="Qwen-Omni folder (stage 'omni')")
    parser.add_argument("--emotion-model", default=None, help="causal LM folder or http(s) endpoint (stage 'emotion')")
    parser.add_argument("--emotion-served-model", default="default", help="model name at the --emotion-model endpoint")
    parser.add_argument("--text-encoder", default=None,
                        help="T5/UMT5 encoder folder, or a pipeline folder with text_encoder/ (stage 'emotion_embeds')")
    parser.add_argument("--text-encoder-dtype", default="float32", choices=list(TEXT_ENCODER_DTYPES),
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
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def options_from_args(args: argparse.Namespace) -> PrepOptions:
    """The `PrepOptions` of parsed arguments (raises a `ValueError` naming the first invalid option)."""
    return PrepOptions(
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


def _terminated(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C, so `run_prep` terminates its workers and releases the lock."""
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # 1. Options wrong for every clip: one error, before anything is read.
    if args.workers < 1:
        parser.error(f"--workers is {args.workers}, expected a positive number of processes (1 runs inline).")
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    # 2. The run; SIGTERM unwinds it (workers terminated, lock released) instead of killing it where it stands.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        summary = run_prep(args.input, args.layout, args.out, options, workers=args.workers,
                           progress=not args.no_progress, overwrite=args.overwrite)  # fmt: skip
    except (OutputLocked, OptionsMismatch, clip_format.ClipFormatError) as error:
        print(f"echo-prep: error: {error}", file=sys.stderr)
        return 2
    except SummaryWriteError as error:
        print(format_summary(error.summary))
        print(f"echo-prep: error: {error}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    print(format_summary(summary))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
