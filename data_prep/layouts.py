"""Source layouts: find conversations and their two participants.

- ``"seamless"``: the Seamless Interaction layout, searched recursively. Every participant is a file id
  ``V<v>_S<s>_I<i>_P<p>`` with an optional capital-letter suffix (``V00_S0809_I00000582_P0947A``) and up to three
  files sharing it: ``<id>.mp4`` (required), ``<id>.wav`` (optional; otherwise the mp4's audio) and ``<id>.json``
  (optional; ``metadata:transcript`` and ``metadata:vad``, see `data_prep.transcripts`). The two participants of an
  interaction share ``V<v>_S<s>_I<i>``, the conversation id.
- ``"pairs"``: one folder per conversation (the conversation id is the folder name) with exactly two videos
  (``.mp4``, ``.mov``, ``.mkv``, ``.avi``, ``.webm``); each participant is a video stem; optional audio with the same
  stem (``.wav``, ``.flac``, ``.m4a``, ``.mp3``; otherwise the video's audio); an optional ``transcript.json``.

Every conversation yields clips with each participant in turn as the avatar and the other one as the user.
Groups that cannot form a conversation (one participant, three participants, a folder with one video) are returned
as failures naming the files, so the run summary reports them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SEAMLESS_ID = re.compile(r"^(?P<conversation>V\d+_S\d+_I\d+)_(?P<participant>P\d+[A-Z]?)$")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
AUDIO_SUFFIXES = (".wav", ".flac", ".m4a", ".mp3")


@dataclass
class Participant:
    """One side of a conversation: its id, video, audio (`None` = the video's audio) and Seamless json."""

    id: str
    video: Path
    audio: Path | None = None
    metadata: Path | None = None


@dataclass
class Conversation:
    """Two participants of one dyadic conversation, plus a pairs-layout transcript when there is one."""

    id: str
    layout: str
    participants: list[Participant]
    transcript: Path | None = None
    source: dict = field(default_factory=dict)

    def files(self) -> list[Path]:
        paths = [self.transcript] if self.transcript else []
        for p in self.participants:
            paths += [x for x in (p.video, p.audio, p.metadata) if x is not None]
        return paths


@dataclass
class LayoutFailure:
    """An input that cannot form a conversation: what it is, which file, and why."""

    input: str
    file: str
    reason: str


def find_conversations(input_dir: str | Path, layout: str) -> tuple[list[Conversation], list[LayoutFailure]]:
    """All conversations under ``input_dir`` in ``layout`` (sorted by id), and the inputs that cannot pair up."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"`--input` {input_dir} is not a folder.")
    if layout == "seamless":
        return _find_seamless(input_dir)
    if layout == "pairs":
        return _find_pairs(input_dir)
    raise ValueError(f"`layout` is {layout!r}, expected 'seamless' or 'pairs'.")


def _find_seamless(input_dir: Path) -> tuple[list[Conversation], list[LayoutFailure]]:
    groups: dict[str, list[Participant]] = defaultdict(list)
    for video in sorted(input_dir.rglob("*.mp4")):
        match = SEAMLESS_ID.match(video.stem)
        if match is None:
            continue
        audio = video.with_suffix(".wav")
        metadata = video.with_suffix(".json")
        groups[match["conversation"]].append(
            Participant(
                id=match["participant"],
                video=video,
                audio=audio if audio.exists() else None,
                metadata=metadata if metadata.exists() else None,
            )
        )
    conversations, failures = [], []
    for conversation_id, participants in sorted(groups.items()):
        participants.sort(key=lambda p: p.id)
        if len(participants) != 2:
            failures.append(
                LayoutFailure(
                    conversation_id,
                    ", ".join(p.video.name for p in participants),
                    f"expected the two participants of interaction {conversation_id}, found {len(participants)}",
                )
            )
            continue
        conversations.append(
            Conversation(
                conversation_id,
                "seamless",
                participants,
                source={
                    "vendor_id": conversation_id.split("_")[0],
                    "session": conversation_id.split("_")[1],
                    "interaction": conversation_id.split("_")[2],
                },
            )
        )
    return conversations, failures


def _find_pairs(input_dir: Path) -> tuple[list[Conversation], list[LayoutFailure]]:
    conversations, failures = [], []
    for folder in sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if len(videos) != 2:
            failures.append(
                LayoutFailure(folder.name, folder.name, f"expected two videos in the folder, found {len(videos)}")
            )
            continue
        participants = []
        for video in videos:
            audio = next((video.with_suffix(s) for s in AUDIO_SUFFIXES if video.with_suffix(s).exists()), None)
            participants.append(Participant(id=video.stem, video=video, audio=audio))
        if participants[0].id == participants[1].id:
            failures.append(LayoutFailure(folder.name, videos[0].name, "both videos have the same stem"))
            continue
        transcript = folder / "transcript.json"
        conversations.append(
            Conversation(folder.name, "pairs", participants, transcript if transcript.exists() else None)
        )
    return conversations, failures
