"""``echo-eval``: score generated avatar videos against the ground truth the way the ECHO paper does (Table 1).

    echo-eval --generated DIR --reference DIR [--user DIR] [--weights DIR] [--out report.json] [--markdown PATH]

Clip matching: ``*.mp4`` files are matched by file name between ``--generated`` and ``--reference`` (and ``--user``
when given). Names present on one side only are skipped with a warning that lists them; an empty or missing folder,
or no common name at all, is an error. A clip whose generated and reference lengths differ fails with a reason naming
both lengths (``--length-mismatch truncate`` trims both to the shorter one instead; the user clip is trimmed likewise).
Generated and ground-truth videos of different resolutions are refused before anything is scored, naming each clip
and both sizes (``--resize-generated`` resizes the generated frames to the ground truth's instead, with a warning).
Clips of different frame rates (generated, ground truth, and the user's with ``--user``) are refused likewise, naming
each clip and both rates: the metrics compare frame with frame, so resample the generated clips to the ground truth's
rate first (e.g. ``ffmpeg -i clip.mp4 -r 25 out.mp4``).

A clip that cannot be scored (an unreadable video, no face found, missing motion coefficients) is reported with its
reason, in the JSON (``"failed"``) and under the Markdown table, and left out of every metric; the other clips are
scored. A run in which no clip can be scored is an error listing the reasons.

Motion (rPCC, SID, Var, and FD / MSE in the JSON): with ``--motion-source mediapipe`` (default) coefficients come
from `MediaPipeMotionExtractor` (pose = yaw, pitch, roll, translation; expression = landmark offsets reduced by a PCA
fitted on the ground-truth frames, ``--expression-components``); with ``--motion-source files`` each folder holds a
``<clip>.npz`` (``expression``/``exp``/``expcode`` and ``pose``/``posecode``) or ``<clip>.npy`` (T × 56, FLAME
expression then pose) computed elsewhere (EMOCA, as in the paper). SID fits k-means on the ground-truth frames
(k = 15 expression, 9 pose). The Markdown table reports the **expression** values of rPCC, SID and Var (the JSON
holds expression and pose).

Video metrics need ``--weights DIR`` with the converted feature networks (see `echo.metrics.networks`): FID
(``inception``), FVD (``i3d``), CSIM (``arcface``; generated frames against the first ground-truth frame, or
``--reference-images DIR/<clip>.png``), LSE-D / LSE-C (``syncnet``; the audio track of the generated mp4, or
``--audio DIR/<clip>.wav``). A column that cannot be computed is written ``n/a`` and the reason is listed under the
table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch

from echo.atomic import write_text_atomic
from echo.media import read_audio
from echo.metrics import behaviour
from echo.metrics import motion as motion_metrics
from echo.metrics import video as video_metrics
from echo.metrics.extractor import FlameCoefficientAdapter, LandmarkPCA, MediaPipeMotionExtractor, MotionCoefficients
from echo.metrics.networks import load_feature_network

logger = logging.getLogger("echo.metrics")

TABLE_COLUMNS = ("rPCC", "SID", "Var", "FID", "FVD", "CSIM", "LSE-D", "LSE-C")
LOWER_IS_BETTER = {"rPCC", "FID", "FVD", "LSE-D"}


def list_clips(folder: str, name: str) -> dict[str, str]:
    """``{clip name (stem): path}`` of the ``*.mp4`` files of ``folder``; errors on a missing or empty folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--{name} folder {folder} does not exist.")
    clips = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".mp4")}
    if not clips:
        raise ValueError(f"--{name} folder {folder} holds no .mp4 clip.")
    return clips


def match_clips(generated: dict[str, str], reference: dict[str, str], user: dict[str, str] | None = None) -> list[str]:
    """Names common to all given sets (sorted). Unmatched names are skipped with a warning; none in common errors."""
    names = set(generated) & set(reference)
    if user is not None:
        names &= set(user)
    sets = {"generated": generated, "reference": reference, **({"user": user} if user is not None else {})}
    for label, clips in sets.items():
        skipped = sorted(set(clips) - names)
        if skipped:
            logger.warning("skipping %d %s clip(s) without a match: %s", len(skipped), label, ", ".join(skipped))
    if not names:
        raise ValueError(
            f"no clip name is common to the folders ({', '.join(f'{k}: {sorted(v)[:5]}' for k, v in sets.items())}); "
            "clips are matched by file name."
        )
    return sorted(names)


def _check_lengths(name: str, clips: dict[str, np.ndarray | None], mode: str) -> dict[str, np.ndarray | None]:
    lengths = {k: len(v) for k, v in clips.items() if v is not None}
    if len(set(lengths.values())) <= 1:
        return clips
    if mode == "error":
        raise ValueError(
            f"clip {name!r} has different lengths {lengths} (frames); generate clips of the ground-truth length or "
            "pass --length-mismatch truncate."
        )
    n = min(lengths.values())
    logger.warning("clip %r: lengths %s differ, truncating to %d frames", name, lengths, n)
    return {k: (None if v is None else v[:n]) for k, v in clips.items()}


def _load_motion_file(folder: str, name: str, adapter: FlameCoefficientAdapter) -> MotionCoefficients:
    for ext in (".npz", ".npy"):
        path = os.path.join(folder, name + ext)
        if os.path.isfile(path):
            return adapter.load(path)
    raise FileNotFoundError(f"motion coefficients for clip {name!r} not found: expected {folder}/{name}.npz or .npy.")


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_table(
    table: dict[str, float | None],
    reasons: dict[str, str],
    method: str = "generated",
    failed: dict[str, str] | None = None,
) -> str:
    """Markdown table with Table 1's columns; ``n/a`` cells and the reason for each below the table, then the
    clips that could not be scored (``failed``: clip → reason)."""
    arrows = [f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}" for c in TABLE_COLUMNS]
    lines = ["| Method | " + " | ".join(arrows) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    lines.append(f"| {method} | " + " | ".join(_fmt(table.get(c)) for c in TABLE_COLUMNS) + " |")
    lines += ["", "rPCC, SID and Var are computed on the expression coefficients (pose values are in the JSON report)."]
    if reasons:
        lines.append("")
        lines += [f"- {c}: n/a — {reasons[c]}" for c in TABLE_COLUMNS if c in reasons]
    if failed:
        lines += ["", "Failed clips (left out of every metric):"] + [f"- {n}: {r}" for n, r in failed.items()]
    return "\n".join(lines) + "\n"


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class ClipSetError(ValueError):
    """The clip set as a whole cannot be scored (resolutions differ, or every clip failed): the run is refused."""


def _clip_errors() -> tuple[type[BaseException], ...]:
    """What makes one clip fail (reported, the others scored): unreadable files, no face, bad coefficient files."""
    import av

    return OSError, ValueError, KeyError, av.error.FFmpegError


def _failure_reason(name: str, error: BaseException) -> str:
    logger.warning("clip %r failed: %s", name, error)
    return f"{type(error).__name__}: {error}"


def _size_mismatch(name: str, generated: tuple[int, int], reference: tuple[int, int]) -> str:
    return (
        f"clip {name!r}: generated {generated[1]}×{generated[0]}, ground truth {reference[1]}×{reference[0]} "
        "(width×height)"
    )


def check_sizes(
    names: list[str], generated: dict[str, str], reference: dict[str, str], resize: bool, failed: dict[str, str]
) -> list[str]:
    """The clips of ``names`` whose generated and ground-truth videos open, after comparing their resolutions (read
    from the containers, nothing decoded).

    A clip whose files cannot be opened goes to ``failed`` (clip → reason). Different resolutions raise a
    `ClipSetError` naming every such clip and both sizes, unless ``resize`` (``--resize-generated``): then they are
    kept, with a warning, and the generated frames are resized when decoded.
    """
    kept, mismatched = [], []
    for name in names:
        try:
            sizes = video_metrics.video_size(generated[name]), video_metrics.video_size(reference[name])
        except _clip_errors() as error:
            failed[name] = _failure_reason(name, error)
            continue
        kept.append(name)
        if sizes[0] != sizes[1]:
            mismatched.append(_size_mismatch(name, *sizes))
    if mismatched and not resize:
        raise ClipSetError(
            f"generated and ground-truth videos differ in resolution: {'; '.join(mismatched)}. Generate at the "
            "ground-truth resolution, or pass --resize-generated to resize the generated frames to it."
        )
    if mismatched:
        logger.warning(
            "resizing the generated frames to the ground truth's resolution (--resize-generated): %s",
            "; ".join(mismatched),
        )
    return kept


def check_rates(names: list[str], clip_sets: dict[str, dict[str, str]], failed: dict[str, str]) -> list[str]:
    """The clips of ``names`` whose videos open, after comparing the frame rates of each clip's videos in
    ``clip_sets`` (label → clip → path; the ground truth's labelled ``"reference"``), read from the containers.

    A clip whose files cannot be opened goes to ``failed``. Different rates raise a `ClipSetError` naming every such
    clip and each rate: frame-by-frame metrics of a 50-fps clip against a 25-fps one compare different instants.
    """
    kept, mismatched = [], []
    for name in names:
        try:
            rates = {label: video_metrics.video_rate(clips[name]) for label, clips in clip_sets.items()}
        except _clip_errors() as error:
            failed[name] = _failure_reason(name, error)
            continue
        kept.append(name)
        if max(rates.values()) - min(rates.values()) > 1e-3:
            shown = ", ".join(
                f"{'ground truth' if label == 'reference' else label} {rate:g} fps" for label, rate in rates.items()
            )
            mismatched.append(f"clip {name!r}: {shown}")
    if mismatched:
        raise ClipSetError(
            f"the videos of a clip differ in frame rate: {'; '.join(mismatched)}. The metrics compare frame with "
            "frame: resample the generated clips to the ground truth's rate (e.g. `ffmpeg -i clip.mp4 -r 25 "
            "out.mp4`) or render them at it (echo-render writes 25 fps)."
        )
    return kept


def _match_size(name: str, gen: np.ndarray, ref: np.ndarray, resize: bool) -> np.ndarray:
    """The generated frames at the ground truth's resolution (resized when ``resize``), else a `ClipSetError`."""
    if gen.shape[1:3] == ref.shape[1:3]:
        return gen
    if not resize:
        mismatch = _size_mismatch(name, gen.shape[1:3], ref.shape[1:3])
        raise ClipSetError(f"{mismatch}; generate at the ground-truth resolution or pass --resize-generated.")
    return video_metrics.resize_frames(gen, ref.shape[1:3])


def _all_failed(failed: dict[str, str]) -> ClipSetError:
    listed = "\n".join(f"- {name}: {reason}" for name, reason in failed.items())
    return ClipSetError(f"no clip could be scored:\n{listed}")


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns the report dict (also written to ``args.out`` / ``args.markdown``)."""
    from tqdm.auto import tqdm

    # 1. Match clips
    generated = list_clips(args.generated, "generated")
    reference = list_clips(args.reference, "reference")
    user = list_clips(args.user, "user") if args.user else None
    names = match_clips(generated, reference, user)
    failed: dict[str, str] = {}
    names = check_sizes(names, generated, reference, args.resize_generated, failed)
    names = check_rates(
        names, {"generated": generated, "reference": reference, **({"user": user} if user else {})}, failed
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # 2. Feature networks (a missing file disables its metrics, with the reason)
    reasons: dict[str, str] = {}
    networks: dict[str, torch.nn.Module | None] = {}
    for net, columns in (
        ("inception", ["FID"]),
        ("i3d", ["FVD"]),
        ("arcface", ["CSIM"]),
        ("syncnet", ["LSE-D", "LSE-C"]),
    ):
        networks[net] = None
        if not args.weights:
            for c in columns:
                reasons[c] = f"no --weights folder given (needs {net}.safetensors)"
            continue
        try:
            networks[net] = load_feature_network(net, args.weights, device=device)
        except FileNotFoundError as err:
            for c in columns:
                reasons[c] = str(err)

    # 3. Per clip: decode, motion, per-clip video metrics and feature sets; frames are dropped after each clip. A
    #    clip that fails (unreadable, no face, bad coefficients) is reported and left out; the others are scored.
    extractor = MediaPipeMotionExtractor() if args.motion_source == "mediapipe" else None
    adapter = FlameCoefficientAdapter(args.expression_dims, args.pose_dims)
    per_clip: dict[str, dict] = {}
    motions: dict[str, dict[str, MotionCoefficients]] = {}
    features: dict[str, dict[str, list[np.ndarray]]] = {
        "inception": {"generated": [], "reference": []},
        "i3d": {"generated": [], "reference": []},
    }
    silent: list[str] = []
    for name in tqdm(names, desc="echo-eval: clips", disable=args.quiet):
        try:
            row, clip_motions, clip_features, has_audio = _score_clip(
                name, args, generated, reference, user, networks, extractor, adapter
            )
        except ClipSetError:
            raise
        except _clip_errors() as error:
            failed[name] = _failure_reason(name, error)
            continue
        # Only a clip scored in full enters the sets.
        per_clip[name], motions[name] = row, clip_motions
        for net, sets in clip_features.items():
            for label, feats in sets.items():
                features[net][label].append(feats)
        if not has_audio:
            silent.append(name)
    names = [name for name in names if name in per_clip]
    if not names:
        raise _all_failed(failed)

    # 4. Motion metrics (expression through a PCA fitted on the ground truth for the landmark route)
    parts = {}
    for part in ("expression", "pose"):
        seqs = {label: [getattr(motions[n][label], part) for n in names] for label in motions[names[0]]}
        if extractor is not None and part == "expression":
            pca = LandmarkPCA(args.expression_components).fit(np.concatenate(seqs["reference"]))
            seqs = {label: [pca.transform(s) for s in v] for label, v in seqs.items()}
        parts[part] = seqs

    aggregate: dict[str, float | None] = {}
    for part, seqs in parts.items():
        gen_seqs, ref_seqs = seqs["generated"], seqs["reference"]
        for i, name in enumerate(names):
            per_clip[name][f"mse_{part}"] = motion_metrics.mse(gen_seqs[i], ref_seqs[i])
            per_clip[name][f"var_{part}"] = motion_metrics.variance(gen_seqs[i])
            per_clip[name][f"var_{part}_ground_truth"] = motion_metrics.variance(ref_seqs[i])
            if "user" in seqs:
                per_clip[name][f"rpcc_{part}"] = motion_metrics.rpcc(gen_seqs[i], ref_seqs[i], seqs["user"][i])
        k = motion_metrics.SID_CLUSTERS[part]
        ref_frames = np.concatenate(ref_seqs)
        if len(ref_frames) >= k:
            centroids = motion_metrics.kmeans(ref_frames, k, n_init=args.kmeans_init, seed=args.seed)
            aggregate[f"sid_{part}"] = motion_metrics.sid(gen_seqs, centroids=centroids)
            aggregate[f"sid_{part}_ground_truth"] = motion_metrics.sid(ref_seqs, centroids=centroids)
        else:
            aggregate[f"sid_{part}"] = None
            reasons.setdefault(
                "SID", f"k-means with k={k} needs at least {k} ground-truth frames, got {len(ref_frames)}"
            )
        aggregate[f"fd_{part}"] = motion_metrics.frechet_distance(gen_seqs, ref_seqs)
        for key in (f"mse_{part}", f"var_{part}", f"var_{part}_ground_truth", f"rpcc_{part}"):
            aggregate[key] = _mean([per_clip[n].get(key) for n in names])
    if user is None:
        reasons["rPCC"] = "needs the user videos (--user DIR)"

    # 5. Set-level video metrics (a Fréchet distance needs at least 2 samples per set) and averages
    for net, column, key, unit in (
        ("inception", "FID", "fid", "frames"),
        ("i3d", "FVD", "fvd", f"{args.fvd_clip_length}-frame windows"),
    ):
        if networks[net] is None:
            continue
        gen_feats = np.concatenate(features[net]["generated"])
        ref_feats = np.concatenate(features[net]["reference"])
        if min(len(gen_feats), len(ref_feats)) < 2:
            reasons[column] = f"a Fréchet distance needs at least 2 samples per set, got {len(gen_feats)} {unit}"
        else:
            aggregate[key] = video_metrics.frechet_feature_distance(gen_feats, ref_feats)
    if networks["arcface"] is not None:
        aggregate["csim"] = _mean([per_clip[n]["csim"] for n in names])
    if networks["syncnet"] is not None:
        aggregate["lse_d"] = _mean([per_clip[n].get("lse_d") for n in names])
        aggregate["lse_c"] = _mean([per_clip[n].get("lse_c") for n in names])
        if silent:
            reason = f"no audio for clip(s) {', '.join(silent)} (mux the avatar audio into the mp4 or pass --audio)"
            if aggregate["lse_d"] is None:
                reasons["LSE-D"] = reasons["LSE-C"] = reason
            else:
                logger.warning("LSE averaged without %s", reason)

    # 6. Report
    table = {
        "rPCC": aggregate.get("rpcc_expression"),
        "SID": aggregate.get("sid_expression"),
        "Var": aggregate.get("var_expression"),
        "FID": aggregate.get("fid"),
        "FVD": aggregate.get("fvd"),
        "CSIM": aggregate.get("csim"),
        "LSE-D": aggregate.get("lse_d"),
        "LSE-C": aggregate.get("lse_c"),
    }
    reasons = {c: r for c, r in reasons.items() if table.get(c) is None}
    report = {
        "clips": per_clip,
        "aggregate": aggregate,
        "table": table,
        "unavailable": reasons,
        "failed": failed,
        "settings": {
            "generated": args.generated,
            "reference": args.reference,
            "user": args.user,
            "motion_source": args.motion_source,
            "length_mismatch": args.length_mismatch,
            "resize_generated": args.resize_generated,
            "num_clips": len(names) + len(failed),
            "num_scored": len(names),
        },
    }
    report["markdown"] = markdown_table(table, reasons, failed=failed)
    _write_report(report, args)
    return report


def _score_clip(name, args, generated, reference, user, networks, extractor, adapter):
    """Step 3 of `evaluate` for one clip: ``(row, motions, features, has_audio)``; raises on a clip that fails."""
    gen, fps = video_metrics.read_video(generated[name])
    ref, _ = video_metrics.read_video(reference[name])
    usr = video_metrics.read_video(user[name])[0] if user is not None else None
    gen = _match_size(name, gen, ref, args.resize_generated)
    checked = _check_lengths(name, {"generated": gen, "reference": ref, "user": usr}, args.length_mismatch)
    gen, ref, usr = checked["generated"], checked["reference"], checked["user"]
    row = {"num_frames": len(gen)}
    # 3a. Motion coefficients
    motions = {}
    sets = {"generated": (gen, args.generated), "reference": (ref, args.reference)}
    if usr is not None:
        sets["user"] = (usr, args.user)
    for label, (frames, folder) in sets.items():
        if extractor is not None:
            try:
                motions[label] = extractor(frames)
            except ValueError as err:
                raise ValueError(f"clip {name!r} ({label}): {err}") from err
            continue
        coeffs = _load_motion_file(folder, name, adapter)
        if len(coeffs) != len(gen) and not (args.length_mismatch == "truncate" and len(coeffs) > len(gen)):
            raise ValueError(
                f"clip {name!r}: the {label} motion coefficients have {len(coeffs)} frames, the videos {len(gen)}."
            )
        motions[label] = coeffs.truncate(len(gen))
    # 3b. Feature sets of FID (frames) and FVD (windows)
    features = {}
    if networks["inception"] is not None:
        features["inception"] = {
            label: video_metrics.image_features(networks["inception"], frames[:: args.frame_stride])
            for label, frames in (("generated", gen), ("reference", ref))
        }
    if networks["i3d"] is not None:
        features["i3d"] = {
            label: video_metrics.video_features(networks["i3d"], frames, args.fvd_clip_length)
            for label, frames in (("generated", gen), ("reference", ref))
        }
    # 3c. CSIM against the reference image, LSE with the avatar audio
    if networks["arcface"] is not None:
        if args.reference_images:
            ref_image = _load_image(os.path.join(args.reference_images, name + ".png"))
        else:
            ref_image = ref[0]
        row["csim"] = video_metrics.csim(networks["arcface"], gen, ref_image)
    has_audio = True
    if networks["syncnet"] is not None:
        audio_path = os.path.join(args.audio, name + ".wav") if args.audio else generated[name]
        audio = video_metrics.read_audio(audio_path) if os.path.isfile(audio_path) else None
        has_audio = audio is not None and len(audio) > 0
        if has_audio:
            row.update(video_metrics.lse(networks["syncnet"], gen, audio, fps=fps))
    return row, motions, features, has_audio


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a killed or failed write leaves the old file
    (or none), never a truncated one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)


def _write_report(report: dict, args: argparse.Namespace) -> None:
    if args.out:
        _write_atomic(args.out, json.dumps(report, indent=2))
    if args.markdown:
        _write_atomic(args.markdown, report["markdown"])


BEHAVIOUR_COLUMNS = (
    ("lip_sync_r", "lip sync r ↑"),
    ("listening_ratio", "listening ratio ↑"),
    ("face_rate", "face rate ↑"),
    ("psnr", "PSNR ↑"),
    ("ssim", "SSIM ↑"),
)


def behaviour_markdown(per_clip: dict[str, dict], aggregate: dict, failed: dict[str, str]) -> str:
    """Markdown table of the behaviour measures: one row per clip, then the mean; failed clips listed below."""
    header = "| clip | " + " | ".join(label for _, label in BEHAVIOUR_COLUMNS) + " |"
    lines = [header, "|---" * (len(BEHAVIOUR_COLUMNS) + 1) + "|"]
    for name, row in [*per_clip.items(), ("**mean**", aggregate)]:
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(key)) for key, _ in BEHAVIOUR_COLUMNS) + " |")
    long = {k: aggregate[k] for k in ("first_face_rate", "last_face_rate", "first_psnr", "last_psnr") if k in aggregate}
    if long:
        lines += ["", "Long video (first vs last window): " + ", ".join(f"{k} {v:.3f}" for k, v in long.items())]
    if failed:
        lines += ["", "Failed clips (left out of the mean):"] + [
            f"- {name}: {reason}" for name, reason in failed.items()
        ]
    return "\n".join(lines) + "\n"


def evaluate_behaviour(args: argparse.Namespace) -> dict:
    """``echo-eval --behaviour``: lip sync, listening, quality and long-video measures per clip
    (`echo.metrics.behaviour.conversation_behaviour`), from the generated and ground-truth mp4s and both
    participants' wavs (``--audio DIR/<clip>.wav``, ``--user-audio DIR/<clip>.wav``). A clip that fails (unreadable,
    no audio) is reported with its reason and the others go on."""
    from tqdm.auto import tqdm

    if not args.audio or not args.user_audio:
        raise ValueError("--behaviour needs --audio DIR (the avatar's <clip>.wav) and --user-audio DIR (the user's).")
    generated = list_clips(args.generated, "generated")
    reference = list_clips(args.reference, "reference")
    names = match_clips(generated, reference)
    per_clip: dict[str, dict] = {}
    failed: dict[str, str] = {}
    scored = check_sizes(names, generated, reference, args.resize_generated, failed)
    scored = check_rates(scored, {"generated": generated, "reference": reference}, failed)
    for name in tqdm(scored, desc="echo-eval: behaviour", disable=args.quiet):
        try:
            gen, fps = video_metrics.read_video(generated[name])
            ref, _ = video_metrics.read_video(reference[name])
            gen = _match_size(name, gen, ref, args.resize_generated)
            checked = _check_lengths(name, {"generated": gen, "reference": ref}, args.length_mismatch)
            waves = {}
            for label, folder in (("avatar", args.audio), ("user", args.user_audio)):
                path = os.path.join(folder, name + ".wav")
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no {label} audio {path}")
                waves[label] = read_audio(path)
            per_clip[name] = behaviour.conversation_behaviour(
                checked["generated"],
                checked["reference"],
                waves["avatar"],
                waves["user"],
                fps=fps,
                window_seconds=args.long_window,
            )
        except ClipSetError:
            raise
        except _clip_errors() as error:
            failed[name] = _failure_reason(name, error)
    keys = sorted({k for row in per_clip.values() for k in row if k != "num_frames"})
    aggregate = {k: _mean([row.get(k) for row in per_clip.values()]) for k in keys}
    report = {
        "clips": per_clip,
        "aggregate": aggregate,
        "failed": failed,
        "settings": {
            "generated": args.generated,
            "reference": args.reference,
            "audio": args.audio,
            "user_audio": args.user_audio,
            "num_clips": len(names),
            "long_window_seconds": args.long_window,
        },
    }
    report["markdown"] = behaviour_markdown(per_clip, aggregate, failed)
    _write_report(report, args)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="echo-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", required=True, help="folder of generated <clip>.mp4")
    parser.add_argument("--reference", required=True, help="folder of ground-truth <clip>.mp4")
    parser.add_argument("--user", default=None, help="folder of the user's <clip>.mp4 (for rPCC)")
    parser.add_argument("--weights", default=None, help="folder with inception/i3d/arcface/syncnet .safetensors")
    parser.add_argument("--out", default="report.json")
    parser.add_argument("--markdown", default=None, help="also write the Table-1 shaped Markdown table here")
    parser.add_argument("--audio", default=None, help="folder of <clip>.wav for LSE (default: the generated mp4's)")
    parser.add_argument("--reference-images", default=None, help="folder of <clip>.png reference images for CSIM")
    parser.add_argument("--motion-source", choices=("mediapipe", "files"), default="mediapipe")
    parser.add_argument("--expression-dims", type=int, default=50, help="FLAME expression size (files route)")
    parser.add_argument("--pose-dims", type=int, default=6, help="FLAME pose size (files route)")
    parser.add_argument("--expression-components", type=int, default=50, help="PCA size (mediapipe route)")
    parser.add_argument("--length-mismatch", choices=("error", "truncate"), default="error")
    parser.add_argument(
        "--resize-generated",
        action="store_true",
        help="resize generated frames to the ground truth's resolution (with a warning) instead of "
        "refusing clips of different resolutions",
    )
    parser.add_argument("--frame-stride", type=int, default=1, help="FID uses every n-th frame")
    parser.add_argument("--fvd-clip-length", type=int, default=16)
    parser.add_argument("--kmeans-init", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--behaviour",
        action="store_true",
        help="report lip sync, listening, PSNR/SSIM, face rate and long-video stability instead of Table 1's metrics "
        "(needs --audio and --user-audio)",
    )
    parser.add_argument("--user-audio", default=None, help="folder of the user's <clip>.wav (--behaviour)")
    parser.add_argument("--long-window", type=float, default=10.0, help="seconds of the first/last long-video windows")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = evaluate_behaviour(args) if args.behaviour else evaluate(args)
    sys.stdout.write(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
