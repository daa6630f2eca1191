"""echo-prep past one machine: deterministic shards for job arrays, and a Ray engine (see ``docs/cluster_prep.md``).

Shards (``--shard K/N``): conversation ``c`` belongs to shard ``sha256(c.id) mod N``, which depends on the id alone, so
a conversation keeps its shard when the corpus grows, and N copies of the same command (a SLURM array) cover every
conversation exactly once. Each shard writes ``prep_summary.shard-K-of-N.json``; `merge_summaries` (``echo-prep
--merge-summaries``, run automatically by the shard that finishes last) joins them into ``prep_summary.json``.

Ray (``--engine ray``): the driver (the ``echo-prep`` process, which holds the output folder's lock and checks the
options once) keeps a fixed set of actors, each one process that prepares whole conversations with
`data_prep.stages.prepare_conversation` and keeps its models (wav2vec2, Whisper, the cache stages' VAE / Qwen-Omni /
LLM / text encoder) loaded between conversations. Each actor has one conversation in flight: the driver sends a
conversation's file paths (never frames) when an actor is free, so a corpus of any size never sits in memory. An
actor that dies (killed, out of memory, node lost) is restarted by Ray; its conversation's unfinished ``.tmp-*``
folders are removed and the conversation is sent again, and its finished clip folders are kept (the retry skips them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from pathlib import Path

from data_prep.failures import failure_record
from data_prep.stages import prepare_conversation

logger = logging.getLogger("echo-prep")

SHARD_SUMMARY = re.compile(r"prep_summary\.shard-(\d+)-of-(\d+)\.json")
#: How often the Ray driver sends a conversation again after the actor preparing it died.
RAY_RETRIES = 2
#: Seconds the driver waits for Ray to restart a dead worker before going on without it.
RESTART_S = 120


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``0 ≤ K < N``; a `ValueError` naming the flag otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or not int(match[1]) < int(match[2]):
        raise ValueError(
            f"--shard is {text!r}, expected K/N with 0 ≤ K < N (e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."
        )
    return int(match[1]), int(match[2])


def shard_of(conversation_id: str, num_shards: int) -> int:
    """The shard of a conversation: ``sha256(id) mod num_shards`` (stable across runs, machines and corpus growth)."""
    return int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") % num_shards


def shard_summary_name(shard: tuple[int, int]) -> str:
    return f"prep_summary.shard-{shard[0]}-of-{shard[1]}.json"


def merge_summaries(out_dir: str | Path) -> dict:
    """Join the per-shard summaries of ``out_dir`` into one ``prep_summary.json`` record (returned, not written).

    Raises:
        `FileNotFoundError`: no shard summary, or some of the N shards have none yet (named, with the way on).
        `ValueError`: summaries of several shard counts, or of other inputs, lie in the folder.
    """
    out_dir = Path(out_dir)
    found: dict[int, dict[int, Path]] = {}
    for path in out_dir.glob("prep_summary.shard-*-of-*.json"):
        match = SHARD_SUMMARY.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    if not found:
        raise FileNotFoundError(
            f"{str(out_dir)!r} holds no prep_summary.shard-K-of-N.json; run echo-prep --shard K/N first."
        )
    if len(found) > 1:
        raise ValueError(
            f"{str(out_dir)!r} holds shard summaries of several shard counts ({sorted(found)}); delete the "
            "prep_summary.shard-*-of-*.json files of the count you no longer use and merge again."
        )
    ((count, paths),) = found.items()
    missing = sorted(set(range(count)) - set(paths))
    if missing:
        raise FileNotFoundError(
            f"{str(out_dir)!r} has no summary yet for shard(s) {', '.join(f'{k}/{count}' for k in missing)}: run (or "
            "rerun) them, e.g. echo-prep ... --shard K/N, then merge again."
        )
    parts = [json.loads(paths[k].read_text()) for k in range(count)]
    for key in ("layout", "input"):
        values = {part.get(key) for part in parts}
        if len(values) > 1:
            raise ValueError(
                f"the shard summaries of {str(out_dir)!r} name several `{key}` values: {sorted(map(str, values))}."
            )
    merged = {
        "layout": parts[0]["layout"],
        "input": parts[0]["input"],
        "conversations": sum(part["conversations"] for part in parts),
        "clips_written": sorted(c for part in parts for c in part["clips_written"]),
        "clips_skipped": sorted(c for part in parts for c in part["clips_skipped"]),
        "failed": sorted((f for part in parts for f in part["failed"]), key=lambda f: (f["input"], f["file"])),
        "shards": count,
    }
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Temporary clip folders of an interrupted writer
# ----------------------------------------------------------------------------------------------------------------


def tmp_owner(name: str, conversation_ids: list[str]) -> str | None:
    """The conversation a ``.tmp-<clip>-<pid>`` folder belongs to: the longest id that ``<clip>`` starts with
    followed by ``_`` (clip ids are ``<conversation>_<participant>_c<k>``); `None` when none does."""
    rest = name[len(".tmp-") :]
    owners = [c for c in conversation_ids if rest.startswith(f"{c}_")]
    return max(owners, key=len) if owners else None


def remove_tmp_folders(out_dir: Path, owned: set[str], conversation_ids: list[str]) -> None:
    """Delete the ``.tmp-*`` folders of the conversations in ``owned`` (left by a killed writer of those conversations;
    those of other conversations, which other shards may be writing now, are left alone)."""
    for tmp in out_dir.glob(".tmp-*"):
        if tmp_owner(tmp.name, conversation_ids) in owned:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The Ray engine
# ----------------------------------------------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "--engine ray needs Ray, which is not installed: pip install 'echo-ihg[cluster]' (or "
            "pip install 'ray[default]>=2.40,<3'), on the driver and on every node of the cluster."
        ) from error
    return ray


class Preparer:
    """One Ray actor: prepares whole conversations into ``out_dir``; its models stay loaded between them (the
    per-process caches of `data_prep.stages` and `data_prep.caches`)."""

    def __init__(self, out_dir: str, options, on_clip=None):
        self.out_dir, self.options, self.on_clip = out_dir, options, on_clip

    def pid(self) -> int:
        return os.getpid()

    def prepare(self, conversation):

        try:
            result = prepare_conversation(conversation, self.out_dir, self.options, on_clip=self.on_clip)
            return conversation.id, result, None
        except Exception as error:  # reported per input in the summary; the run continues with the others
            return conversation.id, None, failure_record(conversation, error)


def _restarted(ray, actor) -> bool:
    """Wait (up to ``RESTART_S``) until Ray has restarted a dead actor; whether it answers again."""
    deadline = time.monotonic() + RESTART_S
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=RESTART_S)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    return False


def run_ray(
    conversations: list,
    out_dir: Path,
    options,
    record,
    all_ids: list[str],
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    on_clip=None,
) -> None:
    """Prepare ``conversations`` on a Ray cluster; ``record(result, failure)`` is called in the driver for each.

    Args:
        address (`str`, *optional*): the cluster (``"auto"``: the one this node belongs to); `None` starts a local one
            unless Ray is already initialised in this process.
        workers (`int`, *optional*): actors; by default as many as the cluster's GPUs / ``gpus_per_worker`` when
            ``options.device`` is CUDA, else its CPUs / ``options.threads``.
        gpus_per_worker (`float`, *optional*): GPUs each actor reserves (a fraction shares one GPU between several
            actors); defaults to 1 with a CUDA device, 0 otherwise.
        on_clip (`callable`, *optional*): as in `data_prep.stages.prepare_conversation`, run inside the actors
            (it must be picklable).
    """
    ray = import_ray()
    cuda = str(options.device).startswith("cuda")
    if cuda and options.device != "cuda":
        raise ValueError(
            f"--device is {options.device!r}; with --engine ray pass --device cuda: Ray gives each worker its GPU "
            "(CUDA_VISIBLE_DEVICES), which it sees as cuda:0."
        )
    gpus = (1.0 if cuda else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if gpus < 0 or (cuda and gpus == 0):
        raise ValueError(
            f"--ray-gpus-per-worker is {gpus_per_worker}, expected a positive fraction of a GPU with --device cuda."
        )
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        resources = ray.cluster_resources()
        if workers is None:
            if gpus > 0:
                workers = int(resources.get("GPU", 0) / gpus)
            else:
                workers = int(resources.get("CPU", 1) // options.threads)
        if workers < 1:
            raise ValueError(
                f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) has room for no "
                f"worker of {options.threads} CPU(s) and {gpus:g} GPU(s); lower --threads / --ray-gpus-per-worker."
            )
        actor_class = ray.remote(num_cpus=options.threads, num_gpus=gpus, max_restarts=-1, max_task_retries=0)(Preparer)
        actors = [actor_class.remote(str(out_dir), options, on_clip) for _ in range(min(workers, len(conversations)))]
        logger.info("echo-prep on Ray: %d worker(s) of %d CPU(s), %g GPU(s) each", len(actors), options.threads, gpus)
        pending, idle, in_flight, deaths = deque(conversations), list(actors), {}, {}
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
        try:
            # Back-pressure: one conversation (its file paths) per actor in flight; the rest wait in the driver.
            while pending or in_flight:
                while pending and idle:
                    actor, conversation = idle.pop(), pending.popleft()
                    in_flight[actor.prepare.remote(conversation)] = (actor, conversation)
                (ready,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, conversation = in_flight.pop(ready)
                idle.append(actor)
                try:
                    _, result, failure = ray.get(ready)
                except lost as error:
                    # The actor died mid-conversation: its finished clip folders stay, its unfinished ones go.
                    deaths[conversation.id] = deaths.get(conversation.id, 0) + 1
                    remove_tmp_folders(out_dir, {conversation.id}, all_ids)
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    if not _restarted(ray, actor):
                        idle.remove(actor)
                        logger.warning("a Ray worker did not come back within %d s; going on without it", RESTART_S)
                    if deaths[conversation.id] <= RAY_RETRIES and (idle or in_flight):
                        logger.warning(
                            "the Ray worker preparing %s died (%s); sending it again", conversation.id, reason
                        )
                        pending.appendleft(conversation)
                        continue
                    result, failure = (
                        None,
                        {
                            "input": conversation.id,
                            "file": "",
                            "reason": f"the Ray worker preparing it died {deaths[conversation.id]} times ({type(error).__name__}: {reason})",
                        },
                    )
                record(result, failure)
                if not idle and not in_flight:  # every worker is gone: what is left fails, named, not silently
                    while pending:
                        record(None, {"input": pending.popleft().id, "file": "", "reason": "no Ray worker left"})
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
