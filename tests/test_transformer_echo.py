"""Behaviour of the ECHO generator: Wan equivalence, SDCM semantics (Eq. 10-11), frame alignment, training, LoRA,
serialisation and input validation. Tiny models (2 blocks, width 32) built from configs with random weights."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from echo import flow_matching
from echo.conditioning import build_condition
from echo.transformer_echo import EchoTransformer3DModel
from tests.tiny_models import ORIGINAL_WAN_NAMES

WAN_T2V = dict(
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
WAN_I2V = dict(WAN_T2V, in_channels=36, image_dim=24, added_kv_proj_dim=32)
ECHO = dict(audio_dim=24, audio_num_layers=3, audio_window=5, context_dim=20)
B, F_LAT, H, W = 2, 3, 16, 16  # latents (B, 16, 3, 16, 16) → 3 × 8 × 8 tokens
T_VID = 4 * (F_LAT - 1) + 1  # 9 video frames
TOKENS = F_LAT * (H // 2) * (W // 2)


def make_inputs(seed: int = 0, text_len: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 3, (B, F_LAT, H // 2, W // 2), generator=g)  # 0 none, 1 lip, 2 face
    return dict(
        hidden_states=torch.randn(B, 16, F_LAT, H, W, generator=g),
        timestep=torch.tensor([700.0, 35.0]),
        encoder_hidden_states=torch.randn(B, text_len, 32, generator=g),
        audio_embeds=torch.randn(B, T_VID, 5, 3, 24, generator=g),
        context_embeds=torch.randn(B, 6, 20, generator=g),
        lip_mask=(masks == 1).float(),
        face_mask=(masks == 2).float(),
    )


def perturb_added_modules(model: EchoTransformer3DModel, seed: int = 0) -> EchoTransformer3DModel:
    """Give the zero-initialised (added) modules random weights, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("audio_proj.", "context_proj.")) or ".sdcm." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def wan_t2v_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan_t2v")
    WanTransformer3DModel(**WAN_T2V).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def echo_model(wan_t2v_folder):
    """An Echo model from a saved T2V Wan, with its added modules randomised (a trained SDCM)."""
    return perturb_added_modules(EchoTransformer3DModel.from_wan(wan_t2v_folder, **ECHO)).eval()


class SDCMProbe:
    """Reads (and optionally overrides) block 0's SDCM through forward hooks on named sub-modules."""

    def __init__(self, model, gate_value: float | None = None):
        sdcm = model.get_submodule("blocks.0.sdcm")
        self.out = {}
        self.handles = [sdcm.register_forward_hook(lambda m, a, o: self.out.__setitem__("delta", o))]
        if hasattr(sdcm, "gate"):
            self.handles += [
                sdcm.attn_usr.register_forward_hook(lambda m, a, o: self.out.__setitem__("h_usr", o)),
                sdcm.attn_avt.register_forward_hook(lambda m, a, o: self.out.__setitem__("h_avt", o)),
            ]
            if gate_value is not None:
                self.handles.append(sdcm.gate.register_forward_hook(lambda m, a, o: torch.full_like(o, gate_value)))

    def __enter__(self):
        return self.out

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# 1. Wan equivalence at initialisation ---------------------------------------------------------------------------------


def test_t2v_wan_equivalence_from_saved_folder(wan_t2v_folder):
    wan = WanTransformer3DModel.from_pretrained(wan_t2v_folder).eval()
    echo = EchoTransformer3DModel.from_wan(wan_t2v_folder, **ECHO).eval()
    inputs = make_inputs()
    with torch.no_grad():
        expected = wan(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        # All Echo inputs present: at initialisation SDCM and the new input channels contribute nothing.
        condition = build_condition(torch.randn(B, 16, 1, H, W), torch.randn(B, 16, F_LAT, H, W), 1)
        actual = echo(**inputs, condition=condition).sample
        assert (actual - expected).abs().max() <= 1e-5
        # ... and so does a continuation chunk's condition (motion latents + the reference plane).
        continuation = build_condition(torch.randn(B, 16, 1, H, W), torch.randn(B, 16, F_LAT, H, W), 2)
        assert (echo(**inputs, condition=continuation).sample - expected).abs().max() <= 1e-5
        # The equivalence is not vacuous: a trained SDCM does change the output.
        perturb_added_modules(echo)
        assert (echo(**inputs, condition=condition).sample - expected).abs().max() > 1e-2
    # Every Wan key landed under its own name.
    wan_state = wan.state_dict()
    echo_state = echo.state_dict()
    for key, value in wan_state.items():
        if key != "patch_embedding.weight":
            assert torch.equal(echo_state[key], value), key
    assert torch.equal(echo_state["patch_embedding.weight"][:, :16], wan_state["patch_embedding.weight"])
    assert echo_state["patch_embedding.weight"][:, 16:].abs().max() == 0


@pytest.mark.parametrize("motion", [False, True], ids=["first_chunk", "continuation_chunk"])
def test_i2v_wan_equivalence_from_saved_folder(tmp_path, motion):
    """An I2V base reads Wan's own condition [mask(4), given latents(16)]: the Echo model built from it computes what
    the base computes on those 20 channels, whatever the reference plane holds (its input weights start at zero)."""
    torch.manual_seed(1)
    WanTransformer3DModel(**WAN_I2V).save_pretrained(tmp_path / "transformer")  # a Wan pipeline folder's layout
    wan = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    echo = EchoTransformer3DModel.from_wan(tmp_path, subfolder="transformer", **ECHO).eval()
    assert (echo.config.in_channels, echo.config.condition_channels) == (52, 36)
    inputs = make_inputs(seed=1, text_len=512)  # Wan's I2V attention splits image tokens off a 512-token text
    image = torch.randn(B, 4, 24)
    given_latents = torch.randn(B, 16, F_LAT, H, W)  # the condition video's latents (motion: 2 given latent frames)
    condition = build_condition(torch.randn(B, 16, 1, H, W), given_latents, 2 if motion else 1)  # B, 36, F, h, w
    assert condition[:, 20:].abs().max() > 0  # the reference plane is given, and must not change the output
    with torch.no_grad():
        expected = wan(
            torch.cat([inputs["hidden_states"], condition[:, :20]], 1),
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            encoder_hidden_states_image=image,
        ).sample
        actual = echo(**inputs, condition=condition, encoder_hidden_states_image=image).sample
    assert (actual - expected).abs().max() <= 1e-5
    wan_embedding = wan.state_dict()["patch_embedding.weight"]  # inner, 36, 1, 2, 2
    echo_embedding = echo.state_dict()["patch_embedding.weight"]  # inner, 52, 1, 2, 2
    assert torch.equal(echo_embedding[:, :36], wan_embedding) and echo_embedding[:, 36:].abs().max() == 0
    with pytest.raises(ValueError, match=r"`encoder_hidden_states_image` is None, expected \(batch, 257, image_dim\)"):
        echo(**inputs, condition=condition)
    short_text = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :7])
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` has shape \(2, 7, 32\), expected \(2, 512, 32\)"):
        echo(**short_text, condition=condition, encoder_hidden_states_image=image)


# 2. SDCM semantics ----------------------------------------------------------------------------------------------------


def test_lip_tokens_ignore_user_context(echo_model):
    inputs = make_inputs()
    context = inputs.pop("context_embeds").requires_grad_(True)
    with SDCMProbe(echo_model) as out:
        echo_model(**inputs, context_embeds=context)
    delta = out["delta"]  # B, N, D
    lip = inputs["lip_mask"].flatten(1).bool()
    face = inputs["face_mask"].flatten(1).bool()
    (grad_lip,) = torch.autograd.grad(delta[lip].sum(), context, retain_graph=True)
    (grad_face,) = torch.autograd.grad(delta[face].sum(), context)
    assert torch.count_nonzero(grad_lip) == 0
    assert grad_face.abs().max() > 0  # the user context does reach the face region
    # The lip output is exactly the avatar stream.
    h_avt = out["h_avt"].reshape(delta.shape)
    torch.testing.assert_close(delta[lip], h_avt[lip], rtol=0, atol=0)
    assert delta[lip].abs().max() > 0


def test_tokens_outside_both_masks_get_no_sdcm_contribution(echo_model):
    inputs = make_inputs()
    with torch.no_grad(), SDCMProbe(echo_model) as out:
        echo_model(**inputs)
    delta = out["delta"]
    outside = ((inputs["lip_mask"] + inputs["face_mask"]) == 0).flatten(1)
    assert outside.any() and (~outside).any()
    assert torch.count_nonzero(delta[outside]) == 0
    assert (delta[~outside].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("gate", [0.0, 0.3, 1.0])
def test_face_output_moves_from_user_to_avatar_with_gate(echo_model, gate):
    inputs = make_inputs()
    gate_inputs = []
    handle = echo_model.blocks[0].sdcm.gate.register_forward_hook(lambda m, a, o: gate_inputs.append(a))
    try:
        with torch.no_grad(), SDCMProbe(echo_model, gate_value=gate) as out:
            echo_model(**inputs)
    finally:
        handle.remove()
    delta = out["delta"]
    h_usr, h_avt = out["h_usr"], out["h_avt"].reshape(delta.shape)
    # the gate reads the two streams in Eq. 11's order: f_conv^1 gets h_usr, f_conv^2 gets h_avt
    torch.testing.assert_close(gate_inputs[0][0], h_usr, rtol=0, atol=0)
    torch.testing.assert_close(gate_inputs[0][1], h_avt, rtol=0, atol=0)
    face = inputs["face_mask"].flatten(1).bool()
    assert (h_usr[face] - h_avt[face]).abs().max() > 1e-2  # the two streams differ, so the mix is visible
    torch.testing.assert_close(delta[face], gate * h_avt[face] + (1 - gate) * h_usr[face], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stream", ["h_usr", "h_avt"])
def test_sdcm_gate_reads_both_streams_locally_within_each_frame(echo_model, stream):
    """Eq. 11: g = σ(f_g([f_conv^1(h_usr); f_conv^2(h_avt)])). A change of either stream at one token moves g exactly
    on the k × k neighbourhood of that token in its own latent frame (convolutions over H' × W', frames never mix)."""
    gate = echo_model.blocks[0].sdcm.gate
    radius = gate.conv_usr.kernel_size[0] // 2
    grid = (F_LAT, H // 2, W // 2)
    g = torch.Generator().manual_seed(7)
    streams = {name: torch.randn(B, TOKENS, 32, generator=g) for name in ("h_usr", "h_avt")}
    changed = {name: value.clone() for name, value in streams.items()}
    frame, row, col = 1, 4, 2
    changed[stream].view(B, *grid, 32)[:, frame, row, col] += torch.randn(32, generator=g)
    with torch.no_grad():
        out = gate(streams["h_usr"], streams["h_avt"], grid)
        out_changed = gate(changed["h_usr"], changed["h_avt"], grid)
    assert ((out > 0) & (out < 1)).all()
    diff = (out_changed - out).abs().amax(-1).reshape(B, *grid)
    near = torch.zeros(grid, dtype=torch.bool)
    near[frame, row - radius : row + radius + 1, col - radius : col + radius + 1] = True
    assert (diff[:, near] > 1e-6).all()
    assert (diff[:, ~near] == 0).all()


def test_overlapping_masks_keep_lip_tokens_audio_driven(echo_model):
    """M_face is applied as M_face ⊙ (1 − M_lip): a token marked both is treated as lip."""
    inputs = make_inputs()
    context = inputs.pop("context_embeds").requires_grad_(True)
    inputs["face_mask"] = torch.ones_like(inputs["face_mask"])
    with SDCMProbe(echo_model) as out:
        echo_model(**inputs, context_embeds=context)
    lip = inputs["lip_mask"].flatten(1).bool()
    (grad,) = torch.autograd.grad(out["delta"][lip].sum(), context)
    assert torch.count_nonzero(grad) == 0


def test_without_user_context_face_tokens_follow_gated_audio(echo_model):
    inputs = make_inputs()
    inputs.pop("context_embeds")
    with torch.no_grad(), SDCMProbe(echo_model, gate_value=0.25) as out:
        echo_model(**inputs)
    face = inputs["face_mask"].flatten(1).bool()
    h_avt = out["h_avt"].reshape(out["delta"].shape)
    torch.testing.assert_close(out["delta"][face], 0.25 * h_avt[face])


def test_context_mask_equals_dropping_the_masked_tokens(echo_model):
    inputs = make_inputs()
    context = inputs.pop("context_embeds")
    mask = torch.tensor([[True, True, True, False, False, False], [False] * 6])
    with torch.no_grad():
        with SDCMProbe(echo_model) as masked:
            echo_model(**inputs, context_embeds=context, context_mask=mask)
        with SDCMProbe(echo_model) as dropped:
            echo_model(**inputs, context_embeds=context[:, :3])
        with SDCMProbe(echo_model) as without:
            echo_model(**inputs)
    torch.testing.assert_close(masked["delta"][0], dropped["delta"][0], rtol=1e-5, atol=1e-6)
    # A sample without any valid context token gets no user stream, as with `context_embeds=None`.
    torch.testing.assert_close(masked["delta"][1], without["delta"][1], rtol=1e-5, atol=1e-6)
    assert (masked["delta"][0] - without["delta"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("use_sdcm", [True, False])
def test_audio_mask_drops_one_samples_audio_exactly_like_no_audio(wan_t2v_folder, use_sdcm):
    """Per-sample condition dropout (classifier-free guidance training): ``audio_mask[b] = False`` gives sample b the
    output of ``audio_embeds=None`` and leaves the other sample's output as with audio."""
    model = perturb_added_modules(EchoTransformer3DModel.from_wan(wan_t2v_folder, use_sdcm=use_sdcm, **ECHO)).eval()
    inputs = make_inputs()
    with torch.no_grad():
        dropped = model(**inputs, audio_mask=torch.tensor([True, False])).sample
        full = model(**inputs).sample
        silent = model(**dict(inputs, audio_embeds=None)).sample
    torch.testing.assert_close(dropped[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dropped[1], silent[1], rtol=1e-5, atol=1e-6)
    assert (full[1] - silent[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="audio_mask"):
        model(**inputs, audio_mask=torch.tensor([True]))


# 3. Frame alignment ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,latent_frame", [((5, 9), 2), ((1, 5), 1), ((0, 1), 0)])
def test_audio_is_frame_aligned(echo_model, frames, latent_frame):
    inputs = make_inputs()
    changed = dict(inputs, audio_embeds=inputs["audio_embeds"].clone())
    changed["audio_embeds"][:, frames[0] : frames[1]] = torch.randn_like(
        changed["audio_embeds"][:, frames[0] : frames[1]]
    )
    with torch.no_grad():
        with SDCMProbe(echo_model) as out:
            echo_model(**inputs)
        with SDCMProbe(echo_model) as out_changed:
            echo_model(**changed)
    diff = (out["delta"] - out_changed["delta"]).abs().amax(-1).reshape(B, F_LAT, -1).amax(-1)  # B, F
    for f in range(F_LAT):
        if f == latent_frame:
            assert (diff[:, f] > 1e-4).all()
        else:
            assert (diff[:, f] == 0).all(), (f, diff)


def test_audio_layers_are_mixed_by_learned_softmax_weights(echo_model):
    """With the layer weights' softmax concentrated on layer 0, the other wav2vec2 layers do not reach the tokens."""
    inputs = make_inputs()
    changed = dict(inputs, audio_embeds=inputs["audio_embeds"].clone())
    changed["audio_embeds"][..., 1:, :] = torch.randn_like(changed["audio_embeds"][..., 1:, :])
    audio_proj = echo_model.audio_proj
    saved = audio_proj.layer_weights.detach().clone()
    with torch.no_grad():
        tokens = audio_proj(inputs["audio_embeds"], F_LAT)
        assert (audio_proj(changed["audio_embeds"], F_LAT) - tokens).abs().max() > 1e-3
        audio_proj.layer_weights.copy_(torch.tensor([100.0, -100.0, -100.0]))
        try:
            torch.testing.assert_close(
                audio_proj(changed["audio_embeds"], F_LAT), audio_proj(inputs["audio_embeds"], F_LAT), rtol=0, atol=0
            )
        finally:
            audio_proj.layer_weights.copy_(saved)


# 4. Training: overfitting one clip with the flow-matching loss --------------------------------------------------------


def test_tiny_model_overfits_one_clip():
    """Width 64 (the output patch has 64 values, so width 32 would be a bottleneck), 2 latent frames, fixed noise."""
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**dict(WAN_T2V, attention_head_dim=32, ffn_dim=128))
    model = EchoTransformer3DModel.from_wan(wan, **ECHO).train()
    g = torch.Generator().manual_seed(3)
    num_latent_frames, batch = 2, 2  # one clip of 5 video frames at two noise levels per step
    x0 = torch.randn(1, 16, num_latent_frames, H, W, generator=g).repeat(batch, 1, 1, 1, 1)
    masks = torch.randint(0, 3, (1, num_latent_frames, H // 2, W // 2), generator=g).repeat(batch, 1, 1, 1)
    conditioning = dict(
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g).repeat(batch, 1, 1),
        condition=build_condition(x0[:, :, :1], torch.cat([x0[:, :, :1], x0[:, :, 1:] * 0.1], 2), 1),
        audio_embeds=torch.randn(1, 5, 5, 3, 24, generator=g).repeat(batch, 1, 1, 1, 1),
        context_embeds=torch.randn(1, 6, 20, generator=g).repeat(batch, 1, 1),
        lip_mask=(masks == 1).float(),
        face_mask=(masks == 2).float(),
    )
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    x_sigma = flow_matching.add_noise(x0, noise, sigma)
    target = flow_matching.velocity_target(x0, noise)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        prediction = model(x_sigma, flow_matching.sigma_to_timestep(sigma), **conditioning).sample
        loss = flow_matching.flow_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
    # The new modules took part: SDCM moved away from its zero initialisation.
    assert model.blocks[0].sdcm.attn_avt.to_out[0].weight.abs().max() > 0


def test_gradient_checkpointing_gives_same_gradients(echo_model):
    inputs = make_inputs()
    grads, calls = [], []
    for checkpointing in (False, True):
        echo_model.zero_grad()
        if checkpointing:
            echo_model.enable_gradient_checkpointing()
        block, count = echo_model.blocks[0], [0]
        block_forward = block.forward  # counted through the instance (hooks do not fire on recomputation)
        block.forward = lambda *a, _c=count, _f=block_forward, **k: (_c.__setitem__(0, _c[0] + 1), _f(*a, **k))[1]
        try:
            echo_model(**inputs).sample.square().mean().backward()
        finally:
            del block.forward
            echo_model.disable_gradient_checkpointing()
        calls.append(count[0])
        grads.append({n: p.grad.clone() for n, p in echo_model.named_parameters() if p.grad is not None})
    echo_model.zero_grad()
    # checkpointing is really on: the block's forward runs again during the backward pass
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    assert any(".sdcm." in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


# 5. LoRA --------------------------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_round_trips_in_peft_format(wan_t2v_folder, tmp_path):
    from peft import LoraConfig

    base = perturb_added_modules(EchoTransformer3DModel.from_wan(wan_t2v_folder, **ECHO))
    base.save_pretrained(tmp_path / "base")
    model = EchoTransformer3DModel.from_pretrained(tmp_path / "base").eval()
    inputs = make_inputs()
    with torch.no_grad():
        reference = model(**inputs).sample

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=r".*blocks\.\d+\.(attn1|attn2|sdcm\.attn_usr)\.to_[qkv]"),
        adapter_name="stage2",
    )
    lora_names = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert any("sdcm.attn_usr.to_q" in n for n in lora_names) and any("attn1.to_k" in n for n in lora_names)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs).sample.square().mean().backward()
        optimizer.step()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == lora_names
    with torch.no_grad():
        adapted = model(**inputs).sample
    assert (adapted - reference).abs().max() > 1e-4

    model.save_lora_adapter(tmp_path / "adapter", adapter_name="stage2")  # diffusers' PeftAdapterMixin
    saved = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert saved and all("lora_" in k for k in saved)

    fresh = EchoTransformer3DModel.from_pretrained(tmp_path / "base").eval()
    fresh.load_lora_adapter(tmp_path / "adapter", adapter_name="stage2", prefix=None, use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).sample, adapted, rtol=1e-5, atol=1e-6)


# Serialisation, ablation, features, condition -------------------------------------------------------------------------


def test_save_pretrained_round_trip(echo_model, tmp_path):
    echo_model.save_pretrained(tmp_path)
    loaded = EchoTransformer3DModel.from_pretrained(tmp_path).eval()
    inputs = make_inputs(seed=5)
    with torch.no_grad():
        expected = echo_model(**inputs).sample
        torch.testing.assert_close(loaded(**inputs).sample, expected, rtol=0, atol=0)

    # bfloat16: Wan's float32 modules stay float32, SDCM runs in bfloat16, and the output stays close.
    half = EchoTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert half.blocks[0].scale_shift_table.dtype == torch.float32
    assert half.blocks[0].sdcm.attn_avt.to_q.weight.dtype == torch.bfloat16
    half_inputs = {
        k: v.to(torch.bfloat16) if k not in ("timestep", "lip_mask", "face_mask") else v for k, v in inputs.items()
    }
    with torch.no_grad():
        output = half(**half_inputs).sample
    assert output.dtype == torch.bfloat16
    assert (output.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_direct_fusion_ablation(wan_t2v_folder):
    wan = WanTransformer3DModel.from_pretrained(wan_t2v_folder).eval()
    model = EchoTransformer3DModel.from_wan(wan, use_sdcm=False, **ECHO).eval()
    keys = model.state_dict().keys()
    assert not any(k for k in keys if "attn_usr" in k or "attn_avt" in k or ".gate." in k)
    assert "blocks.0.sdcm.attn.to_out.0.weight" in keys
    inputs = make_inputs()
    with torch.no_grad():
        expected = wan(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        assert (model(**inputs).sample - expected).abs().max() <= 1e-5
        perturb_added_modules(model)
        with SDCMProbe(model) as out:
            model(**inputs)
    # Unmasked: tokens outside both masks are modulated too.
    outside = ((inputs["lip_mask"] + inputs["face_mask"]) == 0).flatten(1)
    assert (out["delta"][outside].abs().amax(-1) > 0).all()
    # Padded user-context tokens are ignored in the fused key set.
    context_mask = torch.tensor([[True] * 3 + [False] * 3] * B)
    with torch.no_grad():
        with SDCMProbe(model) as masked:
            model(**dict(inputs, context_mask=context_mask))
        with SDCMProbe(model) as dropped:
            model(**dict(inputs, context_embeds=inputs["context_embeds"][:, :3]))
    torch.testing.assert_close(masked["delta"], dropped["delta"], rtol=1e-5, atol=1e-6)


def test_return_block_features_are_block_outputs(echo_model):
    inputs = make_inputs()
    captured = {}
    handle = echo_model.blocks[1].register_forward_hook(lambda m, a, o: captured.__setitem__(1, o))
    with torch.no_grad():
        output = echo_model(**inputs, return_block_features=[1])
    handle.remove()
    assert set(output.block_features) == {1}
    assert output.block_features[1].shape == (B, TOKENS, 32)
    torch.testing.assert_close(output.block_features[1], captured[1], rtol=0, atol=0)


def _wan_i2v_mask(num_given_video_frames: int, num_video_frames: int) -> torch.Tensor:
    """The mask of diffusers' Wan I2V pipeline (`prepare_latents`), generalised to several given video frames."""
    mask = torch.ones(B, 1, num_video_frames, H, W)
    mask[:, :, num_given_video_frames:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=4)
    mask = torch.concat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(B, -1, 4, H, W).transpose(1, 2)  # B, 4, F, h, w
    return mask


def test_build_condition_layout_matches_wan_i2v_plus_the_reference_plane():
    """[mask(4), given latents(16)] is Wan I2V's condition: the mask of the given frames and the condition video's
    latents on every latent frame; the reference plane (16) holds the reference latent on every latent frame, in a
    first chunk and in a continuation chunk alike (Eq. 1)."""
    reference = torch.randn(B, 16, 1, H, W)
    given = torch.randn(B, 16, F_LAT, H, W)  # the condition video's latents: given frames, then encoded zero frames
    condition = build_condition(reference, given, 1)
    assert condition.shape == (B, 36, F_LAT, H, W)
    torch.testing.assert_close(condition[:, :4], _wan_i2v_mask(1, T_VID), rtol=0, atol=0)
    torch.testing.assert_close(condition[:, 4:20], given, rtol=0, atol=0)
    torch.testing.assert_close(condition[:, 20:], reference.expand(-1, -1, F_LAT, -1, -1), rtol=0, atol=0)

    condition = build_condition(reference, given, 2)  # the previous chunk's last 4·(2 − 1) + 1 = 5 frames given
    torch.testing.assert_close(condition[:, :4], _wan_i2v_mask(5, T_VID), rtol=0, atol=0)
    torch.testing.assert_close(condition[:, 4:20], given, rtol=0, atol=0)
    torch.testing.assert_close(condition[:, 20:], reference.expand(-1, -1, F_LAT, -1, -1), rtol=0, atol=0)

    with pytest.raises(ValueError, match="`reference_latents` .* is required"):
        build_condition(None, given, 1)
    with pytest.raises(
        ValueError, match=r"`given_latents` has shape \(2, 16, 3, 8, 8\), expected \(2, 16, F, 16, 16\)"
    ):
        build_condition(reference, torch.randn(B, 16, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="`num_given` is 4, expected 1 … 3"):
        build_condition(reference, given, 4)


# 6. Bad input ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(audio_embeds=torch.randn(B, T_VID + 4, 5, 3, 24)),
            r"`audio_embeds` has shape \(2, 13, 5, 3, 24\), expected \(batch, 9,",
        ),
        (
            dict(lip_mask=torch.ones(B, F_LAT + 1, 8, 8)),
            r"`lip_mask` has shape \(2, 4, 8, 8\), expected \(2, 3, 8, 8\)",
        ),
        (dict(face_mask=torch.ones(B, F_LAT, 4, 4)), r"`face_mask` has shape \(2, 3, 4, 4\), expected \(2, 3, 8, 8\)"),
        (
            dict(hidden_states=torch.randn(B, 17, F_LAT, H, W)),
            r"`hidden_states` has shape \(2, 17, 3, 16, 16\), expected \(batch, 16,",
        ),
        (
            dict(condition=torch.randn(B, 20, F_LAT, H, W)),
            r"`condition` has shape \(2, 20, 3, 16, 16\), expected \(2, 36, 3, 16, 16\)",
        ),
        (
            dict(condition=torch.randn(B, 36, F_LAT + 1, H, W)),
            r"`condition` has shape \(2, 36, 4, 16, 16\), expected \(2, 36, 3, 16, 16\)",
        ),
        (
            dict(context_embeds=torch.randn(B, 6, 21)),
            r"`context_embeds` has shape \(2, 6, 21\), expected \(2, N_ctx, 20\)",
        ),
        (
            dict(context_mask=torch.ones(B, 5, dtype=torch.bool)),
            r"`context_mask` has shape \(2, 5\), expected \(2, 6\)",
        ),
        (dict(timestep=torch.tensor(500.0)), r"`timestep` has shape \(\), expected \(2,\)"),
    ],
)
def test_bad_inputs_raise_named_value_errors(echo_model, change, match):
    with pytest.raises(ValueError, match=match), torch.no_grad():
        echo_model(**dict(make_inputs(), **change))


def test_doctored_wan_checkpoints_raise(wan_t2v_folder):
    wan = WanTransformer3DModel.from_pretrained(wan_t2v_folder)
    model = EchoTransformer3DModel.from_wan(wan, **ECHO)
    state = wan.state_dict()

    extra = dict(state, **{"blocks.0.attn1.to_x.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"unknown keys \['blocks.0.attn1.to_x.weight'\] \(shapes \[\(32, 32\)\]\)"):
        model.load_wan_state_dict(extra)

    missing = {k: v for k, v in state.items() if k != "blocks.1.ffn.net.0.proj.weight"}
    with pytest.raises(
        ValueError, match=r"misses keys \['blocks.1.ffn.net.0.proj.weight'\] \(expected shapes \[\(64, 32\)\]\)"
    ):
        model.load_wan_state_dict(missing)

    wrong = dict(state, **{"blocks.0.attn2.to_k.weight": torch.zeros(32, 16)})
    with pytest.raises(ValueError, match=r"`blocks.0.attn2.to_k.weight` has shape \(32, 16\), expected \(32, 32\)"):
        model.load_wan_state_dict(wrong)

    # A module whose state dict holds an extra parameter fails the same way through `from_wan`.
    wan.blocks[0].attn1.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"blocks.0.attn1.extra.weight"):
        EchoTransformer3DModel.from_wan(wan, **ECHO)
    with pytest.raises(ValueError, match=r"Wan arguments \['num_layers'\]"):
        EchoTransformer3DModel.from_wan(wan_t2v_folder, num_layers=3)
    # A base with another input width (neither T2V's 16 nor I2V's 36 channels) is refused, naming both.
    odd = WanTransformer3DModel(**dict(WAN_T2V, in_channels=20))
    with pytest.raises(ValueError, match=r"Wan `in_channels` is 20, expected 16 \(T2V\) or 36 \(I2V"):
        EchoTransformer3DModel.from_wan(odd, **ECHO)


# diffusers memory and speed features ---------------------------------------------------------------------------------

# Layers whose weights must stay in high precision under fp8 storage: the input embeddings (patch, timestep/text, avatar
# audio, user context), every norm, the SDCM gate and the output projection (diffusers' default).
HIGH_PRECISION = re.compile(
    r"^(patch_embedding|condition_embedder\.|audio_proj\.|context_proj|proj_out$|.*norm|.*sdcm\.gate\.)"
)


def _cast_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
    }


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32_compute", "bf16_compute"])
def test_fp8_layerwise_casting_stores_the_large_layers_in_fp8(wan_t2v_folder, compute_dtype):
    """`enable_layerwise_casting(storage_dtype=float8_e4m3fn)`: every attention and feed-forward projection is stored in
    fp8, the embeddings, norms, SDCM gate and output projection are not; the forward pass computes exactly what the model with
    those weights rounded to fp8 computes, and stays within fp8's rounding error of the full-precision output."""
    model = perturb_added_modules(EchoTransformer3DModel.from_wan(wan_t2v_folder, torch_dtype=compute_dtype, **ECHO))
    model.eval()
    inputs = {
        k: v.to(compute_dtype) if k not in ("timestep", "lip_mask", "face_mask") else v
        for k, v in make_inputs().items()
    }
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        full = model(**inputs).sample.float()
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
        stored = {name: module.weight.dtype for name, module in _cast_layers(model).items()}
        fp8 = {name for name, dtype in stored.items() if dtype == torch.float8_e4m3fn}
        assert fp8 == {name for name in stored if not HIGH_PRECISION.match(name)}, sorted(stored.items())
        assert {"blocks.1.attn1.to_q", "blocks.1.ffn.net.2", "blocks.0.sdcm.attn_avt.to_k"} <= fp8
        for name, module in _cast_layers(rounded).items():
            if name in fp8:
                for param in module.parameters(recurse=False):
                    param.copy_(param.to(torch.float8_e4m3fn).to(compute_dtype))
        output = model(**inputs).sample.float()
        expected = rounded(**inputs).sample.float()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    # e4m3 keeps 3 mantissa bits (an ulp is 2^-3 of the value): each weight is off by at most half an ulp, and the
    # output moves by less than one ulp of its scale (here by ~0.04); it does move: the weights really are fp8.
    error = (output - full).abs().max() / full.abs().max()
    assert 1e-3 < error < 2**-3, float(error)


def _denoising_calls(count: int = 3) -> list[dict]:
    """Inputs of successive denoising steps: the latents and timestep change a little from one call to the next."""
    calls, inputs = [], make_inputs(seed=11)
    for step in range(count):
        calls.append(dict(inputs, timestep=torch.tensor([900.0, 900.0]) - 50.0 * step))
        inputs = dict(inputs, hidden_states=inputs["hidden_states"] * 0.9)
    return calls


def test_first_block_cache(wan_t2v_folder):
    """`CacheMixin`: diffusers' First Block Cache runs on the Echo blocks; at threshold 0 it never reuses a residual (the
    output is exactly the uncached one), at a large threshold it reuses the cached residual after the first call."""
    hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no cache hooks")
    if not hasattr(hooks, "FirstBlockCacheConfig"):
        pytest.skip("this diffusers has no FirstBlockCacheConfig")
    model = perturb_added_modules(EchoTransformer3DModel.from_wan(wan_t2v_folder, **ECHO)).eval()
    calls = _denoising_calls()
    with torch.no_grad():
        uncached = [model(**inputs).sample for inputs in calls]

        model.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.0))
        with model.cache_context("cond"):
            cached = [model(**inputs).sample for inputs in calls]
        model.disable_cache()
        for actual, expected in zip(cached, uncached):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)

        model.enable_cache(hooks.FirstBlockCacheConfig(threshold=1e9))
        with model.cache_context("cond"):
            reused = [model(**inputs).sample for inputs in calls[:2]]
        model.disable_cache()
    torch.testing.assert_close(reused[0], uncached[0], rtol=0, atol=0)
    assert (reused[1] - uncached[1]).abs().max() > 1e-4  # blocks after the first were skipped
    with torch.no_grad():  # and the hooks are gone
        torch.testing.assert_close(model(**calls[1]).sample, uncached[1], rtol=0, atol=0)


def test_wan_loras_load_onto_echo_and_change_exactly_the_wan_layers(wan_t2v_folder, tmp_path):
    """A LoRA made for the Wan model (diffusers format, saved by `WanPipeline.save_lora_weights`, alpha ≠ rank; and the
    same LoRA in the original Wan format as community LoRAs come, converted by `WanLoraLoaderMixin.lora_state_dict`)
    loads onto the Echo model built from that Wan model with `load_lora_adapter(prefix="transformer")`: the Echo model
    with it computes exactly what the Wan model with it computes, and only the layers the LoRA names are adapted."""
    from diffusers.loaders import WanLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    wan = WanTransformer3DModel.from_pretrained(wan_t2v_folder).eval()
    echo = EchoTransformer3DModel.from_wan(wan, **ECHO).eval()  # ECHO modules as initialised: zero contribution
    inputs = make_inputs(seed=3)
    reference = torch.randn(B, 16, 1, H, W, generator=torch.Generator().manual_seed(4))
    condition = build_condition(reference, torch.cat([reference, torch.zeros(B, 16, F_LAT - 1, H, W)], 2), 1)
    with torch.no_grad():
        before = echo(**inputs, condition=condition).sample

    torch.manual_seed(5)
    targets = r"blocks\.\d+\.(attn1\.to_(q|k|v|out\.0)|attn2\.to_(q|v)|ffn\.net\.(0\.proj|2))"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    wan.add_adapter(config)
    lora = get_peft_model_state_dict(wan)
    WanLoraLoaderMixin.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=lora, transformer_lora_adapter_metadata=config.to_dict()
    )
    with torch.no_grad():
        expected = wan(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]).sample

    echo.load_lora_adapter(tmp_path / "lora", prefix="transformer", adapter_name="wan_lora", use_safetensors=True)
    named = {key.rsplit(".lora_", 1)[0] for key in lora}
    adapted = {name for name, module in echo.named_modules() if hasattr(module, "lora_A")}
    assert adapted == named and not any("sdcm" in name for name in adapted)
    with torch.no_grad():
        actual = echo(**inputs, condition=condition).sample
    assert (actual - before).abs().max() > 1e-2
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    # The same LoRA in the original Wan format (lora_down / lora_up / alpha under `diffusion_model.`).
    original = {}
    for key, value in lora.items():
        module, kind = key.rsplit(".lora_", 1)
        block, index, name = module.split(".", 2)
        prefix = f"diffusion_model.{block}.{index}.{ORIGINAL_WAN_NAMES[name]}"
        original[f"{prefix}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        original[f"{prefix}.alpha"] = torch.tensor(8.0)
    converted = WanLoraLoaderMixin.lora_state_dict(original)
    echo.delete_adapters("wan_lora")
    echo.load_lora_adapter(converted, prefix="transformer", adapter_name="community")
    with torch.no_grad():
        torch.testing.assert_close(echo(**inputs, condition=condition).sample, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_hooks_give_the_same_output(echo_model, offload_type):
    """diffusers' group offload wires its hooks through the Echo blocks and the modules outside them (audio and
    context projections) without changing the output (here onload = offload = CPU: the hooks, not the transfer)."""
    model = copy.deepcopy(echo_model)
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    cpu = torch.device("cpu")
    model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **options)
    inputs = make_inputs(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, echo_model(**inputs).sample, rtol=0, atol=0)


def _code_lines(function) -> list[str]:
    """The stripped code lines of ``function``'s body (comments, blank lines and the signature left out)."""
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(function))
    body = source[source.index(") -> torch.Tensor:\n") + len(") -> torch.Tensor:\n") :]
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_block_forward_is_diffusers_wan_block_forward_with_sdcm_inserted():
    """`EchoTransformerBlock.forward` is marked `# Copied from` diffusers' `WanTransformerBlock.forward`: its lines are
    the Wan 2.1 branch of the installed diffusers' (``temb`` of shape (B, 6, D)), the SDCM step aside, so a change
    upstream shows here."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from echo.transformer_echo import EchoTransformerBlock

    upstream = _code_lines(WanTransformerBlock.forward)
    branch_start, branch_end = upstream.index("if temb.ndim == 4:"), upstream.index("else:")
    upstream = upstream[:branch_start] + upstream[branch_end + 1 :]  # the Wan 2.1 branch, as one path
    ours = _code_lines(EchoTransformerBlock.forward)
    sdcm_start = ours.index("if self.use_sdcm:")
    sdcm_end = ours.index(
        "norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as("
    )
    assert ours[:sdcm_start] + ours[sdcm_end:] == upstream
