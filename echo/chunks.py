# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""The frame-count rule and the chunk schedule, defined once.

Wan's VAE compresses time by ``temporal_compression = 4`` with a causal first frame, so a clip it encodes has
``F = 4k + 1`` frames (``k + 1`` latent frames). Training windows (`echo.data`), masks (`echo.masks`), loss weights
(`echo.losses`), the model's settings (`echo.settings`) and the rendered chunks (`pipelines`) all check their lengths
here, and the pipeline renders a conversation as the chunks of `chunk_schedule`.
"""

TEMPORAL_COMPRESSION = 4  # Wan's VAE: 4× in time (its `scale_factor_temporal`)


def is_frame_count(num_frames: int, temporal_compression: int = TEMPORAL_COMPRESSION) -> bool:
    """Whether ``num_frames`` is ``temporal_compression · k + 1`` frames, ``k >= 0``."""
    return num_frames >= 1 and (num_frames - 1) % temporal_compression == 0


def check_frame_count(
    num_frames: int, name: str, temporal_compression: int = TEMPORAL_COMPRESSION, what: str = "frames"
) -> int:
    r"""
    Refuses a length that is not ``4k + 1``.

    Args:
        num_frames (`int`): the length to check.
        name (`str`): how the message names it (e.g. ``"`num_frames_per_chunk`"``).
        temporal_compression (`int`, defaults to 4): the VAE's time factor.
        what (`str`, defaults to `"frames"`): what is counted, for the message.

    Returns:
        `int`: ``num_frames``; a `ValueError` naming ``name`` otherwise.
    """
    if not is_frame_count(num_frames, temporal_compression):
        raise ValueError(
            f"{name} has {num_frames} {what}, expected {temporal_compression}k + 1 (k >= 0) for temporal "
            f"compression {temporal_compression}."
        )
    return num_frames


def num_latent_frames(num_frames: int, temporal_compression: int = TEMPORAL_COMPRESSION) -> int:
    """Latent frames of a ``4k + 1``-frame clip: ``k + 1``."""
    return (num_frames - 1) // temporal_compression + 1


def check_chunking(num_frames_per_chunk: int, motion_frames: int) -> None:
    """Refuses chunk lengths that are not ``N = 4k + 1`` frames with ``T_prev = 4(m − 1) + 1`` motion frames,
    ``0 < T_prev < N``, naming the offending one."""
    if not is_frame_count(num_frames_per_chunk):
        raise ValueError(f"`num_frames_per_chunk` is {num_frames_per_chunk}, expected 4k + 1 (k >= 0).")
    if not 0 < motion_frames < num_frames_per_chunk or not is_frame_count(motion_frames):
        raise ValueError(
            f"`motion_frames` is {motion_frames}, expected 4(m − 1) + 1 with 0 < motion_frames < "
            f"num_frames_per_chunk = {num_frames_per_chunk}."
        )


def num_chunks(num_frames: int, num_frames_per_chunk: int, motion_frames: int) -> int:
    """How many chunks of `chunk_schedule` cover ``num_frames`` frames, computed without building the list."""
    step = num_frames_per_chunk - motion_frames
    return 1 + max(0, -(-(num_frames - num_frames_per_chunk) // step))


def chunk_range(index: int, num_frames_per_chunk: int, motion_frames: int) -> tuple[int, int]:
    """Frames ``[start, stop)`` of chunk ``index`` of `chunk_schedule` (whatever the conversation's length)."""
    start = index * (num_frames_per_chunk - motion_frames)
    return start, start + num_frames_per_chunk


def chunk_schedule(num_frames: int, num_frames_per_chunk: int, motion_frames: int) -> list[tuple[int, int]]:
    r"""Frame ranges ``[start, stop)`` of the chunks that cover ``num_frames`` frames.

    The first chunk is ``[0, N)``; chunk ``c + 1`` starts ``motion_frames`` frames before the end of chunk ``c``. The
    last chunk may run past ``num_frames`` (the extra frames are generated from silence and cut).

    Args:
        num_frames (`int`): frames to produce.
        num_frames_per_chunk (`int`): ``N = 4k + 1`` frames per chunk.
        motion_frames (`int`): ``4(m − 1) + 1`` frames shared by consecutive chunks, ``0 < motion_frames < N``.

    Returns:
        `list[tuple[int, int]]`: one ``(start, stop)`` pair per chunk.
    """
    if num_frames < 1:
        raise ValueError(f"`num_frames` is {num_frames}, expected at least 1.")
    check_chunking(num_frames_per_chunk, motion_frames)
    count = num_chunks(num_frames, num_frames_per_chunk, motion_frames)
    return [chunk_range(index, num_frames_per_chunk, motion_frames) for index in range(count)]
