"""`ConversationDataset` over real prepared clips: windows agree with the clip files, histories are left-padded,
randomness is a function of (seed, epoch, index), and bad input is named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echo.audio import frame_rms, window_features
from echo.data import ConversationDataset, _read_wav, collate_conversations, read_video_frames
from echo.masks import rasterize_masks, token_masks_from_landmarks


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


def _first_clip(root):
    return sorted(p.parent for p in root.glob("*/meta.json"))[0]


@pytest.fixture(scope="module")
def dataset(data_root):
    return ConversationDataset(
        data_root, num_frames=9, resolution=64, windows_per_clip=3, use_user_video=True, user_video_size=32,
        use_understanding=True, seed=3,
    )  # fmt: skip


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

    rms = frame_rms(_read_wav(clip / "avatar.wav"), 17)[start : start + 9]
    torch.testing.assert_close(item["avatar_rms"], torch.from_numpy(rms))

    lip, face = token_masks_from_landmarks(np.load(clip / "avatar_landmarks.npy")[start : start + 9], 64, 64)
    torch.testing.assert_close(item["lip_mask"], lip)
    torch.testing.assert_close(item["face_mask"], face)
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
    (clip / "emotion.json").write_text(
        json.dumps({"windows": [{"end_frame": 4, "text": "calm"}, {"end_frame": 12, "text": "happy"}]})
    )
    dataset = ConversationDataset([clip], num_frames=9, resolution=64, windows_per_clip=8)
    for index in range(len(dataset)):
        item = dataset[index]
        end = item["window_start"] + 8
        assert item["emotion_text"] == ("happy" if end >= 12 else "calm")
    (clip / "emotion.json").unlink()
    assert ConversationDataset([clip], num_frames=9, resolution=64, default_emotion="neutral")[0]["emotion_text"] == "neutral"


def test_cached_latents_are_sliced_on_latent_frame_boundaries(data_root, tmp_path):
    from safetensors.torch import save_file

    clip = tmp_path / "clip"
    shutil.copytree(_first_clip(data_root), clip)
    latents = torch.arange(5, dtype=torch.float32).view(1, 5, 1, 1).expand(16, 5, 8, 8).contiguous()  # F_all = 5
    save_file({"latents": latents}, str(clip / "avatar_latents.safetensors"))
    dataset = ConversationDataset([clip], num_frames=9, resolution=64, windows_per_clip=6, use_cached_latents=True)
    for index in range(len(dataset)):
        item = dataset[index]
        start = item["window_start"]
        assert start % 4 == 0
        assert item["latents"][0, :, 0, 0].tolist() == [start // 4 + j for j in range(3)]


def test_bad_input_is_named(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        ConversationDataset([tmp_path / "missing_clip"], num_frames=9, resolution=64)
    with pytest.raises(ValueError, match=r"has 17 frames, shorter than the training window of num_frames = 21"):
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


def test_speech_weights_of_a_prepared_clip_follow_its_voice_activity(data_root):
    """w(i) (Eq. 12) from the `avatar_rms` of a real prepared clip: frames inside the avatar's speech segments
    (transcript VAD) weigh more than frames outside them."""
    from echo.losses import speech_weights

    checked = 0
    for clip in sorted(p.parent for p in data_root.glob("*/meta.json")):
        dataset = ConversationDataset([clip], num_frames=17, resolution=64)
        weights = speech_weights(dataset[0]["avatar_rms"][None])[0]
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
    with pytest.raises(FileNotFoundError, match=f"{clips[0].name}.*emotion_embeds.safetensors.*--stages emotion_embeds"):
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
    whole = ConversationDataset(clips, num_frames=17, **kwargs)  # 17-frame clips: one window, the whole clip
    with torch.no_grad():
        encoded = [encode_user_video(vae, whole[i]["user_video"][None], whole[i]["user_face_mask"][None]) for i in (0, 1)]
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
                alone, alone_mask = encode_user_video(vae, reference["user_video"][None], reference["user_face_mask"][None])
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
