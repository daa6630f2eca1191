"""HBCU (Eq. 8): a tiny random Qwen2.5-Omni thinker on real speech and real face frames, loading and the cache."""

import json

import numpy as np
import pytest
import torch

from echo.audio import resample_audio
from echo.understanding import (
    P_THINK,
    OmniUnderstanding,
    pad_understanding,
)

SPECIAL = dict(
    image_token="<|IMAGE|>",
    video_token="<|VIDEO|>",
    audio_token="<|AUDIO|>",
    vision_bos_token="<|vision_bos|>",
    vision_eos_token="<|vision_eos|>",
    audio_bos_token="<|audio_bos|>",
    audio_eos_token="<|audio_eos|>",
)


def build_omni_folder(folder):
    """A tiny random Qwen2.5-Omni thinker with the real folder layout (one merged preprocessor_config.json)."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from echo.components import build_tiny_tokenizer

    base = build_tiny_tokenizer(model_max_length=8192)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=8192,
        **SPECIAL,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>", *SPECIAL.values()]})
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=64,
            n_window=50,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        user_token_id=0,
    )
    torch.manual_seed(0)
    thinker = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    feature_extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    thinker.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    preprocessor = {**feature_extractor.to_dict(), **image_processor.to_dict()}
    preprocessor["image_processor_type"] = "Qwen2VLImageProcessor"
    preprocessor.pop("image_processor_class", None)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, default=str))
    return thinker, tokenizer, feature_extractor, image_processor


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    folder = tmp_path_factory.mktemp("omni")
    parts = build_omni_folder(folder)
    return folder, parts, OmniUnderstanding.from_pretrained(folder)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    from synthetic.conversations import speech_pcm

    text = "I was so nervous before the interview, but I think it went really well."
    wave, rate = speech_pcm(text, voice="en", speed=175)
    wave = wave.astype(np.float32) / np.iinfo(wave.dtype).max
    return resample_audio(wave, rate)


@pytest.fixture(scope="module")
def face_frames():
    from PIL import Image
    from skimage.data import astronaut

    image = astronaut()  # 512 × 512 × 3, the face around rows 20-220, columns 140-300
    frames = []
    for shift in range(4):  # a slow head movement
        crop = image[20 + 4 * shift : 212 + 4 * shift, 136 + 3 * shift : 296 + 3 * shift]
        frames.append(np.asarray(Image.fromarray(crop).resize((64, 64), Image.BICUBIC)))
    return np.stack(frames)


def test_thinker_reads_real_speech_and_face_frames(omni, speech, face_frames):
    _, (thinker, tokenizer, *_), understanding = omni
    assert understanding.hidden_size == 64
    inputs = understanding.prepare_inputs(face_frames, speech)
    ids = inputs["input_ids"][0]
    # the default instruction is P_think, after the media (the tiny tokenizer lower-cases)
    text = understanding.tokenizer.decode(ids)
    assert P_THINK.lower() in text and text.index("<|audio_eos|>") < text.index(P_THINK.lower()[:40])
    # one placeholder per encoder output: 4 frames × (4 × 4 patches / 2²) image tokens; Whisper frames /4 for audio
    assert int((ids == thinker.config.image_token_id).sum()) == 4 * 4
    mel_frames = len(speech) // 160
    expected_audio = ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1
    assert abs(int((ids == thinker.config.audio_token_id).sum()) - expected_audio) <= 1

    captured = {}
    final_norm = understanding.thinker.get_submodule("model.language_model.norm")
    handle = final_norm.register_forward_hook(lambda m, a, o: captured.__setitem__("last", o))
    try:
        hidden = understanding(face_frames, speech)
    finally:
        handle.remove()
    assert hidden.shape == (len(ids), 64) and hidden.dtype == torch.float32 and torch.isfinite(hidden).all()
    # S_usr is the last layer: the text model's output after its final norm (not an earlier layer's states)
    torch.testing.assert_close(hidden, captured["last"][0].float(), atol=0, rtol=0)
    # the thinker is causal: replacing the speech by silence leaves every token before the audio unchanged and
    # changes the audio tokens and everything after them (the prompt reads the audio)
    silent = understanding(face_frames, np.zeros_like(speech))
    first_audio = int((ids == tokenizer.convert_tokens_to_ids(SPECIAL["audio_bos_token"])).nonzero()[0, 0])
    torch.testing.assert_close(silent[:first_audio], hidden[:first_audio], atol=1e-5, rtol=1e-5)
    assert (silent[first_audio + 1 :] - hidden[first_audio + 1 :]).abs().amax() > 1e-3
    # P_think is read after the media: another instruction keeps every token up to the audio end
    other = understanding(face_frames, speech, prompt="Describe the room.")
    audio_end = int((ids == tokenizer.convert_tokens_to_ids(SPECIAL["audio_eos_token"])).nonzero()[0, 0]) + 1
    torch.testing.assert_close(other[:audio_end], hidden[:audio_end], atol=1e-5, rtol=1e-5)
    assert other.shape[0] != hidden.shape[0]
    # and the frames matter: a mirrored face changes the tokens from the first image on
    mirrored = understanding(face_frames[:, :, ::-1].copy(), speech)
    assert (mirrored[first_audio:] - hidden[first_audio:]).abs().amax() > 1e-3


def test_loading_from_a_saved_folder_round_trips(omni, speech, face_frames):
    folder, (thinker, tokenizer, feature_extractor, image_processor), loaded = omni
    direct = OmniUnderstanding(thinker, tokenizer, feature_extractor, image_processor)
    torch.testing.assert_close(loaded(face_frames[:2], speech), direct(face_frames[:2], speech))
    with pytest.raises(ValueError, match="frames"):
        loaded(face_frames[0], speech)


def test_long_histories_are_subsampled_and_chunked(omni, speech, face_frames):
    folder, (thinker, tokenizer, feature_extractor, image_processor), _ = omni
    understanding = OmniUnderstanding(
        thinker,
        tokenizer,
        feature_extractor,
        image_processor,
        max_frames=3,
        max_audio_seconds=2.5,
        audio_chunk_seconds=1.0,
    )
    history = np.repeat(face_frames, 10, axis=0)  # 40 frames
    ids = understanding.prepare_inputs(history, speech)["input_ids"][0]
    count = lambda name: int((ids == tokenizer.convert_tokens_to_ids(SPECIAL[name])).sum())  # noqa: E731
    assert count("vision_bos_token") == 3 and count("image_token") == 3 * 4
    # the most recent 2.5 s of speech in 1 s segments
    assert len(speech) > 2.5 * 16000 and count("audio_bos_token") == 3
    # the first and last frames are always among the selected ones, a frame between two picks is not
    base = understanding.prepare_inputs(history, None)["pixel_values"]
    for index, changes in ((0, True), (39, True), (5, False)):
        edited = history.copy()
        edited[index] = 255 - edited[index]
        pixels = understanding.prepare_inputs(edited, None)["pixel_values"]
        assert (not torch.equal(pixels, base)) == changes, index


def test_understanding_tokens_feed_the_lcu(omni, speech, face_frames):
    _, _, understanding = omni
    hidden = understanding(face_frames[:2], speech)

    # cached tokens of two clips feed the LCU as S_usr (understanding_dim = the thinker's hidden size)
    from echo.lcu import LongRangeContextEncoder

    batch, mask = pad_understanding([hidden, hidden[:5]])
    assert batch.shape == (2, hidden.shape[0], 64) and mask.sum(1).tolist() == [hidden.shape[0], 5]
    lcu = LongRangeContextEncoder(
        audio_dim=8,
        audio_num_layers=2,
        dim=16,
        num_audio_layers=1,
        use_visual=False,
        understanding_dim=64,
        num_attention_heads=2,
        context_dim=16,
    )
    with torch.no_grad():
        lcu.alpha.fill_(1.0)
        out = lcu(torch.randn(2, 12, 2, 8), clip_frames=5, understanding=batch, understanding_mask=mask)
    assert torch.isfinite(out.context).all() and not torch.equal(out.context, out.perception)


def test_qwen3_omni_thinker_is_accepted(tmp_path, speech, face_frames):
    """A tiny Qwen3-Omni (MoE) thinker folder loads through the same class and reads the same inputs."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from echo.components import build_tiny_tokenizer

    special = dict(
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        audio_token="<|audio_pad|>",
        vision_bos_token="<|vision_start|>",
        vision_eos_token="<|vision_end|>",
        audio_bos_token="<|audio_start|>",
        audio_eos_token="<|audio_end|>",
    )
    base = build_tiny_tokenizer(model_max_length=8192)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=8192,
        **special,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>", *special.values()]})
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in special.items()}
    config = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=64,
            n_window=50,
            downsample_hidden_size=16,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "interleaved": True,
            },
        ),
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        user_token_id=0,
    )
    torch.manual_seed(0)
    Qwen3OmniMoeThinkerForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    feature_extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64}, patch_size=16)
    preprocessor = {
        **feature_extractor.to_dict(),
        **image_processor.to_dict(),
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    preprocessor.pop("image_processor_class", None)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor, default=str))

    understanding = OmniUnderstanding.from_pretrained(tmp_path)
    assert type(understanding.thinker).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    hidden = understanding(face_frames[:2], speech)
    ids_in = understanding.prepare_inputs(face_frames[:2], speech)["input_ids"][0]
    assert hidden.shape == (len(ids_in), 64) and torch.isfinite(hidden).all()
    # the speech reaches the hidden states from its first token on (the random MoE audio path is weak: 1e-5 is
    # still far above the zero difference of the tokens before the audio)
    silent = understanding(face_frames[:2], np.zeros_like(speech))
    first_audio = int((ids_in == ids["audio_bos_token"]).nonzero()[0, 0])
    torch.testing.assert_close(silent[:first_audio], hidden[:first_audio], atol=1e-6, rtol=1e-6)
    assert (silent[first_audio + 1 :] - hidden[first_audio + 1 :]).abs().amax() > 1e-5
