"""Low-memory loading: `EchoTransformer3DModel.from_wan` and `echo.components.load_components` build on the meta device
and read every weight straight into its dtype; the ECHO modules start exactly as the constructor makes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from echo.components import load_components, load_model_config
from echo.transformer_echo import ECHO_ONLY_KEYS, EchoTransformer3DModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny.yaml"

WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)
ECHO_TINY = dict(audio_dim=24, audio_num_layers=3, audio_window=5, context_dim=20)

# A mid-size Wan (19.4 M parameters, 74 MB in float32) and its Echo model (~30 M parameters): large enough for the
# memory of the weights to dominate the process's allocator noise, small enough to load in a few seconds.
WAN_MID = dict(
    WAN_TINY,
    num_attention_heads=4,
    attention_head_dim=128,
    text_dim=512,
    freq_dim=256,
    ffn_dim=2048,
    num_layers=4,
    rope_max_seq_len=1024,
)
ECHO_MID = dict(audio_dim=768, audio_num_layers=13, audio_window=5, context_dim=512)


@pytest.fixture(scope="module")
def wan_tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan_tiny")
    WanTransformer3DModel(**WAN_TINY).save_pretrained(folder)
    return folder


def _nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# Runs in a fresh interpreter for each way of loading: peak resident memory (file-backed pages included) while loading, over the resident
# memory just before it. The same path is run once on a tiny model first, so that lazy imports and one-time
# initialisations are not counted. The kernel's peak (VmHWM) is reset through /proc/self/clear_refs; where that is
# refused, `ru_maxrss` (the whole process's peak) is used, which only overstates the loading peak. glibc's malloc gets a
# fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_`): large buffers then go back to the system when freed instead of
# staying in the heap at its dynamic threshold's whim, so the figure is the loader's own need, the same on every run.
_MEASURE = textwrap.dedent(
    """
    import gc, json, resource, sys
    import torch
    torch.set_num_threads(1)
    from echo.components import load_components
    from echo.transformer_echo import EchoTransformer3DModel

    args = json.loads(sys.argv[1])

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def load(how, folder, echo):
        if how == "from_wan":
            return EchoTransformer3DModel.from_wan(folder, torch_dtype=torch.bfloat16, **echo)
        section = {"class": "EchoTransformer3DModel", "from_wan": folder, "torch_dtype": "bfloat16", "config": echo}
        return load_components({"transformer": section})["transformer"]

    how = args["how"]
    load(how, args["tiny"], args["echo_tiny"])
    gc.collect()
    resettable = reset_peak()
    before = status("VmRSS")
    model = load(how, args["mid"], args["echo_mid"])
    touched = sum(float(t.float().sum()) for t in model.state_dict().values())  # every page of the result
    peak = status("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"peak_over_before": peak - before, "model_bytes": size, "resettable": resettable}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident memory from /proc (Linux)")
def test_loading_a_float32_wan_folder_in_bfloat16_peaks_at_most_1_3x_the_model(wan_tiny_folder, tmp_path):
    """A float32 Wan folder (as the published Wan2.1 transformers are) loaded into a bfloat16 Echo model: the peak host
    memory while loading stays within 1.3× the loaded model's size, through `from_wan` and through `load_components`
    (the former loader built a random float32 Echo model beside the Wan model: about 3.4× the bfloat16 model)."""
    torch.manual_seed(0)
    WanTransformer3DModel(**WAN_MID).save_pretrained(tmp_path / "wan_mid")
    for how in ("from_wan", "load_components"):
        args = dict(
            how=how, mid=str(tmp_path / "wan_mid"), tiny=str(wan_tiny_folder), echo_mid=ECHO_MID, echo_tiny=ECHO_TINY
        )
        run = subprocess.run(
            [sys.executable, "-c", _MEASURE, json.dumps(args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072"),
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        ratio = result["peak_over_before"] / result["model_bytes"]
        assert result["model_bytes"] > 50e6, result  # the bfloat16 Echo model (~60 MB) dominates allocator noise
        assert ratio <= 1.3, (
            f"{how}: peak {result['peak_over_before'] / 1e6:.1f} MB for a {result['model_bytes'] / 1e6:.1f} MB model ({ratio:.2f}×)"
        )


def test_folder_loads_straight_into_the_dtype_like_wan_from_pretrained(wan_tiny_folder):
    """bfloat16 from a float32 folder: every Wan tensor equals `WanTransformer3DModel.from_pretrained(torch_dtype=...)`'s
    (Wan's float32 modules stay float32), the added modules are bfloat16, nothing is left on the meta device."""
    wan = WanTransformer3DModel.from_pretrained(wan_tiny_folder, torch_dtype=torch.bfloat16)
    echo = EchoTransformer3DModel.from_wan(wan_tiny_folder, torch_dtype=torch.bfloat16, **ECHO_TINY)
    echo_state = echo.state_dict()
    for key, value in wan.state_dict().items():
        actual = echo_state[key][:, :16] if key == "patch_embedding.weight" else echo_state[key]
        assert actual.dtype == value.dtype and torch.equal(actual, value), key
    assert echo.blocks[0].scale_shift_table.dtype == echo.blocks[0].norm2.weight.dtype == torch.float32
    assert echo.blocks[0].sdcm.attn_avt.to_q.weight.dtype == echo.audio_proj.proj_in.weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in list(echo.parameters()) + list(echo.buffers()))
    # The RoPE tables (buffers, not loaded) are what a model built in the ordinary way computes.
    reference = EchoTransformer3DModel.from_wan(wan, **ECHO_TINY)
    assert torch.equal(echo.rope.freqs_cos, reference.rope.freqs_cos)


def test_added_modules_start_as_the_constructor_makes_them(wan_tiny_folder):
    """The ECHO modules of a meta-built `from_wan` model are materialised as `__init__` makes them: the same zeros and
    ones, and random weights from the same distributions."""
    echo = EchoTransformer3DModel.from_wan(wan_tiny_folder, **ECHO_TINY)
    torch.manual_seed(1)
    reference = EchoTransformer3DModel(**dict(WAN_TINY, in_channels=52), **ECHO_TINY)
    added = {k: v for k, v in reference.state_dict().items() if ECHO_ONLY_KEYS.match(k)}
    own = echo.state_dict()
    assert added and {k for k in own if ECHO_ONLY_KEYS.match(k)} == set(added)
    for key, expected in added.items():
        actual = own[key]
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, key
        for constant in (0.0, 1.0):
            assert bool((expected == constant).all()) == bool((actual == constant).all()), key
        # Random weights: bounded like the constructor's (uninitialised memory or a wrong init is not), and with the
        # same spread where there are enough of them to tell.
        assert torch.isfinite(actual).all() and actual.abs().max() <= 1.5 * expected.abs().max() + 1e-6, key
        if expected.numel() >= 256 and expected.std() > 0:
            assert 0.75 < float(actual.std() / expected.std()) < 1.33, key


def test_sharded_folder_and_module_give_the_same_model(wan_tiny_folder, tmp_path):
    wan = WanTransformer3DModel.from_pretrained(wan_tiny_folder)
    wan.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    from_folder = EchoTransformer3DModel.from_wan(tmp_path / "sharded", **ECHO_TINY).state_dict()
    from_module = EchoTransformer3DModel.from_wan(wan, **ECHO_TINY).state_dict()
    assert from_folder.keys() == from_module.keys()
    assert all(torch.equal(from_folder[k], from_module[k]) for k in from_folder if not ECHO_ONLY_KEYS.match(k))
    # A module is copied: the Echo model does not share (and a later in-place update does not reach) Wan's weights.
    echo = EchoTransformer3DModel.from_wan(wan, **ECHO_TINY)
    assert echo.blocks[0].attn1.to_q.weight.data_ptr() != wan.blocks[0].attn1.to_q.weight.data_ptr()


def test_unloadable_wan_sources_raise_oserror_naming_the_problem(wan_tiny_folder, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((wan_tiny_folder / "config.json").read_text())
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match=r"diffusion_pytorch_model.bin.*pickle.*safetensors only"):
        EchoTransformer3DModel.from_wan(pickled, **ECHO_TINY)
    with pytest.raises(FileNotFoundError, match="is not a folder nor a hub id"):
        EchoTransformer3DModel.from_wan(tmp_path / "missing", **ECHO_TINY)
    with pytest.raises(OSError):  # a hub id absent from the local cache is not downloaded
        EchoTransformer3DModel.from_wan("echo-ihg-tests/not-a-model", local_files_only=True, **ECHO_TINY)


def test_load_components_dtype_per_section_with_caller_override():
    """A description's `torch_dtype` (top level, then per section) sets each model's dtype, keeping each class's float32
    modules (e.g. Wan's norms); the caller's `torch_dtype` (a dtype, or a dict by section) wins."""
    description = load_model_config(TINY)
    description["torch_dtype"] = "bfloat16"
    description["vae"]["torch_dtype"] = "float32"  # as diffusers' Wan examples load the VAE
    sections = ["vae", "transformer", "text_encoder", "context_encoder"]
    loaded = load_components(description, only=sections)
    assert loaded["vae"].dtype == torch.float32
    assert loaded["transformer"].blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert loaded["transformer"].blocks[0].scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules
    assert loaded["text_encoder"].dtype == loaded["context_encoder"].dtype == torch.bfloat16

    everything = load_components(description, torch_dtype=torch.float32, only=sections)
    assert {everything[s].dtype for s in sections} == {torch.float32}
    mixed = load_components(
        description, torch_dtype={"transformer": torch.float32, "default": torch.float16}, only=sections
    )
    assert mixed["transformer"].dtype == torch.float32 and mixed["vae"].dtype == torch.float16

    with pytest.raises(ValueError, match=r"section 'vae' torch_dtype is 'float8'; expected one of"):
        load_components(dict(description, vae=dict(description["vae"], torch_dtype="float8")), only=["vae"])
    with pytest.raises(ValueError, match=r"section 'scheduler' sets 'torch_dtype' but a scheduler has no weights"):
        load_components(
            dict(description, scheduler=dict(description["scheduler"], torch_dtype="float32")), only=["scheduler"]
        )


def test_load_components_from_wan_is_seeded(wan_tiny_folder):
    """The ECHO modules of a `from_wan` section are drawn from the section's seed: two loads give the same model."""
    section = {"class": "EchoTransformer3DModel", "from_wan": str(wan_tiny_folder), "config": ECHO_TINY, "seed": 7}
    first = load_components({"transformer": section})["transformer"].state_dict()
    torch.manual_seed(123)  # the global generator does not matter
    second = load_components({"transformer": section})["transformer"].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = load_components({"transformer": dict(section, seed=8)})["transformer"].state_dict()
    assert not torch.equal(first["blocks.0.sdcm.attn_usr.to_q.weight"], other["blocks.0.sdcm.attn_usr.to_q.weight"])
