"""I2V bases (Wan2.1-I2V layout, tiny): the reference's CLIP image tokens reach the generator in training and in
EchoPipeline through one encoding (`echo.encoding.encode_reference_image`), and the I2V pipeline round-trips."""

import copy

import numpy as np
import pytest
import torch
import yaml

from echo.encoding import PromptEncoder, encode_reference_image
from pipelines import EchoPipeline
from tests.tiny_models import tiny_components_as_trained, tiny_i2v_description

SIZE, CHUNK = 32, 5  # 2×2 tokens per latent frame, 2 latent frames
REFERENCE = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def components():
    return tiny_components_as_trained(description=tiny_i2v_description())


def _pipe(components, **replaced) -> EchoPipeline:
    pipe = EchoPipeline(**{**components, **replaced})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe) -> torch.Tensor:
    """One 5-frame chunk at 32², one step, token masks given (no face detection)."""
    t = np.arange(16_000 * CHUNK // 25) / 16_000
    return pipe(
        reference_image=REFERENCE,
        avatar_audio=(0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32),
        lip_mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        face_mask=torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        emotion="calm",
        height=SIZE,
        width=SIZE,
        num_frames=CHUNK,
        num_frames_per_chunk=CHUNK,
        motion_frames=1,
        num_inference_steps=1,
        output_type="pt",
        frame_inputs=False,  # a random image: no face to frame
        generator=torch.Generator().manual_seed(0),
    ).frames


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every weight moved by seeded noise."""
    changed = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in changed.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return changed


def test_render_feeds_the_reference_clip_tokens_to_every_guidance_pass(components):
    """Every transformer call of the render (the unconditional pass too, as Wan does) receives the reference's CLIP
    tokens, exactly `encode_reference_image` of the reference at the video size; other image-encoder weights give
    other frames, so the tokens act on the output."""
    pipe = _pipe(components)
    received = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: received.append((kwargs["audio_embeds"], kwargs["encoder_hidden_states_image"])),
        with_kwargs=True,
    )
    try:
        frames = _render(pipe)
    finally:
        handle.remove()
    reference = pipe.prepare_reference(REFERENCE, SIZE, SIZE)  # 1, 3, 32, 32 in [-1, 1]
    expected = encode_reference_image(components["image_encoder"], components["image_processor"], reference)
    assert [audio is None for audio, _ in received] == [True, False]  # the uncond and audio passes of the step
    for _, tokens in received:
        torch.testing.assert_close(tokens, expected, rtol=0, atol=0)

    other = _render(_pipe(components, image_encoder=_perturbed(components["image_encoder"])))
    assert (frames - other).abs().max() > 1e-3


def test_a_missing_image_encoder_is_named(components, tmp_path):
    """An I2V generator without its image encoder: the pipeline and the training set-up refuse, naming what to pass."""
    pipe = _pipe(components, image_encoder=None, image_processor=None)
    with pytest.raises(ValueError, match=r"image_dim.*`image_encoder`.*`image_processor`"):
        _render(pipe)

    from training.config import load_config
    from training.modeling import build_training_models

    description = tiny_i2v_description()
    del description["image_encoder"], description["image_processor"]
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(description))
    config = load_config("configs/train/tiny_stage1.yaml", [f"model.config={tmp_path / 'model.yaml'}"])
    with pytest.raises(ValueError, match=r"image_dim = 32.*'image_encoder' and 'image_processor' sections"):
        build_training_models(config)


def test_training_step_trains_through_the_reference_clip_tokens(tmp_path):
    """One stage-1 step of a tiny I2V model built from its description: the generator receives
    `encode_reference_image` of the batch's reference (what the pipeline computes from the same reference), the
    loss's gradient reaches the generator's image path (image embedder, image key projections), and other CLIP
    tokens of the reference give another loss."""
    from training.config import load_config
    from training.modeling import build_training_models
    from training.step import step_generator, training_step

    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_i2v_description()))
    config = load_config(
        "configs/train/tiny_stage1.yaml", [f"model.config={tmp_path / 'model.yaml'}", "data.max_sequence_length=512"]
    )
    models = build_training_models(config)
    transformer = models.module.transformer
    image_path = [p for n, p in transformer.named_parameters() if "image_embedder" in n or "add_k_proj" in n]
    for param in image_path:  # frozen base weights in training; opened here to see the gradient reach them
        param.requires_grad_(True)

    g = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(1, 3, 9, 64, 64, generator=g) * 2 - 1,
        "reference": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
        "avatar_audio": torch.randn(1, 9, 5, 3, 32, generator=g),
        "lip_mask": (torch.rand(1, 3, 4, 4, generator=g) > 0.7).float(),
        "face_mask": (torch.rand(1, 3, 4, 4, generator=g) > 0.5).float(),
        "emotion_text": [""],
    }
    prompt_encoder = PromptEncoder(models.text_encoder, models.tokenizer, config.data.max_sequence_length)
    received = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["encoder_hidden_states_image"]), with_kwargs=True
    )

    def loss(models):
        step = training_step(
            models,
            models.module,
            batch,
            config,
            prompt_encoder,
            step_generator(0, 0, 0),
            torch.device("cpu"),
            torch.float32,
        )
        return step["loss"]

    try:
        value = loss(models)
    finally:
        handle.remove()
    expected = encode_reference_image(models.image_encoder, models.image_processor, batch["reference"])
    torch.testing.assert_close(received[0], expected, rtol=0, atol=0)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in image_path)

    other = copy.copy(models)
    other.image_encoder = _perturbed(models.image_encoder)
    with torch.no_grad():
        assert abs(float(loss(other)) - float(value)) > 1e-6
        assert float(loss(models)) == pytest.approx(float(value), rel=1e-6)  # the same step draws the same noise


def test_i2v_pipeline_round_trips_through_save_pretrained(components, tmp_path):
    """`save_pretrained` / `DiffusionPipeline.from_pretrained` keep the image encoder and processor: the loaded
    pipeline is an `EchoPipeline` that renders the same frames."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPVisionModel

    pipe = _pipe(components)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, EchoPipeline) and isinstance(loaded.image_encoder, CLIPVisionModel)
    assert loaded.image_processor.crop_size == pipe.image_processor.crop_size
    torch.testing.assert_close(_render(loaded), _render(pipe), rtol=0, atol=1e-6)  # fresh buffers: rounding only


def test_chunk_condition_is_wan_i2v_condition():
    """The condition's [mask, given latents] channels are built as diffusers' `WanImageToVideoPipeline` builds its
    condition (the given frames followed by zero pixel frames, VAE-encoded as one video and normalised), bit for bit:
    a first chunk's is Wan's condition of the reference image, a continuation chunk's with one motion frame is Wan's
    condition of that frame, and with 4(m − 1) + 1 motion frames the same construction on them."""
    from diffusers import AutoencoderKLWan

    from echo.components import load_model_config
    from echo.encoding import chunk_condition, encode_latents
    from tests.tiny_models import TINY, wan_i2v_condition

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**load_model_config(TINY)["vae"]["config"]).eval()
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    video = torch.rand(1, 3, 9, 64, 64, generator=g) * 2 - 1  # the previous chunk's frames

    first = chunk_condition(vae, reference, None, 3)  # 1, 36, 3, 8, 8
    expected = wan_i2v_condition(vae, reference, 9)  # 1, 20, 3, 8, 8
    torch.testing.assert_close(first[:, :20], expected, rtol=0, atol=0)
    assert expected[:, 4:, 1:].abs().max() > 0.1  # the frames after the given one are encoded zeros, not zeros
    plane = encode_latents(vae, reference[:, :, None])
    torch.testing.assert_close(first[:, 20:], plane.expand(-1, -1, 3, -1, -1), rtol=0, atol=0)

    continuation = chunk_condition(vae, reference, video[:, :, -1:], 3)
    torch.testing.assert_close(continuation[:, :20], wan_i2v_condition(vae, video[:, :, -1], 9), rtol=0, atol=0)
    torch.testing.assert_close(continuation[:, 20:], first[:, 20:], rtol=0, atol=0)

    five = chunk_condition(vae, reference, video[:, :, -5:], 3)  # m = 2 given latent frames
    condition_video = torch.cat([video[:, :, -5:], torch.zeros(1, 3, 4, 64, 64)], 2)
    torch.testing.assert_close(five[:, 4:20], encode_latents(vae, condition_video), rtol=0, atol=0)
    assert five[:, :4, :2].eq(1).all() and not five[:, :4, 2:].any()
    with pytest.raises(ValueError, match=r"`motion_video` has 4 frames, expected 4\(m − 1\) \+ 1 frames"):
        chunk_condition(vae, reference, video[:, :, -4:], 3)
