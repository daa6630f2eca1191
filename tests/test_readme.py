"""The README's Python examples of "3. Generate from Python" run as written, on tiny models: the only changes are the
model paths (the pipeline folder, the Qwen-Omni id, the real model description), which point at tiny ones; the
input files they read are written first. Without an understanding model, the call says what to pass."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from echo.components import load_components, load_model_config
from tests.test_understanding import build_omni_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny.yaml"
SECONDS = 0.36  # 9 frames at 25 fps: one chunk of the tiny model


def readme_examples() -> list[str]:
    """The ```python blocks of the README's section "3. Generate from Python" (up to the next ``## `` heading)."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## 3\. Generate from Python\n(.*?)^## ", text, flags=re.M | re.S)
    assert section is not None, "README.md has no section '## 3. Generate from Python'"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.M | re.S)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A saved tiny pipeline whose LCU reads understanding tokens of a tiny Qwen2.5-Omni thinker (width 64), and that
    thinker's folder."""
    from pipelines import EchoPipeline

    omni = tmp_path_factory.mktemp("omni")
    build_omni_folder(omni)
    description = load_model_config(TINY)
    description["context_encoder"]["config"]["understanding_dim"] = 64  # the tiny thinker's hidden size
    pipeline = tmp_path_factory.mktemp("echo-pipeline")
    EchoPipeline(**load_components(description)).save_pretrained(pipeline)
    return {"path/to/echo-pipeline": str(pipeline), "Qwen/Qwen2.5-Omni-7B": str(omni)}


@pytest.fixture
def conversation(tmp_path, monkeypatch):
    """The files the example reads, in the working directory: a real face, the avatar's and the user's speech (tones)
    and the user's video."""
    import PIL.Image
    from skimage.data import astronaut

    from data_prep.media import write_wav
    from pipelines.video_io import write_mp4

    monkeypatch.chdir(tmp_path)
    face = astronaut()[::4, ::4]  # 128², a real face for MediaPipe
    PIL.Image.fromarray(face).save("avatar.png")
    t = np.arange(int(SECONDS * 16_000)) / 16_000
    write_wav("avatar.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    write_wav("user.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    write_mp4("user.mp4", np.stack([np.roll(face, k, axis=1) for k in range(int(SECONDS * 25))]))
    return tmp_path


def with_tiny_models(code: str, paths: dict) -> str:
    """``code`` with every model path of ``paths`` it names replaced by the tiny model's."""
    for name, path in paths.items():
        code = code.replace(f'"{name}"', repr(path))
    return code


def test_readme_examples_run_as_written(tiny_models, conversation):
    offline, streaming, building = readme_examples()
    assert all(f'"{name}"' in offline for name in tiny_models)  # the example loads both models by these names
    namespace = {}
    exec(with_tiny_models(offline, tiny_models), namespace)
    from pipelines.video_io import probe_mp4

    assert namespace["frames"].shape[0] == 9 and probe_mp4(conversation / "avatar.mp4")["num_frames"] == 9

    # The streaming example, fed the same conversation in two pieces by the reader's `live_inputs`.
    avatar, user, frames = namespace["avatar_wave"], namespace["user_wave"], namespace["user_frames"]
    shown = []
    namespace["live_inputs"] = lambda: [
        (user[:2560], frames[:4], avatar[:2560]),
        (user[2560:], frames[4:], avatar[2560:]),
    ]
    namespace["show"] = shown.append
    exec(streaming, namespace)
    assert sum(len(piece) for piece in shown) == 9

    # Building a pipeline from a model description, the tiny one instead of the real one, saved to a new folder.
    paths = {"configs/models/wan2.1-t2v-1.3b.yaml": str(TINY), "path/to/echo-pipeline": str(conversation / "built")}
    exec(with_tiny_models(building, paths), namespace)
    assert (conversation / "built" / "model_index.json").is_file()


def test_without_understanding_the_call_says_what_to_pass_before_any_work(tiny_models, conversation, monkeypatch):
    from pipelines import EchoPipeline

    def work(*args, **kwargs):
        raise AssertionError("the call started working before refusing")

    for method in ("prepare_reference", "encode_audio", "encode_prompt"):
        monkeypatch.setattr(EchoPipeline, method, work)
    offline = with_tiny_models(readme_examples()[0], tiny_models)
    without = "\n".join(line for line in offline.splitlines() if "understanding_model=" not in line)
    with pytest.raises(ValueError) as error:
        exec(without, {})
    message = str(error.value)
    assert "understanding_model=echo.OmniUnderstanding.from_pretrained(" in message
    assert "`understanding=` precomputed tokens (N_s, 64)" in message and "use_understanding: false" in message


def test_the_memory_table_is_the_memory_scripts_summary():
    """The README's memory and speed table is what `benchmarks/memory_table.py` makes of the figures of its run
    recorded in docs/benchmarks.md, so the README, the docs and the script cannot disagree."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_table import summary_table

    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    (line,) = [line for line in docs.splitlines() if line.startswith("t2v1.3b_transformer_params_b=")]
    table = summary_table(dict(figure.split("=", 1) for figure in line.split()))
    assert table.count("\n") == 3  # the header, its rule and one row per base (1.3B and 14B)
    assert table in (ROOT / "README.md").read_text() and table in docs


def test_the_readmes_history_claim_is_what_the_configs_and_the_session_do(caplog):
    """The README says the user's history runs from frame 1 and that a chunk's LCU encodes at most a fixed number of
    frames (constant cost): every shipped stage-2 config and model description, and the shipped demo model, use the
    whole history (``max_history_frames`` None), and a session at the 1.3B settings encodes exactly that many frames
    at every chunk after the first."""
    import json

    from echo.settings import EchoSettings
    from tests.test_streaming import _lcu_frames_per_chunk, _shipped_settings
    from training.config import load_config

    text = " ".join((ROOT / "README.md").read_text().split())
    assert "the user's history from frame 1" in text and "max_history_frames: null" in text
    claimed = int(re.search(r"a chunk's LCU encodes at most (\d+) frames with 33-frame chunks", text).group(1))
    stage2 = sorted((ROOT / "configs" / "train").glob("*stage2*.yaml"))
    assert len(stage2) >= 10, stage2  # the paper's, its ablations, the tiny and the demo ones
    for path in stage2:
        assert load_config(path).data.max_history_frames is None, path.name
    for path in sorted((ROOT / "configs" / "models").glob("*.yaml")):
        settings = load_model_config(path).get("settings")
        assert settings is not None and EchoSettings.from_dict(settings).max_history_frames is None, path.name
    demo = json.loads((ROOT / "models" / "echo-demo" / "model_index.json").read_text())
    assert demo["settings"]["max_history_frames"] is None
    calls, _ = _lcu_frames_per_chunk(6, _shipped_settings(), caplog)
    assert {encoded for _, encoded, _ in calls[1:]} == {claimed}
