"""mp4 output (PyAV decode: frames, 25 fps, audio duration) and the echo-render batch renderer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.video_io import load_wav, probe_mp4, read_frames, write_mp4

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
AAC_FRAME = 1024 / 16_000  # AAC works in 1024-sample frames: decoded audio may carry one partial frame of padding


def _tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(seconds * 16_000))) / 16_000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("num_frames", [17, 33])
def test_mp4_has_the_frames_at_25_fps_and_audio_of_the_same_duration(tmp_path, num_frames):
    y, x = np.mgrid[0:32, 0:48]
    frames = np.stack(
        [
            np.stack([(x * 5 + 7 * t) % 256, (y * 7 + 3 * t) % 256, np.full_like(x, 9 * t % 256)], -1)
            for t in range(num_frames)
        ]
    ).astype(np.uint8)  # smooth moving gradients
    audio = _tone(10.0)  # longer than the video: cut to its duration
    path = write_mp4(tmp_path / "clip.mp4", frames, audio=audio)
    info = probe_mp4(path)
    assert info["num_frames"] == num_frames and info["fps"] == 25.0
    assert (info["width"], info["height"], info["video_codec"], info["audio_codec"]) == (48, 32, "h264", "aac")
    assert abs(info["audio_seconds"] - num_frames / 25) <= AAC_FRAME
    # the muxed audio is the avatar's: correlation with the source tone
    decoded = load_wav(path)
    n = int(num_frames / 25 * 16_000) - 2048
    corr = np.corrcoef(decoded[1024 : 1024 + n], audio[:n])[0, 1]
    lagged = max(np.corrcoef(decoded[k : k + n], audio[:n])[0, 1] for k in range(0, 2048, 16))
    assert max(corr, lagged) > 0.9
    # H.264 at crf 18 keeps the pixels close
    assert np.abs(read_frames(path).astype(int) - frames).mean() < 12


def test_side_by_side_puts_the_user_left_of_the_avatar(tmp_path):
    avatar = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    avatar[..., 0] = 250  # red avatar
    user = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    user[..., 2] = 250  # blue user, shorter and smaller: resized to the avatar's height, last frame repeated
    path = write_mp4(tmp_path / "sbs.mp4", avatar, audio=_tone(1.0), user_frames=user)
    frames = read_frames(path)
    assert frames.shape == (9, 32, 64, 3)
    assert frames[:, :, 4:28, 2].mean() > 200 and frames[:, :, 4:28, 0].mean() < 50
    assert frames[:, :, 36:60, 0].mean() > 200 and frames[:, :, 36:60, 2].mean() < 50


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from echo.components import load_components
    from pipelines import EchoPipeline

    folder = tmp_path_factory.mktemp("pipeline")
    EchoPipeline(**load_components(TINY)).save_pretrained(folder)
    return folder


def _write_conversation(folder: Path, seconds: float = 0.36) -> dict:
    """Inputs of one manifest entry: a reference png, two wavs, a user mp4, landmarks and understanding tokens."""
    import PIL.Image
    from safetensors.torch import save_file
    from skimage.data import astronaut

    folder.mkdir(parents=True, exist_ok=True)
    num_frames = int(round(seconds * 25))
    image = astronaut()[::4, ::4]  # 128²
    PIL.Image.fromarray(image).save(folder / "ref.png")
    write_mp4(folder / "user.mp4", np.repeat(image[None, ::2, ::2], num_frames, 0))
    from data_prep.media import write_wav

    write_wav(folder / "avatar.wav", _tone(seconds, 200.0))
    write_wav(folder / "user.wav", _tone(seconds, 300.0))
    landmarks = np.zeros((478, 2), dtype=np.float32) + 64  # a degenerate face: empty masks, valid shapes
    np.save(folder / "ref_landmarks.npy", landmarks)
    np.save(folder / "user_landmarks.npy", np.repeat(landmarks[None] / 2, num_frames, 0))
    save_file({"hidden_states": torch.randn(1, 4, 32)}, str(folder / "omni.safetensors"))
    return {
        "reference_image": "conv/ref.png",
        "avatar_audio": "conv/avatar.wav",
        "user_video": "conv/user.mp4",
        "user_audio": "conv/user.wav",
        "understanding": "conv/omni.safetensors",
        "reference_landmarks": "conv/ref_landmarks.npy",
        "user_landmarks": "conv/user_landmarks.npy",
        "emotion": "calm",
    }


def test_render_manifest_isolates_failures_skips_done_clips_and_stays_inside_out(saved_pipeline, tmp_path, capsys):
    from pipelines import render

    work = tmp_path / "work"
    entry = _write_conversation(work / "conv")
    lines = [
        json.dumps({**entry, "id": "good"}),
        json.dumps({**entry, "id": "broken", "user_audio": "conv/missing.wav"}),
        "{not json",
        json.dumps({**entry, "id": "../x", "num_frames": 5}),
    ]
    manifest = work / "conversations.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = work / "out"
    # size, chunk length and motion frames: the settings saved with the pipeline (tiny: 64², 9-frame chunks)
    args = [
        "--pipeline",
        str(saved_pipeline),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--steps",
        "1",
        "--side-by-side",
    ]

    assert render.main(args) == 1  # some clips failed
    printed = capsys.readouterr().out
    assert "2 rendered, 0 skipped" in printed and "2 failed" in printed
    assert sorted(p.name for p in out.iterdir()) == ["_x.mp4", "failures.jsonl", "good.mp4", "render_options.json"]
    assert not (work / "x.mp4").exists() and not list(tmp_path.glob("x.mp4"))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["broken", "line3"]
    assert "missing.wav" in failures[0]["error"]
    # the default length follows the avatar audio (0.36 s = 9 frames); num_frames overrides it
    assert probe_mp4(out / "good.mp4")["num_frames"] == 9 and probe_mp4(out / "_x.mp4")["num_frames"] == 5
    assert probe_mp4(out / "good.mp4")["width"] == 128  # side by side

    # Rerun: finished clips are not rendered again, failures are retried (and fail again).
    mtime = (out / "good.mp4").stat().st_mtime_ns
    pipe = render.load_pipeline(saved_pipeline)
    calls = []
    original = type(pipe).__call__

    class Counting(type(pipe)):
        def __call__(self, *a, **k):
            calls.append(k.get("emotion"))
            return original(self, *a, **k)

    pipe.__class__ = Counting
    summary = render.render_manifest(pipe, manifest, out, render.build_parser().parse_args(args))
    assert calls == [] and sorted(summary["skipped"]) == ["_x", "good"] and summary["rendered"] == []
    assert (out / "good.mp4").stat().st_mtime_ns == mtime


def test_a_rerun_with_other_options_is_refused_unless_overwritten(saved_pipeline, tmp_path, capsys):
    """Clips rendered with other steps or another size never mix with new ones: the rerun is refused naming the
    differing options (exit 2, nothing rendered); --overwrite deletes the earlier clips and renders again."""
    from pipelines import render

    work = tmp_path / "work"
    entry = _write_conversation(work / "conv", seconds=0.2)
    manifest = work / "conversations.jsonl"
    manifest.write_text(json.dumps({**entry, "id": "a"}) + "\n")
    out = work / "out"
    args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--out", str(out), "--steps", "1"]
    assert render.main(args) == 0
    first = (out / "a.mp4").stat().st_mtime_ns
    assert json.loads((out / "render_options.json").read_text())["num_inference_steps"] == 1
    assert render.main(args) == 0 and (out / "a.mp4").stat().st_mtime_ns == first  # same options: resumes
    for changed, named in (
        (["--steps", "2"], "num_inference_steps: earlier 1, now 2"),
        (["--steps", "1", "--height", "32", "--width", "32"], "height: earlier 64, now 32"),
        (["--steps", "1", "--seed", "3"], "seed: earlier 0, now 3"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            render.main([*args[:-2], *changed])
        assert exit_info.value.code == 2 and named in capsys.readouterr().err
        assert (out / "a.mp4").stat().st_mtime_ns == first
    assert render.main([*args[:-2], "--steps", "2", "--overwrite"]) == 0
    assert (out / "a.mp4").stat().st_mtime_ns != first
    assert json.loads((out / "render_options.json").read_text())["num_inference_steps"] == 2
    # a folder of clips without a record (an older echo-render) is refused as well
    (out / "render_options.json").unlink()
    with pytest.raises(SystemExit):
        render.main([*args[:-2], "--steps", "2"])
    assert "(no record)" in capsys.readouterr().err


def test_render_entry_passes_the_options_and_leaves_the_rest_to_the_model_settings(tmp_path):
    """echo-render forwards --user-video-size and the other options; an option not given is None, so the pipeline
    takes the model's saved setting; reference landmarks are passed in pixels of the reference image."""
    from pipelines import render

    class Recorder:
        def __call__(self, **kwargs):
            self.kwargs = kwargs
            frames = np.zeros((1, kwargs["num_frames"] or 9, 16, 16, 3), dtype=np.float32)
            return type("Output", (), {"frames": frames})()

    entry = {**_write_conversation(tmp_path / "conv"), "id": "a"}
    parser = render.build_parser()
    base = ["--pipeline", "p", "--manifest", "m", "--out", "o"]
    pipe = Recorder()
    render.render_entry(pipe, entry, tmp_path, tmp_path / "a.mp4", parser.parse_args(base))
    for name in (
        "height",
        "width",
        "num_inference_steps",
        "audio_guidance_scale",
        "user_guidance_scale",
        "num_frames_per_chunk",
        "motion_frames",
        "user_video_size",
    ):
        assert pipe.kwargs[name] is None, name
    np.testing.assert_array_equal(pipe.kwargs["reference_landmarks"], np.load(tmp_path / "conv" / "ref_landmarks.npy"))
    options = parser.parse_args([*base, "--user-video-size", "16", "--height", "32"])
    render.render_entry(pipe, entry, tmp_path, tmp_path / "b.mp4", options)
    assert pipe.kwargs["user_video_size"] == 16 and pipe.kwargs["height"] == 32


@pytest.mark.parametrize(
    "clip_id, expected",
    [("../x", "_x"), ("a/b", "a_b"), ("/etc/passwd", "_etc_passwd"), ("..\\..\\y", "_.._y"), ("ok-1.v2", "ok-1.v2")],
)
def test_ids_are_sanitised_into_the_output_folder(tmp_path, clip_id, expected):
    from pipelines.render import output_path, sanitize_id

    assert sanitize_id(clip_id) == expected
    assert output_path(tmp_path, clip_id).parent == tmp_path.resolve()
    for bad in ("", "..", "/", "."):
        with pytest.raises(ValueError):
            sanitize_id(bad)


def test_echo_live_replays_a_conversation_through_a_session_and_reports_latency(saved_pipeline, tmp_path, capsys):
    """echo-live pushes the conversation in pieces at a paced speed through `EchoSession` and reports per chunk the
    arrival of its last input (never before that input was due), the latency to its frames, and the real-time factor;
    the mp4 holds every frame, and the frames are those of the offline call."""
    import torch

    from pipelines import live, render

    entry = {**_write_conversation(tmp_path / "conv", seconds=0.68), "id": "c"}  # 17 frames: chunks [0, 9), [8, 17)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(entry) + "\n")
    out, report = tmp_path / "live.mp4", tmp_path / "report.json"
    options = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--steps", "1", "--piece-frames", "3"]
    assert live.main([*options, "--speed", "10", "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    figures = dict(item.split("=") for item in printed[-1].split())
    assert {"first_frame_latency_s", "real_time_factor", "mean_latency_s", "final_lag_s"} <= set(figures)
    assert float(figures["real_time_factor"]) > 0 and figures["chunks"] == "2"
    rows = json.loads(report.read_text())["chunks"]
    assert [(r["chunk"], r["first_frame"], r["frames"]) for r in rows] == [(0, 0, 9), (1, 9, 8)]
    # chunk 0 needs the avatar's rows 0-10, final once the first 25-frame audio block's right context (frames 25-49)
    # is in: for this 17-frame conversation, at the end of input, after the last piece [15, 17), due at 17 / 25 / 10 s
    assert rows[0]["inputs_complete_s"] >= 17 / 25 / 10
    assert all(r["latency_s"] >= r["compute_s"] > 0 for r in rows)
    assert probe_mp4(out)["num_frames"] == 17

    pipe = render.load_pipeline(saved_pipeline)
    inputs = render.read_entry(entry, tmp_path)
    session = pipe.start_session(
        reference_image=inputs["reference_image"],
        reference_landmarks=inputs["reference_landmarks"],
        understanding=inputs["understanding"],
        emotion="calm",
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
    )
    chunks, _ = live.replay(session, inputs, piece_frames=5, speed=None)  # --no-wait, other pieces
    offline = pipe(**inputs, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), offline.frames[0])


BAD_OPTIONS = [
    ("--steps", "0"),
    ("--steps", "two"),
    ("--audio-guidance-scale", "-1"),
    ("--user-guidance-scale", "nan"),
    ("--audio-guidance-scale", "inf"),
    ("--height", "-16"),
    ("--width", "0"),
    ("--frames-per-chunk", "0"),
    ("--motion-frames", "1.5"),
    ("--user-video-size", "0"),
    ("--seed", "-1"),
]
LIVE_BAD_OPTIONS = [("--speed", "0"), ("--speed", "nan"), ("--piece-frames", "0")]


@pytest.mark.parametrize("option, value", BAD_OPTIONS + LIVE_BAD_OPTIONS)
def test_option_values_are_checked_as_they_are_parsed(option, value, capsys):
    """A value no render could use (``--steps 0``, a negative or NaN guidance scale, ...) is an argparse error naming
    the option (exit code 2), in echo-render and echo-live alike."""
    from pipelines import live, render

    parsers = [live.build_parser()] + ([render.build_parser()] if (option, value) in BAD_OPTIONS else [])
    for parser in parsers:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--pipeline", "p", "--manifest", "m", "--out", "o", option, value])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"argument {option}" in error and repr(value) in error, error


@pytest.mark.parametrize(
    "options, named",
    [
        (["--height", "70"], "`--height` is 70"),
        (["--frames-per-chunk", "10"], "`--frames-per-chunk` is 10"),
        (["--motion-frames", "9"], "`--motion-frames` is 9"),
        (["--user-video-size", "12"], "`--user-video-size` is 12"),
    ],
)
def test_options_invalid_for_the_model_are_one_error_before_any_clip(saved_pipeline, tmp_path, capsys, options, named):
    """Options that every clip would fail with (a size that is no multiple of the model's 16-pixel tokens, a chunk
    length other than 4k + 1 frames, ...) are reported once, naming the option, before any clip is rendered: echo-render
    exits with code 2 and writes nothing; echo-live likewise; `render_manifest` raises before its first clip."""
    from pipelines import live, render

    entry = _write_conversation(tmp_path / "conv")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**entry, "id": name}) + "\n" for name in ("a", "b")))
    out = tmp_path / "out"
    args = ["--pipeline", str(saved_pipeline), "--manifest", str(manifest), "--steps", "1", *options]
    with pytest.raises(SystemExit) as exit_info:
        render.main([*args, "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count(named) == 1, error
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        live.main(args)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err

    pipe = render.load_pipeline(saved_pipeline)
    calls = []

    class Counting(type(pipe)):
        def __call__(self, *a, **k):
            calls.append(k)
            return super().__call__(*a, **k)

    pipe.__class__ = Counting
    with pytest.raises(ValueError, match=named.replace("`", ".")):
        render.render_manifest(pipe, manifest, out, render.build_parser().parse_args([*args, "--out", str(out)]))
    assert calls == [] and not out.exists()
