"""``echo-render``: render many conversations with a saved `EchoPipeline`.

```
echo-render --pipeline DIR --manifest conversations.jsonl --out DIR [--height H --width W --steps N ...]
```

Resolution, chunk length, motion frames, user video size and sampling options default to the settings saved with the
model (`EchoPipeline.settings`, i.e. what it was trained with); an option given on the command line overrides them.
The scheduler is the one saved with the model (``scheduler/scheduler_config.json``); ``--scheduler`` and ``--shift``
sample with another flow scheduler (FlowMatchEuler, UniPC in flow mode) or time shift instead.

The manifest holds one JSON object per line:

```json
{"id": "conv_001", "reference_image": "ref.png", "avatar_audio": "avatar.wav", "user_video": "user.mp4",
 "user_audio": "user.wav", "dialogue": [{"speaker": "user", "start": 0.0, "end": 1.2, "text": "..."}],
 "emotion": "calm and attentive", "num_frames": 250}
```

``user_video`` and ``user_audio`` (the user's side) are required when the model reads them (its pipeline has a
``context_encoder``, the LCU of a stage-2 export) and may be left out for a model without the user branch (a stage-1
export renders from the reference image and the avatar's audio alone). ``dialogue``, ``emotion`` and ``num_frames``
are optional, and so are ``understanding`` (a ``.safetensors`` file with a
``hidden_states`` tensor, the cached HBCU tokens of data preparation), ``reference_landmarks`` (``.npy`` `(478, 2)`,
pixels of the reference image) and ``user_landmarks`` (``.npy`` `(T, 478, 2)`, pixels of the user's frames); without
landmarks MediaPipe detects them. The reference image and the user's video are framed as echo-prep frames the
training crops (`EchoPipeline`'s ``frame_inputs``); an entry whose inputs already are echo-prep head crops (a prepared
clip's frames, the demo's example) says ``"frame_inputs": false``. Relative paths are relative to the manifest's folder. ``--understanding-model``
computes the understanding tokens of entries without a file, ``--emotion-backend`` reasons the emotion of entries
without one from their dialogue (`echo.EmotionReasoner`).

Behaviour:

- every option is checked before any clip renders: its value as it is parsed (``--steps 0``, a negative guidance
  scale), what depends on the model (``--height 70`` with 16-pixel tokens, a chunk length other than ``4k + 1``) once
  the model is loaded; an invalid option is one error (exit code 2), not one failure per clip;
- every clip is written to ``<out>/<id>.mp4`` (H.264 + the avatar's audio; ``--side-by-side`` adds the user's video on
  the left when the entry has one), through a temporary file and an atomic rename, so a file under its final name is
  always complete;
- ids are sanitised: any character outside ``[A-Za-z0-9._-]`` becomes ``_`` and leading dots are dropped, so no id
  (``"../x"``, ``"/etc/passwd"``, ``"a/b"``) can write outside ``--out``; two entries that sanitise to the same id
  fail the second one;
- ``<out>/render_options.json`` records the options and the clips rendered with them: clips it lists are skipped, so
  a rerun renders only what is missing; another ``<id>.mp4`` (a user's own video, a folder) is never taken as done
  nor deleted (that clip fails, naming it), and ``--overwrite`` deletes only the listed clips;
- a clip that fails (missing file, bad entry, model error) is recorded in ``<out>/failures.jsonl`` (``id``,
  ``error``, ``traceback``; rewritten each run) and the others continue; the exit code is 1 when any clip failed;
  when ``failures.jsonl`` cannot be written (disk full), the failures are printed instead;
- ``<out>/.echo-render.lock`` names the running process (the lock of `echo.locking`, as echo-prep's): a second run
  into the same folder while one is live is refused, naming it; a lock left by a killed run is taken over;
- a progress bar with an ETA runs over the clips and a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from echo import locking
from echo.atomic import atomic_write
from echo.audio import SAMPLE_RATE
from echo.clip_format import write_json
from echo.emotion import EmotionReasoner
from echo.flow_matching import FLOW_SCHEDULERS, flow_scheduler, scheduler_shift
from echo.understanding import OmniUnderstanding

from .inputs import check_int, check_scale
from .pipeline_echo import EchoPipeline
from .video_io import load_image, load_wav, read_frames, write_mp4

TOOL = "echo-render"  # names the output folder's lock, .echo-render.lock (`echo.locking`)
REQUIRED_KEYS = ("id", "reference_image", "avatar_audio")
USER_KEYS = ("user_video", "user_audio")  # required too when the model reads the user's side (it has an LCU)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def sanitize_id(clip_id) -> str:
    """A file-name-safe id: characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots are dropped.

    Raises:
        ValueError: when nothing usable remains (e.g. ``""`` or ``".."``).
    """
    if not isinstance(clip_id, (str, int)):
        raise ValueError(f"`id` is a {type(clip_id).__name__}, expected a string.")
    safe = _SAFE.sub("_", str(clip_id)).lstrip(".")
    if not safe.strip("_"):
        raise ValueError(f"`id` {clip_id!r} has no usable characters after sanitising.")
    return safe[:200]


def output_path(out_dir: Path, clip_id) -> Path:
    """``<out_dir>/<sanitised id>.mp4``, checked to lie inside ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    path = (out_dir / f"{sanitize_id(clip_id)}.mp4").resolve()
    if path.parent != out_dir:
        raise ValueError(f"`id` {clip_id!r} resolves to {str(path)!r}, outside the output folder {str(out_dir)!r}.")
    return path


def read_manifest(path: str | os.PathLike) -> list[tuple[int, dict | None, str | None]]:
    """``(line_number, entry, error)`` per non-empty line; ``entry`` is None when the line is not a JSON object."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                rows.append((number, None, f"line {number} is not valid JSON: {error}"))
                continue
            if not isinstance(entry, dict):
                rows.append((number, None, f"line {number} holds a {type(entry).__name__}, expected a JSON object"))
                continue
            rows.append((number, entry, None))
    return rows


def _load_array(path: Path) -> np.ndarray:
    """A manifest's ``.npy`` array (plain numbers only: an object array, whose loading could run code, is refused)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a readable numeric .npy array ({error}).") from error


def _resolve(base: Path, value) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def _input_file(base: Path, entry: dict, key: str) -> Path:
    """The file of ``entry[key]``, checked to be a regular file: reading a FIFO or a device would block the batch."""
    path = _resolve(base, entry[key])
    if not path.exists():
        raise FileNotFoundError(f"`{key}` {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValueError(f"`{key}` {str(path)!r} is not a regular file (a folder, FIFO or device); name a file.")
    return path


def read_entry(entry: dict, base: Path, with_user: bool = True) -> dict:
    """The files and fields of one manifest entry as `EchoPipeline` arguments: ``reference_image``, ``avatar_audio``,
    ``user_audio``, ``user_video``, ``dialogue``, ``emotion``, ``num_frames`` and, when the entry has them,
    ``understanding``, ``reference_landmarks``, ``user_landmarks``, ``frame_inputs``.

    ``with_user`` (defaults to `True`): whether the model reads the user's side (`EchoPipeline.context_encoder` is
    not `None`); then ``user_video`` and ``user_audio`` are required, otherwise they are read when the entry has them
    and left out when it has not."""
    from safetensors.torch import load_file

    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise ValueError(f"entry is missing keys {missing}; required: {list(REQUIRED_KEYS)}")
    missing_user = [key for key in USER_KEYS if key not in entry]
    if with_user and missing_user:
        raise ValueError(
            f"entry is missing {', '.join(f'`{key}`' for key in missing_user)}: this model reads the user's side of "
            "the conversation (its pipeline has a context_encoder, the LCU of a stage-2 model). Add the user's video "
            "and audio files to the entry as `user_video` and `user_audio`, or render with a model without the user "
            "branch (a stage-1 export)."
        )
    kwargs = {
        "reference_image": load_image(_input_file(base, entry, "reference_image")),
        "avatar_audio": load_wav(_input_file(base, entry, "avatar_audio")),
        "dialogue": entry.get("dialogue"),
        "emotion": entry.get("emotion"),
        "sampling_rate": SAMPLE_RATE,  # load_wav reads every file at the model's rate
    }
    if "user_audio" in entry:
        kwargs["user_audio"] = load_wav(_input_file(base, entry, "user_audio"))
    if "user_video" in entry:
        kwargs["user_video"] = read_frames(_input_file(base, entry, "user_video"))
    if "understanding" in entry:
        tensors = load_file(str(_input_file(base, entry, "understanding")))
        if "hidden_states" not in tensors:
            raise KeyError(f"{entry['understanding']!r} has no 'hidden_states' tensor")
        hidden = tensors["hidden_states"].float()
        kwargs["understanding"] = hidden.reshape(-1, hidden.shape[-1])
    if "reference_landmarks" in entry:  # pixels of the reference image, as the pipeline takes them
        kwargs["reference_landmarks"] = _load_array(_input_file(base, entry, "reference_landmarks")).astype(np.float32)
    if "user_landmarks" in entry:
        kwargs["user_landmarks"] = _load_array(_input_file(base, entry, "user_landmarks"))
    if "frame_inputs" in entry:  # false: the inputs already are head crops
        if not isinstance(entry["frame_inputs"], bool):
            raise ValueError(f"`frame_inputs` is {entry['frame_inputs']!r}, expected true or false")
        kwargs["frame_inputs"] = entry["frame_inputs"]
    num_frames = entry.get("num_frames")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"`num_frames` is {num_frames!r}, expected a positive integer")
    kwargs["num_frames"] = num_frames
    return kwargs


def render_entry(
    pipe, entry: dict, base: Path, out_path: Path, args: argparse.Namespace, helpers: dict | None = None
) -> int:
    """Render one manifest entry to ``out_path`` (atomically). Returns the number of frames written.

    ``helpers`` holds optional pipeline arguments shared by all entries (``understanding_model``,
    ``emotion_reasoner``)."""
    inputs = read_entry(entry, base, with_user=getattr(pipe, "context_encoder", None) is not None)  # stage 2: LCU
    output = pipe(
        **inputs,
        **model_options(args),
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
        **(helpers or {}),
    )
    frames = output.frames[0]
    user_frames = inputs.get("user_video") if args.side_by_side else None  # none: the avatar alone
    write_atomically(out_path, frames, inputs["avatar_audio"], user_frames)
    return len(frames)


def write_atomically(out_path: Path, frames: np.ndarray, audio: np.ndarray, user_frames: np.ndarray | None = None):
    """``write_mp4`` through a temporary file and an atomic rename: a file under its final name is complete."""
    with atomic_write(out_path, keep_suffix=True) as tmp_path:  # `.<stem>.<pid>.tmp.mp4`: the format by its suffix
        write_mp4(tmp_path, frames, audio=audio, user_frames=user_frames)


def render_manifest(
    pipe,
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    args: argparse.Namespace,
    helpers: dict | None = None,
) -> dict:
    """Render every entry of ``manifest`` into ``out_dir``; returns the summary dict (see `main`). The options are
    checked against the model first (`check_model_options`): options no clip could render with are one error, before
    any clip. ``out_dir`` is locked for the run (``.echo-render.lock``, `echo.locking`): a second run into it while
    this one lives is refused (`echo.locking.OutputLocked`, naming this run's process)."""
    check_model_options(pipe, args)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = locking.acquire_lock(out_dir, TOOL)
    except OSError as error:  # an unwritable --out, or a file in its place
        raise ValueError(
            f"--out {str(out_dir)!r} cannot be written ({error.strerror or error}); choose another folder."
        ) from error
    heartbeat = locking.start_heartbeat(lock)
    try:
        return _render_locked(pipe, manifest, out_dir, args, helpers)
    finally:
        heartbeat.set()
        locking.release_lock(lock)


def _render_locked(pipe, manifest: str | os.PathLike, out_dir: Path, args: argparse.Namespace, helpers: dict | None):
    """`render_manifest`'s work, under the lock of ``out_dir``."""
    options = render_options(pipe, args)
    try:
        own = record_options(out_dir, options, overwrite=getattr(args, "overwrite", False))
    except OSError as error:  # an unwritable --out
        raise ValueError(
            f"--out {str(out_dir)!r} cannot be written ({error.strerror or error}); choose another folder."
        ) from error
    base = Path(manifest).resolve().parent
    rows = read_manifest(manifest)
    summary = {"rendered": [], "skipped": [], "failed": [], "frames": 0, "seconds": 0.0}
    failures = []
    seen = set()
    start_time = time.perf_counter()
    bar = tqdm(rows, desc="echo-render", unit="clip", dynamic_ncols=True)
    for number, entry, error in bar:
        clip_id = entry.get("id", f"line{number}") if entry is not None else f"line{number}"
        try:
            if error is not None:
                raise ValueError(error)
            out_path = output_path(out_dir, clip_id)
            if out_path.name in seen:
                raise ValueError(f"`id` {clip_id!r} sanitises to {out_path.stem!r}, already used by an earlier entry")
            seen.add(out_path.name)
            if out_path.name in own and out_path.is_file():
                summary["skipped"].append(out_path.stem)
                continue
            if out_path.exists() or out_path.is_symlink():
                raise FileExistsError(
                    f"{str(out_path)!r} exists and is not a clip echo-render recorded as its own in {OPTIONS_FILE} "
                    f"(a {'folder' if out_path.is_dir() else 'file'} of yours?): it is left as it is. Move it away, or "
                    "render into another --out folder."
                )
            bar.set_postfix_str(out_path.stem)
            summary["frames"] += render_entry(pipe, entry, base, out_path, args, helpers)
            own.add(out_path.name)
            write_record(out_dir, options, own)
            summary["rendered"].append(out_path.stem)
        except Exception as exc:  # one clip's failure is recorded; the others still render
            failures.append(
                {
                    "id": str(clip_id),
                    "line": number,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            )
            summary["failed"].append(str(clip_id))
            tqdm.write(f"echo-render: {clip_id!r} failed: {type(exc).__name__}: {exc}")
    bar.close()
    summary["failures_file"] = write_failures(out_dir / FAILURES_FILE, failures)
    summary["seconds"] = time.perf_counter() - start_time
    return summary


FAILURES_FILE = "failures.jsonl"


def write_failures(path: Path, failures: list[dict]) -> Path | None:
    """Write the failure records to ``path`` (atomically: the previous file stays until the new one is complete).
    When that fails (disk full, folder gone), print every record to stderr with the reason instead, so that no failure
    goes unrecorded, and return `None`."""
    try:
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            for failure in failures:
                f.write(json.dumps(failure) + "\n")
        return path
    except OSError as error:
        print(
            f"echo-render: could not write {str(path)!r} ({error.strerror or error}); the failures are:",
            file=sys.stderr,
        )
        for failure in failures:
            print(
                f"echo-render: failed {failure['id']!r} (manifest line {failure['line']}): {failure['error']}",
                file=sys.stderr,
            )
        return None


OPTIONS_FILE = "render_options.json"


def render_options(pipe, args: argparse.Namespace) -> dict:
    """What shapes the rendered clips: the model (its folder and settings), the effective rendering settings (the
    model's, overridden by the options), the scheduler and its shift, the seed and the layout; recorded in
    ``<out>/render_options.json``."""
    settings, height, width = pipe.resolve_settings(**model_options(args))
    return {
        "pipeline": str(Path(args.pipeline).resolve()) if getattr(args, "pipeline", None) else None,
        "model_settings": pipe.settings.to_dict(),
        "height": height,
        "width": width,
        "num_inference_steps": settings.num_inference_steps,
        "audio_guidance_scale": settings.audio_guidance_scale,
        "user_guidance_scale": settings.user_guidance_scale,
        "num_frames_per_chunk": settings.num_frames_per_chunk,
        "motion_frames": settings.motion_frames,
        "user_video_size": settings.user_video_size,
        "scheduler": type(pipe.scheduler).__name__,
        "shift": scheduler_shift(pipe.scheduler),
        "seed": args.seed,
        "side_by_side": bool(getattr(args, "side_by_side", False)),
    }


def record_options(out_dir: Path, options: dict, overwrite: bool = False) -> set[str]:
    """Compare ``options`` with those recorded in ``out_dir`` by an earlier run: a rerun with the same options resumes
    (finished clips are skipped), one with other options is refused naming them (clips of two settings never mix),
    unless ``overwrite``, which deletes the earlier clips first. A folder of clips without a record is refused too.

    The record (``render_options.json``) also lists the clips echo-render wrote (``clips``); ``overwrite`` deletes
    those only, never another ``*.mp4`` of the folder (a user's own video), and only they count as done.

    Returns:
        the file names of the clips rendered with ``options`` so far (empty after ``overwrite``).
    """
    path = out_dir / OPTIONS_FILE
    clips = sorted(p for p in out_dir.glob("*.mp4") if p.is_file())
    own: set[str] = set()
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
            if not isinstance(recorded, dict):
                raise ValueError(f"it holds a {type(recorded).__name__}, expected a JSON object")
        except ValueError as error:
            raise ValueError(
                f"{str(path)!r} is not valid JSON ({error}); delete it with the clips, or pass --overwrite."
            ) from error
        changed = {k: (recorded.get(k), v) for k, v in options.items() if recorded.get(k) != v}
        listed = recorded.get("clips")
        # a record of an older echo-render lists no clips: those of the folder are its own
        own = {p.name for p in clips} if listed is None else {name for name in listed if isinstance(name, str)}
    else:
        changed = {"(no record)": (None, "this run")} if clips else {}
    if changed and not overwrite:
        details = "; ".join(f"{k}: earlier {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{str(out_dir)!r} holds {len(clips)} clips rendered with other options ({details}). Render into a new "
            "--out folder, or pass --overwrite to delete those clips and render again."
        )
    if changed and overwrite:
        for clip in clips:
            if clip.name in own:
                clip.unlink()
        own = set()
    write_record(out_dir, options, own)
    return own


def write_record(out_dir: Path, options: dict, clips: set[str]) -> None:
    """``render_options.json``: the options and the clips rendered with them, written atomically."""
    write_json(out_dir / OPTIONS_FILE, {**options, "clips": sorted(clips)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echo-render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="folder of a saved EchoPipeline (save_pretrained)")
    parser.add_argument("--manifest", required=True, help="JSON-lines manifest, one conversation per line")
    parser.add_argument("--out", required=True, help="output folder for <id>.mp4 and failures.jsonl")
    parser.add_argument("--side-by-side", action="store_true", help="show the user's video left of the avatar")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete clips an earlier run rendered into --out with other options (otherwise such a rerun is refused)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        choices=FLOW_SCHEDULERS,
        help="sample with this scheduler instead of the model's (its shift kept unless --shift)",
    )
    parser.add_argument(
        "--shift",
        type=flow_shift,
        default=None,
        help=f"the scheduler's flow time shift, in (0, {MAX_SHIFT:g}] (default: the model's)",
    )
    return add_model_arguments(parser)


def _parsed(text: str, parse, check, accepts: str):
    """An option's value: ``parse(text)`` checked by a `pipelines.inputs` rule, or the argparse error naming it."""
    try:
        return check(parse(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`pipelines.inputs.check_int`)."""
    return _parsed(text, int, lambda value: check_int(value, "option", 1), "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (`pipelines.inputs.check_int`)."""
    return _parsed(text, int, lambda value: check_int(value, "option", 0), "an integer >= 0")


def guidance_scale(text: str) -> float:
    """argparse type: a finite number >= 0 (`pipelines.inputs.check_scale`)."""
    return _parsed(text, float, lambda value: check_scale(value, "option"), "a finite number >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (e.g. echo-live's ``--speed``)."""

    def check(value: float) -> float:
        if not check_scale(value, "option") > 0:
            raise ValueError(value)
        return value

    return _parsed(text, float, check, "a finite number > 0")


# Flow time shifts past this put every σ of a schedule at 1 to float precision (sampling then fails); Wan uses 3-17.
MAX_SHIFT = 1000.0


def flow_shift(text: str) -> float:
    """argparse type: a flow time shift, a finite number in ``(0, MAX_SHIFT]``."""

    def check(value: float) -> float:
        if not 0 < check_scale(value, "option") <= MAX_SHIFT:
            raise ValueError(value)
        return value

    return _parsed(text, float, check, f"a number in (0, {MAX_SHIFT:g}]")


# The model options: their `EchoPipeline` argument and command-line name.
MODEL_OPTIONS = {
    "height": "--height",
    "width": "--width",
    "num_inference_steps": "--steps",
    "audio_guidance_scale": "--audio-guidance-scale",
    "user_guidance_scale": "--user-guidance-scale",
    "num_frames_per_chunk": "--frames-per-chunk",
    "motion_frames": "--motion-frames",
    "user_video_size": "--user-video-size",
}


def model_options(args: argparse.Namespace) -> dict:
    """The model options as `EchoPipeline` arguments (`None`: the model's saved setting)."""
    values = {
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "audio_guidance_scale": args.audio_guidance_scale,
        "user_guidance_scale": args.user_guidance_scale,
        "num_frames_per_chunk": args.frames_per_chunk,
        "motion_frames": args.motion_frames,
        "user_video_size": args.user_video_size,
    }
    assert values.keys() == MODEL_OPTIONS.keys()
    return values


def check_model_options(pipe, args: argparse.Namespace) -> None:
    """Checks the model options against the loaded model once, before any clip (the checks every clip would fail
    alike: size not a multiple of the token unit, chunk length not ``4k + 1``, ...): a `ValueError` naming the
    options, from `EchoPipeline.resolve_settings` (the checks of the Python API)."""
    try:
        pipe.resolve_settings(**model_options(args))
    except ValueError as error:
        message = str(error)
        for name, option in MODEL_OPTIONS.items():
            message = message.replace(f"`{name}`", f"`{option}`")
        raise ValueError(message) from error


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options echo-render and echo-live share: rendering settings, device, helpers. Each value is checked as it
    is parsed (argparse types); what depends on the model (sizes in tokens, chunk lengths) by `check_model_options`
    once the model is loaded, before any clip."""
    # None = the setting saved with the model (what it was trained with), for every option of this group.
    parser.add_argument(
        "--height",
        type=positive_int,
        default=None,
        help="a multiple of the model's token size (default: the model's resolution)",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=None,
        help="a multiple of the model's token size (default: the model's resolution)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps per chunk, >= 1 (default: the model's)"
    )
    parser.add_argument("--audio-guidance-scale", type=guidance_scale, default=None, help=">= 0 (default: the model's)")
    parser.add_argument("--user-guidance-scale", type=guidance_scale, default=None, help=">= 0 (default: the model's)")
    parser.add_argument(
        "--frames-per-chunk",
        type=positive_int,
        default=None,
        help="4k + 1 frames per chunk (default: the model's training window)",
    )
    parser.add_argument(
        "--motion-frames",
        type=positive_int,
        default=None,
        help="4(m - 1) + 1 frames carried between chunks (default: the model's)",
    )
    parser.add_argument(
        "--user-video-size",
        type=positive_int,
        default=None,
        help="side of the user's frames read by the LCU, a multiple of 8 (default: the model's)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", default=None, help="defaults to cuda when available, else cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="defaults to bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload() (GPU memory saver)")
    parser.add_argument(
        "--understanding-model",
        default=None,
        help="Qwen-Omni folder computing the HBCU tokens of entries without an 'understanding' file",
    )
    parser.add_argument(
        "--emotion-backend",
        default=None,
        choices=["transformers", "openai"],
        help="reason the avatar's emotion from each entry's dialogue (entries without 'emotion')",
    )
    parser.add_argument("--emotion-model", default=None, help="local LM folder, or the served model name")
    parser.add_argument(
        "--emotion-base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    return parser


def build_helpers(args: argparse.Namespace) -> dict:
    """The optional understanding model and emotion reasoner named on the command line, as pipeline arguments."""
    helpers = {}
    if getattr(args, "understanding_model", None):
        helpers["understanding_model"] = OmniUnderstanding.from_pretrained(args.understanding_model)
    if getattr(args, "emotion_backend", None):
        helpers["emotion_reasoner"] = EmotionReasoner(
            backend=args.emotion_backend, model=args.emotion_model, base_url=args.emotion_base_url
        )
    return helpers


def load_pipeline(
    folder: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    cpu_offload: bool = False,
    scheduler: str | None = None,
    shift: float | None = None,
):
    """Load a saved `EchoPipeline` onto ``device`` in ``dtype`` (defaults: cuda + bfloat16 when available). It samples
    with the scheduler saved with it, or with ``scheduler`` (a class of `echo.flow_matching.FLOW_SCHEDULERS`) and / or
    the time ``shift`` (`echo.flow_matching.flow_scheduler`: from the saved scheduler's config, diffusers' way)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    pipe = EchoPipeline.from_pretrained(folder, dtype=getattr(torch, dtype), use_safetensors=True)
    if scheduler is not None or shift is not None:
        pipe.scheduler = flow_scheduler(scheduler or type(pipe.scheduler).__name__, pipe.scheduler, shift)
    sampled_shift = scheduler_shift(pipe.scheduler)
    if not 0 < sampled_shift <= MAX_SHIFT:  # NaN fails too
        raise ValueError(
            f"the scheduler of {str(folder)!r} samples with the time shift {sampled_shift:g} "
            f"(scheduler/scheduler_config.json), expected a number in (0, {MAX_SHIFT:g}]; pass --shift to override it."
        )
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pipe = load_pipeline(args.pipeline, args.device, args.dtype, args.cpu_offload, args.scheduler, args.shift)
        check_model_options(pipe, args)
    except ValueError as error:
        parser.error(str(error))  # once, before any clip (exit code 2)
    try:
        summary = render_manifest(pipe, args.manifest, args.out, args, build_helpers(args))
    except (ValueError, locking.OutputLocked) as error:  # refused up front (before any clip): options, a live run
        parser.error(str(error))
    video_seconds = summary["frames"] / 25.0
    print(
        f"echo-render: {len(summary['rendered'])} rendered, {len(summary['skipped'])} skipped (already done), "
        f"{len(summary['failed'])} failed in {summary['seconds']:.1f} s ({video_seconds:.1f} s of video) -> {args.out}"
    )
    if summary["failed"] and summary["failures_file"] is not None:
        print(f"echo-render: failures recorded in {summary['failures_file']}: {', '.join(summary['failed'])}")
    elif summary["failed"]:
        print(f"echo-render: failed (not recorded, see above): {', '.join(summary['failed'])}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
