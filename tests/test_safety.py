"""No loading path runs code from a file: a crafted pickle, planted wherever a file is read, is refused unread.

Each test plants a file whose unpickling would create a marker file (what a crafted file could do instead: run any
command) in one place the project reads files from — a training checkpoint, a stage output, a clip folder's arrays and
caches, a pipeline folder, a model folder given to echo-prep or to a model description, the metrics weights, an
echo-render manifest — runs the load, and checks that it is refused and the marker does not exist. Where a library
would at best hand the file to torch's weights-only unpickler, the stronger promise is checked too: weights are read
from safetensors only and `torch.load` is never called on the planted file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "configs" / "models" / "tiny.yaml"


class Planted:
    """Unpickling this creates ``marker`` (a crafted file could run any command the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


class PlantedShell(Planted):
    """The same through a shell: ``os.system("touch <marker>")``."""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, kind: str = "pickle") -> Path:
    """Write a crafted file at ``path``: a bare pickle, a `torch.save` archive holding the object, or a NumPy object
    array (``np.save(allow_pickle=True)``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps(Planted(marker), protocol=2))
    elif kind == "shell":
        path.write_bytes(pickle.dumps(PlantedShell(marker), protocol=2))
    elif kind == "torch":
        torch.save({"state": Planted(marker), "weight": torch.zeros(2)}, path)
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.array([Planted(marker), 1.0], dtype=object), allow_pickle=True)
    else:
        raise ValueError(kind)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a planted pickle was unpickled"


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every path `torch.load` is called with (the call goes through to the real loader)."""
    calls = []
    original = torch.load

    def spy(f, *args, **kwargs):
        calls.append(str(f))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP in one process
def test_the_planted_files_do_run_code_when_unpickled(tmp_path):
    """The control: each planted form creates its marker when loaded the unsafe way."""
    for kind in ("pickle", "shell", "torch", "npy"):
        marker = tmp_path / f"MARKER_{kind}"
        path = plant(tmp_path / f"planted_{kind}", marker, kind)
        if kind == "torch":
            torch.load(path, weights_only=False)
        elif kind == "npy":
            np.load(path, allow_pickle=True)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), kind
    # torch.distributed.checkpoint (FSDP's sharded state, as accelerate's load_state reads it) unpickles `.metadata`.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    marker = tmp_path / "MARKER_dcp"
    plant(tmp_path / "fsdp" / ".metadata", marker, "pickle")
    with pytest.raises(CheckpointException):  # the planted object is no metadata: DCP fails, after running it
        dcp.load({"weight": torch.zeros(2)}, storage_reader=dcp.FileSystemReader(tmp_path / "fsdp"), no_dist=True)
    assert marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Training: resume from a checkpoint folder, stage outputs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory):
    """A checkpoint with every kind of file resume reads: accelerate's optimizer / scheduler / scaler archives, the
    trainer's safetensors and JSON, and FSDP's sharded model and optimizer (torch.distributed.checkpoint folders with
    their ``.metadata`` pickles), listed in checkpoint_files.json."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from training.modeling import LORA_DIR, MODULES_FILE
    from training.train import TrainingProgress, save_rng_state, verify_checkpoint, write_manifest

    folder = tmp_path_factory.mktemp("template") / "checkpoint-3"
    folder.mkdir()
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.save(optimizer.state_dict(), folder / "optimizer.bin")
    torch.save(scheduler.state_dict(), folder / "scheduler.bin")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), folder / "scaler.pt")
    save_file({"weight": model.weight.detach().clone()}, str(folder / MODULES_FILE))
    (folder / LORA_DIR).mkdir()
    save_file({"lora_A.weight": torch.zeros(2, 4)}, str(folder / LORA_DIR / "adapter_model.safetensors"))
    (folder / LORA_DIR / "adapter_config.json").write_text(json.dumps({"r": 2}))
    TrainingProgress(global_step=3, micro_step=3).save(folder)
    save_rng_state(folder, 0)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            {"model": model.state_dict()},
            storage_writer=dcp.FileSystemWriter(folder / "pytorch_model_fsdp_0"),
            no_dist=True,
        )
        dcp.save(
            {"optimizer": optimizer.state_dict()},
            storage_writer=dcp.FileSystemWriter(folder / "optimizer_0"),
            no_dist=True,
        )
    write_manifest(folder)
    verify_checkpoint(folder)  # the genuine files pass
    return folder


@pytest.mark.parametrize(
    "name, kind",
    [
        ("custom_checkpoint_0.pkl", "pickle"),  # accelerate's register_for_checkpointing state
        ("random_states_0.pkl", "shell"),  # accelerate's RNG states
        ("optimizer.bin", "torch"),
        ("optimizer.bin", "pickle"),
        ("scheduler.bin", "torch"),
        ("scaler.pt", "torch"),
        ("pytorch_model.bin", "torch"),
        ("pytorch_model_fsdp_0/.metadata", "pickle"),  # torch.distributed.checkpoint reads it with pickle.load
        ("optimizer_0/.metadata", "shell"),
        ("model.safetensors", "pickle"),
        ("rng_state_0.safetensors", "pickle"),
        ("transformer_modules.safetensors", "pickle"),
        ("transformer_lora/adapter_model.safetensors", "torch"),
        ("training_state.json", "pickle"),
    ],
)
def test_resume_refuses_a_planted_pickle_in_any_checkpoint_file(checkpoint_template, tmp_path, marker, name, kind):
    """`--resume` verifies a checkpoint before loading anything: a crafted file is refused, naming it, even when
    checkpoint_files.json was rewritten to match it; `--resume latest` finds no checkpoint to fall back to."""
    from training.train import CheckpointError, resolve_resume, write_manifest

    checkpoint = tmp_path / "run" / "checkpoint-3"
    shutil.copytree(checkpoint_template, checkpoint)
    planted = plant(checkpoint / name, marker, kind)
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=re.escape(planted.name)):
        resolve_resume(tmp_path / "run", "checkpoint-3")
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        resolve_resume(tmp_path / "run", "latest")


def test_resume_under_deepspeed_is_refused(tmp_path):
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False): resuming under it is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from training.config import load_config
    from training.train import TrainingProgress, resume_from_checkpoint

    overrides = [f"output_dir={tmp_path}", "train.resume_from_checkpoint=latest"]
    config = load_config(ROOT / "configs/train/tiny_stage1.yaml", overrides)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_main_process=True, num_processes=1)
    with pytest.raises(ValueError, match="refused under DeepSpeed.*weights_only=False"):
        resume_from_checkpoint(accelerator, config, TrainingProgress())


def test_stage_outputs_are_read_as_safetensors_only(tmp_path, marker):
    """Stage 2 (model.stage1_dir) and echo-export read a stage output's safetensors: a planted pickle is refused."""
    from training.modeling import LORA_DIR, MODULES_FILE, load_adapter, load_fused

    plant(tmp_path / MODULES_FILE, marker, "pickle")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / MODULES_FILE)) + "' is not a readable safetensors"):
        load_fused(torch.nn.Linear(2, 2), tmp_path, "stage1")
    (tmp_path / LORA_DIR).mkdir()
    (tmp_path / LORA_DIR / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LORA"}))
    plant(tmp_path / LORA_DIR / "adapter_model.safetensors", marker, "torch")
    with pytest.raises(ValueError, match="adapter_model.safetensors' is not a readable safetensors"):
        load_adapter(torch.nn.Linear(2, 2), tmp_path / LORA_DIR, "stage1")


# ----------------------------------------------------------------------------------------------------------------------
# Data: clip arrays, caches and metadata read by the dataset
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader, role", [("read_w2v", "avatar"), ("read_w2v", "user"), ("read_landmarks", "user")])
def test_clip_arrays_refuse_pickled_object_arrays(tmp_path, marker, reader, role):
    from echo import clip_format

    name = clip_format.w2v_name(role) if reader == "read_w2v" else clip_format.landmarks_name(role)
    plant(tmp_path / name, marker, "npy")
    with pytest.raises(clip_format.ClipFormatError, match=re.escape(str(tmp_path / name))):
        getattr(clip_format, reader)(tmp_path, role)


@pytest.fixture(scope="module")
def prepared_clips(tmp_path_factory):
    from training.testing import make_tiny_training_set

    # The session's base folder is shared with tests/test_training.py: the set is prepared once per run.
    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def test_the_dataset_refuses_a_pickled_clip_array(prepared_clips, tmp_path, marker):
    from echo import clip_format
    from echo.data import ConversationDataset

    root = tmp_path / "prepared"
    shutil.copytree(prepared_clips, root)
    for clip in sorted(p.parent for p in root.glob("*/meta.json")):
        plant(clip / clip_format.w2v_name("avatar"), marker, "npy")
    dataset = ConversationDataset(
        root, num_frames=9, resolution=64, token_patch=16, use_user_video=False, use_understanding=False
    )
    with pytest.raises(clip_format.ClipFormatError, match=r"avatar_w2v\.npy': is not a readable \.npy array"):
        dataset[0]


@pytest.mark.parametrize(
    "name, read",
    [
        ("user_tokens.safetensors", lambda cf, clip: cf.check_user_tokens(clip, 32, 9)),
        ("user_tokens.safetensors", lambda cf, clip: cf.read_user_tokens(clip, 0, 1)),
        ("emotion_embeds.safetensors", lambda cf, clip: cf.load_emotion_embeds(clip, "neutral")),
        ("user_omni.safetensors", lambda cf, clip: cf.read_understanding_index(clip, 9)),
        ("meta.json", lambda cf, clip: cf.read_meta(clip)),
        ("emotion.json", lambda cf, clip: cf.read_emotion_windows(clip)),
    ],
)
def test_clip_caches_and_metadata_refuse_pickles(tmp_path, marker, name, read):
    """The caches are safetensors and the metadata JSON: formats that cannot run code, so a planted pickle fails to
    parse. (Whether the message names the file is `echo.clip_format`'s.)"""
    from safetensors import SafetensorError

    from echo import clip_format

    plant(tmp_path / name, marker, "pickle")
    with pytest.raises((ValueError, SafetensorError)):
        read(clip_format, tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline folders and model folders
# ----------------------------------------------------------------------------------------------------------------------

# component folder → its weights file in safetensors and the pickle name its library would fall back to
WEIGHT_FILES = {
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "context_encoder": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "audio_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """The tiny model saved as a pipeline folder (every component in safetensors)."""
    from echo.components import load_components
    from pipelines import EchoPipeline

    folder = tmp_path_factory.mktemp("pipeline") / "tiny"
    EchoPipeline(**load_components(TINY_MODEL)).save_pretrained(folder, safe_serialization=True)
    return folder


def _with_planted_weights(pipeline_folder: Path, tmp_path: Path, component: str, marker: Path) -> Path:
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_folder, folder)
    safe, pickled = WEIGHT_FILES[component]
    (folder / component / safe).unlink()
    plant(folder / component / pickled, marker, "torch")
    return folder


@pytest.mark.parametrize("component", sorted(WEIGHT_FILES))
def test_a_pipeline_folder_with_planted_weights_is_refused(pipeline_folder, tmp_path, marker, component):
    """`DiffusionPipeline.from_pretrained` (which resolves EchoPipeline once `pipelines` is imported): a folder whose
    component holds pickled weights instead of safetensors is refused (by torch's weights-only loader at least)."""
    from diffusers import DiffusionPipeline

    import pipelines  # noqa: F401  (registers EchoPipeline in diffusers)

    folder = _with_planted_weights(pipeline_folder, tmp_path, component, marker)
    with pytest.raises((OSError, ValueError, pickle.UnpicklingError)):
        DiffusionPipeline.from_pretrained(folder)


def test_echo_render_loads_pipeline_weights_from_safetensors_only(pipeline_folder, tmp_path, marker, torch_load_calls):
    from pipelines.render import load_pipeline

    folder = _with_planted_weights(pipeline_folder, tmp_path, "vae", marker)
    with pytest.raises(OSError):
        load_pipeline(folder, device="cpu", dtype="float32")
    assert not torch_load_calls


@pytest.mark.parametrize(
    "edit",
    [
        # The pipeline class named as [module, class] of a file in the folder: diffusers' custom-pipeline route.
        lambda index, folder, code: (
            index.update(_class_name=["evil_pipeline", "EvilPipeline"]),
            (folder / "evil_pipeline.py").write_text(code),
        ),
        # A component class from a file in its subfolder.
        lambda index, folder, code: (
            index.update(scheduler=["evil_module", "EvilScheduler"]),
            (folder / "scheduler" / "evil_module.py").write_text(code),
        ),
        # A component "class" that is a function of an installed module.
        lambda index, folder, code: index.update(scheduler=["os", "system"]),
    ],
    ids=["custom-pipeline-file", "custom-component-file", "installed-function"],
)
def test_a_pipeline_folder_runs_no_code_of_its_own(pipeline_folder, tmp_path, marker, edit):
    from diffusers import DiffusionPipeline

    import pipelines  # noqa: F401

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    code = (
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom pipelines import EchoPipeline as EvilPipeline\n"
    )
    edit(index, folder, code)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError):
        DiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("component", sorted(WEIGHT_FILES))
def test_load_components_reads_model_folders_as_safetensors_only(
    pipeline_folder, tmp_path, marker, torch_load_calls, component
):
    """A model description's ``pretrained:`` folder holding pickled weights only is refused before any file is
    unpickled (use_safetensors=True), naming the section and the file."""
    from echo.components import load_components, load_model_config

    folder = _with_planted_weights(pipeline_folder, tmp_path, component, marker)
    section = {"class": load_model_config(TINY_MODEL)[component]["class"], "pretrained": str(folder / component)}
    with pytest.raises(
        OSError, match=rf"section '{component}': .*\['{WEIGHT_FILES[component][1]}'\].*safetensors only"
    ):
        load_components({component: section})
    assert not torch_load_calls


def test_load_components_from_wan_reads_safetensors_only(pipeline_folder, tmp_path, marker, torch_load_calls):
    """``from_wan``: the Wan generator folder is read the same way."""
    from diffusers import WanTransformer3DModel

    from echo.components import load_components

    folder = tmp_path / "wan"
    echo_config = json.loads((pipeline_folder / "transformer" / "config.json").read_text())
    WanTransformer3DModel.from_config(WanTransformer3DModel.extract_init_dict(echo_config)[0]).save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    plant(folder / "diffusion_pytorch_model.bin", marker, "torch")
    section = {"class": "EchoTransformer3DModel", "from_wan": str(folder)}
    with pytest.raises(OSError, match="section 'transformer'.*safetensors only"):
        load_components({"transformer": section})
    assert not torch_load_calls


def test_the_emotion_text_encoder_folder_is_read_as_safetensors_only(tmp_path, marker, torch_load_calls):
    """``echo-prep --text-encoder`` / `EmotionTextEncoder.from_pretrained`."""
    from echo.emotion import EmotionTextEncoder
    from training.testing import save_tiny_text_encoder

    folder = save_tiny_text_encoder(tmp_path / "text")
    (folder / "text_encoder" / "model.safetensors").unlink()
    plant(folder / "text_encoder" / "pytorch_model.bin", marker, "torch")
    with pytest.raises(OSError, match="model.safetensors"):
        EmotionTextEncoder.from_pretrained(folder)
    assert not torch_load_calls


def test_the_understanding_model_folder_is_read_as_safetensors_only(tmp_path, marker, torch_load_calls):
    """``echo-prep --omni-model`` / `OmniUnderstanding.from_pretrained`: a Qwen-Omni folder with pickled weights."""
    from echo.understanding import OmniUnderstanding

    (tmp_path / "omni").mkdir()
    (tmp_path / "omni" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni_thinker"}))
    plant(tmp_path / "omni" / "pytorch_model.bin", marker, "torch")
    with pytest.raises(OSError, match="model.safetensors"):
        OmniUnderstanding.from_pretrained(tmp_path / "omni")
    assert not torch_load_calls


def _wav2vec2_folder(tmp_path: Path, marker: Path) -> Path:
    from data_prep.testing import save_tiny_wav2vec2

    folder = save_tiny_wav2vec2(tmp_path / "w2v")
    (folder / "model.safetensors").unlink()
    plant(folder / "pytorch_model.bin", marker, "torch")
    return folder


def test_echo_prep_refuses_a_wav2vec2_folder_with_planted_weights(tmp_path, marker):
    """``echo-prep --wav2vec2 FOLDER`` (`data_prep.audio_features.Wav2Vec2Features`)."""
    from data_prep.audio_features import Wav2Vec2Features

    with pytest.raises((OSError, pickle.UnpicklingError)):
        Wav2Vec2Features(_wav2vec2_folder(tmp_path, marker))


def test_echo_prep_reads_the_wav2vec2_folder_as_safetensors_only(tmp_path, marker, torch_load_calls):
    from data_prep.audio_features import Wav2Vec2Features

    with pytest.raises(OSError):
        Wav2Vec2Features(_wav2vec2_folder(tmp_path, marker))
    assert not torch_load_calls


# ----------------------------------------------------------------------------------------------------------------------
# Metrics weights and inputs, echo-render manifests
# ----------------------------------------------------------------------------------------------------------------------


def test_metric_network_weights_are_read_as_safetensors_only(tmp_path, marker):
    """`load_feature_network` reads ``<name>.safetensors`` and ``<name>.json``; `convert_checkpoint` reads a public
    checkpoint with the weights-only loader. A planted pickle in any of them is refused, naming it."""
    from echo.metrics.networks import SyncNet, convert_checkpoint, load_feature_network

    SyncNet(width_multiplier=0.0625, embedding_dim=16).save_to_folder(str(tmp_path / "weights"))
    load_feature_network("syncnet", str(tmp_path / "weights"))  # the genuine folder loads
    planted = plant(tmp_path / "weights" / "syncnet.safetensors", marker, "pickle")
    with pytest.raises(ValueError, match=re.escape(str(planted)) + "' are not a readable safetensors file"):
        load_feature_network("syncnet", str(tmp_path / "weights"))
    planted = plant(tmp_path / "weights" / "syncnet.json", marker, "pickle")
    with pytest.raises(ValueError, match=re.escape(str(planted)) + "' is not valid JSON"):
        load_feature_network("syncnet", str(tmp_path / "weights"))
    for kind in ("torch", "pickle"):
        planted = plant(tmp_path / f"syncnet_v2_{kind}.model", marker, kind)
        with pytest.raises(ValueError, match=re.escape(str(planted)) + "' was refused by torch's weights-only loader"):
            convert_checkpoint("syncnet", str(planted), str(tmp_path / "converted"))


def test_motion_coefficients_refuse_pickled_arrays(tmp_path, marker):
    """echo-eval's motion metrics read coefficient arrays with `np.load` (allow_pickle=False)."""
    from echo.metrics.extractor import FlameCoefficientAdapter

    with pytest.raises(ValueError, match="allow_pickle"):
        FlameCoefficientAdapter().load(str(plant(tmp_path / "coefficients.npy", marker, "npy")))


def test_echo_render_manifest_refuses_pickled_landmarks(tmp_path, marker):
    """An echo-render manifest entry's ``reference_landmarks`` / ``user_landmarks`` arrays are read with `np.load`
    (allow_pickle=False): a pickled object array is refused before anything is rendered."""
    import argparse

    from PIL import Image

    from echo.clip_format import write_wav
    from pipelines.render import render_entry
    from pipelines.video_io import write_mp4

    write_wav(tmp_path / "avatar.wav", np.zeros(16000, dtype=np.float32))
    write_wav(tmp_path / "user.wav", np.zeros(16000, dtype=np.float32))
    write_mp4(tmp_path / "user.mp4", np.zeros((5, 32, 32, 3), dtype=np.uint8))
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "reference.png")
    entry = {
        "id": "x",
        "reference_image": "reference.png",
        "avatar_audio": "avatar.wav",
        "user_video": "user.mp4",
        "user_audio": "user.wav",
    }
    for key in ("reference_landmarks", "user_landmarks"):
        planted = plant(tmp_path / f"{key}.npy", marker, "npy")
        with pytest.raises(ValueError, match="allow_pickle"):
            render_entry(None, {**entry, key: planted.name}, tmp_path, tmp_path / "out.mp4", argparse.Namespace())
