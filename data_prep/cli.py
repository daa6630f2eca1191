"""``echo-prep``: conversations → prepared clip folders.

    echo-prep --input DIR --layout {seamless,pairs} --out DIR [--workers N] [--stages clips,omni,emotion,emotion_embeds,user_tokens]
              [--wav2vec2 FOLDER] [--size 512] [--clip-seconds 10] [--overwrite] ...
              [--engine {local,ray} [--address auto]] [--shard K/N]
    echo-prep --out DIR --merge-summaries

Conversations are processed by a process pool (``--workers 1`` runs inline), or by Ray workers (``--engine ray``), with
a progress bar over conversations; ``--shard K/N`` takes a deterministic slice of them, for job arrays (see
`data_prep.cluster` and ``docs/cluster_prep.md``). Both engines write the same bytes. The run ends with a
table of the failed inputs (conversation, offending file, reason), also written to ``<out>/prep_summary.json``::

    {"layout", "input", "conversations", "clips_written", "clips_skipped",
     "failed": [{"input": <conversation id>, "file": <file name>, "reason": <message>}]}

A failure in one conversation never stops the others. Rerunning the same command resumes: stale ``.tmp-*`` folders
of an interrupted run are removed, finished clip folders are kept as they are and only missing ones are written.

Safety of the output folder:

- Options wrong for every clip (``--size 70``, ``--workers 0``) are refused before anything is read.
- ``<out>/prep_options.json`` records the options that shape the outputs; a rerun with other values is refused with
  the differing options named (use a new ``--out``, or ``--overwrite`` to delete the earlier clips and redo them).
- ``<out>/.echo-prep.lock`` (``.echo-prep.shard-K-of-N.lock`` for a shard) names the running process (pid, host,
  start time) and is touched every 30 s. A run into a folder whose lock names a live process is refused, and so is a
  shard beside a live run of another shard count (or an unsharded run); a lock left by a killed run is taken over with
  a notice (one of another host once its heartbeat is 5 minutes old). The lock is `echo.locking`'s, which
  echo-render's ``.echo-render.lock`` shares.
- An ``--input`` that is not a folder is refused before anything is written to ``--out``.
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
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep import cluster
from data_prep.caches import DEFAULT_EMOTION_STRIDE, DEFAULT_OMNI_STRIDE
from data_prep.failures import failure_record as _failure
from data_prep.layouts import Conversation, find_conversations
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
from echo import clip_format, locking
from echo.framing import CROP_SCALE, SMOOTH_HALF_LIFE, build_detector
from echo.locking import LOCK_STALE_S, OutputLocked, release_lock, start_heartbeat  # noqa: F401 (part of this API)
from echo.locking import process_stat as _process_stat  # noqa: F401

logger = logging.getLogger("echo-prep")

TOOL = "echo-prep"
LOCK = locking.lock_name(TOOL)
SUMMARY = "prep_summary.json"


@dataclass
class PrepSummary:
    layout: str
    input: str
    conversations: int = 0
    clips_written: list[str] = field(default_factory=list)
    clips_skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)


class SummaryWriteError(OSError):
    """``prep_summary.json`` could not be written; ``summary`` holds the run's results all the same."""

    def __init__(self, path: Path, error: OSError, summary: PrepSummary):
        super().__init__(error.errno, f"could not write {str(path)!r}: {error.strerror or error}")
        self.summary = summary


# ----------------------------------------------------------------------------------------------------------------
# The lock of an output folder: `echo.locking`, the one implementation echo-prep and echo-render share
# ----------------------------------------------------------------------------------------------------------------


def _lock_record(shard: tuple[int, int] | None = None) -> dict:
    return locking.lock_record(shard)


def lock_name(shard: tuple[int, int] | None = None) -> str:
    """``.echo-prep.lock`` for a whole run, ``.echo-prep.shard-K-of-N.lock`` for shard K of N."""
    return locking.lock_name(TOOL, shard)


def _admission(out_dir: Path):
    """echo-prep's short mutex over ``out_dir`` (`echo.locking.admission`)."""
    return locking.admission(out_dir, TOOL)


def acquire_lock(out_dir: Path, shard: tuple[int, int] | None = None) -> Path:
    """echo-prep's lock of ``out_dir`` (or of shard ``shard`` there): `echo.locking.acquire_lock`.

    Raises:
        `OutputLocked`: the message names the live run and the way on.
    """
    return locking.acquire_lock(out_dir, TOOL, shard)


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


def _work(conversation: Conversation, out_dir: str, options: PrepOptions):
    try:
        return conversation.id, prepare_conversation(conversation, out_dir, options), None
    except Exception as error:  # reported per input in the summary; the run continues with the others
        return conversation.id, None, _failure(conversation, error)


def _remove_outputs(out_dir: Path) -> None:
    """``--overwrite``: delete what earlier echo-prep runs wrote into ``out_dir`` (clip folders, markers, records)."""
    clips = [
        p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / clip_format.META).is_file()
    ]
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
    workers: int | None = 1,
    progress: bool = True,
    on_clip=None,
    overwrite: bool = False,
    engine: str = "local",
    shard: tuple[int, int] | None = None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
) -> PrepSummary:
    """Prepare every conversation under ``input_dir`` (or shard ``shard`` of them) into ``out_dir``; returns (and
    writes) the run summary.

    Args:
        workers (`int`, defaults to 1): processes of the local pool (1 runs inline in this process); with
            ``engine="ray"`` the Ray actors (`None`: as many as the cluster holds, see `data_prep.cluster.run_ray`).
        on_clip (`callable`, *optional*): ``on_clip(clip_id, tmp_dir)`` before each clip's atomic rename (inline runs
            and Ray actors, where it must be picklable; see `data_prep.stages.prepare_conversation`).
        overwrite (`bool`, defaults to `False`): delete the outputs of earlier runs in ``out_dir`` first, instead of
            resuming (needed to rerun with other options, see `data_prep.stages.record_options`).
        engine (`str`, defaults to `"local"`): ``"local"`` (this machine's process pool) or ``"ray"``
            (`data_prep.cluster.run_ray` on the cluster at ``address``, GPUs per actor ``gpus_per_worker``).
        shard (`tuple[int, int]`, *optional*): ``(K, N)``: only the conversations of shard K of N
            (`data_prep.cluster.shard_of`); the summary goes to ``prep_summary.shard-K-of-N.json``, and into a merged
            ``prep_summary.json`` once every shard has one.

    Raises:
        `OutputLocked`: another live run (or an overlapping shard) writes ``out_dir``.
        `data_prep.stages.OptionsMismatch`: ``out_dir`` was prepared with other options. `SummaryWriteError`:
        ``prep_summary.json`` could not be written (its ``summary`` holds the results).
    """
    from tqdm.auto import tqdm

    if engine not in ("local", "ray"):
        raise ValueError(f"`engine` (--engine) is {engine!r}, expected 'local' or 'ray'.")
    if workers is None and engine == "local":
        workers = 1
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"`workers` (--workers) is {workers!r}, expected a positive number of processes.")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"`shard` (--shard) is {shard!r}, expected (K, N) with 0 ≤ K < N.")
    if shard is not None and overwrite:
        raise ValueError(
            "--overwrite deletes every prepared clip of --out, including other shards' clips: run it once without "
            "--shard (or delete the folder), then run the shards."
        )
    if not Path(input_dir).is_dir():  # before anything is written (prep_options.json would bind --out's options)
        state = "is not a folder" if Path(input_dir).exists() else "does not exist"
        raise FileNotFoundError(
            f"--input {str(input_dir)!r} {state}: pass the folder of conversations. Nothing was written to --out."
        )
    if engine == "ray":
        cluster.import_ray()  # fail fast with the install line
    # Fail fast on a missing face backend (e.g. face-alignment not installed) instead of once per conversation.
    build_detector(options.face_backend).close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out_dir, shard)
    heartbeat = start_heartbeat(lock)
    try:
        # 1. The folder is ours (or this shard's): check (or clear) what earlier runs left, record this run's options.
        with _admission(out_dir):
            if overwrite:
                _remove_outputs(out_dir)
            record_options(out_dir, options)
        conversations, layout_failures = find_conversations(input_dir, layout)
        all_ids = [c.id for c in conversations]
        if shard is None:
            for stale in out_dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        else:
            # Only this shard's conversations: the other shards may be writing theirs into the same folder now.
            conversations = [c for c in conversations if cluster.shard_of(c.id, shard[1]) == shard[0]]
            layout_failures = [f for f in layout_failures if cluster.shard_of(f.input, shard[1]) == shard[0]]
            cluster.remove_tmp_folders(out_dir, {c.id for c in conversations}, all_ids)
        # 2. Conversations: inline, in a pool of workers that die with this process, or on Ray.
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

        if engine == "ray":
            cluster.run_ray(
                conversations,
                out_dir,
                options,
                record,
                all_ids,
                address=address,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                on_clip=on_clip,
            )
        elif workers == 1:
            for conversation in conversations:
                try:
                    record(prepare_conversation(conversation, out_dir, options, on_clip=on_clip), None)
                except Exception as error:  # reported per input; the run continues with the others
                    record(None, _failure(conversation, error))
        else:
            # Spawned (not forked) workers: the parent may hold torch / MediaPipe threads a fork would copy mid-state.
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
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
        # 3. The summary, atomically: a failed write keeps the previous file (or none), never a truncated one. A shard
        # writes its own, and the merged one once every shard has written its own.
        path = out_dir / (SUMMARY if shard is None else cluster.shard_summary_name(shard))
        try:
            data = asdict(summary) if shard is None else {**asdict(summary), "shard": f"{shard[0]}/{shard[1]}"}
            write_atomic_text(path, json.dumps(data, indent=1))
            if shard is not None:
                try:
                    write_atomic_text(out_dir / SUMMARY, json.dumps(cluster.merge_summaries(out_dir), indent=1))
                except (FileNotFoundError, ValueError) as error:  # other shards still run: the last one merges
                    logger.info("prep_summary.json not merged yet: %s", error)
        except OSError as error:
            raise SummaryWriteError(path, error, summary) from error
        return summary
    finally:
        heartbeat.set()
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
    parser.add_argument("--input", help="folder of conversations (required unless --merge-summaries)")
    parser.add_argument("--layout", choices=["seamless", "pairs"], help="required unless --merge-summaries")
    parser.add_argument("--out", required=True, help="folder of prepared clip folders")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the prepared clips of earlier runs in --out and prepare them again (needed to "
        "rerun with other options)",
    )
    parser.add_argument(
        "--wav2vec2",
        default="facebook/wav2vec2-base-960h",
        help="Wav2Vec2Model folder, or a model id already in the Hugging Face cache (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes of the local pool (default 1 = inline); with --engine ray, Ray workers "
        "(default: as many as the cluster's CPUs / --threads, or GPUs / --ray-gpus-per-worker)",
    )
    parser.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="'local': a process pool on this machine; 'ray': a Ray cluster (pip install "
        "'echo-ihg[cluster]'; docs/cluster_prep.md)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="--engine ray: the Ray cluster to join ('auto': the one this node belongs to; default: start a local one)",
    )
    parser.add_argument(
        "--ray-gpus-per-worker",
        type=float,
        default=None,
        help="--engine ray: GPUs each worker reserves (default 1 with --device cuda, else 0; 0.25 puts "
        "four workers on a GPU)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="K/N: prepare only shard K of N of the conversations (a job array runs K = 0..N-1 into one "
        "--out; the last to finish merges prep_summary.json)",
    )
    parser.add_argument(
        "--merge-summaries",
        action="store_true",
        help="only join the prep_summary.shard-K-of-N.json files of --out into prep_summary.json",
    )
    parser.add_argument(
        "--stages", default=CORE_STAGE, help=f"comma-separated subset of {','.join([CORE_STAGE, *CACHE_STAGES])}"
    )
    parser.add_argument("--size", type=int, default=512, help="side of the square crops, a multiple of 16")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--min-clip-seconds", type=float, default=1.0, help="shortest kept last clip")
    parser.add_argument("--crop-scale", type=float, default=CROP_SCALE, help="crop side / larger face-box side")
    parser.add_argument(
        "--smooth-half-life",
        type=float,
        default=SMOOTH_HALF_LIFE,
        help="half-life in frames of the causal crop-box smoothing (echo.framing; 0 = none)",
    )
    parser.add_argument("--face-backend", default="mediapipe", choices=list(FACE_BACKENDS))
    parser.add_argument("--min-face-ratio", type=float, default=0.5, help="fail below this fraction of face frames")
    parser.add_argument("--av-tolerance", type=float, default=0.1, help="seconds audio may fall short of video")
    parser.add_argument("--asr-model", default=None, help="Whisper folder for conversations without transcripts")
    parser.add_argument("--vae", default=None, help="AutoencoderKLWan folder (stage 'user_tokens')")
    parser.add_argument("--omni-model", default=None, help="Qwen-Omni folder (stage 'omni')")
    parser.add_argument("--emotion-model", default=None, help="causal LM folder or http(s) endpoint (stage 'emotion')")
    parser.add_argument("--emotion-served-model", default="default", help="model name at the --emotion-model endpoint")
    parser.add_argument(
        "--text-encoder",
        default=None,
        help="T5/UMT5 encoder folder, or a pipeline folder with text_encoder/ (stage 'emotion_embeds')",
    )
    parser.add_argument(
        "--text-encoder-dtype",
        default="float32",
        choices=list(TEXT_ENCODER_DTYPES),
        help="dtype of the text encoder and of the cached embeddings (default: %(default)s)",
    )
    parser.add_argument(
        "--default-emotion",
        default="neutral",
        help="training's data.default_emotion, also cached by 'emotion_embeds' (default: %(default)s)",
    )
    parser.add_argument(
        "--user-video-size",
        type=int,
        default=64,
        help="training's data.user_video_size, for stage 'user_tokens' (default: %(default)s)",
    )
    parser.add_argument(
        "--omni-stride",
        type=int,
        default=DEFAULT_OMNI_STRIDE,
        help="frames between the understanding entries of stage 'omni', each Φ of the user's media "
        "from the conversation's start to its end frame (default: %(default)s); saved with the "
        "model trained on it as understanding_stride",
    )
    parser.add_argument(
        "--emotion-stride",
        type=int,
        default=DEFAULT_EMOTION_STRIDE,
        help="frames between the emotion texts of stage 'emotion', each reasoned on the dialogue up to "
        "its end frame (default: %(default)s); saved with the model as emotion_stride",
    )
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
        smooth_half_life=args.smooth_half_life,
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
        emotion_stride=args.emotion_stride,
        device=args.device,
        threads=args.threads,
    )


def _terminated(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C, so `run_prep` terminates its workers and releases the lock."""
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge_summaries:
        try:
            merged = cluster.merge_summaries(args.out)
            write_atomic_text(Path(args.out) / SUMMARY, json.dumps(merged, indent=1))
        except (OSError, ValueError) as error:
            print(f"echo-prep: error: {error}", file=sys.stderr)
            return 2
        print(format_summary(PrepSummary(**{k: v for k, v in merged.items() if k != "shards"})))
        return 1 if merged["failed"] else 0
    # 1. Options wrong for every clip: one error, before anything is read.
    for name in ("input", "layout"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (unless --merge-summaries).")
    if not Path(args.input).is_dir():
        state = "is not a folder" if Path(args.input).exists() else "does not exist"
        parser.error(f"--input {args.input!r} {state}: pass the folder of conversations. Nothing was written to --out.")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers is {args.workers}, expected a positive number of processes (1 runs inline).")
    try:
        options = options_from_args(args)
        shard = None if args.shard is None else cluster.parse_shard(args.shard)
    except ValueError as error:
        parser.error(str(error))
    if args.shard is not None and args.overwrite:
        parser.error(
            "--overwrite deletes every prepared clip of --out, other shards' too: run it once without "
            "--shard (or delete the folder), then run the shards."
        )
    if args.engine == "local" and (args.address is not None or args.ray_gpus_per_worker is not None):
        parser.error("--address and --ray-gpus-per-worker apply to --engine ray.")
    # 2. The run; SIGTERM unwinds it (workers terminated, lock released) instead of killing it where it stands.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        summary = run_prep(
            args.input,
            args.layout,
            args.out,
            options,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            engine=args.engine,
            shard=shard,
            address=args.address,
            gpus_per_worker=args.ray_gpus_per_worker,
        )
    except (OutputLocked, OptionsMismatch, clip_format.ClipFormatError, ImportError) as error:
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
