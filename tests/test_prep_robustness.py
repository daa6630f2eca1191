"""echo-prep's output folder under kills, concurrent runs, changed options, bad option values and a full disk."""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_prep import cli
from data_prep.stages import OptionsMismatch, PrepOptions, record_options
from data_prep.testing import save_tiny_wav2vec2
from echo import clip_format
from synthetic.conversations import make_conversation

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


@pytest.fixture
def layout_only_input(tmp_path):
    """An input folder whose one conversation fails in the layout check (one video): a run reads no media."""
    (tmp_path / "src" / "lonely").mkdir(parents=True)
    (tmp_path / "src" / "lonely" / "A.mp4").write_bytes(b"\0")
    return tmp_path / "src"


def _argv(src, out, *extra):
    return [
        "--input",
        str(src),
        "--layout",
        "pairs",
        "--out",
        str(out),
        "--wav2vec2",
        "unused",
        "--size",
        "64",
        "--no-progress",
        *extra,
    ]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ----------------------------------------------------------------------------------------------------------------
# Killed runs and concurrent runs
# ----------------------------------------------------------------------------------------------------------------


def test_a_live_run_locks_the_folder_and_a_dead_one_is_taken_over(layout_only_input, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": live.pid, "host": socket.gethostname(), "started": "2030-01-01 00:00:00 +0000"}
        (out / cli.LOCK).write_text(json.dumps(lock))
        assert cli.main(_argv(layout_only_input, out)) == 2
        error = capsys.readouterr().err
        assert f"pid {live.pid}" in error and socket.gethostname() in error and "2030-01-01" in error
        assert json.loads((out / cli.LOCK).read_text()) == lock  # left to its owner
        assert not (out / cli.SUMMARY).exists()
        # A lock of another host cannot be checked from here: refused too, saying so.
        (out / cli.LOCK).write_text(json.dumps({**lock, "host": "elsewhere"}))
        with pytest.raises(cli.OutputLocked, match="'elsewhere'.*cannot tell"):
            cli.run_prep(layout_only_input, "pairs", out, PrepOptions(wav2vec2="unused", size=64), progress=False)
    finally:
        live.kill()
        live.wait()
    # The owner is gone (or its pid now names another process): the lock is taken over with a notice.
    for stale in ({"pid": _dead_pid()}, {"pid": os.getpid(), "process_start_ticks": -1}):
        (out / cli.LOCK).write_text(json.dumps({**lock, **stale}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="echo-prep"):
            summary = cli.run_prep(
                layout_only_input, "pairs", out, PrepOptions(wav2vec2="unused", size=64), progress=False
            )
        assert f"pid {stale['pid']}" in caplog.text and "no longer runs" in caplog.text
        assert [f["input"] for f in summary.failed] == ["lonely"]
        assert not (out / cli.LOCK).exists()  # released at the end of the run


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_a_pool_run_leaves_no_worker_and_a_rerun_completes(tmp_path, encoder, signum):
    """``echo-prep --workers 2`` killed while its workers write clips: every worker dies with it within seconds (none
    goes on writing into the folder), and a rerun completes. SIGKILL leaves a stale lock the rerun takes over;
    SIGTERM unwinds the run, which terminates its workers and releases the lock."""
    psutil = pytest.importorskip("psutil")
    for seed in (21, 22):
        make_conversation(tmp_path / "src", "pairs", seconds=1.0, size=96, seed=seed)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "data_prep.cli",
        *_argv(tmp_path / "src", out, "--clip-seconds", "0.5", "--min-clip-seconds", "0.5"),
    ]
    command[command.index("unused")] = str(encoder)
    process = subprocess.Popen(
        [*command, "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    descendants = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if out.is_dir() and any(p.name.startswith(".tmp-") or (p / "meta.json").exists() for p in out.iterdir()):
                break  # the workers are writing clips
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert len(descendants) >= 2
        os.kill(process.pid, signum)
        assert process.wait(timeout=30) == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signal.SIGTERM)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"processes outlived the killed run: {[p.pid for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in descendants:
            if child.is_running():
                child.kill()
    assert (out / cli.LOCK).exists() == (signum == signal.SIGKILL)  # a SIGKILLed run cannot remove its lock
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert ("no longer runs" in rerun.stderr) == (signum == signal.SIGKILL)
    assert len(clip_format.list_clip_folders(out)) == 8  # 2 conversations × 2 clips × 2 assignments
    assert not (out / cli.LOCK).exists() and not list(out.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


def test_a_rerun_with_other_options_is_refused_naming_them(tmp_path, encoder, capsys):
    make_conversation(tmp_path / "src", "pairs", seconds=0.6, size=96, seed=23)
    out = tmp_path / "out"
    argv = _argv(tmp_path / "src", out, "--clip-seconds", "0.6", "--min-clip-seconds", "0.6")
    argv[argv.index("unused")] = str(encoder)
    assert cli.main(argv) == 0
    clip = out / "conv0023_A_c0000"
    stamp = (clip / "meta.json").stat().st_mtime_ns
    capsys.readouterr()

    changed = [*argv, "--size", "32", "--crop-scale", "2.0"]
    assert cli.main(changed) == 2
    error = capsys.readouterr().err
    assert "`size` (--size) was 64, now 32" in error and "`crop_scale` (--crop-scale) was 1.8, now 2.0" in error
    assert "--out" in error and "--overwrite" in error
    assert (clip / "meta.json").stat().st_mtime_ns == stamp  # nothing reused, nothing rewritten
    # A folder of an older echo-prep (no prep_options.json) is compared with its clips' meta.json.
    (out / "prep_options.json").unlink()
    assert cli.main(changed) == 2 and "`size` (--size) was 64, now 32" in capsys.readouterr().err
    # The same options resume; --overwrite redoes every clip with the new ones.
    assert cli.main(argv) == 0 and (clip / "meta.json").stat().st_mtime_ns == stamp
    assert cli.main([*changed, "--overwrite"]) == 0
    assert clip_format.read_meta(clip)["size"] == 32
    assert json.loads((out / "prep_options.json").read_text())["clips"]["size"] == 32


def test_cache_stage_options_are_compared_when_the_stage_ran_before(tmp_path, monkeypatch):
    (tmp_path / "vae_a").mkdir()
    first = PrepOptions(wav2vec2="w", size=64, stages=["omni"], omni_model=str(tmp_path / "vae_a"))
    record_options(tmp_path, first)
    # A stage run for the first time is added, with its options.
    record_options(
        tmp_path,
        PrepOptions(wav2vec2="w", size=64, stages=["user_tokens"], vae=str(tmp_path / "vae_a"), user_video_size=32),
    )
    recorded = json.loads((tmp_path / "prep_options.json").read_text())
    assert set(recorded["stages"]) == {"omni", "user_tokens"}
    # A relative spelling of the same model folder is the same option.
    monkeypatch.chdir(tmp_path)
    record_options(
        tmp_path, PrepOptions(wav2vec2="w", size=64, stages=["user_tokens"], vae="vae_a", user_video_size=32)
    )
    with pytest.raises(OptionsMismatch, match=r"`user_video_size` \(--user-video-size\) was 32, now 64"):
        record_options(tmp_path, PrepOptions(wav2vec2="w", size=64, stages=["user_tokens"], vae="vae_a"))
    with pytest.raises(OptionsMismatch, match=r"`vae` \(--vae\) was '.*vae_a', now 'vae_b'"):
        record_options(
            tmp_path, PrepOptions(wav2vec2="w", size=64, stages=["user_tokens"], vae="vae_b", user_video_size=32)
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "70"], "`size` (--size) is 70, expected a positive multiple of 16"),
        (["--workers", "0"], "--workers is 0"),
        (["--workers", "-2"], "--workers is -2"),
        (["--clip-seconds", "0.01"], "`clip_seconds` (--clip-seconds) is 0.01, expected at least one frame"),
        (["--clip-seconds", "nan"], "`clip_seconds` (--clip-seconds) is nan"),
        (["--crop-scale", "-1"], "`crop_scale` (--crop-scale) is -1.0"),
        (["--user-video-size", "20"], "`user_video_size` (--user-video-size) is 20"),
        (["--stages", "clips,emotion_embeds"], "Stage 'emotion_embeds' needs `text_encoder` (--text-encoder)"),
    ],
)
def test_options_wrong_for_every_clip_are_refused_once_up_front(layout_only_input, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        cli.main(_argv(layout_only_input, out, *extra))
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count(message) == 1, error
    assert not out.exists()  # refused before the folder is touched


# ----------------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------------


def test_a_failed_summary_write_keeps_the_old_file_and_still_prints_the_failures(
    layout_only_input, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert cli.main(_argv(layout_only_input, out)) == 1
    before = (out / cli.SUMMARY).read_text()
    assert json.loads(before)["failed"][0]["input"] == "lonely"
    capsys.readouterr()
    write_text = pathlib.Path.write_text

    def disk_full(self, text, *args, **kwargs):
        if "prep_summary" in self.name:  # half the text lands, then the disk is full
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    assert cli.main(_argv(layout_only_input, out)) == 1
    printed = capsys.readouterr()
    assert any("lonely" in line and "expected two videos" in line for line in printed.out.splitlines())
    assert "prep_summary.json" in printed.err and os.strerror(errno.ENOSPC) in printed.err
    assert (out / cli.SUMMARY).read_text() == before  # the previous summary, not a truncated one
    assert sorted(p.name for p in out.iterdir()) == ["prep_options.json", cli.SUMMARY]  # no temporary file, no lock
