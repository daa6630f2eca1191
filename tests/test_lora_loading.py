"""Wan LoRAs on `EchoPipeline` (diffusers' `WanLoraLoaderMixin`): a LoRA made for the plain Wan model (e.g. a
community step-distillation LoRA) loads with ``pipe.load_lora_weights`` onto the Wan layers of the Echo generator, in
the diffusers and in the original Wan key format, adds exactly its low-rank update, and unloads without a trace."""

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from echo.transformer_echo import WAN_CONFIG_KEYS
from pipelines import EchoPipeline
from tests.render_inputs import tiny_render_inputs
from tests.tiny_models import ORIGINAL_WAN_NAMES, random_generator_inputs, tiny_components_as_trained

RANK, ALPHA = 2, 6  # alpha ≠ rank: the update is scaled by alpha / rank
TARGETS = r"blocks\.\d+\.(attn1\.to_(q|k|v|out\.0)|attn2\.to_(q|v)|ffn\.net\.(0\.proj|2))"


@pytest.fixture(scope="module")
def pipe():
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_lora(pipe, tmp_path_factory):
    """A LoRA trained (here: drawn) on a plain Wan T2V model with the tiny generator's Wan config, saved as diffusers'
    Wan pipelines save one: ``(folder, its layers by module name)``."""
    config = {key: pipe.transformer.config[key] for key in WAN_CONFIG_KEYS}
    config["in_channels"] = pipe.transformer.config.out_channels  # a T2V Wan reads the latents only
    torch.manual_seed(1)
    wan = WanTransformer3DModel(**config)
    lora_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    wan.add_adapter(lora_config)
    layers = get_peft_model_state_dict(wan)
    folder = tmp_path_factory.mktemp("wan_lora")
    WanLoraLoaderMixin.save_lora_weights(
        folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=lora_config.to_dict()
    )
    return folder, layers


def original_wan_key(key: str) -> str:
    """diffusers' ``blocks.N.attn1.to_q.lora_A.weight`` → the original Wan checkpoint's
    ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` (``lora_B`` → ``lora_up``)."""
    module, kind = key.rsplit(".lora_", 1)
    block, index, name = module.split(".", 2)
    matrix = {"A.weight": "lora_down", "B.weight": "lora_up"}[kind]
    return f"diffusion_model.{block}.{index}.{ORIGINAL_WAN_NAMES[name]}.{matrix}.weight"


def original_wan_format(layers: dict) -> dict:
    """The same LoRA in the original Wan format (``lora_down``, ``lora_up`` and an ``alpha`` per layer), the format
    most community Wan LoRAs come in."""
    original = {original_wan_key(key): value.clone() for key, value in layers.items()}
    alphas = {key.rsplit(".", 2)[0] + ".alpha": torch.tensor(float(ALPHA)) for key in original}
    return {**original, **alphas}


def merged_by_hand(transformer: torch.nn.Module, layers: dict) -> torch.nn.Module:
    """A copy of ``transformer`` whose every layer the LoRA names has ``W + alpha / rank · B A``."""
    model = copy.deepcopy(transformer)
    for key, down in layers.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            model.get_submodule(module).weight.data += ALPHA / RANK * layers[f"{module}.lora_B.weight"] @ down
    return model


@pytest.mark.parametrize("key_format", ["diffusers folder", "original Wan keys"])
def test_wan_lora_adds_exactly_its_update_to_the_wan_layers_and_unloads(pipe, wan_lora, key_format):
    folder, layers = wan_lora
    transformer = pipe.transformer
    inputs = random_generator_inputs(transformer, seed=2)  # every condition: audio, user context, masks
    with torch.no_grad():
        base = transformer(**inputs).sample
        expected = merged_by_hand(transformer, layers)(**inputs).sample

    source = folder if key_format == "diffusers folder" else original_wan_format(layers)
    given = {key: value.clone() for key, value in source.items()} if isinstance(source, dict) else None
    pipe.load_lora_weights(source, adapter_name="distill")
    try:
        adapted = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
        assert adapted == {key.split(".lora_")[0] for key in layers}  # the Wan layers it names, no ECHO module
        with torch.no_grad():
            actual = transformer(**inputs).sample
    finally:
        pipe.unload_lora_weights()
    assert (actual - base).abs().max() > 1e-2
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    if given is not None:  # the caller's state dict is left as it was (it can be loaded again)
        assert source.keys() == given.keys() and all(torch.equal(source[key], given[key]) for key in given)

    assert not any("lora" in name for name, _ in transformer.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs).sample, base, rtol=0, atol=0)


def test_a_rendered_video_follows_the_adapter_weight(pipe, wan_lora):
    """The LoRA changes the rendered frames; ``set_adapters(name, 0.0)`` and ``unload_lora_weights`` give back the
    frames of the pipeline without it."""
    kwargs = tiny_render_inputs()

    def render():
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames

    base = render()
    pipe.load_lora_weights(wan_lora[0], adapter_name="distill")
    try:
        with_lora = render()
        pipe.set_adapters("distill", 0.0)
        weight_zero = render()
    finally:
        pipe.unload_lora_weights()
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(weight_zero, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(render(), base, rtol=0, atol=0)


def test_fused_lora_stays_in_the_weights_after_unloading(pipe, wan_lora):
    """``fuse_lora`` then ``unload_lora_weights`` (the way to serve a step-distillation LoRA without LoRA layers):
    the plain weights become ``W + alpha / rank · B A``."""
    folder, layers = wan_lora
    transformer = pipe.transformer
    inputs = random_generator_inputs(transformer, seed=3)
    original = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    with torch.no_grad():
        expected = merged_by_hand(transformer, layers)(**inputs).sample
    pipe.load_lora_weights(folder, adapter_name="distill")
    try:
        pipe.fuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
        assert not any("lora" in name for name, _ in transformer.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(transformer(**inputs).sample, expected, rtol=0, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
        transformer.load_state_dict(original)
