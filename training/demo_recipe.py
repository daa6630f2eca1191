"""The demo model's recipe in one command: data → VAE → stage 1 → stage 2 → export (``make train-demo``).

    python -m training.demo_recipe [--recipe configs/train/demo_recipe.yaml] [--only vae,stage1] [--dry-run]

Each stage runs the project's own entry point in a subprocess, with the configs a GPU user would edit:

1. ``data``: ``python -m synthetic.demo_set`` (synthetic conversations prepared by the real ``echo-prep``);
2. ``vae``: ``training.train_vae`` (``accelerate launch`` with the recipe's GPU accelerate config on a GPU);
   ``decoder`` (when the recipe has that section): ``training.train_vae`` again, the VAE's decoder trained further
   on whole chunks with its encoder frozen (``init_from`` the VAE), so the generator's latents stay valid;
3. ``stage1`` / ``stage2``: ``accelerate launch --config_file <accelerate config> -m training.train --config ...
   --resume latest``: the GPU config when torch sees a GPU, else the CPU one (2 gloo processes, one thread each);
4. ``export``: ``echo-export`` (``python -m training.export``) of the stage-2 run into the pipeline folder, with
   the fine-tuned decoder's VAE (``--vae``) when there is a ``decoder`` stage;
5. ``distill`` (when the recipe has that section): ``accelerate launch -m training.distill`` (one process) of the
   exported pipeline into a few-step student (docs/few_step.md), copied into ``<export.out>/few_step``.

The recipe file (``configs/train/demo_recipe.yaml``) is the one source of the paths that tie the stages together; the
driver passes them on as ``--set`` overrides: the prepared data root (``<data.out>/prepared/train``, held-out
``.../heldout``) to the VAE and both stages, the model description (``export.model_config``) to both stages, the
stage-1 output to stage 2. The model description's ``vae.pretrained`` must be the folder whose latents the generator
learns (`Recipe.generator_vae_dir`): the decoder stage's ``export_dir`` when that stage trains the encoder too, else
the VAE's.

Resuming: a stage whose output is complete is skipped (data: ``<out>/DONE``; VAE: its report at
``train.max_train_steps``; a training stage: ``final/`` trained to the configured ``max_train_steps``; export: a
pipeline folder newer than the stage-2 ``final/``; distill: ``<export.out>/few_step`` trained to its
``max_train_steps``); an incomplete one is rerun and continues from its own checkpoints
(``demo_set`` and ``echo-prep`` skip finished conversations and clips, the trainers resume from their newest
``checkpoint-N``). ``state_file`` (JSON) records, per stage, the fingerprint of the output it was started from
(`Recipe.upstream`) and its run times: raising a stage's ``max_train_steps`` and rerunning trains it further, and the
stages after it start over (``--overwrite``) because their input changed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from echo.atomic import write_text_atomic
from echo.components import load_model_config, read_yaml
from pipelines.demo import write_example
from training.config import apply_overrides, load_config
from training.distill import load_distill_config, ship_student, shipped_student_steps
from training.train_vae import is_complete, load_vae_config

STAGES = ("data", "vae", "decoder", "stage1", "stage2", "export", "distill")
DEFAULT_RECIPE = "configs/train/demo_recipe.yaml"


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The recipe YAML with ``section.key=value`` overrides (values parsed as YAML)."""

    recipe = apply_overrides(read_yaml(path, "recipe") or {}, overrides)
    unknown = set(recipe) - {*STAGES, "accelerate", "state_file"}
    if unknown:
        raise ValueError(
            f"recipe {str(path)!r} has unknown sections {sorted(unknown)}; expected {[*STAGES, 'accelerate', 'state_file']}"
        )
    return recipe


class Recipe:
    """The stages of one recipe file: their commands, completion checks and the paths that tie them together."""

    def __init__(self, recipe: dict, python: str = sys.executable, gpu: bool | None = None):
        self.recipe = recipe
        self.python = python
        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        self.gpu = gpu
        data = recipe["data"]
        self.data_out = Path(data["out"])
        self.train_root = self.data_out / "prepared" / "train"
        self.heldout_root = self.data_out / "prepared" / "heldout"
        self.model_config = recipe["export"]["model_config"]
        self.state_file = Path(
            recipe.get("state_file") or Path(self.stage_config("stage1").output_dir).parent / "recipe_state.json"
        )

    # -- configs of the training stages, with the recipe's paths applied ------------------------------------------
    def vae_sets(self) -> list[str]:
        return [
            f"data.root={self.train_root}",
            f"data.heldout_root={self.heldout_root}",
            *self.recipe["vae"].get("set", []),
        ]

    def vae_config(self):

        return load_vae_config(self.recipe["vae"]["config"], self.vae_sets())

    def decoder_sets(self) -> list[str]:
        return [
            f"data.root={self.train_root}",
            f"data.heldout_root={self.heldout_root}",
            f"init_from={self.vae_config().export_dir}",
            *self.recipe["decoder"].get("set", []),
        ]

    def decoder_config(self):
        """The decoder stage's VAE config, or `None` when the recipe has no ``decoder`` section."""

        if not self.recipe.get("decoder"):
            return None
        return load_vae_config(self.recipe["decoder"]["config"], self.decoder_sets())

    def stage_sets(self, stage: str) -> list[str]:
        sets = [f"data.root={self.train_root}", f"model.config={self.model_config}"]
        if stage == "stage2":
            sets.append(f"model.stage1_dir={self.stage_config('stage1').output_dir}")
        return sets + list(self.recipe[stage].get("set", []))

    def distill_sets(self) -> list[str]:
        return [
            f"pipeline={self.recipe['export']['out']}",
            f"data.root={self.train_root}",
            *self.recipe["distill"].get("set", []),
        ]

    def distill_config(self):
        """The distill stage's config, or `None` when the recipe has no ``distill`` section."""
        if not self.recipe.get("distill"):
            return None
        return load_distill_config(self.recipe["distill"]["config"], self.distill_sets())

    def ship_student(self) -> Path | None:
        """Copy the distill stage's student into ``<export.out>/few_step`` (the folder `load_few_step_weights` reads)."""
        config = self.distill_config()
        if config is None:
            return None
        return ship_student(Path(config.output_dir), Path(self.recipe["export"]["out"]))

    def stage_config(self, stage: str):

        return load_config(self.recipe[stage]["config"], self.stage_sets(stage))

    def generator_vae_dir(self) -> Path:
        """The VAE folder the generator's latents come from: the ``decoder`` stage's output when that stage trains the
        encoder as well (whole chunks, so the temporal latents carry the mouth), else the ``vae`` stage's."""

        decoder = self.decoder_config()
        if decoder is not None and not decoder.train.freeze_encoder:
            return Path(decoder.export_dir)
        return Path(self.vae_config().export_dir)

    def check_vae_path(self) -> None:
        """The model description loads the VAE whose latents the generator is trained on."""

        section = load_model_config(self.model_config).get("vae", {})
        export_dir = self.generator_vae_dir()
        pretrained = section.get("pretrained")
        if pretrained is None or Path(pretrained).resolve() != export_dir.resolve():
            raise ValueError(
                f"model config {self.model_config!r} loads its VAE from {pretrained!r}, but the recipe's generator "
                f"is trained on the latents of {str(export_dir)!r}; make the model config's vae.pretrained that folder."
            )

    def write_example(self) -> Path | None:
        """``<export.out>/example``: the held-out conversation `echo-demo` renders with the shipped model (the recipe's
        ``export.example``: ``{clip: <held-out clip folder name>, seconds: <length>}``), if the recipe names one."""
        example = self.recipe["export"].get("example")
        if not example:
            return None

        out = Path(self.recipe["export"]["out"]) / "example"
        return write_example(self.heldout_root / example["clip"], out, seconds=example.get("seconds"))

    def write_model_card(self) -> Path | None:
        """``<export.out>/README.md``: a copy of the recipe's ``export.model_card`` (a Markdown file), if it names one."""
        card = self.recipe["export"].get("model_card")
        if not card:
            return None
        return write_text_atomic(Path(self.recipe["export"]["out"]) / "README.md", Path(card).read_text())

    def export_extras(self) -> list[Path]:
        """The files the export stage writes after ``echo-export``: the example's ``manifest.jsonl`` (`write_example`
        writes it last) and the model card, those the recipe names. Until they exist the stage is not complete, so a
        run killed between ``echo-export`` and them exports again."""
        export, out = self.recipe["export"], Path(self.recipe["export"]["out"])
        return [
            path
            for key, path in (("example", out / "example" / "manifest.jsonl"), ("model_card", out / "README.md"))
            if export.get(key)
        ]

    # -- completion ----------------------------------------------------------------------------------------------
    def complete(self, stage: str) -> bool:
        if stage == "data":
            return (self.data_out / "DONE").is_file()
        if stage == "vae":
            return is_complete(self.vae_config())
        if stage == "decoder":
            config = self.decoder_config()
            return config is None or is_complete(config)
        if stage in ("stage1", "stage2"):
            config = self.stage_config(stage)
            saved = Path(config.output_dir) / "final" / "training_config.yaml"
            if not saved.is_file():
                return False
            trained = read_yaml(saved, "training config")["train"]["max_train_steps"]
            return trained >= config.train.max_train_steps
        if stage == "export":
            index = Path(self.recipe["export"]["out"]) / "model_index.json"
            final = Path(self.stage_config("stage2").output_dir) / "final"
            inputs = [final] + ([Path(c.export_dir)] if (c := self.decoder_config()) is not None else [])
            return (
                index.is_file()
                and all(p.exists() and index.stat().st_mtime >= p.stat().st_mtime for p in inputs)
                and all(p.is_file() for p in self.export_extras())
            )
        if stage == "distill":  # shipped, trained to its max_train_steps, onto the exported base
            config = self.distill_config()
            if config is None:
                return True
            out = Path(self.recipe["export"]["out"])
            trained = shipped_student_steps(out)
            return trained is not None and trained >= config.train.max_train_steps
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    def upstream(self, stage: str) -> float | None:
        """Fingerprint (modification time) of the output a stage was trained from; a changed one makes the stage
        start over (a VAE trained further needs a new stage 1, a new stage 1 a new stage 2)."""
        path = {
            "vae": self.data_out / "DONE",
            "decoder": Path(self.vae_config().export_dir) / "config.json",
            "stage1": self.generator_vae_dir() / "config.json",
            "stage2": Path(self.stage_config("stage1").output_dir) / "final" / "training_config.yaml",
            "distill": Path(self.recipe["export"]["out"]) / "model_index.json",  # a new export: a new base
        }.get(stage)
        return path.stat().st_mtime if path is not None and path.is_file() else None

    # -- commands ------------------------------------------------------------------------------------------------
    def _launch(self, processes: int | None = None) -> list[str]:
        """``accelerate launch`` with the recipe's accelerate config for this machine."""
        accelerate = self.recipe.get("accelerate", {})
        config_file = accelerate.get("gpu" if self.gpu else "cpu")
        command = [self.python, "-m", "accelerate.commands.launch"]
        if config_file:
            command += ["--config_file", str(config_file)]
        if processes is not None:
            command += ["--num_processes", str(processes)]
        if processes != 1:
            command += ["--main_process_port", str(_free_port())]  # two runs on one machine never collide
        return command

    def command(self, stage: str, overwrite: bool = False) -> list[str]:
        """The stage's command line; ``overwrite`` starts a training stage over instead of resuming it."""
        if stage == "data":
            data = self.recipe["data"]
            command = [
                self.python,
                "-m",
                "synthetic.demo_set",
                "--out",
                str(self.data_out),
                "--model-config",
                str(self.model_config),
                "--workers",
                str(data.get("workers", 1)),
            ]
            for key, value in (data.get("options") or {}).items():  # {num_train: 64, no_progress: true, ...}
                flag = "--" + key.replace("_", "-")
                if value is True:
                    command.append(flag)
                elif isinstance(value, (list, tuple)):
                    command += [flag, *map(str, value)]
                elif value is not False and value is not None:
                    command += [flag, str(value)]
            return command
        if stage in ("vae", "decoder"):  # both run training.train_vae, the decoder stage on the VAE stage's output
            sets = [
                arg for item in (self.vae_sets() if stage == "vae" else self.decoder_sets()) for arg in ("--set", item)
            ]
            sets += ["--overwrite"] if overwrite else []
            config = self.recipe[stage]["config"]
            if self.gpu:
                return self._launch() + ["-m", "training.train_vae", "--config", config, *sets]
            processes = int(self.recipe.get("accelerate", {}).get("vae_processes", 1))
            if processes == 1:
                return [self.python, "-m", "training.train_vae", "--config", config, *sets]
            return self._launch(processes) + ["-m", "training.train_vae", "--config", config, *sets]
        if stage in ("stage1", "stage2"):
            sets = [arg for item in self.stage_sets(stage) for arg in ("--set", item)]
            resume = ["--overwrite"] if overwrite else ["--resume", "latest"]
            return self._launch() + ["-m", "training.train", "--config", self.recipe[stage]["config"], *resume, *sets]
        if stage == "export":
            export = self.recipe["export"]
            return [
                self.python,
                "-m",
                "training.export",
                "--stage-dir",
                self.stage_config("stage2").output_dir,
                "--model-config",
                str(self.model_config),
                "--out",
                str(export["out"]),
                "--dtype",
                str(export.get("dtype", "fp16")),
                "--vae-dtype",
                str(export.get("vae_dtype", "fp32")),
                "--overwrite",
            ] + (["--vae", str(c.export_dir)] if (c := self.decoder_config()) is not None else [])
        if stage == "distill":
            sets = [arg for item in self.distill_sets() for arg in ("--set", item)]
            sets += ["--overwrite"] if overwrite else []
            single_cpu = self.recipe.get("accelerate", {}).get("single_cpu")
            if self.gpu or not single_cpu:
                launch = self._launch(1)
            else:  # one CPU process: the teacher's sampler and the student's step share nothing worth splitting
                launch = [self.python, "-m", "accelerate.commands.launch", "--config_file", str(single_cpu)]
            return launch + ["-m", "training.distill", "--config", self.recipe["distill"]["config"], *sets]
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _record(state_file: Path, stage: str, values: dict) -> None:
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state.setdefault(stage, {}).update(values)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_file, json.dumps(state, indent=1) + "\n")


@contextlib.contextmanager
def recipe_lock(state_file: Path):
    """Hold ``<state_file>.lock`` for the run: a second run of the same recipe while one is live is refused (both
    would resume the same checkpoints and write the same folders)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    path = state_file.with_name(state_file.name + ".lock")
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RuntimeError(
                f"another demo-recipe run holds {path} ({handle.read().strip() or 'pid unknown'}); wait for it or stop "
                "it, then rerun"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def run_recipe(recipe: Recipe, stages: list[str] = STAGES, dry_run: bool = False) -> int:
    """Run the ``stages`` in order, skipping complete ones; returns the first failing exit code (0 when all pass)."""
    recipe.check_vae_path()
    env = dict(os.environ)
    if not recipe.gpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # one thread per training process (the CPU accelerate config has two)
    cores = str(len(os.sched_getaffinity(0)))
    for index, stage in enumerate(stages):
        started = time.time()
        state = json.loads(recipe.state_file.read_text()) if recipe.state_file.is_file() else {}
        upstream, recorded = recipe.upstream(stage), state.get(stage, {}).get("upstream")
        stale = upstream is not None and recorded is not None and upstream != recorded
        if not stale and recipe.complete(stage):
            print(f"[demo-recipe] {index + 1}/{len(stages)} {stage}: complete, skipped", flush=True)
            continue
        command = recipe.command(stage, overwrite=stale)
        stage_env = env
        if (
            stage in ("vae", "decoder")
            and not recipe.gpu
            and int(recipe.recipe.get("accelerate", {}).get("vae_processes", 1)) == 1
        ):
            stage_env = {**env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", cores)}  # one process, all cores
        why = " (its input changed: starting it over)" if stale else ""
        print(f"[demo-recipe] {index + 1}/{len(stages)} {stage}{why}: {' '.join(command)}", flush=True)
        if dry_run:
            continue
        _record(recipe.state_file, stage, {"upstream": upstream, "device": "gpu" if recipe.gpu else "cpu"})
        code = subprocess.run(command, env=stage_env).returncode
        if stage == "export" and code == 0:
            recipe.write_example()
            recipe.write_model_card()
        if stage == "distill" and code == 0:
            recipe.ship_student()
        elapsed = round(time.time() - started, 1)
        state = json.loads(recipe.state_file.read_text())
        total = round(
            state.get(stage, {}).get("total_seconds", 0.0) + elapsed, 1
        )  # runs killed by a signal are not counted
        _record(
            recipe.state_file,
            stage,
            {
                "last_run_seconds": elapsed,
                "total_seconds": total,
                "exit_code": code,
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        if code != 0:
            print(
                f"[demo-recipe] {stage} failed (exit {code}) after {elapsed} s; rerun the same command to resume",
                flush=True,
            )
            return code
        if not recipe.complete(stage):
            print(
                f"[demo-recipe] {stage} exited without a complete output; rerun the same command to resume", flush=True
            )
            return 1
        print(f"[demo-recipe] {stage}: done in {elapsed} s ({total} s over all runs)", flush=True)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "demo-recipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe YAML (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override, e.g. stage1.set=[train.max_train_steps=2000]",
    )
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--dry-run", action="store_true", help="print what would run")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = Recipe(load_recipe(args.recipe, args.set))
    stages = list(STAGES) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"--only names unknown stages {unknown}; expected a subset of {list(STAGES)}")
    started = time.time()
    with contextlib.nullcontext() if args.dry_run else recipe_lock(recipe.state_file):
        code = run_recipe(recipe, stages, dry_run=args.dry_run)
    if code == 0 and not args.dry_run:
        where = f"; pipeline: {recipe.recipe['export']['out']}" if "export" in stages else ""
        print(
            f"[demo-recipe] {'all' if len(stages) == len(STAGES) else 'requested'} stages complete "
            f"({time.time() - started:.0f} s this run){where}",
            flush=True,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
