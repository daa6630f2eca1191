"""Transcripts and voice activity: dataset files, Whisper ASR, and the per-clip dialogue history.

Schemas read:

- Pairs layout, ``<conversation>/transcript.json`` (optional)::

      {"segments": [{"speaker": "<video stem>", "start": 0.5, "end": 1.7, "text": "Hello there."}, ...]}

- Seamless Interaction layout, ``<file id>.json`` per participant: ``"metadata:transcript"`` is a list of entries
  with ``"start"`` and ``"end"`` (seconds) and the text in ``"transcript"`` or ``"text"``, or, when those are
  missing or empty, in ``"words"`` (a list of strings or of ``{"word", "start", "end", "score"}``); ``"metadata:vad"`` is a list of ``{"start", "end"}``
  (seconds). Both keys are optional; a missing one reads as an empty list.

Written per clip, ``transcript.json``::

      {"clip_start": s0, "clip_end": s1, "transcript_source": "dataset"|"asr"|"none",
       "segments": [{"speaker": "avatar"|"user", "start", "end", "text"}],
       "vad": {"avatar": [[start, end], ...], "user": [...]}}

with every time in seconds relative to the clip's first frame (frame k is at k / 25 s): the dialogue history before
the clip has negative times, and only what started before the clip's end is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.media import MediaError


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MediaError(f"{Path(path).name}: unreadable transcript ({error})") from error


def _segment(entry, path: Path, key: str) -> dict:
    if not isinstance(entry, dict):
        raise MediaError(f"{path.name}: `{key}` entry {entry!r} is not an object with start/end")
    try:
        start, end = float(entry["start"]), float(entry["end"])
    except (KeyError, TypeError, ValueError) as error:
        raise MediaError(f"{path.name}: `{key}` entry {entry!r} has no numeric start/end") from error
    if end < start:
        raise MediaError(f"{path.name}: `{key}` entry ends ({end}) before it starts ({start})")
    return {"start": start, "end": end}


def read_pairs_transcript(path: str | Path, speakers: list[str]) -> dict[str, list[dict]]:
    """Pairs-layout transcript → ``{speaker: [{"start", "end", "text"}]}`` for the given speakers."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
        raise MediaError(f"{path.name}: unreadable transcript (expected an object with a `segments` list)")
    result = {speaker: [] for speaker in speakers}
    for entry in data["segments"]:
        segment = _segment(entry, path, "segments")
        speaker = str(entry.get("speaker"))
        if speaker not in result:
            raise MediaError(f"{path.name}: segment speaker {speaker!r} is not one of {speakers}")
        result[speaker].append({**segment, "text": str(entry.get("text", "")).strip()})
    return result


def read_seamless_json(path: str | Path) -> tuple[list[dict], list[dict]]:
    """A Seamless participant json → (transcript segments ``{"start", "end", "text"}``, vad ``{"start", "end"}``)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise MediaError(f"{path.name}: unreadable transcript (expected a json object)")
    segments, vad = [], []
    for entry in data.get("metadata:transcript") or []:
        segment = _segment(entry, path, "metadata:transcript")
        text = entry.get("transcript") or entry.get("text")
        if not text:  # an empty "transcript" with word timings does occur: rebuild the text from the words
            words = entry.get("words") or []
            text = " ".join(w["word"] if isinstance(w, dict) else str(w) for w in words)
        segments.append({**segment, "text": str(text).strip()})
    for entry in data.get("metadata:vad") or []:
        vad.append(_segment(entry, path, "metadata:vad"))
    return segments, vad


def speech_regions(
    waveform: np.ndarray,
    sample_rate: int = 16_000,
    threshold: float = 0.02,
    min_gap: float = 0.3,
    min_length: float = 0.2,
) -> list[dict]:
    """Energy-based voice activity: ``[{"start", "end"}]`` where the 20 ms RMS exceeds ``threshold`` × peak RMS."""
    hop = int(0.02 * sample_rate)
    frames = len(waveform) // hop
    if frames == 0:
        return []
    rms = np.sqrt(np.mean(waveform[: frames * hop].reshape(frames, hop) ** 2, axis=1))
    active = rms > threshold * max(float(rms.max()), 1e-6)
    regions, start = [], None
    for i, flag in enumerate(np.append(active, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            regions.append([start * 0.02, i * 0.02])
            start = None
    merged = []
    for region in regions:
        if merged and region[0] - merged[-1][1] < min_gap:
            merged[-1][1] = region[1]
        else:
            merged.append(region)
    return [{"start": a, "end": b} for a, b in merged if b - a >= min_length]


class WhisperTranscriber:
    """ASR with a transformers Whisper model loaded from a folder (or a Hugging Face cache id).

    Each speech region (see `speech_regions`, at most 30 s each) is transcribed separately, which gives segment times
    without relying on Whisper's timestamp tokens.
    """

    def __init__(self, model_path, device: str = "cpu", max_new_tokens: int = 96):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(model_path)
        self.model = WhisperForConditionalGeneration.from_pretrained(model_path, use_safetensors=True).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def __call__(self, waveform: np.ndarray, sample_rate: int = 16_000) -> list[dict]:
        """Mono 16 kHz audio → ``[{"start", "end", "text"}]`` (seconds)."""
        import torch

        segments = []
        for region in speech_regions(waveform, sample_rate):
            start = region["start"]
            while start < region["end"]:
                end = min(region["end"], start + 30.0)
                audio = waveform[int(start * sample_rate) : int(end * sample_rate)]
                features = self.processor(audio, sampling_rate=sample_rate, return_tensors="pt").input_features
                # The decoder prompt (start, language, task, no-timestamps) takes up to 4 of its positions.
                limit = min(self.max_new_tokens, self.model.config.max_target_positions - 4)
                with torch.no_grad():
                    tokens = self.model.generate(features.to(self.device, self.model.dtype), max_new_tokens=limit)
                text = self.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
                segments.append({"start": start, "end": end, "text": text})
                start = end
        return segments


def clip_transcript(
    segments: dict[str, list[dict]],
    vad: dict[str, list[dict]],
    avatar: str,
    user: str,
    clip_start: float,
    clip_end: float,
    source: str,
) -> dict:
    """The ``transcript.json`` payload of one clip (see the module docstring)."""
    roles = {avatar: "avatar", user: "user"}
    history = []
    for speaker, role in roles.items():
        for segment in segments.get(speaker, []):
            if segment["start"] < clip_end:
                history.append(
                    {
                        "speaker": role,
                        "start": round(segment["start"] - clip_start, 4),
                        "end": round(segment["end"] - clip_start, 4),
                        "text": segment["text"],
                    }
                )
    history.sort(key=lambda s: (s["start"], s["speaker"]))
    activity = {
        role: [
            [round(max(r["start"], clip_start) - clip_start, 4), round(min(r["end"], clip_end) - clip_start, 4)]
            for r in vad.get(speaker, [])
            if r["end"] > clip_start and r["start"] < clip_end
        ]
        for speaker, role in roles.items()
    }
    return {
        "clip_start": round(clip_start, 4),
        "clip_end": round(clip_end, 4),
        "transcript_source": source,
        "segments": history,
        "vad": activity,
    }
