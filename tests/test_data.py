"""`ConversationDataset` over real prepared clips: windows agree with the clip files, histories are left-padded,
randomness is a function of (seed, epoch, index), and bad input is named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echo import clip_format
from echo.audio import frame_rms, window_features
from echo.clip_format import read_video_frames
from echo.data import ConversationDataset, collate_conversations, read_user_frames, track_rms_reference
from echo.masks import FACE_OVAL, LIPS_OUTER, rasterize_masks, reference_token_masks, token_masks_from_landmarks


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def _first_clip(root):
    return sorted(p.parent for p in root.glob("*/meta.json"))[0]


@pytest.fixture(scope="module")
def dataset(data_root):
    return ConversationDataset(
        data_root,
        num_frames=9,
        resolution=64,
        windows_per_clip=3,
        use_user_video=True,
        user_video_size=32,
        use_understanding=True,
        seed=3,
    )


def test_window_matches_the_clip_files(dataset):
    item = dataset[4]
    clip = dataset.clips[4 // 3].path
    start = item["window_start"]
    assert 0 <= start <= 17 - 9

    frames = read_video_frames(clip / "avatar.mp4", range(start, start + 9))
    expected = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # 3, T, H, W (64² stored, no resize)
    torch.testing.assert_close(item["video"], expected)

    w2v = torch.from_numpy(np.load(clip / "avatar_w2v.npy").astype(np.float32))
    full_windows = window_features(w2v[None], radius=2)[0]  # windows over the whole clip
    torch.testing.assert_close(item["avatar_audio"], full_windows[start : start + 9])

    # The RMS over the reference level of the avatar's whole track (here the one clip of its conversation).
    rms = frame_rms(clip_format.read_clip_wav(clip, "avatar"), 17)
    torch.testing.assert_close(item["avatar_rms"], torch.from_numpy(rms[start : start + 9] / track_rms_reference(rms)))
    assert item["lip_mask"].sum() > 0 and (item["lip_mask"] * item["face_mask"]).sum() == 0

    # The user history runs from the clip's first frame to the window end.
    user = np.load(clip / "user_w2v.npy").astype(np.float32)
    torch.testing.assert_close(item["user_audio"], torch.from_numpy(user[: start + 9]))
    assert item["user_video"].shape == (start + 9, 3, 32, 32) and item["user_face_mask"].sum() > 0
    # ... in every stream: the user's own frames 0 … window end (not the avatar's), downsized with antialiasing,
    user_frames = torch.from_numpy(read_video_frames(clip / "user.mp4", range(start + 9))).permute(0, 3, 1, 2)
    expected_user = F.interpolate(user_frames.float() / 127.5 - 1, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(item["user_video"], expected_user.clamp(-1, 1))
    # and the user's face mask from the user's landmarks (64² crop pixels) at 32².
    lip_u, face_u = rasterize_masks(np.load(clip / "user_landmarks.npy")[: start + 9], 32, 32, source_size=(64, 64))
    torch.testing.assert_close(item["user_face_mask"], torch.from_numpy(face_u | lip_u).float())
    avatar_lip, avatar_face = rasterize_masks(
        np.load(clip / "avatar_landmarks.npy")[: start + 9], 32, 32, source_size=(64, 64)
    )
    assert not np.array_equal(face_u | lip_u, avatar_face | avatar_lip)  # the two faces differ, so this can fail


def test_pyav_reader_matches_decord(data_root, monkeypatch):
    clip = _first_clip(data_root)
    decoded = read_video_frames(clip / "avatar.mp4", [0, 5, 16])
    monkeypatch.setitem(__import__("sys").modules, "decord", None)  # `import decord` now raises ImportError
    fallback = read_video_frames(clip / "avatar.mp4", [0, 5, 16])
    assert np.abs(decoded.astype(int) - fallback.astype(int)).max() <= 2


def test_randomness_depends_on_seed_epoch_and_index_only(data_root):
    dataset = ConversationDataset(data_root, num_frames=9, resolution=64, windows_per_clip=3, seed=3)
    first = [dataset[i]["window_start"] for i in range(len(dataset))]
    assert first == [dataset[i]["window_start"] for i in range(len(dataset))]
    dataset.set_epoch(1)
    try:
        second = [dataset[i]["window_start"] for i in range(len(dataset))]
    finally:
        dataset.set_epoch(0)
    assert first != second


def test_reference_frame_is_never_inside_the_window(data_root, tmp_path):
    """The reference is drawn from the avatar's frames outside the target window (at inference it is never a frame of
    the output): over many draws it never lies inside the window, it covers the frames before and after it, it is the
    item's ``reference`` image, and the draws are a pure function of the dataset's seed, epoch and index. A window
    that is its whole clip takes it from another clip of the same conversation and avatar."""
    from echo.encoding import frames_to_tensor

    dataset = ConversationDataset(data_root, num_frames=9, resolution=64, windows_per_clip=8, seed=5)
    clip = dataset.clips[0]
    seen = set()
    for draw in range(400):
        start = draw % (clip.num_frames - 9 + 1)
        record, frame = dataset.draw_reference(clip, start, np.random.default_rng([5, draw]))
        assert record.path == clip.path and not start <= frame < start + 9, (start, frame)
        seen.add((start, frame < start))
    expected = {(s, True) for s in range(1, 9)} | {(s, False) for s in range(0, 8)}  # every side a window has
    assert expected == seen

    def draws(seed):
        other = ConversationDataset(data_root, num_frames=9, resolution=64, windows_per_clip=8, seed=seed)
        return [(other[i]["window_start"], other[i]["reference_frame"]) for i in range(len(other))]

    first = draws(5)
    assert first == draws(5) and first != draws(6)
    for start, frame in first:
        assert not start <= frame < start + 9
    item = dataset[0]
    video = clip_format.read_video_frames(clip.path / clip_format.video_name("avatar"), [item["reference_frame"]])
    torch.testing.assert_close(item["reference"], frames_to_tensor(video, 64)[0], rtol=0, atol=0)

    clips = write_conversation(tmp_path, num_clips=2, clip_frames=9)  # windows of 9 frames are whole clips
    whole = ConversationDataset([clips[1]], num_frames=9, resolution=32, windows_per_clip=4)
    assert {whole[i]["reference_clip"] for i in range(len(whole))} == {clips[0].name}
    lonely = ConversationDataset([clips[1]], num_frames=9, resolution=32)
    lonely._tracks[lonely.clips[0].path] = [lonely.clips[0]]  # no other clip of its track
    with pytest.raises(clip_format.ClipFormatError, match=r"no frame with a face outside the window \[0, 9\)"):
        lonely[0]


def test_collate_left_pads_histories(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    items = sorted(items, key=lambda it: it["user_audio"].shape[0])[:: len(items) - 1]  # shortest and longest
    lengths = [it["user_audio"].shape[0] for it in items]
    assert lengths[0] < lengths[1]
    batch = collate_conversations(items)
    longest = lengths[1]
    assert batch["user_audio"].shape[:2] == (2, longest)
    for row, item in enumerate(items):
        n = item["user_audio"].shape[0]
        assert batch["user_audio_mask"][row].tolist() == [False] * (longest - n) + [True] * n
        torch.testing.assert_close(batch["user_audio"][row, longest - n :], item["user_audio"])
        assert batch["user_audio"][row, : longest - n].abs().sum() == 0
        torch.testing.assert_close(batch["user_video"][row, longest - n :], item["user_video"])
        # understanding tokens are right-padded with their own mask
        k = item["understanding"].shape[0]
        assert batch["understanding_mask"][row].sum() == k
        torch.testing.assert_close(batch["understanding"][row, :k], item["understanding"])
    assert batch["video"].shape == (2, 3, 9, 64, 64) and batch["lip_mask"].shape == (2, 3, 4, 4)
    assert batch["emotion_text"] == [it["emotion_text"] for it in items]


def test_emotion_text_is_the_latest_window_known_at_the_window_end(data_root, tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(_first_clip(data_root), clip)
    """A window reads the text of its reasoning frame (the latest k·stride − 1 at or before its end); an emotion.json
    of an older echo-prep (no stride: 81-frame clip windows) or with windows off its stride is refused."""
    (clip / "emotion.json").write_text(
        json.dumps({"windows": [{"end_frame": 4, "text": "calm"}, {"end_frame": 12, "text": "happy"}]})
    )
    with pytest.raises(clip_format.ClipFormatError, match="older echo-prep.*--emotion-stride"):
        ConversationDataset([clip], num_frames=9, resolution=64)
    clip_format.write_emotion_windows(clip, [{"end_frame": 4, "text": "calm"}, {"end_frame": 12, "text": "x"}], 5)
    with pytest.raises(clip_format.ClipFormatError, match=r"clip frames \[12\].*not reasoning frames k·5 − 1"):
        ConversationDataset([clip], num_frames=9, resolution=64)
    texts = {4: "calm", 9: "happy", 14: "sad"}
    clip_format.write_emotion_windows(clip, [{"end_frame": e, "text": t} for e, t in texts.items()], stride=5)
    dataset = ConversationDataset([clip], num_frames=9, resolution=64, windows_per_clip=8)
    ends = set()
    for index in range(len(dataset)):
        item = dataset[index]
        end = item["window_start"] + 8
        assert item["emotion_text"] == texts[(end + 1) // 5 * 5 - 1], end
        ends.add(end)
    assert len(ends) > 3
    (clip / "emotion.json").unlink()
    assert (
        ConversationDataset([clip], num_frames=9, resolution=64, default_emotion="neutral")[0]["emotion_text"]
        == "neutral"
    )


def test_bad_input_is_named(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        ConversationDataset([tmp_path / "missing_clip"], num_frames=9, resolution=64)
    with pytest.raises(
        ValueError, match=r"every clip is shorter than the training window of num_frames = 21 .* has 17"
    ):
        ConversationDataset(data_root, num_frames=21, resolution=64)
    broken = tmp_path / "broken"
    shutil.copytree(_first_clip(data_root), broken)
    (broken / "avatar_w2v.npy").unlink()
    with pytest.raises(FileNotFoundError, match="avatar_w2v.npy"):
        ConversationDataset([broken], num_frames=9, resolution=64)
    with pytest.raises(FileNotFoundError, match="user_omni.safetensors"):
        shutil.copytree(_first_clip(data_root), tmp_path / "no_omni")
        (tmp_path / "no_omni" / "user_omni.safetensors").unlink()
        ConversationDataset([tmp_path / "no_omni"], num_frames=9, resolution=64, use_understanding=True)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ConversationDataset(data_root, num_frames=8, resolution=64)
    # A malformed meta.json is a ValueError naming the file; a folder without one under a data root is reported.
    root = tmp_path / "root"
    shutil.copytree(_first_clip(data_root), root / "good")
    (root / "not_a_clip").mkdir()
    with pytest.raises(FileNotFoundError, match=r"root.*without 'meta.json'.*not_a_clip"):
        ConversationDataset(root, num_frames=9, resolution=64)
    (root / "not_a_clip").rmdir()
    assert len(ConversationDataset(root, num_frames=9, resolution=64)) == 1
    (root / "good" / "meta.json").write_text('{"num_frames": 17,')
    with pytest.raises(ValueError, match=r"good/meta\.json.*not valid JSON"):
        ConversationDataset(root, num_frames=9, resolution=64)


def test_speech_weights_of_a_prepared_clip_follow_its_voice_activity(data_root):
    """w(i) (Eq. 12) from the `avatar_rms` of a real prepared clip: frames inside the avatar's speech segments
    (transcript VAD) weigh more than frames outside them."""
    from echo.losses import speech_weights

    checked = 0
    for clip in sorted(p.parent for p in data_root.glob("*/meta.json")):
        dataset = ConversationDataset([clip], num_frames=9, resolution=64)
        weights = speech_weights(torch.from_numpy(dataset.avatar_rms(dataset.clips[0]))[None])[0]  # whole clip
        vad = json.loads((clip / "transcript.json").read_text())["vad"]["avatar"]
        times = (torch.arange(17) + 0.5) / 25
        speaking = torch.zeros(17, dtype=torch.bool)
        for start, end in vad:
            speaking |= (times >= start + 0.04) & (times <= end - 0.04)
        silent = torch.ones(17, dtype=torch.bool)
        for start, end in vad:
            silent &= (times < start - 0.04) | (times > end + 0.04)
        if speaking.sum() >= 3 and silent.sum() >= 3:
            assert weights[speaking].mean() > 2 * weights[silent].mean(), (weights, vad)
            checked += 1
    assert checked >= 1


def test_cached_emotion_embeds_are_the_embedding_of_the_window_text(data_root, tmp_path):
    from data_prep.caches import cache_emotion_embeds
    from echo.emotion import EmotionTextEncoder
    from training.testing import save_tiny_text_encoder

    encoder = EmotionTextEncoder.from_pretrained(save_tiny_text_encoder(tmp_path / "text"), max_length=64)
    clips = []
    for source in sorted(p.parent for p in data_root.glob("*/meta.json")):
        clips.append(tmp_path / source.name)
        shutil.copytree(source, clips[-1])
    with pytest.raises(
        FileNotFoundError, match=f"{clips[0].name}.*emotion_embeds.safetensors.*--stages emotion_embeds"
    ):
        ConversationDataset(clips, num_frames=9, resolution=64, use_cached_emotion_embeds=True)
    for clip in clips:
        cache_emotion_embeds(clip, encoder)
    kwargs = dict(num_frames=9, resolution=64, windows_per_clip=4, seed=1)
    by_text = ConversationDataset(clips, **kwargs)
    cached = ConversationDataset(clips, use_cached_emotion_embeds=True, **kwargs)
    items = [cached[i] for i in range(len(cached))]
    assert len({it["emotion_text"] for it in items}) == 2  # both emotion windows are exercised
    for index, item in enumerate(items):
        assert item["emotion_text"] == by_text[index]["emotion_text"]
        torch.testing.assert_close(item["emotion_embeds"], encoder.encode(item["emotion_text"])[0], rtol=0, atol=0)
    batch = collate_conversations(items[:2])
    torch.testing.assert_close(batch["emotion_embeds"], encoder.encode(batch["emotion_text"]), rtol=0, atol=0)
    dropped = ConversationDataset(clips, use_cached_emotion_embeds=True, drop_emotion=True, **kwargs)[0]
    assert dropped["emotion_text"] == ""
    torch.testing.assert_close(dropped["emotion_embeds"], encoder.encode("")[0], rtol=0, atol=0)


def test_cached_user_tokens_are_the_lcu_tokens_of_the_history_frames(data_root, tmp_path):
    """With `use_cached_user_tokens` an item holds, for its history (frames 0 … window end, or the last
    `max_history_frames`), the rows of `encode_user_video` over the whole clip's frames as the frame path reads them;
    collate left-pads them; a missing file or one of another size names the clip folder and the echo-prep command."""
    from diffusers import AutoencoderKLWan

    from data_prep.caches import cache_user_tokens
    from echo.encoding import encode_user_video
    from training.testing import save_tiny_vae

    vae = AutoencoderKLWan.from_pretrained(save_tiny_vae(tmp_path / "vae")).eval()
    clips = []
    for source in sorted(p.parent for p in data_root.glob("*/meta.json")):
        clips.append(tmp_path / source.name)
        shutil.copytree(source, clips[-1])
    kwargs = dict(resolution=64, use_user_video=True, user_video_size=32, seed=3)
    with pytest.raises(FileNotFoundError, match=f"{clips[0].name}.*user_tokens.safetensors.*--stages user_tokens"):
        ConversationDataset(clips, use_cached_user_tokens=True, **kwargs)
    for clip in clips:
        cache_user_tokens(clip, vae, user_video_size=32)
    with pytest.raises(ValueError, match=f"{clips[0].name}.*32.*user_video_size.*is 64.*--user-video-size 64"):
        ConversationDataset(clips, use_cached_user_tokens=True, **{**kwargs, "user_video_size": 64})
    # every frame of the 17-frame clips, read as the dataset reads a history
    whole = [dict(zip(("user_video", "user_face_mask"), read_user_frames(clip, 0, 17, 32, 64))) for clip in clips]
    with torch.no_grad():
        encoded = [
            encode_user_video(vae, whole[i]["user_video"][None], whole[i]["user_face_mask"][None]) for i in (0, 1)
        ]
    for history in (None, 10):
        options = dict(num_frames=9, windows_per_clip=3, max_history_frames=history, **kwargs)
        frames = ConversationDataset(clips, **options)
        cached = ConversationDataset(clips, use_cached_user_tokens=True, **options)
        items = [cached[i] for i in range(len(cached))]
        lengths = {it["user_tokens"].shape[0] for it in items}
        assert len(lengths) > 1 if history is None else max(lengths) == history  # several lengths / truncated
        for index, item in enumerate(items):
            reference, clip = frames[index], index // 3
            stop = item["window_start"] + 9
            rows = slice(0 if history is None else max(0, stop - history), stop)
            assert "user_video" not in item and "user_face_mask" not in item
            # The frame path reads the same frames and masks the cache was encoded from …
            assert torch.equal(reference["user_video"], whole[clip]["user_video"][rows])
            assert torch.equal(reference["user_face_mask"], whole[clip]["user_face_mask"][rows])
            # … and the item holds exactly their rows of the cached encoding.
            tokens, mask = encoded[clip]
            torch.testing.assert_close(item["user_tokens"], tokens[0, rows], rtol=0, atol=0)
            torch.testing.assert_close(item["user_token_mask"], mask[0, rows], rtol=0, atol=0)
            # Encoding the shorter history alone differs only by the VAE's batch-size-dependent float rounding.
            with torch.no_grad():
                alone, alone_mask = encode_user_video(
                    vae, reference["user_video"][None], reference["user_face_mask"][None]
                )
            torch.testing.assert_close(item["user_tokens"], alone[0])
            torch.testing.assert_close(item["user_token_mask"], alone_mask[0], rtol=0, atol=0)
        if history is None:
            by_length = {it["user_tokens"].shape[0]: it for it in items}
    short, long = by_length[min(by_length)], by_length[max(by_length)]
    batch = collate_conversations([short, long])
    pad = long["user_tokens"].shape[0] - short["user_tokens"].shape[0]
    assert torch.equal(batch["user_tokens"][0, pad:], short["user_tokens"]) and not batch["user_tokens"][0, :pad].any()
    assert torch.equal(batch["user_token_mask"][1], long["user_token_mask"])
    assert torch.equal(batch["user_audio_mask"][0], torch.arange(long["user_tokens"].shape[0]) >= pad)


# ----------------------------------------------------------------------------------------------------------------
# Conversations of several clips (defects 2-5 and 8 of issue 10), written through `echo.clip_format`
# ----------------------------------------------------------------------------------------------------------------


def _face_landmarks(cx: float, cy: float, radius: float) -> np.ndarray:
    """`(478, 2)` points: a round face oval and a lip ring below its centre (the rings `echo.masks` rasterises)."""
    points = np.tile(np.float32([cx, cy]), (478, 1))
    angle = np.linspace(0, 2 * np.pi, len(FACE_OVAL), endpoint=False)
    points[list(FACE_OVAL)] = np.stack([cx + radius * np.sin(angle), cy - radius * np.cos(angle)], axis=1)
    angle = np.linspace(0, 2 * np.pi, len(LIPS_OUTER), endpoint=False)
    lips = np.stack([cx + 0.4 * radius * np.cos(angle), cy + 0.5 * radius + 0.12 * radius * np.sin(angle)], axis=1)
    points[list(LIPS_OUTER)] = lips
    return points


def write_conversation(
    root,
    num_clips=6,
    clip_frames=250,
    size=32,
    avatar_audio=None,
    user_audio=None,
    seed=0,
    conversation="conv",
    avatar="A",
    user="B",
):
    """Clip folders ``<conversation>_<avatar>_c<k>`` of one conversation in echo-prep's format, small and fast:
    ``size``² videos whose frames change every frame, user wav2vec2 rows holding their conversation frame index
    (``user_w2v[t, 0, 0] = start_frame + t``), a face whose landmarks move from frame to frame, and the given audio
    (``avatar_audio(k)`` / ``user_audio(k)`` → ``clip_frames·640`` samples; quiet noise by default)."""
    from data_prep.media import write_video

    rng = np.random.default_rng(seed)
    spf = 16_000 // 25
    clips = []
    for k in range(num_clips):
        start = k * clip_frames
        folder = root / clip_format.clip_id(conversation, avatar, k)
        folder.mkdir(parents=True)
        frames = np.arange(start, start + clip_frames)
        for role in ("avatar", "user"):
            video = rng.integers(0, 256, (clip_frames, size // 4, size // 4, 3), dtype=np.uint8)
            write_video(folder / clip_format.video_name(role), video.repeat(4, axis=1).repeat(4, axis=2))
            make = avatar_audio if role == "avatar" else user_audio
            wave = make(k) if make is not None else rng.normal(0, 0.002, clip_frames * spf)
            clip_format.write_wav(folder / clip_format.wav_name(role), wave)
            w2v = rng.normal(size=(clip_frames, 2, 4)).astype(np.float16)
            if role == "user":
                w2v[:, 0, 0] = frames
            clip_format.write_w2v(folder, role, w2v)
            sway = 0.08 * size * np.sin(frames / 3.0 + (role == "user"))
            clip_format.write_landmarks(
                folder, role, np.stack([_face_landmarks(size / 2 + s, size / 2, 0.3 * size) for s in sway])
            )
        clip_format.write_meta(
            folder,
            {
                "clip_id": folder.name,
                "source": {"layout": "pairs", "conversation": conversation},
                "fps": 25,
                "num_frames": clip_frames,
                "sample_rate": 16_000,
                "size": size,
                "avatar": {"participant": avatar},
                "user": {"participant": user},
                "start_frame": start,
            },
        )
        clips.append(folder)
    return clips


@pytest.fixture(scope="module")
def long_conversation(tmp_path_factory):
    """A 60 s conversation: 6 clips of 10 s (250 frames at 25 fps), 32² pixels."""
    return write_conversation(tmp_path_factory.mktemp("long"), num_clips=6, clip_frames=250)


def test_user_history_starts_at_the_conversation_start_across_clips(long_conversation):
    """Defect 4: a window late in a 60 s conversation of 10 s clips gets the user's history from the conversation's
    start (more than 10 s), row for row, and `max_history_frames` cuts it across clip boundaries."""
    root = long_conversation[0].parent
    last = ConversationDataset([long_conversation[-1]], num_frames=9, resolution=32, windows_per_clip=3, seed=1)
    for index in range(len(last)):
        item = last[index]
        stop = 5 * 250 + item["window_start"] + 9  # conversation frames
        assert item["conversation_frame"] == stop - 9
        assert item["user_audio"].shape[0] == stop > 250  # more than the clip's 10 s
        assert item["user_audio"][:, 0, 0].tolist() == list(range(stop))  # every frame once, in order
    cut = ConversationDataset(root, num_frames=9, resolution=32, max_history_frames=400, seed=2)
    for index in range(len(cut)):
        item = cut[index]
        stop = item["conversation_frame"] + 9
        assert item["user_audio"][:, 0, 0].tolist() == list(range(max(0, stop - 400), stop))
    # The user's frames and face masks follow the same rows, read from each clip they come from.
    video = ConversationDataset(
        [long_conversation[2]],
        num_frames=9,
        resolution=32,
        use_user_video=True,
        user_video_size=16,
        max_history_frames=300,
        seed=3,
    )[0]
    stop = video["conversation_frame"] + 9
    expected = []
    for clip in long_conversation[:3]:
        start = 250 * long_conversation.index(clip)
        rows = [t - start for t in range(stop - 300, stop) if start <= t < start + 250]
        if rows:
            expected.append(clip_format.read_video_frames(clip / "user.mp4", rows))
    expected = torch.from_numpy(np.concatenate(expected)).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = F.interpolate(expected, size=(16, 16), mode="bilinear", antialias=True).clamp(-1, 1)
    assert video["user_video"].shape == (300, 3, 16, 16) and video["user_face_mask"].shape == (300, 16, 16)
    torch.testing.assert_close(video["user_video"], expected)


def test_a_missing_clip_cuts_the_history_at_the_gap(long_conversation, tmp_path):
    for k in (0, 2, 3):
        shutil.copytree(long_conversation[k], tmp_path / long_conversation[k].name)
    item = ConversationDataset([tmp_path / long_conversation[3].name], num_frames=9, resolution=32, seed=0)[0]
    stop = item["conversation_frame"] + 9
    assert item["user_audio"][:, 0, 0].tolist() == list(range(500, stop))  # clip 1 is missing: from clip 2's start


@pytest.fixture(scope="module")
def speech_and_silence(tmp_path_factory):
    """A conversation whose avatar speaks (espeak-ng) in clips 0 and 2 and only listens (microphone noise) in 1 and 3."""
    from synthetic.conversations import synthesize_speech

    speech = synthesize_speech("Hello there, how are you doing today? I am fine, thanks.")
    rng = np.random.default_rng(5)

    def avatar(k):
        wave = rng.normal(0, 0.002, 100 * 640).astype(np.float32)
        if k % 2 == 0:
            wave[: min(len(speech), len(wave))] += speech[: len(wave)]
        return wave

    return write_conversation(tmp_path_factory.mktemp("speech"), num_clips=4, clip_frames=100, avatar_audio=avatar)


def test_speech_weights_of_a_listening_window_are_at_the_floor(speech_and_silence):
    """Defect 2: `avatar_rms` is normalised over the avatar's whole track, so w(i) of a window of pure listening (mic
    noise only) stays at the floor while speaking frames weigh ≈ 1; per-window normalisation gave the noise ≈ 1."""
    from echo.losses import speech_weights

    floor = 0.1
    kwargs = dict(num_frames=33, resolution=32, windows_per_clip=4, seed=0)
    for clip in speech_and_silence[1::2]:  # listening clips
        dataset = ConversationDataset([clip], **kwargs)
        for index in range(len(dataset)):
            weights = speech_weights(dataset[index]["avatar_rms"][None], floor)
            assert weights.max() < floor + 0.02, weights
    speaking = ConversationDataset([speech_and_silence[0]], **kwargs)
    best = max(speech_weights(speaking[i]["avatar_rms"][None], floor).max() for i in range(len(speaking)))
    assert best > 0.95
    item = speaking[0]
    loud = item["avatar_rms"] > 0.5
    assert loud.sum() >= 5 and speech_weights(item["avatar_rms"][None], floor)[0, loud].min() > 0.5


def test_masks_are_the_reference_frame_masks_for_every_latent_frame(data_root):
    """Defect 5: SDCM's masks of an item are `reference_token_masks` of its reference frame's landmarks (the pipeline's
    rule), the same for every latent frame, not the masks of the target frames."""
    dataset = ConversationDataset(data_root, num_frames=9, resolution=64, token_patch=8, windows_per_clip=4, seed=7)
    moved = 0
    for index in range(len(dataset)):
        item = dataset[index]
        clip = dataset.clips[index // 4].path
        landmarks = np.load(clip / "avatar_landmarks.npy")
        reference = item["reference_frame"]
        frame = read_video_frames(clip / "avatar.mp4", [reference])[0]
        torch.testing.assert_close(item["reference"], torch.from_numpy(frame).permute(2, 0, 1).float() / 127.5 - 1)
        lip, face = reference_token_masks(landmarks[reference], 64, 64, 3, source_size=(64, 64), patch_size=(8, 8))
        assert torch.equal(item["lip_mask"], lip) and torch.equal(item["face_mask"], face)
        assert all(torch.equal(item["lip_mask"][0], m) for m in item["lip_mask"])
        start = item["window_start"]
        target = token_masks_from_landmarks(landmarks[start : start + 9], 64, 64, patch_size=(8, 8))
        moved += not (torch.equal(target[0], lip) and torch.equal(target[1], face))
    assert moved > 0  # the target frames' masks differ from the reference's: the check can fail


def test_emotion_before_the_first_window_is_the_default(data_root, tmp_path):
    """Defect 8: a window ending before the first emotion window gets `default_emotion`, not the first window's text
    (reasoned from later dialogue)."""
    clip = tmp_path / "clip"
    shutil.copytree(_first_clip(data_root), clip)
    clip_format.write_emotion_windows(clip, [{"end_frame": 12, "text": "happy"}], stride=13)
    dataset = ConversationDataset([clip], num_frames=9, resolution=64, windows_per_clip=8, default_emotion="neutral")
    assert dataset.emotion_stride == 13
    ends = set()
    for index in range(len(dataset)):
        item = dataset[index]
        end = item["window_start"] + 8
        ends.add(end >= 12)
        assert item["emotion_text"] == ("happy" if end >= 12 else "neutral"), end
    assert ends == {True, False}
    assert clip_format.emotion_text_at([{"end_frame": 5, "text": "a"}, {"end_frame": 9, "text": "b"}], 4, "d") == "d"


def test_emotion_and_understanding_carry_over_from_earlier_clips(tmp_path):
    """Across clips of one conversation, a window early in clip k gets the latest emotion text and understanding
    entry of the earlier clips (their end frames precede it), never a later one."""
    clips = write_conversation(tmp_path, num_clips=2, clip_frames=20, size=32)
    clip_format.write_emotion_windows(
        clips[0], [{"end_frame": 9, "text": "calm"}, {"end_frame": 19, "text": "sad"}], stride=10
    )
    clip_format.write_emotion_windows(
        clips[1], [{"end_frame": 9, "text": "happy"}, {"end_frame": 19, "text": "glad"}], stride=10
    )  # conversation frames 29 and 39
    tokens = [torch.full((2, 3), float(e)) for e in (9, 19)]
    clip_format.write_understanding(clips[0], [9, 19], tokens, stride=10)
    clip_format.write_understanding(clips[1], [9, 19], [torch.full((3, 3), 29.0), torch.full((1, 3), 39.0)], stride=10)
    dataset = ConversationDataset([clips[1]], num_frames=9, resolution=32, windows_per_clip=40, use_understanding=True)
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        end = item["conversation_frame"] + 8  # 28 … 39
        assert item["emotion_text"] == ("sad" if end < 29 else "happy" if end < 39 else "glad"), end
        entry = max(e for e in (9, 19, 29, 39) if e <= end)
        assert item["understanding"].shape[0] == {9: 2, 19: 2, 29: 3, 39: 1}[entry]
        assert (item["understanding"] == entry).all()
        seen.add(entry)
    assert seen == {19, 29, 39}
    early = ConversationDataset([clips[0]], num_frames=9, resolution=32, windows_per_clip=40, use_understanding=True)
    items = [early[i] for i in range(len(early))]
    assert {it["understanding"].shape[0] for it in items if it["window_start"] + 8 < 9} == {0}  # nothing known yet
    batch = collate_conversations(items)
    for row, item in enumerate(items):
        assert batch["understanding_mask"][row].sum() == item["understanding"].shape[0]
    assert batch["understanding"].shape[1] >= 1


def test_understanding_of_a_window_is_phi_of_the_media_up_to_its_end(tmp_path):
    """Defect 3: the omni cache holds Φ per stride of the conversation, each on the user's frames and audio from the
    conversation's start to the entry's end (across clips); a window gets the latest entry ending at or before its
    last frame, exactly what the pipeline's `understanding_model(frames[:stop], audio[:stop·640])` gives there."""
    from data_prep.caches import cache_omni
    from echo.understanding import OmniUnderstanding
    from tests.test_understanding import build_omni_folder

    build_omni_folder(tmp_path / "omni")
    thinker = OmniUnderstanding.from_pretrained(tmp_path / "omni", max_frames=6)
    rng = np.random.default_rng(0)
    clips = write_conversation(
        tmp_path / "data", num_clips=3, clip_frames=12, size=32, user_audio=lambda k: rng.normal(0, 0.1, 12 * 640)
    )
    for clip in clips:
        cache_omni(clip, thinker, stride=8)
    frames = np.concatenate([read_video_frames(c / "user.mp4", range(12)) for c in clips])  # the conversation
    audio = np.concatenate([clip_format.read_clip_wav(c, "user") for c in clips])
    assert [clip_format.read_understanding_index(c, 12).end_frames.tolist() for c in clips] == [[7], [3, 11], [7]]
    dataset = ConversationDataset(
        clips, num_frames=5, resolution=32, windows_per_clip=6, use_understanding=True, seed=4
    )
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        end = item["conversation_frame"] + 4
        known = [e for e in (7, 15, 23, 31) if e <= end]
        if not known:
            assert item["understanding"].shape == (0, thinker.hidden_size)
            continue
        entry = known[-1]
        seen.add(entry)
        expected = thinker(frames[: entry + 1], audio[: (entry + 1) * 640])
        torch.testing.assert_close(item["understanding"], expected, rtol=0, atol=0)
    assert len(seen) >= 3 and max(seen) > 11  # several entries, and histories longer than a clip
    whole_clip = thinker(frames[24:36], audio[24 * 640 : 36 * 640])  # the old cache: Φ of the whole clip
    assert not any(
        dataset[i]["understanding"].shape == whole_clip.shape and torch.equal(dataset[i]["understanding"], whole_clip)
        for i in range(len(dataset))
    )


def test_a_short_last_clip_is_history_but_no_window_source(tmp_path):
    """echo-prep keeps a short last clip (>= 1 s): it cannot hold a window, so it gives none, while a later clip's
    window still reads the user's history through it."""
    clips = write_conversation(tmp_path, num_clips=3, clip_frames=30, size=32)
    import json

    meta = json.loads((clips[1] / "meta.json").read_text())
    for role in ("avatar", "user"):  # cut the middle clip to 8 frames
        clip_format.write_w2v(clips[1], role, np.load(clips[1] / f"{role}_w2v.npy")[:8])
        clip_format.write_landmarks(clips[1], role, np.load(clips[1] / f"{role}_landmarks.npy")[:8])
    clip_format.write_meta(clips[1], {**meta, "num_frames": 8})
    for k in (2,):  # the clip after it starts where the short one ends: the history stays contiguous
        later = json.loads((clips[k] / "meta.json").read_text())
        clip_format.write_meta(clips[k], {**later, "start_frame": 38})
    dataset = ConversationDataset(tmp_path, num_frames=9, resolution=32, windows_per_clip=2, seed=0)
    assert [c.path for c in dataset.clips] == [clips[0], clips[2]] and dataset.short_clips == [clips[1]]
    item = dataset[3]
    stop = 38 + item["window_start"] + 9
    rows = item["user_audio"][:, 0, 0].tolist()
    assert rows[:38] == list(range(30)) + list(range(30, 38)) and len(rows) == stop
