"""LongRangeContextEncoder (LCU, Eq. 5-9): causality, long range, padding, face selection, gates, switches."""

import inspect

import pytest
import torch

from echo.lcu import ALPHA_INIT, LCUOutput, LongRangeContextEncoder
from echo.mamba import MambaBlock

NL, AUDIO_DIM, C_V, HV, WV, S_DIM = 3, 16, 4, 8, 8, 24
TINY = dict(
    audio_dim=AUDIO_DIM,
    audio_num_layers=NL,
    audio_window=5,
    dim=32,
    num_audio_layers=2,
    video_channels=C_V,
    video_grid=(2, 2),
    num_vision_layers=1,
    understanding_dim=S_DIM,
    num_attention_heads=4,
    context_dim=32,
)


def make_inputs(num_frames, batch_size=1, num_understanding=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    face = torch.zeros(batch_size, num_frames, HV, WV)
    face[..., 2:7, 1:6] = 1.0  # a face region covering parts of all four grid cells
    return dict(
        user_audio=torch.randn(batch_size, num_frames, NL, AUDIO_DIM, generator=g, dtype=dtype),
        user_video=torch.randn(batch_size, num_frames, C_V, HV, WV, generator=g, dtype=dtype),
        user_face_mask=face,
        understanding=torch.randn(batch_size, num_understanding, S_DIM, generator=g, dtype=dtype),
    )


def slice_frames(inputs, frames):
    out = dict(inputs)
    for key in ("user_audio", "user_video", "user_face_mask", "user_audio_mask"):
        if key in inputs:
            out[key] = inputs[key][:, frames]
    return out


@pytest.fixture(scope="module")
def lcu():
    torch.manual_seed(0)
    return LongRangeContextEncoder(**TINY).eval()


@pytest.fixture(scope="module")
def lcu64():
    torch.manual_seed(0)
    return LongRangeContextEncoder(**TINY).double().eval()


@torch.no_grad()
def test_clip_output_ignores_frames_after_its_end_and_left_padding(lcu64):
    num_frames, t, clip = 40, 29, 9
    inputs = make_inputs(num_frames, dtype=torch.float64)
    perturbed = make_inputs(num_frames, seed=1, dtype=torch.float64)
    for key in ("user_audio", "user_video"):
        perturbed[key][:, : t + 1] = inputs[key][:, : t + 1]
    perturbed["understanding"] = inputs["understanding"]

    # 1. Per-frame history encodings are causal: frames ≤ t − radius (audio window look-ahead) and ≤ t (vision)
    #    are unchanged when the frames after t change; later frames do change (the check can fail).
    _, audio = lcu64.encode_audio_history(inputs["user_audio"])
    _, audio_p = lcu64.encode_audio_history(perturbed["user_audio"])
    torch.testing.assert_close(audio_p[:, : t - 1], audio[:, : t - 1], atol=0, rtol=0)
    assert (audio_p[:, t + 1 :] - audio[:, t + 1 :]).abs().amax() > 1e-3
    video = lcu64.encode_video_history(inputs["user_video"], inputs["user_face_mask"])
    video_p = lcu64.encode_video_history(perturbed["user_video"], perturbed["user_face_mask"])
    torch.testing.assert_close(video_p[:, : t + 1], video[:, : t + 1], atol=0, rtol=0)
    assert (video_p[:, t + 1 :] - video[:, t + 1 :]).abs().amax() > 1e-3

    # 2. The clip ending at t: its own history 0..t, alone or left-padded in a batch whose padding holds the
    #    (perturbed) future frames, gives the same f_pu.
    alone = lcu64(clip_frames=clip, **slice_frames(inputs, slice(0, t + 1)))
    order = torch.cat([torch.arange(t + 1, num_frames), torch.arange(0, t + 1)])
    padded = slice_frames(perturbed, order)
    batch = {k: torch.cat([padded[k], inputs[k]]) for k in padded}
    mask = torch.ones(2, num_frames, dtype=torch.bool)
    mask[0, : num_frames - t - 1] = False
    out = lcu64(clip_frames=clip, user_audio_mask=mask, **batch)
    torch.testing.assert_close(out.context[:1], alone.context, atol=1e-12, rtol=1e-10)
    assert out.context_mask.all()
    # the full history of the second sample gives a different clip (it ends later)
    assert (out.context[1] - alone.context[0]).abs().amax() > 1e-3


@torch.no_grad()
def test_long_range_audio_at_frame_10_of_4000_reaches_the_clip_and_f_pu_equals_p_usr_at_init(lcu64):
    num_frames = 4000
    inputs = make_inputs(num_frames, dtype=torch.float64)
    alpha = lcu64.alpha.clone()
    lcu64.alpha.zero_()
    try:
        out = lcu64(clip_frames=9, **inputs)
    finally:
        lcu64.alpha.copy_(alpha)
    # Eq. 9 with both gates closed (β = 0 at initialisation, α set to 0): f_pu is P_usr exactly
    assert torch.equal(out.context, out.perception)

    perturbed = dict(inputs, user_audio=inputs["user_audio"].clone())
    perturbed["user_audio"][:, 10] += torch.randn(NL, AUDIO_DIM, dtype=torch.float64)
    out_p = lcu64(clip_frames=9, **perturbed)
    change = (out_p.context - out.context).abs().amax() / out.context.abs().amax()
    # float64 round-off is ~1e-16: a relative change above 1e-12 is carried 3,990 frames by the Mamba state
    assert change > 1e-12, f"relative change {change:.3e}"


@torch.no_grad()
@pytest.mark.parametrize("gate_logit", [-1e4, 0.0, 1e4])
def test_current_windows_are_modulated_by_the_gated_history(lcu64, gate_logit):
    """Eq. 6: Â = A + g ⊙ tanh(f_proj(Ā_K)), with A the current clip's windows and Ā_K the history state of its
    frame. g = 0 passes the windows through unchanged; g = 1 adds the full history term."""
    clip = 6
    inputs = make_inputs(20, dtype=torch.float64)
    seen = {}
    hooks = [
        lcu64.audio_gate.register_forward_hook(lambda m, a, o: torch.full_like(o, gate_logit)),
        lcu64.f_proj.register_forward_hook(lambda m, a, o: seen.update(state=a[0], history=torch.tanh(o))),
        lcu64.audio_tokens.register_forward_hook(lambda m, a, o: seen.__setitem__("modulated", a[0])),
    ]
    try:
        lcu64(clip_frames=clip, **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    windows, states = lcu64.encode_audio_history(inputs["user_audio"])
    current = windows[:, -clip:]  # B, T_cur, L_w, audio_dim
    # Ā_K of each current frame is the history state at that same frame, shared by its L_w window rows
    torch.testing.assert_close(seen["state"], states[:, -clip:, None].expand(-1, -1, current.shape[2], -1))
    modulated = seen["modulated"].reshape(current.shape)
    g = torch.sigmoid(torch.tensor(gate_logit, dtype=torch.float64))
    assert seen["history"].abs().amax() > 1e-3
    torch.testing.assert_close(modulated, current + g * seen["history"], atol=1e-12, rtol=1e-12)


def test_gates_start_so_that_the_understanding_learns_from_step_0(lcu):
    """β starts closed (F_ffn gets no gradient at initialisation); α starts at ALPHA_INIT, so the understanding path
    (f_align, the cross-attention) gets gradient at step 0 although the generator's user gate starts at zero."""
    assert torch.equal(lcu.alpha.detach(), torch.full((1,), ALPHA_INIT)) and not lcu.beta.any()
    inputs = make_inputs(24)
    lcu.zero_grad()
    out = lcu(clip_frames=9, **inputs)
    out.context.square().sum().backward()
    assert lcu.alpha.grad.abs() > 0 and lcu.beta.grad.abs() > 0
    for name in ("cross_attn", "f_align"):
        assert any(torch.count_nonzero(p.grad) for n, p in lcu.named_parameters() if n.startswith(name)), name
    grads = [p.grad for n, p in lcu.named_parameters() if n.startswith("ffn")]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), "ffn"
    assert torch.count_nonzero(lcu.audio_layers[0].mixer.in_proj.weight.grad) > 0
    lcu.zero_grad()


@torch.no_grad()
def test_understanding_fusion_after_opening_the_gate_respects_the_mask():
    torch.manual_seed(0)
    lcu = LongRangeContextEncoder(**TINY).eval()
    lcu.alpha.fill_(0.5)
    inputs = make_inputs(20, num_understanding=6)
    mask = torch.tensor([[True, True, True, True, False, False]])
    out = lcu(clip_frames=9, understanding_mask=mask, **inputs)
    assert not torch.equal(out.context, out.perception)
    # masked understanding tokens have no effect, valid ones do
    changed_masked = dict(inputs, understanding=inputs["understanding"].clone())
    changed_masked["understanding"][:, 4:] += torch.randn(2, S_DIM)
    torch.testing.assert_close(lcu(clip_frames=9, understanding_mask=mask, **changed_masked).context, out.context)
    changed_valid = dict(inputs, understanding=inputs["understanding"].clone())
    changed_valid["understanding"][:, 0] += torch.randn(S_DIM)
    assert (lcu(clip_frames=9, understanding_mask=mask, **changed_valid).context - out.context).abs().amax() > 1e-4
    # a sample without any understanding token falls back to f_m = P_usr (no NaN)
    empty = lcu(clip_frames=9, understanding_mask=torch.zeros_like(mask), **inputs)
    assert torch.equal(empty.context, empty.perception)


@torch.no_grad()
def test_face_mask_selects_tokens(lcu):
    inputs = make_inputs(12)
    out = lcu(clip_frames=5, **inputs)
    face = inputs["user_face_mask"].bool().unsqueeze(2).expand_as(inputs["user_video"])
    background = dict(
        inputs, user_video=torch.where(face, inputs["user_video"], torch.randn_like(inputs["user_video"]))
    )
    torch.testing.assert_close(lcu(clip_frames=5, **background).context, out.context, atol=1e-6, rtol=1e-6)
    on_face = dict(inputs, user_video=torch.where(face, torch.randn_like(inputs["user_video"]), inputs["user_video"]))
    assert (lcu(clip_frames=5, **on_face).context - out.context).abs().amax() > 1e-4


@torch.no_grad()
def test_vision_mamba_mixes_space_within_a_frame_and_time_causally(lcu64):
    """Eq. 7's vision Mamba scans the face grid of each frame, then time: a change of one grid cell at frame 5
    reaches the other cells of frame 5 and later frames, never earlier frames."""
    inputs = make_inputs(12, dtype=torch.float64)
    changed = inputs["user_video"].clone()
    changed[:, 5, :, 2:4, 1:4] += 1.0  # face pixels of grid cell 0 (rows 0-3, columns 0-3) only
    vision = lcu64.encode_video_history(inputs["user_video"], inputs["user_face_mask"])
    vision_changed = lcu64.encode_video_history(changed, inputs["user_face_mask"])
    diff = (vision_changed - vision).abs().amax(-1)[0]  # T, G
    assert (diff[:5] == 0).all()
    assert (diff[5] > 1e-6).all()  # cell 0 itself and, through the spatial scan, the other cells
    assert (diff[6:] > 1e-6).all()


@pytest.mark.parametrize(
    "switches, absent, required",
    [
        (dict(), (), ("user_audio", "user_video", "user_face_mask", "understanding")),
        (dict(use_visual=False), ("video_", "vision_"), ("user_audio", "understanding")),
        (
            dict(use_understanding=False),
            ("f_align", "cross_attn", "alpha"),
            ("user_audio", "user_video", "user_face_mask"),
        ),
        (
            dict(use_visual=False, use_understanding=False),
            ("video_", "vision_", "f_align", "cross_attn", "alpha"),
            ("user_audio",),
        ),
    ],
)
def test_switches_remove_modules_and_inputs(switches, absent, required):
    torch.manual_seed(0)
    lcu = LongRangeContextEncoder(**TINY, **switches).eval()
    keys = set(lcu.state_dict())
    full_keys = set(LongRangeContextEncoder(**TINY).state_dict())
    for prefix in absent:
        assert not any(k.startswith(prefix) for k in keys), prefix
        assert any(k.startswith(prefix) for k in full_keys), prefix
    assert keys <= full_keys
    assert lcu.required_inputs == required
    inputs = make_inputs(10)
    given = {k: v for k, v in inputs.items() if k in required}
    with torch.no_grad():
        out = lcu(clip_frames=5, **given)
    assert isinstance(out, LCUOutput) and out.context.shape == (1, 5, 32)
    # every required input is enforced with a clear error
    for name in required[1:]:
        with pytest.raises(ValueError, match=name):
            lcu(clip_frames=5, **{k: v for k, v in given.items() if k != name})
    # an input of a removed branch has no effect
    with torch.no_grad():
        torch.testing.assert_close(lcu(clip_frames=5, **inputs).context, out.context, atol=0, rtol=0)
    assert "clip_frames" in inspect.signature(lcu.forward).parameters


def test_shape_errors_name_the_tensor(lcu):
    inputs = make_inputs(10)
    with pytest.raises(ValueError, match="user_audio.*got \\(1, 10, 3, 15\\)"):
        lcu(clip_frames=5, **dict(inputs, user_audio=inputs["user_audio"][..., :15]))
    with pytest.raises(ValueError, match="clip_frames"):
        lcu(clip_frames=11, **inputs)


def test_save_load_round_trip_and_gradient_checkpointing(tmp_path):
    torch.manual_seed(0)
    lcu = LongRangeContextEncoder(**TINY)
    lcu.alpha.data.fill_(0.3)
    lcu.beta.data.fill_(-0.2)
    lcu.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LongRangeContextEncoder.from_pretrained(tmp_path)
    inputs = make_inputs(16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clip_frames=5, **inputs).context, lcu(clip_frames=5, **inputs).context)

    lcu.train()
    lcu(clip_frames=5, **inputs).context.sum().backward()
    grads = {n: p.grad.clone() for n, p in lcu.named_parameters()}
    lcu.zero_grad()
    lcu.enable_gradient_checkpointing()
    layer, calls = lcu.audio_layers[0], []
    layer_forward = layer.forward  # counted through the instance (hooks do not fire on recomputation)
    layer.forward = lambda *a, **k: (calls.append(1), layer_forward(*a, **k))[1]
    try:
        lcu(clip_frames=5, **inputs).context.sum().backward()
    finally:
        del layer.forward
    assert len(calls) == 2  # checkpointing is on: the Mamba layer runs again during the backward pass
    for n, p in lcu.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_bfloat16_load_keeps_the_ssm_parameters_in_float32(tmp_path):
    torch.manual_seed(0)
    lcu = LongRangeContextEncoder(**TINY).eval()
    lcu.save_pretrained(tmp_path)
    half = LongRangeContextEncoder.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    mixer = half.audio_layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32 and mixer.in_proj.weight.dtype == torch.bfloat16
    inputs = make_inputs(30)
    with torch.no_grad():
        out, ref = half(clip_frames=9, **inputs).context, lcu(clip_frames=9, **inputs).context
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.05)


def _with_scan_block(lcu, frames):
    """Sets the parallel-scan block of every Mamba layer (256 by default), so short tests cross block boundaries."""
    for module in lcu.modules():
        if isinstance(module, MambaBlock):
            module.scan_chunk_size = frames
    return lcu


def _incremental_contexts(lcu, inputs, chunks, radius, motion):
    """Encodes the chunks ``[start, stop)`` of one conversation incrementally (the state carried from chunk to chunk,
    the next clip starting ``motion`` frames before ``stop``), each call getting the full history."""
    contexts, state = [], None
    for start, stop in chunks:
        limit = stop - max(radius, motion)
        out = lcu(clip_frames=stop - start, state=state, save_state_at=limit, **slice_frames(inputs, slice(0, stop)))
        saved = max(limit // lcu.scan_block * lcu.scan_block, 0 if state is None else state.num_frames)
        assert (out.state is None and saved == 0) or out.state.num_frames == saved
        contexts.append((out.context, out.perception))
        state = out.state
    return contexts


@torch.no_grad()
@pytest.mark.parametrize("motion", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("switches", [dict(), dict(use_visual=False)], ids=["visual", "audio_only"])
def test_incremental_chunks_equal_the_full_history_forward_exactly(dtype, motion, switches):
    """A conversation encoded chunk by chunk with the state carried gives, bit for bit, the full-history forward of
    every chunk (the LCU as trained): states are saved at parallel-scan block boundaries (16 frames here, 256 by
    default), where the full scan starts a block too. Chunks of 9 frames overlapping by ``motion`` frames."""
    torch.manual_seed(0)
    lcu = _with_scan_block(LongRangeContextEncoder(**{**TINY, **switches}).to(dtype).eval(), 16)
    lcu.alpha.fill_(0.5)
    lcu.beta.fill_(0.5)  # the whole of Eq. 9 counts
    inputs = make_inputs(70, dtype=dtype)
    inputs["user_audio_mask"] = torch.ones(1, 70, dtype=torch.bool)  # all valid, as the pipeline passes it
    chunks = [(0, 9)]
    while chunks[-1][1] + 9 - motion <= 70:
        chunks.append((chunks[-1][1] - motion, chunks[-1][1] - motion + 9))
    assert len(chunks) >= 8
    incremental = _incremental_contexts(lcu, inputs, chunks, radius=2, motion=motion)
    for (start, stop), (context, perception) in zip(chunks, incremental):
        full = lcu(clip_frames=stop - start, **slice_frames(inputs, slice(0, stop)))
        assert torch.equal(context, full.context) and torch.equal(perception, full.perception), (start, stop)
    # the history matters (so the comparison is not vacuous): without the state the last chunk differs
    start, stop = chunks[-1]
    window = slice_frames(inputs, slice(start, stop))
    assert (lcu(clip_frames=stop - start, **window).context - incremental[-1][0]).abs().max() > 1e-3


@torch.no_grad()
def test_the_shipped_schedule_carries_the_whole_history_exactly_over_40_chunks():
    """The shipped 1.3B description's settings (configs/models/wan2.1-t2v-1.3b.yaml: 33-frame chunks, one motion
    frame, the whole history) with the LCU's own 16-frame scan blocks: over 41 chunks (1,281 frames), each chunk's
    context from the carried state is bit for bit the full-history forward (what stage 2 trains), and no chunk
    reads more frames than chunk 1 (the state's open block + the new frames + the audio windows' look-back)."""
    from pathlib import Path

    from echo.components import load_model_config

    root = Path(__file__).resolve().parents[1]
    settings = load_model_config(root / "configs" / "models" / "wan2.1-t2v-1.3b.yaml")["settings"]
    assert settings["max_history_frames"] is None  # the whole history: a state can carry it exactly
    chunk, motion = settings["num_frames_per_chunk"], settings["motion_frames"]
    torch.manual_seed(0)
    lcu = LongRangeContextEncoder(**TINY).eval()  # default scan blocks (TEMPORAL_SCAN_BLOCK)
    lcu.alpha.fill_(0.5)
    lcu.beta.fill_(0.5)
    chunks = [(c * (chunk - motion), c * (chunk - motion) + chunk) for c in range(41)]
    inputs = make_inputs(chunks[-1][1])
    inputs["user_audio_mask"] = torch.ones(1, chunks[-1][1], dtype=torch.bool)
    read = []
    hook = lcu.audio_norm.register_forward_pre_hook(lambda m, a: read.append(a[0].shape[1]))
    try:
        incremental = _incremental_contexts(lcu, inputs, chunks, radius=2, motion=motion)
    finally:
        hook.remove()
    assert read[0] == chunk and max(read[1:]) == read[1] <= 15 + 2 + (chunk - motion) + 2, read
    for (start, stop), (context, perception) in zip(chunks, incremental):
        full = lcu(clip_frames=stop - start, **slice_frames(inputs, slice(0, stop)))
        assert torch.equal(context, full.context) and torch.equal(perception, full.perception), (start, stop)
    # the history matters: without the frames before chunk 30, chunk 40's context differs
    start, stop = chunks[-1]
    late = slice_frames(inputs, slice(chunks[30][0], stop))
    assert (lcu(clip_frames=stop - start, **late).context - incremental[-1][0]).abs().max() > 1e-4


@torch.no_grad()
def test_incremental_call_reads_no_frame_before_the_state_end():
    """The cost of a chunk does not depend on the history's length: frames before ``state.num_frames − radius``
    (audio windows) and before ``state.num_frames`` (video) are not read again, so NaN there changes nothing."""
    torch.manual_seed(0)
    lcu = _with_scan_block(LongRangeContextEncoder(**TINY).eval(), 8)
    inputs = make_inputs(40)
    state = lcu(clip_frames=9, save_state_at=26, **slice_frames(inputs, slice(0, 28))).state
    assert state.num_frames == 24  # the last block boundary at or before frame 26
    expected = lcu(clip_frames=9, state=state, save_state_at=36, **inputs)
    poisoned = {k: v.clone() for k, v in inputs.items()}
    poisoned["user_audio"][:, : 24 - 2] = float("nan")
    poisoned["user_video"][:, :24] = float("nan")
    rows = {}  # frames each per-frame module processes: the new frames, not the history
    counts = {"audio_norm": lambda x: x.shape[1], "f_audio": lambda x: x.shape[1], "video_proj": lambda x: x.shape[0]}
    hooks = [
        getattr(lcu, name).register_forward_pre_hook(lambda m, a, name=name, n=n: rows.__setitem__(name, n(a[0])))
        for name, n in counts.items()
    ]
    try:
        out = lcu(clip_frames=9, state=state, save_state_at=36, **poisoned)
    finally:
        for hook in hooks:
            hook.remove()
    # frames 24-39 (16), and for the audio windows the 2 frames before them
    assert rows == {"audio_norm": 18, "f_audio": 16, "video_proj": 16}, rows
    assert torch.isfinite(out.context).all()
    torch.testing.assert_close(out.context, expected.context, atol=0, rtol=0)
    torch.testing.assert_close(out.state.audio[0].ssm_state, expected.state.audio[0].ssm_state, atol=0, rtol=0)
    # ... and the frames it does read count: the two audio frames before the state's end feed the windows
    poisoned["user_audio"][:, 23] = 0.0
    assert (lcu(clip_frames=9, state=state, **poisoned).context - expected.context).abs().max() > 1e-6


def test_incremental_call_rejects_what_a_state_cannot_give():
    torch.manual_seed(0)
    lcu = _with_scan_block(LongRangeContextEncoder(**TINY).eval(), 8)
    inputs = make_inputs(30)
    out = lcu(clip_frames=9, save_state_at=18, return_dict=False, **slice_frames(inputs, slice(0, 20)))
    assert len(out) == 4 and out[3].num_frames == 16  # (context, context_mask, perception, state)
    state = out[3]
    with pytest.raises(ValueError, match="clip_frames"):  # the clip [15, 24) starts before the state's end
        lcu(clip_frames=9, state=state, **slice_frames(inputs, slice(0, 24)))
    with pytest.raises(ValueError, match="save_state_at"):  # frame 28's window is not final in a 30-frame history
        lcu(clip_frames=9, state=state, save_state_at=29, **inputs)
    padded = torch.ones(1, 30, dtype=torch.bool)
    padded[:, 20] = False
    with pytest.raises(ValueError, match="user_audio_mask"):
        lcu(clip_frames=9, state=state, user_audio_mask=padded, **inputs)
    with pytest.raises(ValueError, match="batch"):
        lcu(clip_frames=9, state=state, **{k: v.expand(2, *v.shape[1:]) for k, v in inputs.items()})
    audio_only = LongRangeContextEncoder(**TINY, use_visual=False)
    with pytest.raises(ValueError, match="state"):
        audio_only(clip_frames=9, state=state, user_audio=inputs["user_audio"], understanding=inputs["understanding"])
