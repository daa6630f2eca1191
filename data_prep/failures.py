"""The failure record of one conversation in echo-prep's summary, shared by the process pool (`data_prep.cli`) and
the Ray actors (`data_prep.cluster`)."""

from __future__ import annotations

import traceback
from pathlib import Path

from data_prep.layouts import Conversation
from data_prep.media import MediaError


def failure_record(conversation: Conversation, error: BaseException) -> dict:
    """``{"input", "file", "reason"}`` for a failed conversation; the file is the one the message names."""
    message = str(error)
    names = {path.name for path in conversation.files()}
    head = message.split(":", 1)[0].strip()
    if isinstance(error, MediaError) and head in names:
        return {"input": conversation.id, "file": head, "reason": message.split(":", 1)[1].strip()}
    # Not a known source problem: keep the type and the last frame so the report is actionable.
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return {"input": conversation.id, "file": "", "reason": f"{type(error).__name__}: {message}{location}"}
