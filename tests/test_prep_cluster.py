"""echo-prep past one machine: shards (job arrays) and the Ray engine give the bytes of ``--workers 1``; locks across
shards; a Ray worker killed mid-run costs nothing finished and loses nothing (see ``docs/cluster_prep.md``)."""

import json
import os
import signal
import socket

import pytest

from data_prep import cli, cluster
from data_prep.cli import run_prep
from data_prep.stages import PrepOptions
from data_prep.testing import save_tiny_wav2vec2
from synthetic.conversations import make_conversation

SEEDS = (20, 21, 22, 24)  # two in each shard of 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four 0.96 s conversations (two 12-frame clips each, so 4 clip folders), a tiny wav2vec2, and the reference
    output of ``--workers 1``."""
    root = tmp_path_factory.mktemp("cluster")
    for seed in SEEDS:
        make_conversation(root / "src", "pairs", seconds=0.96, size=96, seed=seed)
    encoder = save_tiny_wav2vec2(root / "wav2vec2")
    options = PrepOptions(wav2vec2=str(encoder), size=32, clip_seconds=0.48, min_clip_seconds=0.48)
    summary = run_prep(root / "src", "pairs", root / "reference", options, progress=False)
    assert summary.failed == [] and len(summary.clips_written) == 16
    return root, options, summary


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'echo-ihg[cluster]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _files(root):
    """Every output file but the run summaries (which list what each run wrote), by relative path."""
    return {
        p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("prep_summary")
    }


def _assert_same_bytes(reference, other):
    expected, got = _files(reference), _files(other)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].read_bytes() == expected[name].read_bytes(), name


def _stamps(root):
    """(inode, mtime) of every file of the clip folders and done markers (``prep_options.json`` is rewritten by
    every run)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _files(root).values() if p.parent != root}


def test_two_shards_and_a_merge_give_the_whole_run(corpus):
    root, options, reference = corpus
    shards = [run_prep(root / "src", "pairs", root / "sharded", options, progress=False, shard=(0, 2))]
    # Shard 1 removes the unfinished clips its own killed writers left, not those shard 0 may be writing now.
    ours, theirs = root / "sharded" / ".tmp-conv0020_A_c0000-99999", root / "sharded" / ".tmp-conv0021_A_c0000-99999"
    assert [cluster.shard_of(c, 2) for c in ("conv0020", "conv0021")] == [1, 0]
    ours.mkdir(), theirs.mkdir()
    shards.append(run_prep(root / "src", "pairs", root / "sharded", options, progress=False, shard=(1, 2)))
    assert not ours.exists() and theirs.is_dir()
    theirs.rmdir()
    # A deterministic partition: each conversation in exactly one shard, both shards non-empty.
    assert sorted(c for s in shards for c in s.clips_written) == reference.clips_written
    assert [s.conversations for s in shards] == [2, 2]
    assert {cluster.shard_of(f"conv{seed:04d}", 2) for seed in SEEDS} == {0, 1}
    _assert_same_bytes(root / "reference", root / "sharded")
    # The last shard merged the summaries; `echo-prep --merge-summaries` does the same on demand.
    merged = json.loads((root / "sharded" / cli.SUMMARY).read_text())
    assert merged == {**json.loads((root / "reference" / cli.SUMMARY).read_text()), "shards": 2}
    (root / "sharded" / cli.SUMMARY).unlink()
    assert cli.main(["--out", str(root / "sharded"), "--merge-summaries"]) == 0
    assert json.loads((root / "sharded" / cli.SUMMARY).read_text()) == merged
    assert not list((root / "sharded").glob(".echo-prep*"))  # no lock, no admission file left

    # A missing shard is named, with the way on.
    (root / "sharded" / "prep_summary.shard-1-of-2.json").unlink()
    with pytest.raises(FileNotFoundError, match="shard\\(s\\) 1/2"):
        cluster.merge_summaries(root / "sharded")


def test_the_lock_across_shards(tmp_path):
    """N shards share a folder; a second live run of one shard, another shard count or a whole run beside a shard do
    not. A lock of another host is live while its heartbeat is fresh and taken over once stale."""
    out = tmp_path / "out"
    out.mkdir()
    live = {k: v for k, v in cli._lock_record((0, 2)).items()}  # this test process: live
    (out / cli.lock_name((0, 2))).write_text(json.dumps(live))
    held = cli.acquire_lock(out, (1, 2))  # the other shard of the same array: allowed
    cli.release_lock(held)
    with pytest.raises(cli.OutputLocked, match="shard 0/2, pid"):
        cli.acquire_lock(out, (0, 2))
    with pytest.raises(cli.OutputLocked, match="would overlap"):
        cli.acquire_lock(out, (0, 3))
    with pytest.raises(cli.OutputLocked, match="would overlap"):
        cli.acquire_lock(out)

    # Another host's shard lock: refused while its heartbeat is fresh, taken over once it is stale.
    (out / cli.lock_name((0, 2))).write_text(json.dumps({**live, "host": "node-17", "pid": 1}))
    with pytest.raises(cli.OutputLocked, match="'node-17'.*cannot tell.*heartbeat"):
        cli.acquire_lock(out, (0, 2))
    old = os.stat(out / cli.lock_name((0, 2))).st_mtime - cli.LOCK_STALE_S - 1
    os.utime(out / cli.lock_name((0, 2)), (old, old))
    held = cli.acquire_lock(out, (0, 2))
    assert json.loads(held.read_text())["host"] == socket.gethostname()
    cli.release_lock(held)
    assert sorted(p.name for p in out.iterdir()) == []

    with pytest.raises(ValueError, match="--shard is '2/2', expected K/N with 0 ≤ K < N"):
        cluster.parse_shard("2/2")


@pytest.mark.timeout(300)
def test_ray_writes_the_bytes_of_one_worker(corpus, ray_cluster):
    root, options, reference = corpus
    summary = run_prep(root / "src", "pairs", root / "ray", options, progress=False, engine="ray", workers=2)
    assert summary.failed == [] and summary.clips_written == reference.clips_written
    _assert_same_bytes(root / "reference", root / "ray")
    assert not list((root / "ray").glob(".tmp-*")) and not list((root / "ray").glob(".echo-prep*"))


class KillOnce:
    """``on_clip`` hook run inside the Ray workers: the first worker to complete ``clip`` (in its tmp folder) records
    the clip folders finished so far (inode, mtime) and SIGKILLs its own process, before the rename."""

    def __init__(self, marker, clip):
        self.marker, self.clip = str(marker), clip

    def __call__(self, clip, tmp_dir):
        if clip != self.clip:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # the retry
        out = tmp_dir.parent
        stamps = {
            str(p.relative_to(out)): [p.stat().st_ino, p.stat().st_mtime_ns] for p in out.glob("conv*/*") if p.is_file()
        }
        os.write(fd, json.dumps({"pid": os.getpid(), "finished": stamps}).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow  # ~25 s on 2 cores: a second Ray run, an actor restart and a rerun
@pytest.mark.timeout(300)
def test_a_killed_ray_worker_repeats_nothing_and_loses_nothing(corpus, ray_cluster, tmp_path):
    root, options, reference = corpus
    out = tmp_path / "killed"
    # Killed with the conversation's first window written (A_c0000, B_c0000) and A_c0001 complete but not renamed.
    hook = KillOnce(tmp_path / "killed.json", "conv0021_A_c0001")
    summary = run_prep(root / "src", "pairs", out, options, progress=False, engine="ray", workers=2, on_clip=hook)
    killed = json.loads((tmp_path / "killed.json").read_text())
    assert not _pid_alive(killed["pid"])
    assert {"conv0021_A_c0000/meta.json", "conv0021_B_c0000/meta.json"} <= killed["finished"].keys()
    # The run completed: the conversation was sent again, its finished clips kept as they were.
    assert summary.failed == [] and summary.clips_skipped == ["conv0021_A_c0000", "conv0021_B_c0000"]
    assert sorted(summary.clips_written + summary.clips_skipped) == reference.clips_written
    for name, stamp in killed["finished"].items():
        assert [(out / name).stat().st_ino, (out / name).stat().st_mtime_ns] == stamp, name
    assert not list(out.glob(".tmp-*"))
    _assert_same_bytes(root / "reference", out)

    # A rerun finds everything done and rewrites nothing.
    before = _stamps(out)
    again = run_prep(root / "src", "pairs", out, options, progress=False, engine="ray", workers=2)
    assert again.clips_written == [] and again.clips_skipped == reference.clips_written
    assert _stamps(out) == before


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = cli._process_stat(pid)
    return stat is not None and stat[0] != "Z"
