"""Issue 23 (round 3 of "nothing lost, nothing silently wrong"): the overwrite flags, checkpoint rotation, NaN
anywhere, missing weights, and the smaller cases. Each test reproduces one case of the issue and compares what is on
disk before and after where data could be lost."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_render import _write_conversation
from tests.tiny_models import TINY
from training.train import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file under ``folder``: what a test compares before and after."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _train(data_root: Path, output_dir: Path, *overrides: str) -> dict:
    args = [
        "--config",
        str(CONFIGS / "tiny_stage1.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        f"output_dir={output_dir}",
    ]
    for item in overrides:
        args += ["--set", item]
    return run(args)


def _reset_accelerate() -> None:
    """A run that raised leaves accelerate's process state behind; the next run in this process needs it cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


@pytest.fixture(scope="module")
def stage1_run(data_root, tmp_path_factory):
    """A 2-step tiny stage-1 run with checkpoint-2/ and final/."""
    base = tmp_path_factory.mktemp("round3")
    _train(data_root, base / "runs" / "stage1", "train.max_train_steps=2", "train.checkpointing_steps=2")
    return base / "runs" / "stage1"


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from echo.components import load_components
    from pipelines import EchoPipeline

    folder = tmp_path_factory.mktemp("pipeline")
    EchoPipeline(**load_components(TINY)).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Data lost
# ----------------------------------------------------------------------------------------------------------------------


def test_export_overwrite_never_deletes_its_inputs_or_a_non_pipeline_folder(stage1_run, tmp_path):
    """Issue 23, data lost 1: ``--out`` equal to ``--stage-dir``, or a folder holding it, is refused with
    ``--overwrite`` too, and so is a folder that is not a pipeline; only a pipeline folder is replaced."""
    from training.export import export_pipeline

    runs = stage1_run.parent
    before = _snapshot(runs)
    for out in (stage1_run, runs, stage1_run / "final"):
        with pytest.raises(ValueError, match=r"--out .* the input --stage-dir"):
            export_pipeline(stage1_run, out, overwrite=True)
    assert _snapshot(runs) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    with pytest.raises(FileExistsError, match="not an EchoPipeline folder"):
        export_pipeline(stage1_run, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "my own file"

    pipe = export_pipeline(stage1_run, tmp_path / "pipe")
    export_pipeline(stage1_run, pipe, overwrite=True)  # a pipeline folder is replaced
    assert json.loads((pipe / "model_index.json").read_text())["_class_name"] == "EchoPipeline"
    assert _snapshot(runs) == before


def test_render_overwrite_deletes_only_the_clips_it_rendered(saved_pipeline, tmp_path):
    """Issue 23, data lost 2: ``--overwrite`` deletes the clips echo-render recorded as its own, never a user's
    video in the same folder."""
    from pipelines import render

    work = tmp_path / "work"
    entry = _write_conversation(work / "conv", seconds=0.2)
    manifest = work / "conversations.jsonl"
    manifest.write_text(json.dumps({**entry, "id": "a"}) + "\n")
    out = work / "out"
    args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(out), "--steps", "1"]
    assert render.main(args) == 0
    (out / "holiday.mp4").write_bytes(b"a user's own video")
    first = (out / "a.mp4").read_bytes()
    assert render.main([*args[:-2], "--steps", "2", "--overwrite"]) == 0
    assert (out / "holiday.mp4").read_bytes() == b"a user's own video"
    assert (out / "a.mp4").read_bytes() != first  # the own clip was rendered again


def _checkpoint_run(data_root: Path, out: Path, *overrides: str) -> dict:
    return _train(data_root, out, "train.checkpointing_steps=2", "train.checkpoints_total_limit=1", *overrides)


def test_a_checkpoint_save_killed_midway_keeps_the_previous_checkpoint(data_root, tmp_path, monkeypatch):
    """Issue 23, data lost 3: with ``checkpoints_total_limit: 1``, a save that dies before it completes (here: the
    manifest write raising, as a kill would stop it) leaves checkpoint-2 as it was, and ``--resume latest`` resumes
    from it."""
    import training.train as train

    out = tmp_path / "run"
    write_manifest, calls, seen = train.write_manifest, [], {}

    def dying_write_manifest(folder):
        calls.append(folder)
        if len(calls) == 2:  # the save of checkpoint-4
            seen["before"] = _snapshot(out / "checkpoint-2") if (out / "checkpoint-2").is_dir() else None
            raise RuntimeError("killed during the save of checkpoint-4")
        return write_manifest(folder)

    monkeypatch.setattr(train, "write_manifest", dying_write_manifest)
    with pytest.raises(RuntimeError, match="killed during the save"):
        _checkpoint_run(data_root, out, "train.max_train_steps=4")
    _reset_accelerate()
    monkeypatch.setattr(train, "write_manifest", write_manifest)
    assert seen["before"] is not None and _snapshot(out / "checkpoint-2") == seen["before"]
    assert train.resolve_resume(out, "latest") == out / "checkpoint-2"
    resumed = _checkpoint_run(data_root, out, "train.max_train_steps=4", "train.resume_from_checkpoint=latest")
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # rotated once 4 was complete


def test_failures_jsonl_on_a_full_disk_prints_the_failures(saved_pipeline, tmp_path, monkeypatch, capsys):
    """Issue 23, data lost 4: when ``failures.jsonl`` cannot be written (ENOSPC), the failed clip is printed with
    its error and the summary still comes; the earlier ``failures.jsonl`` is not left truncated."""
    import builtins

    from pipelines import render

    work = tmp_path / "work"
    entry = _write_conversation(work / "conv", seconds=0.2)
    manifest = work / "conversations.jsonl"
    manifest.write_text(json.dumps({**entry, "id": "broken", "user_audio": "conv/missing.wav"}) + "\n")
    out = work / "out"
    out.mkdir(parents=True)
    (out / "failures.jsonl").write_text('{"id": "earlier"}\n')
    real_open = builtins.open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "failures.jsonl" in str(path) and "w" in mode else handle

    monkeypatch.setattr(render, "open", open_on_full_disk, raising=False)
    args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(out), "--steps", "1"]
    assert render.main(args) == 1
    printed = capsys.readouterr()
    assert re.search(r"could not write .*failures\.jsonl.*No space left", printed.err), printed.err
    assert "'broken'" in printed.err and "missing.wav" in printed.err
    assert "0 rendered, 0 skipped (already done), 1 failed" in printed.out
    assert (out / "failures.jsonl").read_text() == '{"id": "earlier"}\n'
    assert not list(out.glob(".failures.jsonl.*"))


# ----------------------------------------------------------------------------------------------------------------------
# NaN anywhere
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lip_mask", "face_mask"])
def test_nan_lip_or_face_mask_is_refused_naming_it(name):
    from echo.components import load_components
    from pipelines import EchoPipeline
    from tests.render_inputs import tiny_render_inputs

    pipe = EchoPipeline(**load_components(TINY))
    pipe.set_progress_bar_config(disable=True)
    inputs = tiny_render_inputs(num_frames=5)
    inputs[name] = inputs[name].clone()
    inputs[name][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"`{name}` holds NaN"):
        pipe(**inputs, generator=torch.Generator().manual_seed(0))


def test_a_nan_loss_stops_training_naming_the_step_without_saving_final(data_root, tmp_path, monkeypatch):
    """A loss that turns NaN at step 3 stops the run with an error naming step 3; no final/ (nor a NaN checkpoint)
    is written, and checkpoint-2 from before stays."""
    import training.train as train

    training_step, micro = train.training_step, []

    def diverging_step(*args, **kwargs):
        terms = training_step(*args, **kwargs)
        micro.append(1)
        if len(micro) >= 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(train, "training_step", diverging_step)
    out = tmp_path / "run"
    with pytest.raises(train.TrainingDiverged, match=r"step 3: the loss is not finite \(loss = nan"):
        _train(data_root, out, "train.max_train_steps=4", "train.checkpointing_steps=2")
    _reset_accelerate()
    assert not (out / "final").exists() and not (out / "checkpoint-4").exists()
    train.verify_checkpoint(out / "checkpoint-2")
    modules = load_file(str(out / "checkpoint-2" / "transformer_modules.safetensors"))
    assert all(torch.isfinite(v).all() for v in modules.values())


def test_export_refuses_nan_weights_naming_them(stage1_run, tmp_path):
    from training.export import export_pipeline
    from training.modeling import MODULES_FILE

    run_dir = tmp_path / "stage1"
    shutil.copytree(stage1_run, run_dir)
    path = run_dir / "final" / MODULES_FILE
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(
        ValueError, match=rf"trained transformer of .* holds NaN or infinite weights \({re.escape(name)}"
    ):
        export_pipeline(run_dir, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def _pipeline_copy_with(saved_pipeline: Path, tmp_path: Path, edit) -> tuple[Path, str]:
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    name = "blocks.0.attn1.to_q.weight"
    edit(tensors, name)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder, name


def test_a_pipeline_folder_of_nan_weights_is_refused_at_load(saved_pipeline, tmp_path):
    from pipelines import render

    def poison(tensors, name):
        tensors[name] = torch.full_like(tensors[name], float("nan"))

    folder, name = _pipeline_copy_with(saved_pipeline, tmp_path, poison)
    with pytest.raises(ValueError, match=rf"hold NaN or infinite values \({re.escape(name)}"):
        render.load_pipeline(folder, device="cpu")


# ----------------------------------------------------------------------------------------------------------------------
# A missing weight
# ----------------------------------------------------------------------------------------------------------------------


def test_a_transformer_file_missing_one_weight_is_an_error_naming_it(saved_pipeline, tmp_path):
    from pipelines import render

    folder, name = _pipeline_copy_with(saved_pipeline, tmp_path, lambda tensors, name: tensors.pop(name))
    with pytest.raises(ValueError, match=rf"lack 1 tensors \({re.escape(name)}\)"):
        render.load_pipeline(folder, device="cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Silent wrong results, errors that name nothing
# ----------------------------------------------------------------------------------------------------------------------


def test_a_checkpoint_without_its_manifest_is_not_resumed(stage1_run, tmp_path):
    """A flipped byte in the adapter weights (a valid safetensors header) with checkpoint_files.json deleted."""
    from training.train import MANIFEST_FILE, CheckpointError, resolve_resume

    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(stage1_run / "checkpoint-2", checkpoint)
    (checkpoint / MANIFEST_FILE).unlink()
    weights = checkpoint / "transformer_lora" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint-2' has no {MANIFEST_FILE}"):
        resolve_resume(tmp_path / "run", "checkpoint-2")
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        resolve_resume(tmp_path / "run", "latest")


def test_a_directory_named_like_a_clip_is_not_taken_as_done(saved_pipeline, tmp_path):
    """A folder ``<id>.mp4`` in ``--out``: the clip fails naming it (not "already done"), and ``--overwrite``
    leaves it alone instead of crashing."""
    from pipelines import render

    work = tmp_path / "work"
    entry = _write_conversation(work / "conv", seconds=0.2)
    manifest = work / "conversations.jsonl"
    manifest.write_text(json.dumps({**entry, "id": "a"}) + "\n")
    out = work / "out"
    (out / "a.mp4").mkdir(parents=True)
    (out / "a.mp4" / "keep.txt").write_text("x")
    args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(out), "--steps", "1"]
    for extra in ([], ["--overwrite"]):
        assert render.main([*args, *extra]) == 1
        failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
        assert [f["id"] for f in failures] == ["a"] and re.search(r"a\.mp4' exists .* folder", failures[0]["error"])
        assert (out / "a.mp4" / "keep.txt").read_text() == "x"


def test_echo_render_into_an_unwritable_out_names_it(saved_pipeline, tmp_path, capsys):
    from pipelines import render

    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        render.main(["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert re.search(r"--out '.*file/out' cannot be written", capsys.readouterr().err)


def test_echo_export_removes_the_temporary_folder_of_a_killed_export(stage1_run, tmp_path):
    from training.export import export_pipeline

    stale = tmp_path / ".pipe.999999999.tmp"  # no such process
    stale.mkdir()
    (stale / "model_index.json").write_text("{")
    export_pipeline(stage1_run, tmp_path / "pipe")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_settings_of_the_wrong_type_or_range_are_refused_at_load_naming_the_key():
    from echo.settings import EchoSettings

    for values, message in (
        ({"resolution": "abc"}, r"settings key `resolution` is 'abc' \(str\), expected an integer"),
        ({"resolution": 1e9}, r"settings key `resolution` is 1000000000.0 \(float\), expected an integer"),
        ({"resolution": 1_000_000_000}, r"`resolution` is 1000000000, expected .* at most 8192"),
        ({"use_emotion": "yes"}, r"settings key `use_emotion` is 'yes' \(str\), expected true or false"),
        ({"audio_guidance_scale": float("inf")}, r"`audio_guidance_scale` is inf .* expected a finite number"),
    ):
        with pytest.raises(ValueError, match=message):
            EchoSettings.from_dict(values, source="model_index.json")
    assert EchoSettings.from_dict({"max_history_frames": None, "audio_guidance_scale": 3}).audio_guidance_scale == 3


def test_a_16_bit_png_is_read_at_its_brightness(tmp_path):
    import PIL.Image

    from pipelines.video_io import load_image

    gray = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "ref16.png"
    PIL.Image.fromarray(gray).save(path)
    assert PIL.Image.open(path).mode.startswith("I")
    image = np.asarray(load_image(path))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[..., 0], gray / 257.0, atol=1)  # 8-bit = 16-bit / 257, not clipped to white
    assert (image == 255).mean() < 0.01


def test_a_fifo_in_the_manifest_fails_its_clip_without_blocking(saved_pipeline, tmp_path):
    import os

    from pipelines import render

    work = tmp_path / "work"
    entry = _write_conversation(work / "conv", seconds=0.2)
    os.mkfifo(work / "conv" / "fifo.png")
    manifest = work / "conversations.jsonl"
    manifest.write_text(json.dumps({**entry, "id": "a", "reference_image": "conv/fifo.png"}) + "\n")
    out = work / "out"
    args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(out), "--steps", "1"]
    assert render.main(args) == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert re.search(r"`reference_image` '.*fifo\.png' is not a regular file", failures[0]["error"])


def test_scheduler_shift_out_of_bounds_is_refused(saved_pipeline, tmp_path, capsys):
    from pipelines import render

    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("")
    base = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        render.main([*base, "--shift", "1e30"])
    assert exit_info.value.code == 2 and "--shift: expected a number in (0, 1000]" in capsys.readouterr().err
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    key = (
        "shift"
        if "shift" in config and config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
        else "flow_shift"
    )
    config[key] = -1.0
    config_path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        render.main([*base[:1], str(folder), *base[2:]])
    assert exit_info.value.code == 2 and "samples with the time shift -1" in capsys.readouterr().err


def test_resume_latest_with_a_changed_config_names_the_differing_keys(stage1_run, data_root, tmp_path):
    """A changed learning rate, ``windows_per_clip`` or LoRA rank is refused naming each key with both values, before
    anything is loaded (no tensor-size list); the run's length may change. A checkpoint written before a config key
    existed was trained at its default: a non-default value of it is refused too."""
    from training.checkpoint_integrity import write_manifest

    out = tmp_path / "run"
    shutil.copytree(stage1_run, out)
    shutil.rmtree(out / "final")
    saved = out / "checkpoint-2" / "training_config.yaml"
    lines = saved.read_text().splitlines(keepends=True)
    saved.write_text("".join(line for line in lines if "lip_flow_weight" not in line))  # an older checkpoint
    write_manifest(out / "checkpoint-2")
    assert len(saved.read_text().splitlines()) == len(lines) - 1
    for change, named in (
        ("optim.lora_lr=0.5", r"optim\.lora_lr: checkpoint 0\.001, now 0\.5"),
        ("data.windows_per_clip=3", r"data\.windows_per_clip: checkpoint 2, now 3"),
        ("lora.rank=8", r"lora\.rank: checkpoint 4, now 8"),
        ("loss.lip_flow_weight=10", r"loss\.lip_flow_weight: checkpoint 1\.0, now 10(\.0)?"),
    ):
        with pytest.raises(ValueError, match=rf"config differs .*checkpoint-2.* \({named}\)"):
            _train(data_root, out, "train.max_train_steps=3", "train.resume_from_checkpoint=latest", change)
        _reset_accelerate()
    resumed = _train(
        data_root, out, "train.max_train_steps=3", "train.resume_from_checkpoint=latest", "train.checkpointing_steps=2"
    )
    assert [h["step"] for h in resumed["history"]] == [3]


# ----------------------------------------------------------------------------------------------------------------------
# The stage-1 state echo-export fuses, a final/ without its adapter
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2_run(stage1_run, data_root):
    """A 2-step tiny stage-2 run on ``stage1_run`` (checkpoint-2/ and final/)."""
    out = stage1_run.parent / "stage2"
    args = [
        "--config",
        str(CONFIGS / "tiny_stage2.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        f"output_dir={out}",
        "--set",
        f"model.stage1_dir={stage1_run}",
        "--set",
        "train.max_train_steps=2",
        "--set",
        "train.checkpointing_steps=2",
    ]
    run(args)
    return out


def test_export_refuses_a_stage1_dir_that_stage2_was_not_trained_on(stage1_run, stage2_run, tmp_path):
    """Issue 23: ``--stage1-dir`` naming another stage-1 run (here: a copy with one weight changed) or the stage-2 run
    itself is refused naming both; stage 2 records the stage-1 state it was trained on (its weights' SHA-256) in
    final/ and in every checkpoint."""
    from training.export import export_pipeline
    from training.modeling import LORA_DIR, STAGE1_RECORD, stage1_identity

    identity = stage1_identity(stage1_run / "final")
    for state in ("final", "checkpoint-2"):
        assert (
            json.loads((stage2_run / state / STAGE1_RECORD).read_text())["weights_sha256"] == identity["weights_sha256"]
        )

    other = tmp_path / "other_stage1"
    shutil.copytree(stage1_run, other)
    path = other / "final" / LORA_DIR / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=rf"--stage1-dir '{re.escape(str(other / 'final'))}' is not the stage-1 state "
        rf"'{re.escape(str(stage2_run / 'final'))}' was trained on: .*recorded .*stage1",
    ):
        export_pipeline(stage2_run, tmp_path / "pipe", stage1_dir=other)
    with pytest.raises(ValueError, match=r"--stage1-dir .*stage2/final' is a stage-2 output, not a stage-1 one"):
        export_pipeline(stage2_run, tmp_path / "pipe", stage1_dir=stage2_run)
    assert not (tmp_path / "pipe").exists()
    export_pipeline(stage2_run, tmp_path / "pipe", stage1_dir=stage1_run)  # the stage 1 it was trained on


def test_export_of_a_final_without_its_adapter_is_refused_not_replaced_by_a_checkpoint(stage1_run, tmp_path, caplog):
    """Issue 23: a final/ without transformer_lora/ (a stopped save) is an error naming it and the newest checkpoint,
    not a silent export of that checkpoint; a run with no final/ at all exports its newest checkpoint, saying so."""
    import logging

    from training.export import export_pipeline
    from training.modeling import LORA_DIR

    run_dir = tmp_path / "stage1"
    shutil.copytree(stage1_run, run_dir)
    shutil.rmtree(run_dir / "final" / LORA_DIR)
    with pytest.raises(FileNotFoundError, match=r"final/ has no transformer_lora/, so it is incomplete.*checkpoint-2"):
        export_pipeline(run_dir, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    shutil.rmtree(run_dir / "final")
    with caplog.at_level(logging.WARNING, logger="training.modeling"):
        export_pipeline(run_dir, tmp_path / "pipe")
    assert re.search(r"stage1 has no final/ .*using its newest checkpoint, checkpoint-2", caplog.text), caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Two echo-render runs into one folder
# ----------------------------------------------------------------------------------------------------------------------


def test_a_second_echo_render_into_a_folder_a_live_run_holds_is_refused_naming_it(saved_pipeline, tmp_path, capsys):
    """Issue 23: echo-render holds ``<out>/.echo-render.lock`` (echo.locking, the lock echo-prep uses too): a run into
    a folder whose lock names a live process is refused before any clip, naming that process; once it is gone its
    lock is taken over."""
    import subprocess
    import sys

    from data_prep import cli as prep_cli
    from echo import locking
    from pipelines import render

    assert prep_cli.OutputLocked is locking.OutputLocked and prep_cli.LOCK == ".echo-prep.lock"  # one implementation
    work = tmp_path / "work"
    entry = _write_conversation(work / "conv", seconds=0.2)
    manifest = work / "conversations.jsonl"
    manifest.write_text(json.dumps({**entry, "id": "a"}) + "\n")
    out = work / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stat = locking.process_stat(holder.pid)
        record = {**locking.lock_record(), "pid": holder.pid, "process_start_ticks": stat[1] if stat else None}
        (out / ".echo-render.lock").write_text(json.dumps(record))
        args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(out), "--steps", "1"]
        with pytest.raises(SystemExit) as exit_info:
            render.main(args)
        assert exit_info.value.code == 2
        assert re.search(
            rf"being written by another echo-render run, pid {holder.pid} on host", capsys.readouterr().err
        )
        assert not (out / "a.mp4").exists() and json.loads((out / ".echo-render.lock").read_text()) == record
    finally:
        holder.kill()
        holder.wait()
    assert render.main(args) == 0  # the holder is gone: its lock is taken over
    assert (out / "a.mp4").is_file() and not (out / ".echo-render.lock").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Errors that name their input
# ----------------------------------------------------------------------------------------------------------------------


def test_training_into_an_output_dir_that_is_a_file_names_it(data_root, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    for output_dir, where in ((blocker, "is a file"), (blocker / "sub", r"lies under '.*run', which is a file")):
        with pytest.raises(NotADirectoryError, match=rf"output_dir '.*' {where}: a run writes a folder there"):
            _train(data_root, output_dir, "train.max_train_steps=1")
        _reset_accelerate()
    assert blocker.read_text() == "not a folder"


def test_a_file_size_limit_during_the_first_checkpoint_save_names_the_checkpoint(data_root, tmp_path):
    """``RLIMIT_FSIZE`` of 64 KiB (a full quota behaves alike): the save of checkpoint-2 fails naming it, output_dir
    and the cause, and leaves no partial folder."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from training.train import cli\n"
        "cli(sys.argv[1:])\n"
    )
    args = [
        "--config",
        str(CONFIGS / "tiny_stage1.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        f"output_dir={out}",
        "--set",
        "train.max_train_steps=2",
        "--set",
        "train.checkpointing_steps=2",
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode != 0
    assert re.search(
        rf"CheckpointSaveError: saving checkpoint-2 into output_dir '{re.escape(str(out))}' failed "
        r"\(.*File too large",
        result.stderr,
    ), result.stderr[-3000:]
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*"))


def test_echo_prep_with_a_missing_input_names_it_and_writes_nothing(tmp_path, capsys):
    """A typo in ``--input``: refused naming it before ``--out`` is created, so the corrected run (here with another
    ``--size``) is not refused for options an empty run recorded."""
    from data_prep import cli
    from data_prep.stages import PrepOptions

    out = tmp_path / "prepared"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input", str(tmp_path / "convs-typo"), "--layout", "pairs", "--out", str(out), "--size", "64"])
    assert exit_info.value.code == 2
    assert re.search(r"--input '.*convs-typo' does not exist: pass the folder", capsys.readouterr().err)
    with pytest.raises(FileNotFoundError, match=r"--input '.*convs-typo' does not exist"):
        cli.run_prep(tmp_path / "convs-typo", "pairs", out, PrepOptions(wav2vec2="unused", size=64), progress=False)
    assert not out.exists()


def test_echo_live_out_in_a_missing_folder_is_refused_before_rendering(saved_pipeline, tmp_path, capsys):
    from pipelines import live

    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("")
    for option in ("--out", "--report"):
        with pytest.raises(SystemExit) as exit_info:
            live.main(
                [
                    "--pipeline",
                    str(saved_pipeline),
                    "--manifest",
                    str(manifest),
                    option,
                    str(tmp_path / "missing" / "avatar.mp4"),
                ]
            )
        assert exit_info.value.code == 2
        assert re.search(
            rf"{option} '.*missing/avatar.mp4' lies in '.*missing', which is not a folder", capsys.readouterr().err
        )


# ----------------------------------------------------------------------------------------------------------------------
# Two faces in an echo-prep input, 50-fps clips at echo-eval, audio longer than its video
# ----------------------------------------------------------------------------------------------------------------------


def _two_faces() -> tuple[np.ndarray, tuple[int, int]]:
    """skimage's astronaut (a smaller face, left) beside matplotlib's Grace Hopper (the larger face, right): one
    frame, and the column range of Grace Hopper's half."""
    import matplotlib.cbook
    import PIL.Image
    from skimage.data import astronaut

    left = astronaut()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        right = np.asarray(PIL.Image.open(file).convert("RGB"))
    frame = np.zeros((max(left.shape[0], right.shape[0]), left.shape[1] + right.shape[1], 3), dtype=np.uint8)
    frame[: left.shape[0], : left.shape[1]] = left
    frame[: right.shape[0], left.shape[1] :] = right
    return frame, (left.shape[1], frame.shape[1])


def test_the_participant_is_the_largest_face_and_the_crop_never_moves_to_another_person():
    """Issue 23: two faces in a video. The participant is the largest face of the first frame (not the detector's
    most confident one); while their face is hidden, the crop holds on them (those frames count as without a face)
    instead of jumping to the other person and following them afterwards."""
    from echo.framing import FaceFramer, select_face

    rows = np.array([[0, 0, 10, 10, 0.99], [50, 50, 90, 90, 0.6]], dtype=np.float32)  # small and sure, large
    np.testing.assert_array_equal(select_face(rows, None), [50, 50, 90, 90])
    assert select_face(rows[:1], np.array([50, 50, 90, 90], dtype=np.float32)) is None  # another person: no match

    frame, (x0, x1) = _two_faces()
    hidden = frame.copy()
    hidden[:, x0:x1] = 0  # the participant's face is not detected in these frames; the other person's is
    frames = [frame] * 3 + [hidden] * 2 + [frame] * 3
    with FaceFramer(smooth_half_life=0) as framer:
        assert len(framer.detect(frame)) == 2 and len(framer.detect(hidden)) == 1
        boxes, found, _ = framer.track(frames)
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert ((centres > x0) & (centres < x1)).all(), centres  # every crop on the participant
    assert found.tolist() == [True] * 3 + [False] * 2 + [True] * 3


def test_echo_eval_refuses_clips_at_another_frame_rate_naming_both(tmp_path):
    """Issue 23: 50-fps generated clips against 25-fps ground truth are refused before anything is scored, naming the
    clip and both rates (the same frame count would otherwise score without a word); equal rates score."""
    from echo.metrics import cli
    from echo.metrics.video import write_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(10, 48, 48, 3), dtype=np.uint8)
    t = np.arange(10)[:, None]
    for folder, fps in (("reference", 25), ("generated", 50), ("generated25", 25)):
        (tmp_path / folder).mkdir()
        write_video(str(tmp_path / folder / "clip.mp4"), frames, fps=fps)
        np.savez(
            tmp_path / folder / "clip.npz",
            expcode=np.sin(t * (1 + np.arange(50))[None] / 7),
            posecode=np.cos(t * (1 + np.arange(6))[None] / 5),
        )
    argv = [
        "--reference",
        str(tmp_path / "reference"),
        "--motion-source",
        "files",
        "--kmeans-init",
        "1",
        "--quiet",
        "--out",
        "",
    ]
    with pytest.raises(cli.ClipSetError, match=r"frame rate: clip 'clip': generated 50 fps, ground truth 25 fps"):
        cli.evaluate(cli.parse_args(["--generated", str(tmp_path / "generated"), *argv]))
    report = cli.evaluate(cli.parse_args(["--generated", str(tmp_path / "generated25"), *argv]))
    assert report["settings"]["num_scored"] == 1


def test_echo_prep_fails_audio_three_times_longer_than_its_video_naming_both(tmp_path):
    """Issue 23: a 3 s audio track beside its 1 s video fails the conversation, naming the audio file, its video and
    both lengths (it was cut to the video without a word); the other participant's normal track is not blamed."""
    from data_prep.cli import run_prep
    from data_prep.media import read_wav
    from data_prep.stages import PrepOptions
    from data_prep.testing import save_tiny_wav2vec2
    from echo.clip_format import write_wav
    from synthetic.conversations import make_conversation

    conversation = make_conversation(tmp_path / "src", "pairs", seconds=1.0, size=96, seed=5)
    audio, rate = read_wav(conversation.audios["A"])
    write_wav(conversation.audios["A"], np.tile(audio, 3), rate)
    options = PrepOptions(wav2vec2=str(save_tiny_wav2vec2(tmp_path / "w2v")), size=64, clip_seconds=1.0)
    summary = run_prep(tmp_path / "src", "pairs", tmp_path / "out", options, progress=False)
    assert summary.clips_written == [] and len(summary.failed) == 1
    failure = summary.failed[0]
    assert failure["file"] == "A.wav", failure
    assert re.search(
        r"audio is 3\.00 s long, longer than its video A\.mp4 \(1\.00 s\) by more than 1\.00 s", failure["reason"]
    ), failure


def test_resuming_stage2_on_another_stage1_is_refused(stage1_run, stage2_run, data_root, tmp_path):
    """The stage-1 state recorded in a stage-2 checkpoint must be the one ``model.stage1_dir`` gives on resume."""
    from training.modeling import LORA_DIR

    other = tmp_path / "other_stage1"
    shutil.copytree(stage1_run, other)
    path = other / "final" / LORA_DIR / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors = {k: v + 1.0 for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    out = tmp_path / "stage2"
    shutil.copytree(stage2_run, out)
    shutil.rmtree(out / "final")
    args = [
        "--config",
        str(CONFIGS / "tiny_stage2.yaml"),
        "--set",
        f"data.root={data_root}",
        "--set",
        f"output_dir={out}",
        "--set",
        f"model.stage1_dir={other}",
        "--set",
        "train.max_train_steps=3",
        "--set",
        "train.checkpointing_steps=2",
        "--resume",
        "latest",
    ]
    with pytest.raises(ValueError, match=r"--resume: .*checkpoint-2' was trained on the stage-1 state .*stage1/final'"):
        run(args)
    _reset_accelerate()
