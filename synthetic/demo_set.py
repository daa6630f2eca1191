"""The demo set: synthetic conversations with variety, prepared by the real ``echo-prep``, with a held-out split.

    python -m synthetic.demo_set --out data/demo [--num-train 64] [--workers 1]

Writes, under ``--out``:

- ``wav2vec2/``: the frozen, seeded audio encoder of the model description (``audio_encoder`` and
  ``feature_extractor`` of ``configs/models/demo.yaml``, built by `echo.components.load_components` and saved with
  ``save_pretrained``), the one ``echo-prep`` reads, so training and inference see the same features;
- ``source/train/`` and ``source/heldout/``: conversations in the pairs layout (`synthetic.conversations`), each written
  to ``tmp/`` first and moved in when complete, with its ``<id>.truth.npz`` beside it;
- ``prepared/train/`` and ``prepared/heldout/``: ``echo-prep --layout pairs`` output (each participant in turn as the
  avatar), 25 fps, ``--size`` crops; held-out conversations are one clip per avatar (``--clip-seconds`` of the
  longest), training ones ``--clip-seconds`` long;
- ``demo_set.json``: the plan (every conversation's split, seed, length, identities, dialogue and motion styles) and
  the measured timings.

Variety (`conversation_plan`): two distinct identities out of `synthetic.conversations.IDENTITIES` per conversation,
per-participant `MotionStyle` (amplitudes, speeds; nods while listening, nearly still in mutual silence), espeak-ng
voices and speaking rates, one to three sentences per turn and long mutual silences. The held-out split never shares
a sentence (`HELDOUT_SENTENCES`), a speaking rate (`HELDOUT_SPEEDS`) or a seed with training.

Resumable: finished conversations are skipped (their folder exists only when complete), and ``echo-prep`` itself
skips finished clips; rerunning the command continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echo.atomic import write_text_atomic
from echo.components import load_components
from synthetic.conversations import (
    HELDOUT_SENTENCES,
    IDENTITIES,
    TRAIN_SENTENCES,
    DialogueStyle,
    MotionStyle,
    make_conversation,
)

TRAIN_VOICES = ("en-us+m3", "en-us+f3", "en-gb+m1", "en-us+f2", "en+m4", "en-gb+f4")
# Voices a held-out conversation may speak with when ``DemoSetConfig.heldout_voices`` asks for unseen ones.
UNSEEN_VOICES = ("en-us+m7", "en-gb+f5", "en+m6", "en-us+f1")
# Speaking rates (espeak-ng words per minute): the two splits never share one.
TRAIN_SPEEDS = (145, 160, 175, 190, 205)
HELDOUT_SPEEDS = (152, 168, 183, 198)
TRAIN_SEED_BASE = 1_000
HELDOUT_SEED_BASE = 900_000


@dataclass
class DemoSetConfig:
    """Sizes of the demo set.

    Attributes:
        num_train (`int`): training conversations.
        train_seconds (`tuple[float, float]`): a training conversation's length, uniform in this range.
        num_heldout (`int`): held-out conversations of ``heldout_seconds``.
        heldout_seconds (`float`): their length.
        long_seconds (`float`): one more held-out conversation this long (the long-video check); 0 for none.
        source_size (`int`): side of the synthetic source videos.
        size (`int`): side of the prepared crops.
        clip_seconds (`float`): training clip length (``echo-prep --clip-seconds``).
        seed (`int`): seed of the plan (lengths, identities, styles).
        identities (`tuple[str, ...]`): the pool both participants are drawn from (names of
            `synthetic.conversations.IDENTITIES`); empty: all of them (the multi-identity set). A pool of framings of
            one photo makes a personal-avatar set: every clip, on either side, shows that person.
        unseen_heldout_voices (`bool`): held-out conversations speak with `UNSEEN_VOICES`, never heard in training
            (otherwise they draw from `TRAIN_VOICES`, like training).
    """

    num_train: int = 64
    train_seconds: tuple[float, float] = (14.0, 26.0)
    num_heldout: int = 3
    heldout_seconds: float = 24.0
    long_seconds: float = 60.0
    source_size: int = 256
    size: int = 128
    clip_seconds: float = 10.0
    seed: int = 0
    identities: tuple[str, ...] = ()
    unseen_heldout_voices: bool = False


def _styles(
    rng: np.random.Generator, heldout: bool, pool: tuple[str, ...] = TRAIN_VOICES
) -> tuple[DialogueStyle, tuple[MotionStyle, MotionStyle]]:
    speeds = HELDOUT_SPEEDS if heldout else TRAIN_SPEEDS
    voices = rng.choice(len(pool), size=2, replace=False)
    dialogue = DialogueStyle(
        sentences=HELDOUT_SENTENCES if heldout else TRAIN_SENTENCES,
        voices=(pool[voices[0]], pool[voices[1]]),
        speeds=(int(rng.choice(speeds)), int(rng.choice(speeds))),
        gap=(0.15, 0.6),
        long_gap_prob=float(rng.uniform(0.2, 0.45)),
        long_gap=(1.0, 3.0),
        sentences_per_turn=(1, 3),
    )
    return dialogue, (MotionStyle.sample(rng), MotionStyle.sample(rng))


def conversation_plan(config: DemoSetConfig) -> list[dict]:
    """Every conversation of the set: ``{"split", "name", "seed", "seconds", "identities", "dialogue", "motion"}``.

    A pure function of ``config``: rerunning the command plans the same conversations.
    """
    rng = np.random.default_rng(config.seed)
    unknown = sorted(set(config.identities) - set(IDENTITIES))
    if unknown or len(set(config.identities)) == 1:
        raise ValueError(
            f"demo-set identities {list(config.identities)}: "
            + (f"{unknown} unknown" if unknown else "a conversation needs two")
            + f"; name at least two of {sorted(IDENTITIES)} (--identities), or none for all of them."
        )
    names = sorted(config.identities or IDENTITIES)
    plan = []
    specs = [("train", i, float(rng.uniform(*config.train_seconds))) for i in range(config.num_train)]
    specs += [("heldout", j, config.heldout_seconds) for j in range(config.num_heldout)]
    if config.long_seconds > 0:
        specs.append(("heldout", config.num_heldout, config.long_seconds))
    for split, index, seconds in specs:
        heldout = split == "heldout"
        # Cycle through the identities so every one appears in training; the partner is drawn among the others.
        first = names[index % len(names)] if not heldout else names[int(rng.integers(len(names)))]
        second = names[int(rng.choice([k for k in range(len(names)) if names[k] != first]))]
        dialogue, motion = _styles(
            rng, heldout, UNSEEN_VOICES if heldout and config.unseen_heldout_voices else TRAIN_VOICES
        )
        plan.append(
            {
                "split": split,
                "name": f"{'heldout' if heldout else 'train'}{index:04d}" + ("_long" if seconds >= 60 else ""),
                "seed": (HELDOUT_SEED_BASE if heldout else TRAIN_SEED_BASE) + index,
                "seconds": round(seconds, 2),
                "identities": [first, second],
                "dialogue": dataclasses.asdict(dialogue),
                "motion": [dataclasses.asdict(m) for m in motion],
            }
        )
    return plan


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def generate(entry: dict, source_root: Path, tmp_root: Path, config: DemoSetConfig) -> bool:
    """Write one planned conversation into ``source_root`` (atomically); `False` when it already exists."""

    final = source_root / entry["name"]
    if final.is_dir():
        return False
    work = tmp_root / entry["name"]
    shutil.rmtree(work, ignore_errors=True)
    make_conversation(
        work,
        layout="pairs",
        seconds=entry["seconds"],
        size=config.source_size,
        seed=entry["seed"],
        name=entry["name"],
        identities=tuple(entry["identities"]),
        dialogue=DialogueStyle(**_tuples(entry["dialogue"])),
        motion=tuple(MotionStyle(**_tuples(m)) for m in entry["motion"]),
    )
    source_root.mkdir(parents=True, exist_ok=True)
    os.replace(work / f"{entry['name']}.truth.npz", source_root / f"{entry['name']}.truth.npz")
    os.replace(work / entry["name"], final)  # the folder exists only when complete
    shutil.rmtree(work, ignore_errors=True)
    return True


def save_audio_encoder(model_config: str | Path, folder: Path) -> Path:
    """Save the model description's seeded wav2vec2 and feature extractor (``save_pretrained``) for ``echo-prep``."""

    if (folder / "config.json").exists() and (folder / "preprocessor_config.json").exists():
        return folder
    components = load_components(model_config, only=["audio_encoder", "feature_extractor"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    components["audio_encoder"].save_pretrained(tmp, safe_serialization=True)
    components["feature_extractor"].save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def run_echo_prep(source: Path, out: Path, wav2vec2: Path, size: int, clip_seconds: float, workers: int) -> int:
    """The real ``echo-prep`` (``python -m data_prep.cli``) on a pairs-layout folder; returns its exit code."""
    command = [
        sys.executable,
        "-m",
        "data_prep.cli",
        "--input",
        str(source),
        "--layout",
        "pairs",
        "--out",
        str(out),
        "--wav2vec2",
        str(wav2vec2),
        "--size",
        str(size),
        "--clip-seconds",
        str(clip_seconds),
        "--workers",
        str(workers),
    ]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command).returncode


def build_demo_set(
    out: str | Path, config: DemoSetConfig, model_config: str | Path, workers: int = 1, progress: bool = True
) -> dict:
    """Generate and prepare the whole set under ``out`` (resumable); returns the written ``demo_set.json``."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = conversation_plan(config)
    manifest_path = out / "demo_set.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("config") not in (None, _jsonable(config)):
        raise ValueError(
            f"{manifest_path} was written for another demo-set config {manifest['config']}; use a new --out or "
            f"the same options ({_jsonable(config)})."
        )
    manifest.update({"config": _jsonable(config), "model_config": str(model_config), "plan": plan})
    timings = manifest.setdefault("timings", {})

    # 1. The frozen seeded audio encoder echo-prep reads.
    wav2vec2 = save_audio_encoder(model_config, out / "wav2vec2")

    # 2. Synthetic conversations (skips finished ones).
    started, generated_seconds = time.time(), 0.0
    bar = tqdm(plan, desc="demo-set: synthesise", unit="conv", disable=not progress)
    for entry in bar:
        if generate(entry, out / "source" / entry["split"], out / "tmp", config):
            generated_seconds += entry["seconds"]
    bar.close()
    if generated_seconds:
        timings["synthesis_seconds_per_conversation_second"] = round((time.time() - started) / generated_seconds, 3)
    _write_json(manifest_path, manifest)

    # 3. echo-prep, each split (skips finished clips).
    longest = max([e["seconds"] for e in plan if e["split"] == "heldout"], default=config.clip_seconds)
    for split, clip_seconds in (("train", config.clip_seconds), ("heldout", float(np.ceil(longest)))):
        if not any(e["split"] == split for e in plan):
            continue
        started = time.time()
        code = run_echo_prep(
            out / "source" / split, out / "prepared" / split, wav2vec2, config.size, clip_seconds, workers
        )
        if code != 0:
            raise RuntimeError(
                f"echo-prep failed on {out / 'source' / split} (exit {code}); see "
                f"{out / 'prepared' / split / 'prep_summary.json'}. Rerun to resume."
            )
        summary = json.loads((out / "prepared" / split / "prep_summary.json").read_text())
        if summary["clips_written"]:
            seconds = sum(e["seconds"] for e in plan if e["split"] == split)
            timings[f"prep_{split}_seconds"] = round(time.time() - started, 1)
            timings[f"prep_{split}_seconds_per_conversation_second"] = round((time.time() - started) / seconds, 3)
    manifest["totals"] = {
        split: {
            "conversations": sum(e["split"] == split for e in plan),
            "seconds": round(sum(e["seconds"] for e in plan if e["split"] == split), 1),
            "clips": len([p for p in (out / "prepared" / split).iterdir() if (p / "meta.json").exists()]),
        }
        for split in ("train", "heldout")
        if (out / "prepared" / split).is_dir()
    }
    shutil.rmtree(out / "tmp", ignore_errors=True)
    _write_json(manifest_path, manifest)
    (out / "DONE").write_text(json.dumps(manifest["totals"]) + "\n")
    return manifest


def _jsonable(config: DemoSetConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    defaults = DemoSetConfig()
    parser = argparse.ArgumentParser(
        "demo-set", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/demo", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--model-config",
        default="configs/models/demo.yaml",
        help="model description whose audio encoder echo-prep uses (default: %(default)s)",
    )
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--train-seconds", type=float, nargs=2, default=list(defaults.train_seconds))
    parser.add_argument("--num-heldout", type=int, default=defaults.num_heldout)
    parser.add_argument("--heldout-seconds", type=float, default=defaults.heldout_seconds)
    parser.add_argument(
        "--long-seconds",
        type=float,
        default=defaults.long_seconds,
        help="one more held-out conversation this long (0: none)",
    )
    parser.add_argument("--source-size", type=int, default=defaults.source_size)
    parser.add_argument("--size", type=int, default=defaults.size, help="prepared crop side")
    parser.add_argument("--clip-seconds", type=float, default=defaults.clip_seconds)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--identities",
        nargs="+",
        default=list(defaults.identities),
        help="the identities both participants are drawn from (default: all; framings of one photo: a personal avatar)",
    )
    parser.add_argument(
        "--unseen-heldout-voices",
        action="store_true",
        help="held-out conversations speak with voices unseen in training",
    )
    parser.add_argument("--workers", type=int, default=1, help="echo-prep processes")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = DemoSetConfig(
        num_train=args.num_train,
        train_seconds=tuple(args.train_seconds),
        num_heldout=args.num_heldout,
        heldout_seconds=args.heldout_seconds,
        long_seconds=args.long_seconds,
        source_size=args.source_size,
        size=args.size,
        clip_seconds=args.clip_seconds,
        seed=args.seed,
        identities=tuple(args.identities),
        unseen_heldout_voices=args.unseen_heldout_voices,
    )
    manifest = build_demo_set(args.out, config, args.model_config, workers=args.workers, progress=not args.no_progress)
    print(json.dumps({"totals": manifest["totals"], "timings": manifest["timings"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
