"""The demo model's recipe: its data plan keeps the held-out split apart, its configs agree with the model description,
and the one-command recipe resumes after a kill at every stage (a tiny version of it)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from synthetic.conversations import HELDOUT_SENTENCES, IDENTITIES, TRAIN_SENTENCES
from synthetic.demo_set import HELDOUT_SPEEDS, TRAIN_SPEEDS, DemoSetConfig, conversation_plan

ROOT = Path(__file__).resolve().parents[1]


def test_plan_has_the_size_variety_and_a_separate_heldout_split():
    plan = conversation_plan(DemoSetConfig())
    train = [e for e in plan if e["split"] == "train"]
    heldout = [e for e in plan if e["split"] == "heldout"]
    assert len(train) >= 60 and sum(e["seconds"] for e in train) >= 20 * 60
    assert sum(e["seconds"] >= 20 for e in heldout) >= 3 and any(e["seconds"] >= 60 for e in heldout)
    assert plan == conversation_plan(DemoSetConfig())  # a rerun plans the same conversations

    # Every identity is someone's avatar in training; the two participants of a conversation differ.
    assert {i for e in train for i in e["identities"]} == set(IDENTITIES)
    assert all(e["identities"][0] != e["identities"][1] for e in plan)
    # Held-out sentences, speaking rates and seeds never occur in training.
    assert not set(TRAIN_SENTENCES) & set(HELDOUT_SENTENCES) and not set(TRAIN_SPEEDS) & set(HELDOUT_SPEEDS)
    assert all(set(e["dialogue"]["sentences"]) <= set(TRAIN_SENTENCES) for e in train)
    assert all(set(e["dialogue"]["sentences"]) == set(HELDOUT_SENTENCES) for e in heldout)
    assert {s for e in train for s in e["dialogue"]["speeds"]} <= set(TRAIN_SPEEDS)
    assert {s for e in heldout for s in e["dialogue"]["speeds"]} <= set(HELDOUT_SPEEDS)
    assert not {e["seed"] for e in train} & {e["seed"] for e in heldout}
    # Variety: head-motion styles differ between participants and conversations; mutual silences are planned.
    assert len({m["nod_deg"] for e in train for m in e["motion"]}) == 2 * len(train)
    assert all(e["dialogue"]["long_gap_prob"] > 0 and e["dialogue"]["sentences_per_turn"][1] > 1 for e in plan)


def test_demo_configs_agree_with_the_model_description_and_fit_the_size_budget(monkeypatch):
    """Stage configs train what configs/models/demo.yaml says (settings), with the ablations of the demo; the
    generator is ≤ 12 M parameters and the exported pipeline (fp16, VAE fp32) ≤ 40 MB."""
    from diffusers import AutoencoderKLWan

    from echo.components import load_components, load_model_config
    from training.config import settings_from_config
    from training.demo_recipe import Recipe, load_recipe
    from training.train_vae import load_vae_config

    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    recipe = Recipe(load_recipe(ROOT / "configs/train/demo_recipe.yaml"), gpu=False)
    recipe.check_vae_path()
    description = load_model_config(ROOT / "configs/models/demo.yaml")
    for stage in ("stage1", "stage2"):
        config = recipe.stage_config(stage)
        saved = settings_from_config(config).to_dict()
        for key in (
            "resolution",
            "num_frames_per_chunk",
            "motion_frames",
            "user_video_size",
            "use_emotion",
            "max_sequence_length",
        ):
            assert saved[key] == description["settings"][key], (stage, key)
        assert config.loss.motion_prob > 0 and config.loss.audio_drop_prob > 0
        assert config.model.config == "configs/models/demo.yaml"
    stage2 = recipe.stage_config("stage2")
    assert stage2.model.stage1_dir == recipe.stage_config("stage1").output_dir
    assert not stage2.ablation.use_understanding and stage2.ablation.use_visual and stage2.loss.user_drop_prob > 0

    sections = ["transformer", "context_encoder", "audio_encoder", "text_encoder"]
    components = load_components({k: description[k] for k in sections})
    counts = {k: sum(p.numel() for p in components[k].parameters()) for k in sections}
    assert 8e6 <= counts["transformer"] <= 12e6, counts
    assert (
        components["context_encoder"].config.use_visual and not components["context_encoder"].config.use_understanding
    )
    vae = AutoencoderKLWan(**load_vae_config(ROOT / "configs/train/demo_vae.yaml").vae)
    with torch.no_grad():  # the real compression: 4x in time, 8x8 in space, 16 channels
        assert vae.encode(torch.zeros(1, 3, 5, 64, 64)).latent_dist.mode().shape == (1, 16, 2, 8, 8)
    shipped = 2 * sum(counts.values()) + 4 * sum(p.numel() for p in vae.parameters())
    assert shipped <= 40e6, shipped


def test_the_shipped_model_card_is_the_recipe_card():
    """models/echo-demo/README.md is the card the recipe's export copies there (``export.model_card``), unchanged: an
    edit of the card reaches the shipped folder."""
    from training.demo_recipe import load_recipe

    export = load_recipe(ROOT / "configs/train/demo_recipe.yaml")["export"]
    assert (ROOT / export["out"] / "README.md").read_text() == (ROOT / export["model_card"]).read_text()


def test_export_is_incomplete_until_its_example_and_card_are_written(tmp_path, monkeypatch):
    """A run killed after ``echo-export`` but before the example conversation and the model card were written must
    export again on the rerun, not skip the stage and leave the folder without them."""
    from training.demo_recipe import Recipe, load_recipe

    monkeypatch.chdir(ROOT)
    sets = [
        f"export.out={tmp_path / 'pipeline'}",
        f"stage2.set=[output_dir={tmp_path / 'stage2'}]",
        f"decoder.set=[export_dir={tmp_path / 'decoder'}]",
    ]
    recipe = Recipe(load_recipe(ROOT / "configs/train/demo_recipe.yaml", sets), gpu=False)
    (tmp_path / "stage2" / "final").mkdir(parents=True)
    (tmp_path / "decoder").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")  # newer than both inputs: echo-export finished
    assert not recipe.complete("export")
    (tmp_path / "pipeline" / "example").mkdir()
    (tmp_path / "pipeline" / "example" / "manifest.jsonl").write_text("{}\n")
    assert not recipe.complete("export")  # the card is still missing
    recipe.write_model_card()
    assert recipe.complete("export")
    assert (tmp_path / "pipeline" / "README.md").read_text() == (ROOT / "docs/demo_model_card.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# The tiny recipe, killed in every stage
# ----------------------------------------------------------------------------------------------------------------


def _tiny_recipe(tmp: Path) -> Path:
    """A recipe with the tiny model (configs/models/tiny.yaml, its VAE and decoder trained by the recipe), two 2-s conversations
    and a few steps per stage, checkpointing every 2 steps; one training process."""
    model = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())
    vae_arch = model["vae"]["config"]
    # the decoder stage trains the encoder too (configs/train/demo_vae_decoder.yaml): the generator learns its latents
    model["vae"] = {"class": "AutoencoderKLWan", "pretrained": str(tmp / "decoder")}
    (tmp / "model.yaml").write_text(yaml.safe_dump(model))
    (tmp / "accelerate.yaml").write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "NO",
                "num_machines": 1,
                "num_processes": 1,
                "mixed_precision": "no",
                "use_cpu": True,
            }
        )
    )
    steps = ["train.max_train_steps=8", "train.checkpointing_steps=2", "train.checkpoints_total_limit=2"]
    recipe = {
        "state_file": str(tmp / "recipe_state.json"),
        "data": {
            "out": str(tmp / "data"),
            "workers": 1,
            "options": {
                "num_train": 1,
                "train_seconds": [2.0, 2.0],
                "num_heldout": 1,
                "heldout_seconds": 2.0,
                "long_seconds": 0,
                "source_size": 128,
                "size": 64,
                "clip_seconds": 2.0,
                "no_progress": True,
            },
        },
        "vae": {
            "config": str(ROOT / "configs/train/demo_vae.yaml"),
            "set": [
                f"output_dir={tmp / 'vae_train'}",
                f"export_dir={tmp / 'vae'}",
                *(f"vae.{k}={json.dumps(v)}" for k, v in vae_arch.items()),
                "data.resolution=64",
                "data.clip_crop=32",
                "data.small_size=16",
                "data.clips_per_folder=2",
                "train.stats_clips=4",
                "train.eval_frames=4",
                "train.log_every=1",
                *steps,
            ],
        },
        "decoder": {
            "config": str(ROOT / "configs/train/demo_vae_decoder.yaml"),
            "set": [
                f"output_dir={tmp / 'decoder_train'}",
                f"export_dir={tmp / 'decoder'}",
                "data.resolution=64",
                "data.clip_frames=9",
                "data.clip_crop=32",
                "data.clips_per_folder=1",
                "train.eval_frames=4",
                "train.log_every=1",
                *steps,
            ],
        },
        "stage1": {
            "config": str(ROOT / "configs/train/tiny_stage1.yaml"),
            "set": [
                f"output_dir={tmp / 'stage1'}",
                "data.num_workers=0",
                "data.windows_per_clip=4",
                *steps,
            ],
        },
        "stage2": {
            "config": str(ROOT / "configs/train/tiny_stage2.yaml"),
            "set": [
                f"output_dir={tmp / 'stage2'}",
                "data.num_workers=0",
                "data.windows_per_clip=4",
                "ablation.use_understanding=false",
                *steps,
            ],
        },
        "export": {
            "model_config": str(tmp / "model.yaml"),
            "out": str(tmp / "pipeline"),
            "dtype": "fp16",
            "example": {"clip": "heldout0000_A_c0000", "seconds": 1.0},
            "model_card": str(ROOT / "docs/demo_model_card.md"),
        },
        "accelerate": {"cpu": str(tmp / "accelerate.yaml"), "gpu": str(tmp / "accelerate.yaml")},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml"


def _run(recipe: Path, log: Path, kill_when=None, timeout: float = 600, sets: list[str] = ()) -> str:
    """Run the recipe (with ``--set`` overrides ``sets``); with ``kill_when``, SIGKILL its whole process group as soon
    as ``kill_when()`` holds."""
    command = [sys.executable, "-m", "training.demo_recipe", "--recipe", str(recipe), *(f"--set={s}" for s in sets)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "5"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + timeout
        try:
            while process.poll() is None and time.time() < deadline:
                if kill_when is not None and kill_when():
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    return log.read_text()
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text()
    assert kill_when is None, f"the recipe ended before the kill point (exit {process.returncode}):\n{text[-3000:]}"
    assert process.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_recipe_resumes_after_a_kill_in_every_stage(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    data = tmp_path / "data"

    # 1. Data: killed after the first conversation was written; the rerun keeps it (same folder, untouched).
    first = data / "source" / "train" / "train0000"
    _run(recipe, tmp_path / "run1.log", kill_when=first.is_dir)
    stamp = first.stat().st_mtime_ns
    assert not (data / "DONE").exists()

    # 2. VAE: killed after its first checkpoint; the rerun finishes the data and resumes the VAE from it.
    log = _run(recipe, tmp_path / "run2.log", kill_when=lambda: any((tmp_path / "vae_train").glob("checkpoint-*")))
    assert first.stat().st_mtime_ns == stamp and (data / "DONE").is_file()
    assert json.loads((data / "prepared" / "train" / "prep_summary.json").read_text())["failed"] == []

    # 3. Stage 1: the VAE resumes (not from zero) and completes; stage 1 is killed after a checkpoint.
    log = _run(recipe, tmp_path / "run3.log", kill_when=lambda: any((tmp_path / "stage1").glob("checkpoint-*")))
    assert "data: complete, skipped" in log and "resuming from" in log and "(step 0)" not in log
    assert json.loads((tmp_path / "vae_train" / "report.json").read_text())["steps"] == 8
    assert json.loads((tmp_path / "decoder_train" / "report.json").read_text())["steps"] == 8

    # 4. Stage 2: stage 1 resumes from its checkpoint and completes; stage 2 is killed after a checkpoint.
    log = _run(recipe, tmp_path / "run4.log", kill_when=lambda: any((tmp_path / "stage2").glob("checkpoint-*")))
    assert "vae: complete, skipped" in log and f"resuming from {tmp_path / 'stage1'}/checkpoint-" in log
    assert (tmp_path / "stage1" / "final").is_dir()

    # 5. Stage 2 resumes and completes, then the export writes the pipeline.
    log = _run(recipe, tmp_path / "run5.log")
    assert "stage1: complete, skipped" in log and f"resuming from {tmp_path / 'stage2'}/checkpoint-" in log
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "pipeline" / "README.md").read_text() == (ROOT / "docs/demo_model_card.md").read_text()
    assert len(np.load(tmp_path / "pipeline" / "example" / "user_landmarks.npy")) == 25  # the example's 1 s
    state = json.loads((tmp_path / "recipe_state.json").read_text())
    assert all(state[stage]["exit_code"] == 0 for stage in ("data", "vae", "decoder", "stage1", "stage2", "export"))
    assert "--vae " + str(tmp_path / "decoder") in log  # the export ships the fine-tuned decoder

    # 6. Everything is complete: a rerun skips every stage.
    log = _run(recipe, tmp_path / "run6.log")
    assert log.count("complete, skipped") == 7  # every stage, distill included (this recipe has none: complete)

    # 7. Trained longer (the decoder's and stage 1's max_train_steps raised by --set): the decoder stage continues from
    # its last checkpoint; it trains the encoder whose latents stage 1 learns, so stage 1 and stage 2 start over.
    longer = yaml.safe_load(recipe.read_text())
    sets = [
        f"{stage}.set={json.dumps([*longer[stage]['set'], 'train.max_train_steps=12'])}"
        for stage in ("decoder", "stage1")
    ]
    log = _run(recipe, tmp_path / "run7.log", sets=sets)
    assert "data: complete, skipped" in log and "vae: complete, skipped" in log
    assert f"resuming from {tmp_path / 'decoder_train'}/checkpoint-8 (step 8)" in log
    assert "stage1 (its input changed: starting it over)" in log
    assert f"resuming from {tmp_path / 'stage1'}/checkpoint-8" not in log
    assert "stage2 (its input changed: starting it over)" in log
    assert json.loads((tmp_path / "decoder_train" / "report.json").read_text())["steps"] == 12
    trained = yaml.safe_load((tmp_path / "stage1" / "final" / "training_config.yaml").read_text())["train"]
    assert trained["max_train_steps"] == 12
    assert (tmp_path / "pipeline" / "model_index.json").stat().st_mtime >= (
        tmp_path / "stage2" / "final"
    ).stat().st_mtime


def test_a_second_run_of_the_same_recipe_is_refused_while_one_is_live(tmp_path):
    from training.demo_recipe import recipe_lock

    recipe = _tiny_recipe(tmp_path)
    with recipe_lock(tmp_path / "recipe_state.json"):
        result = subprocess.run(
            [sys.executable, "-m", "training.demo_recipe", "--recipe", str(recipe)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode != 0 and f"another demo-recipe run holds {tmp_path}" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr and not (tmp_path / "data").exists()  # nothing was started


def test_a_personal_avatar_plan_keeps_one_person_and_unseen_voices():
    """The recipe's set: every participant is a framing of the astronaut photo; held-out voices never speak in
    training; a pool that cannot make a conversation is refused, naming the fix."""
    from synthetic.demo_set import TRAIN_VOICES, UNSEEN_VOICES

    recipe = yaml.safe_load((ROOT / "configs/train/demo_recipe.yaml").read_text())
    options = recipe["data"]["options"]
    config = DemoSetConfig(
        identities=tuple(options["identities"]), unseen_heldout_voices=options["unseen_heldout_voices"]
    )
    plan = conversation_plan(config)
    assert {i for e in plan for i in e["identities"]} == set(options["identities"])
    assert {IDENTITIES[i].source for i in options["identities"]} == {"astronaut"}
    assert not any(IDENTITIES[i].mirror or IDENTITIES[i].hue for i in options["identities"])
    train_voices = {v for e in plan if e["split"] == "train" for v in e["dialogue"]["voices"]}
    heldout_voices = {v for e in plan if e["split"] == "heldout" for v in e["dialogue"]["voices"]}
    assert train_voices <= set(TRAIN_VOICES) and heldout_voices <= set(UNSEEN_VOICES)
    assert not train_voices & heldout_voices
    # Without the option, held-out conversations draw from the training voices (the multi-identity set as it was).
    assert {v for e in conversation_plan(DemoSetConfig()) for v in e["dialogue"]["voices"]} <= set(TRAIN_VOICES)
    for pool in (("astronaut",), ("astronaut", "nobody")):
        with pytest.raises(ValueError, match="--identities"):
            conversation_plan(DemoSetConfig(identities=pool))
