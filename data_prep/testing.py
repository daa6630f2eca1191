"""Tiny prepared data for tests and the offline demo, made by the real preparation pipeline.

`make_tiny_prepared_set` writes a short synthetic conversation (`synthetic.conversations`), saves a randomly initialised
tiny ``Wav2Vec2Model`` (config ``audio_encoder`` of ``configs/models/tiny.yaml``) with its feature extractor to a
folder, and runs `data_prep.cli.run_prep` on it: MediaPipe detection, tracking, cropping and face mesh, wav2vec2
loaded back from that folder with ``from_pretrained``, transcripts from the synthetic dialogue.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from data_prep.cli import run_prep
from data_prep.stages import PrepOptions
from synthetic.conversations import make_conversation

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


def tiny_audio_encoder_config() -> dict:
    """The ``audio_encoder.config`` mapping of ``configs/models/tiny.yaml``."""
    return yaml.safe_load(TINY_CONFIG.read_text())["audio_encoder"]["config"]


def save_tiny_wav2vec2(folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny ``Wav2Vec2Model`` (safetensors) and a ``Wav2Vec2FeatureExtractor`` into ``folder``.

    The model has ``num_hidden_layers + 1`` = 3 hidden-state layers of width 32 (see ``configs/models/tiny.yaml``).
    """
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "preprocessor_config.json").exists():
        return folder
    torch.manual_seed(seed)
    model = Wav2Vec2Model(Wav2Vec2Config(**tiny_audio_encoder_config())).eval()
    model.save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(folder)
    return folder


def make_tiny_prepared_set(
    out_dir: str | Path,
    num_frames: int = 33,
    size: int = 64,
    seed: int = 0,
    source_size: int = 128,
    layout: str = "pairs",
) -> list[Path]:
    """Prepare one tiny synthetic conversation; returns its two clip folders (A as avatar, then B as avatar).

    Args:
        out_dir (`str` or `Path`): receives ``source/`` (the synthetic conversation), ``wav2vec2/`` (the tiny audio
            encoder) and ``prepared/`` (the clip folders).
        num_frames (`int`, defaults to 33): T, the frames of each clip (one clip per avatar/user assignment).
        size (`int`, defaults to 64): crop side of the prepared videos.
        seed (`int`, defaults to 0): seed of the synthetic dialogue and of the audio encoder's weights.
        source_size (`int`, defaults to 128): side of the synthetic source videos.
        layout (`str`, defaults to `"pairs"`): source layout, ``"pairs"`` or ``"seamless"``.

    Returns:
        `list[Path]`: two prepared clip folders in the format of ``docs/interfaces.md`` (``meta.json``,
        ``avatar.mp4`` / ``user.mp4`` of ``num_frames`` frames at ``size``², 16 kHz wavs, ``*_w2v.npy`` of shape
        `(num_frames, 3, 32)` float16, ``*_landmarks.npy`` of shape `(num_frames, 478, 2)`, ``transcript.json``).
    """

    out_dir = Path(out_dir)
    seconds = num_frames / 25.0
    make_conversation(out_dir / "source", layout=layout, seconds=seconds, size=source_size, seed=seed)
    encoder = save_tiny_wav2vec2(out_dir / "wav2vec2", seed=seed)
    options = PrepOptions(wav2vec2=str(encoder), size=size, clip_seconds=seconds, min_clip_seconds=seconds)
    summary = run_prep(out_dir / "source", layout, out_dir / "prepared", options, workers=1, progress=False)
    if summary.failed:
        raise RuntimeError(f"Preparing the tiny synthetic set failed: {summary.failed}")
    clips = sorted((out_dir / "prepared").glob("*_c0000"))
    if len(clips) != 2:
        raise RuntimeError(f"Expected two prepared clips under {out_dir / 'prepared'}, found {len(clips)}.")
    return clips


WHISPER_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


def save_tiny_whisper(folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny English-only ``WhisperForConditionalGeneration`` and its ``WhisperProcessor``.

    The tokenizer is a byte-level BPE over the 256 byte symbols (no merges) plus Whisper's special tokens, so it is
    built offline; the model has one encoder and one decoder layer of width 32 and 80 mel bins. Its transcripts are
    random bytes: it exercises the ASR path, not recognition.
    """
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "preprocessor_config.json").exists():
        return folder
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    for token in WHISPER_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tokenizer.add_tokens(list(WHISPER_SPECIAL_TOKENS), special_tokens=True)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    end, start = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=24,
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        eos_token_id=end,
        pad_token_id=end,
        bos_token_id=end,
        no_timestamps_token_id=vocab["<|notimestamps|>"],
        is_multilingual=False,
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_conversation_clips(
    out_dir: str | Path,
    seconds: float = 3.2,
    clip_seconds: float = 0.72,
    size: int = 64,
    seed: int = 5,
    sample_rate: int = 22_050,
) -> Path:
    """Prepare (or reuse) one synthetic conversation cut into several clips, with the tiny audio encoder of
    ``configs/models/tiny.yaml`` (`tests.tiny_models` builds the same one); the source audio is at ``sample_rate``, so
    echo-prep resamples it.

    Args:
        out_dir (`str` or `Path`): receives ``source/``, ``wav2vec2/`` (the audio encoder echo-prep loaded) and
            ``prepared/``; reused when it already holds them (``.complete``).
        seconds (`float`, defaults to 3.2): conversation length (80 frames).
        clip_seconds (`float`, defaults to 0.72): clip length (18 frames: clip edges fall inside the 25-frame audio
            blocks); the last clip is shorter (``min_clip_seconds`` = 0.2).

    Returns:
        `Path`: ``out_dir/prepared`` (clips ``<conversation>_<A|B>_c<k>``).
    """

    out_dir = Path(out_dir)
    if (out_dir / ".complete").is_file():
        return out_dir / "prepared"
    make_conversation(out_dir / "source", "pairs", seconds=seconds, size=128, seed=seed, sample_rate=sample_rate)
    encoder = save_tiny_wav2vec2(out_dir / "wav2vec2", seed=0)
    options = PrepOptions(wav2vec2=str(encoder), size=size, clip_seconds=clip_seconds, min_clip_seconds=0.2)
    summary = run_prep(out_dir / "source", "pairs", out_dir / "prepared", options, workers=1, progress=False)
    if summary.failed:
        raise RuntimeError(f"Preparing the tiny multi-clip conversation failed: {summary.failed}")
    (out_dir / ".complete").write_text("ok")
    return out_dir / "prepared"
