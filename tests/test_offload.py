"""diffusers' offloading on `EchoPipeline`, as far as a CPU-only machine can check it.

`enable_model_cpu_offload` moves each component to the accelerator when its ``forward`` (or a diffusers method with
`apply_forward_hook`, such as ``vae.encode`` / ``vae.decode``) starts; a component whose layers ran without that would
meet CPU weights with accelerator inputs on a GPU. Without a GPU, offload runs here with ``device="cpu"`` (nothing
moves), and the tests check the wiring instead: every model component is in ``model_cpu_offload_seq``, a render runs
each component's layers only while its hook has it loaded (the chain of hooks replayed as on a GPU), and the frames
are those of the pipeline without offload. Group offload with ``onload_device = offload_device = cpu`` runs its hooks
on every component and must not change the frames. The transfers themselves need a GPU (`benchmarks/gpu_check.py`).
"""

import pytest
import torch
from accelerate.hooks import CpuOffload

from pipelines import EchoPipeline
from tests.render_inputs import tiny_render_inputs
from tests.tiny_models import tiny_components_as_trained


def _make_pipe() -> EchoPipeline:
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def expected():
    """Frames of two chunks (17 frames), rendered without offload."""
    return render(_make_pipe())


def render(pipe):
    return pipe(**tiny_render_inputs(num_frames=17), generator=torch.Generator().manual_seed(0)).frames


def test_the_offload_sequence_names_every_model_component():
    pipe = _make_pipe()
    sequence = pipe.model_cpu_offload_seq.split("->")
    models = [name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)]
    assert set(models) - set(pipe._exclude_from_cpu_offload) <= set(sequence)
    assert len(sequence) == len(set(sequence))


def test_model_cpu_offload_loads_each_component_before_its_layers_run(expected, monkeypatch):
    pipe = _make_pipe()
    models = {name: component for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}
    owner = {id(module): name for name, component in models.items() for module in component.modules()}
    loaded, ran, unloaded_runs = set(), set(), []
    pre_forward, init_hook = CpuOffload.pre_forward, CpuOffload.init_hook

    def loading(self, module, *args, **kwargs):  # as on a GPU: load this component, offload the previous one
        if self.prev_module_hook is not None:
            loaded.discard(owner[id(self.prev_module_hook.model)])
        loaded.add(owner[id(module)])
        return pre_forward(self, module, *args, **kwargs)

    def offloading(self, module):  # (re)installing the hooks puts every component back on the CPU
        loaded.discard(owner.get(id(module)))
        return init_hook(self, module)

    def check(module, args):  # every layer call; a component's own forward starts with its hook
        name = owner.get(id(module))
        if name is not None and module is not models[name]:
            ran.add(name)
            if name not in loaded:
                unloaded_runs.append((name, type(module).__name__))

    monkeypatch.setattr(CpuOffload, "pre_forward", loading)
    monkeypatch.setattr(CpuOffload, "init_hook", offloading)
    pipe.enable_model_cpu_offload(device="cpu")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        frames = render(pipe)
    finally:
        handle.remove()
    assert ran == set(models) and unloaded_runs == []
    assert loaded == set()  # all offloaded after the call (`maybe_free_model_hooks`)
    torch.testing.assert_close(frames, expected, rtol=0, atol=0)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_renders_the_same_frames(expected, offload_type):
    pipe = _make_pipe()
    cpu = torch.device("cpu")
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **options)
    hooked = {
        name
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        and any(hasattr(module, "_diffusers_hook") for module in component.modules())
    }
    assert hooked == {name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    torch.testing.assert_close(render(pipe), expected, rtol=0, atol=0)
