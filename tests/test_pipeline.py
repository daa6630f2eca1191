"""EchoPipeline on tiny components: determinism, chunking with reference + motion-frame conditioning, the guidance
equation, defaults from the saved settings, save/load round trip, CPU offload."""

import numpy as np
import pytest
import torch

from pipelines import EchoPipeline, chunk_schedule
from tests.tiny_models import tiny_components_as_trained

SIZE = 32  # 4×4 latents, 2×2 tokens per frame
CHUNK, MOTION = 9, 5


def _make_pipe() -> EchoPipeline:
    components = tiny_components_as_trained()  # ECHO additions acting as after training
    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _make_pipe()


@pytest.fixture(scope="module")
def inputs():
    from skimage.data import astronaut

    from echo.encoding import detect_face_landmarks

    image = astronaut()  # 512 × 512 RGB, a real face
    landmarks = detect_face_landmarks(image)  # 478 × 2, pixels of the 512² image
    small = image[::8, ::8]  # 64 × 64
    rng = np.random.default_rng(0)
    t = np.arange(16_000 * 2) / 16_000
    speech = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    user_frames = np.stack([np.roll(small, shift=k % 3, axis=1) for k in range(30)])
    return {
        "reference_image": image,
        "avatar_audio": speech,
        "user_video": user_frames,
        "user_audio": (0.1 * rng.standard_normal(16_000 * 2)).astype(np.float32),
        "reference_landmarks": landmarks,  # pixels of the reference image as given
        "user_landmarks": np.repeat(landmarks[None] / 8, 30, axis=0),
        "understanding": torch.randn(4, 32, generator=torch.Generator().manual_seed(0)),
        "emotion": "calm and attentive",
        "height": SIZE,
        "width": SIZE,
        "num_frames_per_chunk": CHUNK,
        "motion_frames": MOTION,
        "user_video_size": 32,
        "frame_inputs": False,  # taken as head crops: the expectations below read these very frames and landmarks
    }


def _run(pipe, inputs, seed=0, **overrides):
    kwargs = {**inputs, "num_frames": 9, "num_inference_steps": 2, "output_type": "pt"}
    kwargs.update(overrides)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).frames


def test_chunk_schedule_overlaps_by_the_motion_frames():
    assert chunk_schedule(17, 9, 5) == [(0, 9), (4, 13), (8, 17)]
    assert chunk_schedule(5, 9, 5) == [(0, 9)]
    chunks = chunk_schedule(100, 33, 5)
    assert chunks[0] == (0, 33) and chunks[-1][1] >= 100 and chunks[-2][1] < 100
    assert all(b[0] == a[1] - 5 for a, b in zip(chunks, chunks[1:]))
    with pytest.raises(ValueError, match="motion_frames"):
        chunk_schedule(17, 9, 4)
    with pytest.raises(ValueError, match="num_frames_per_chunk"):
        chunk_schedule(17, 10, 5)


def test_same_seed_same_frames_other_seed_other_frames(pipe, inputs):
    first = _run(pipe, inputs, seed=0)
    again = _run(pipe, inputs, seed=0)
    other = _run(pipe, inputs, seed=1)
    assert first.shape == (1, 9, 3, SIZE, SIZE)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_three_chunks_condition_on_previous_motion_frames_and_growing_user_history(pipe, inputs, monkeypatch):
    conditions, histories, decoded = {}, [], []
    original_decode = pipe.decode_latents

    def decode_latents(latents):
        decoded.append(original_decode(latents))
        return decoded[-1]

    monkeypatch.setattr(pipe, "decode_latents", decode_latents)

    audio_windows, masks = {}, []

    def transformer_hook(module, args, kwargs):
        conditions.setdefault(pipe.current_chunk, kwargs["condition"].clone())
        if kwargs["audio_embeds"] is not None:  # the unconditional guidance pass has none
            audio_windows.setdefault(pipe.current_chunk, kwargs["audio_embeds"].clone())
        masks.append((kwargs["lip_mask"].clone(), kwargs["face_mask"].clone()))

    user_streams = []

    def lcu_hook(module, args, kwargs):
        histories.append((kwargs["user_audio"].shape[1], kwargs["clip_frames"]))
        user_streams.append({k: kwargs[k].clone() for k in ("user_audio", "user_video", "user_face_mask")})

    handles = [
        pipe.transformer.register_forward_pre_hook(transformer_hook, with_kwargs=True),
        pipe.context_encoder.register_forward_pre_hook(lcu_hook, with_kwargs=True),
    ]
    try:
        steps = []

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            steps.append((pipeline.current_chunk, step, tuple(callback_kwargs["latents"].shape)))
            return callback_kwargs

        frames = _run(pipe, inputs, num_frames=17, num_inference_steps=1, callback_on_step_end=on_step_end)
    finally:
        for handle in handles:
            handle.remove()

    # exactly the requested frames, from three chunks (0-8, 4-12, 8-16)
    assert frames.shape[1] == 17 and sorted(conditions) == [0, 1, 2]
    latent_shape = (1, 16, 3, SIZE // 8, SIZE // 8)
    assert steps == [(0, 0, latent_shape), (1, 0, latent_shape), (2, 0, latent_shape)]
    # the user's history always starts at frame 0 and ends with the chunk (LCU causal), the clip is the chunk
    assert histories == [(9, 9), (13, 9), (17, 9)]
    # ... and holds the user's own streams, frame for frame: wav2vec2 rows of the user audio, the VAE tokens of each
    # user frame (resized to user_video_size with antialiasing) and its face mask from the user landmarks.
    import torch.nn.functional as F

    from echo.encoding import encode_user_video
    from echo.masks import rasterize_masks

    user = torch.from_numpy(inputs["user_video"][:17]).permute(0, 3, 1, 2).float() / 127.5 - 1
    user = F.interpolate(user, size=(32, 32), mode="bilinear", antialias=True).clamp(-1, 1)
    lip, face = rasterize_masks(inputs["user_landmarks"][:17], 32, 32, source_size=(64, 64))
    tokens, token_mask = encode_user_video(pipe.vae, user[None], torch.from_numpy(lip | face).float()[None])
    audio_rows = pipe.encode_audio(inputs["user_audio"], 17)
    for streams, stop in zip(user_streams, (9, 13, 17)):
        torch.testing.assert_close(streams["user_video"], tokens[:, :stop], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(streams["user_face_mask"], token_mask[:, :stop])
        torch.testing.assert_close(streams["user_audio"][0], audio_rows[:stop].to(streams["user_audio"].dtype))
    assert token_mask.any() and not token_mask.all()
    # The avatar audio of each chunk is the wav2vec2 windows of the chunk's own frames [start, stop).
    from echo.audio import window_features

    avatar_rows = pipe.encode_audio(inputs["avatar_audio"], 17)
    expected_windows = window_features(avatar_rows[None], radius=pipe.transformer.config.audio_window // 2)
    for chunk, (start, stop) in enumerate([(0, 9), (4, 13), (8, 17)]):
        torch.testing.assert_close(audio_windows[chunk], expected_windows[:, start:stop].to(audio_windows[chunk].dtype))

    # every pass of every chunk gets the avatar's lip and face token masks from the reference landmarks
    lip, face = pipe.prepare_avatar_masks(
        SIZE, SIZE, 3, inputs["reference_landmarks"], reference_image=inputs["reference_image"]
    )
    assert lip.any() and face.any() and not torch.equal(lip, face)  # so a swap or a missing mask fails below
    assert masks and all(torch.equal(m[0], lip) and torch.equal(m[1], face) for m in masks)

    # Condition channels: [mask(4), given latents(16), reference plane(16)].
    from echo.encoding import encode_latents

    reference = pipe.prepare_reference(inputs["reference_image"], SIZE, SIZE)
    reference_latents = encode_latents(pipe.vae, reference[:, :, None])  # 1, 16, 1, h, w
    assert reference_latents.abs().max() > 0.1
    # chunk 0: Wan I2V's condition of the reference: [reference, zero frames] encoded as one video, latent frame 0 given
    from echo.conditioning import condition_video

    torch.testing.assert_close(conditions[0][:, 4:20, :1], reference_latents)
    given = encode_latents(pipe.vae, condition_video(reference[:, :, None], 9))
    torch.testing.assert_close(conditions[0][:, 4:20], given, atol=0, rtol=0)
    assert conditions[0][:, :4, 0].eq(1).all() and not conditions[0][:, :4, 1:].any()
    # every chunk (continuations too, Eq. 1) holds the reference latent in the reference plane at every latent frame
    for chunk in (0, 1, 2):
        torch.testing.assert_close(
            conditions[chunk][:, 20:], reference_latents.expand(-1, -1, 3, -1, -1), atol=0, rtol=0
        )

    # chunk 1: latent frames 0-1 hold the VAE encoding of chunk 0's last 5 frames (output frames 4-8)
    motion = frames[:, 4:9].permute(0, 2, 1, 3, 4) * 2 - 1  # 1, 3, 5, H, W in [-1, 1]
    motion_latents = encode_latents(pipe.vae, motion)  # 1, 16, 2, h, w
    torch.testing.assert_close(conditions[1][:, 4:20, :2], motion_latents, atol=1e-4, rtol=1e-4)
    assert conditions[1][:, :4, :2].eq(1).all() and not conditions[1][:, :4, 2:].any()
    # every continuation holds the previous chunk's own last 5 decoded frames (chunk 2: chunk 1's frames 8-12),
    # followed by zero frames, encoded as one video (Wan I2V's construction)
    for chunk in (1, 2):
        previous = encode_latents(pipe.vae, condition_video(decoded[chunk - 1][:, :, -MOTION:], 9))
        torch.testing.assert_close(conditions[chunk][:, 4:20], previous, atol=0, rtol=0)
    # the output is chunk 0 followed by chunks 1 and 2 without their regenerated motion frames
    stitched = torch.cat([decoded[0], decoded[1][:, :, MOTION:], decoded[2][:, :, MOTION:]], dim=2)
    torch.testing.assert_close(frames, ((stitched + 1) / 2).permute(0, 2, 1, 3, 4), atol=1e-6, rtol=0)


def test_guidance_combines_the_three_passes(pipe, inputs, monkeypatch):
    """noise_pred = uncond + s_a (audio − uncond) + s_u (full − audio); passes with zero weight are skipped."""
    outputs, combined = [], []

    def transformer_hook(module, args, kwargs, output):
        if kwargs["audio_embeds"] is None:
            name = "uncond"
        else:
            name = "audio" if kwargs["context_embeds"] is None else "full"
        outputs.append((name, output[0].clone()))

    original_step = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        combined.append(model_output.clone())
        return original_step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", step)
    handle = pipe.transformer.register_forward_hook(transformer_hook, with_kwargs=True)
    try:
        _run(pipe, inputs, num_inference_steps=1, audio_guidance_scale=3.0, user_guidance_scale=2.0)
        passes = dict(outputs)
        assert [name for name, _ in outputs] == ["uncond", "audio", "full"]
        uncond, audio, full = passes["uncond"], passes["audio"], passes["full"]
        # every condition changes the prediction, so the equation below is not trivially met
        assert (audio - uncond).abs().max() > 1e-3 and (full - audio).abs().max() > 1e-3
        torch.testing.assert_close(combined[0], uncond + 3.0 * (audio - uncond) + 2.0 * (full - audio))

        outputs.clear()
        _run(pipe, inputs, num_inference_steps=1, audio_guidance_scale=1.0, user_guidance_scale=1.0)
        assert [name for name, _ in outputs] == ["full"]
    finally:
        handle.remove()


def test_guidance_weights_skip_zero_weight_passes():
    cases = {
        (3.0, 2.0, True): {"uncond": -2.0, "audio": 1.0, "full": 2.0},
        (1.0, 1.0, True): {"full": 1.0},
        (2.0, 2.0, True): {"uncond": -1.0, "full": 2.0},
        (1.0, 2.0, True): {"audio": -1.0, "full": 2.0},
        (3.0, 2.0, False): {"uncond": -2.0, "audio": 3.0},  # no user: full ≡ audio
    }
    for (s_a, s_u, has_user), expected in cases.items():
        assert EchoPipeline.guidance_weights(s_a, s_u, has_user) == expected


def test_save_pretrained_reloads_through_diffusion_pipeline_and_offloads(pipe, inputs, tmp_path):
    import json

    import diffusers

    expected = _run(pipe, inputs, seed=3, num_inference_steps=1)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "EchoPipeline"
    assert index["transformer"] == ["echo.transformer_echo", "EchoTransformer3DModel"]
    assert index["settings"] == pipe.settings.to_dict() and index["settings"]["resolution"] == 64
    assert list((tmp_path / "transformer").glob("*.safetensors"))

    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is EchoPipeline
    assert loaded.settings == pipe.settings  # the settings travel with the model
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(loaded, inputs, seed=3, num_inference_steps=1), expected, atol=1e-6, rtol=0)

    loaded.enable_model_cpu_offload(device="cpu")
    assert loaded.transformer._hf_hook is not None
    torch.testing.assert_close(_run(loaded, inputs, seed=3, num_inference_steps=1), expected, atol=1e-6, rtol=0)


def test_defaults_are_the_saved_settings(pipe, inputs):
    """Without height, width, chunk length, motion frames, user video size or step count, `pipe(...)` uses the
    settings the model was trained with (`pipe.settings`, from configs/models/tiny.yaml: 64², 9-frame chunks, 1 motion
    frame, 32² user frames, 4 steps); changing the saved settings changes the render; explicit arguments override."""
    calls, user_tokens = [], []
    handles = [
        pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: calls.append((pipe.current_chunk, tuple(k["hidden_states"].shape))), with_kwargs=True
        ),
        pipe.context_encoder.register_forward_pre_hook(
            lambda m, a, k: user_tokens.append(tuple(k["user_video"].shape)), with_kwargs=True
        ),
    ]
    saved = dict(pipe.config.settings)
    defaults = {
        k: v
        for k, v in inputs.items()
        if k not in ("height", "width", "num_frames_per_chunk", "motion_frames", "user_video_size")
    }
    scales = {"audio_guidance_scale": 1.0, "user_guidance_scale": 1.0}  # one pass per step
    try:
        frames = pipe(**defaults, **scales, num_frames=13, output_type="pt").frames
        # 64² (8² latents), chunks of 9 frames with 1 motion frame: [0, 9), [8, 17); 4 steps each; 32² user frames
        assert frames.shape == (1, 13, 3, 64, 64)
        assert calls == [(0, (1, 16, 3, 8, 8))] * 4 + [(1, (1, 16, 3, 8, 8))] * 4
        assert user_tokens == [(1, 9, 16, 4, 4), (1, 17, 16, 4, 4)]

        calls.clear()
        pipe.register_to_config(
            settings={**saved, "resolution": 32, "num_frames_per_chunk": 5, "num_inference_steps": 1}
        )
        frames = pipe(**defaults, **scales, num_frames=5, output_type="pt").frames
        assert frames.shape == (1, 5, 3, 32, 32) and calls == [(0, (1, 16, 2, 4, 4))]

        calls.clear()  # explicit arguments win for this call only
        pipe(**defaults, **scales, num_frames=5, height=48, width=32, num_inference_steps=2, output_type="pt")
        assert calls == [(0, (1, 16, 2, 6, 4))] * 2
    finally:
        pipe.register_to_config(settings=saved)
        for handle in handles:
            handle.remove()


def test_continuation_chunk_output_depends_on_the_reference(pipe, inputs, monkeypatch):
    """Eq. 1: a continuation chunk is conditioned on the reference image, not only on the motion frames. With the
    first chunk's decoded frames pinned (so both renders give the second chunk the same motion frames and noise),
    another reference changes only the condition's reference plane, and with it the second chunk's prediction."""
    fixed = torch.rand(1, 3, CHUNK, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    monkeypatch.setattr(pipe, "decode_latents", lambda latents: fixed)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault(pipe.current_chunk, (kwargs["condition"].clone(), output[0].clone()))

    outputs = []
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        for image in (inputs["reference_image"], 255 - inputs["reference_image"]):
            seen.clear()
            _run(
                pipe,
                inputs,
                reference_image=image,
                num_frames=13,
                num_inference_steps=1,
                audio_guidance_scale=1.0,
                user_guidance_scale=1.0,
            )
            outputs.append(seen[1])
    finally:
        handle.remove()
    (condition_a, prediction_a), (condition_b, prediction_b) = outputs
    assert torch.equal(condition_a[:, :20], condition_b[:, :20])  # same mask and motion latents
    assert (condition_a[:, 20:] - condition_b[:, 20:]).abs().max() > 1e-2  # another reference plane
    assert (prediction_a - prediction_b).abs().max() > 1e-3


def test_reference_masks_are_the_training_masks_of_the_face(pipe, inputs):
    """Defect 5: the pipeline's SDCM masks are `echo.masks.reference_token_masks` of the reference landmarks, the rule
    the dataset uses, and they lie on the face."""
    from echo.masks import reference_token_masks

    image, landmarks = inputs["reference_image"], inputs["reference_landmarks"]  # 512², landmarks in its pixels
    lip, face = pipe.prepare_avatar_masks(128, 128, 3, landmarks, reference_image=image)
    assert lip.shape == face.shape == (1, 3, 8, 8)
    expected = reference_token_masks(landmarks, 128, 128, 3, source_size=(512, 512))
    assert torch.equal(lip[0], expected[0]) and torch.equal(face[0], expected[1])
    assert lip.sum() >= 1 and face.sum() > 2 * lip.sum()
    assert not (lip * face).any()  # disjoint regions
    mouth = landmarks[13] / 4 / 16  # landmark 13: inner upper lip, in tokens of 16 pixels of the 128² frame
    assert lip[0, 0, int(mouth[1]), int(mouth[0])] == 1
    eye_row = int(landmarks[[33, 263], 1].mean() / 4 / 16)  # no lip token at or above the eyes
    assert lip[0, 0, : eye_row + 1].sum() == 0 and face[0, 0, eye_row].sum() >= 1
    # without landmarks, MediaPipe finds them on the reference image: the same masks
    detected = pipe.prepare_avatar_masks(128, 128, 3, None, reference_image=image)
    assert torch.equal(detected[0], lip) and torch.equal(detected[1], face)
    # masks given at the token grid are used as they are (face without lip)
    given = pipe.prepare_avatar_masks(128, 128, 3, lip_mask=lip[0, 0], face_mask=torch.ones(8, 8))
    assert torch.equal(given[0], lip) and torch.equal(given[1], 1 - lip)


def test_face_detection_on_frames_marks_missing_faces_with_nan(inputs):
    from echo.encoding import detect_face_landmarks

    image = inputs["reference_image"]
    frames = np.stack([image, np.zeros_like(image), image])
    landmarks = detect_face_landmarks(frames)
    assert landmarks.shape == (3, 478, 2)
    assert np.isnan(landmarks[1]).all() and np.isfinite(landmarks[[0, 2]]).all()
    np.testing.assert_allclose(landmarks[0], inputs["reference_landmarks"], rtol=1e-5)
    with pytest.raises(ValueError, match="no face"):
        detect_face_landmarks(np.zeros_like(image))


def test_emotion_text_reaches_the_text_cross_attention_and_lau_off_uses_the_empty_prompt(pipe, inputs):
    from echo.encoding import PromptEncoder

    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    saved = dict(pipe.config.settings)
    try:
        scales = {"audio_guidance_scale": 1.0, "user_guidance_scale": 1.0, "num_inference_steps": 1}
        _run(pipe, inputs, emotion="joyful", **scales)
        pipe.register_to_config(settings={**saved, "use_emotion": False})  # a model trained w/o LAU
        _run(pipe, inputs, emotion="joyful", **scales)
    finally:
        pipe.register_to_config(settings=saved)
        handle.remove()
    # the embedding training gives the text: PromptEncoder at the saved max_sequence_length (64 tokens)
    encoder = PromptEncoder(pipe.text_encoder, pipe.tokenizer, max_sequence_length=pipe.settings.max_sequence_length)
    assert seen[0].shape == (1, 64, 32)
    torch.testing.assert_close(seen[0], encoder("joyful"), atol=0, rtol=0)
    torch.testing.assert_close(seen[1], encoder(""), atol=0, rtol=0)
    assert not torch.allclose(seen[0], seen[1])
    assert pipe.settings.use_emotion


def test_bad_inputs_raise_clear_errors(pipe, inputs):
    with pytest.raises(ValueError, match="divisible by 16"):
        _run(pipe, inputs, height=72)
    with pytest.raises(ValueError, match="user_video"):
        _run(pipe, inputs, user_video=None)
    with pytest.raises(ValueError, match="one per chunk"):
        _run(pipe, inputs, num_frames=17, emotion=["a", "b"])
    with pytest.raises(ValueError, match="understanding"):
        _run(pipe, inputs, understanding=None)
    with pytest.raises(ValueError, match="output_type"):
        _run(pipe, inputs, output_type="mp4")
    with pytest.raises(ValueError, match="reference_landmarks"):
        _run(pipe, inputs, reference_landmarks=np.zeros((68, 2)))
    with pytest.raises(ValueError, match="motion_frames"):
        _run(pipe, inputs, motion_frames=4)
    with pytest.raises(ValueError, match="avatar_audio_features"):
        _run(pipe, inputs, avatar_audio=None, avatar_audio_features=np.zeros((5, 3, 32), np.float32))


def test_latent_output_is_each_chunks_latents_before_decoding(pipe, inputs):
    """`output_type="latent"` returns, as diffusers' Wan pipelines do, the denoised latents before VAE decoding, one
    entry per chunk (13 frames: chunks 0-8 and 4-12) holding all its latent frames. Decoded by the project's
    `decode_latents` and stitched as documented (chunk 0 whole, each later chunk without its first `motion_frames`
    frames, cut to `num_frames`), they are the frames of `output_type="pt"` with the same seed; a session yields the
    same latents chunk by chunk."""
    latents = _run(pipe, inputs, num_frames=13, num_inference_steps=1, output_type="latent")
    frames = _run(pipe, inputs, num_frames=13, num_inference_steps=1)
    assert latents.shape == (2, 16, 3, SIZE // 8, SIZE // 8)
    decoded = [pipe.decode_latents(latents[c : c + 1]) for c in range(len(latents))]  # 1, 3, 9, H, W each
    stitched = torch.cat([decoded[0], decoded[1][:, :, MOTION:]], dim=2)[:, :, :13]
    torch.testing.assert_close(frames, ((stitched + 1) / 2).permute(0, 2, 1, 3, 4), atol=1e-6, rtol=0)

    starts = (
        "reference_image",
        "reference_landmarks",
        "understanding",
        "emotion",
        "height",
        "width",
        "num_frames_per_chunk",
        "motion_frames",
        "user_video_size",
        "frame_inputs",
    )
    session = pipe.start_session(
        **{k: inputs[k] for k in starts},
        generator=torch.Generator().manual_seed(0),
        num_frames=13,
        num_inference_steps=1,
        output_type="latent",
    )
    session.push(**{k: v for k, v in inputs.items() if k.startswith(("user_", "avatar_")) and k not in starts})
    session.close()
    torch.testing.assert_close(torch.stack([chunk.frames for chunk in session]), latents, atol=0, rtol=0)


def test_each_guidance_pass_keeps_its_own_cache_state(pipe, inputs, monkeypatch):
    """diffusers' caches (`transformer.enable_cache`) see each guidance pass in its own `cache_context`. First Block
    Cache at threshold 0 (nothing reused) gives exactly the uncached latents; at a huge threshold (a state is reused
    whenever there is one), each of the three passes runs its whole block stack at the first step of every chunk (a
    state of its own, fresh for each chunk's new trajectory) and reuses it at the later step. Each context also tells
    the cache the step's index and σ, as diffusers' Wan pipelines do."""
    from diffusers.hooks import FirstBlockCacheConfig

    latents = {"num_frames": 13, "num_inference_steps": 2, "output_type": "latent"}  # the tiny VAE mutes changes
    uncached = _run(pipe, inputs, **latents)
    ran_last_block = []  # per transformer call: whether its last block computed

    def last_block_ran(module, args, output):
        ran_last_block[-1] = True

    handles = [
        pipe.transformer.register_forward_pre_hook(lambda module, args: ran_last_block.append(False)),
        pipe.transformer.blocks[-1].ffn.register_forward_hook(last_block_ran),
    ]
    try:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        cached = _run(pipe, inputs, **latents)
        pipe.transformer.disable_cache()
        torch.testing.assert_close(cached, uncached, atol=0, rtol=0)
        ran_last_block.clear()
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        contexts, cache_context = [], pipe.transformer.cache_context
        monkeypatch.setattr(
            pipe.transformer,
            "cache_context",
            lambda name, **step: contexts.append((name, step)) or cache_context(name, **step),
        )
        reused = _run(pipe, inputs, **latents)
    finally:
        pipe.transformer.disable_cache()
        for handle in handles:
            handle.remove()
    first_step, later_step = [True] * 3, [False] * 3  # the uncond, audio and full passes of a step
    assert ran_last_block == (first_step + later_step) * 2  # 2 chunks × 2 steps
    sigmas = pipe.scheduler.sigmas
    steps = [{"step_index": i, "sigma": float(sigmas[i]), "num_inference_steps": 2} for i in (0, 1)]
    assert contexts == [(name, step) for step in steps for name in ("uncond", "audio", "full")] * 2
    assert (reused - uncached).abs().max() > 1e-4
