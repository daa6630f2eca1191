"""Training and inference build the same inputs: for one prepared clip and one window, the tensors `EchoPipeline` feeds
the generator and the LCU equal exactly those the training step feeds, for a first chunk (reference) and a
continuation chunk (reference + motion frames). Also the training step's own conditions: continuation windows keep the
reference (Eq. 1) and f_ref sees the condition dropout of the adapted model (Eq. 12).

Both paths share the same modules (tiny, from configs/models/tiny.yaml, whose settings match
configs/train/tiny_stage2.yaml: 64², 9-frame windows, 1 motion frame, 32² user frames). Inputs are captured with
forward pre-hooks on the generator and the LCU. The pipeline is driven with what the clip folder holds: the window's
reference frame and its landmarks, the avatar's and user's wav2vec2 rows, the user's frames and landmarks, the
window's understanding tokens and emotion text. The chunk schedule of a 17-frame conversation with 9-frame chunks and 1
motion frame is [0, 9), [8, 17): the dataset windows starting at frames 0 and 8 are those chunks.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from echo import clip_format
from echo.data import ConversationDataset, collate_conversations
from echo.encoding import PromptEncoder, encode_latents
from pipelines import EchoPipeline
from tests.tiny_models import tiny_components_as_trained, wan_i2v_condition
from training.config import load_config
from training.modeling import EchoTrainingModule, TrainingModels
from training.step import step_generator, training_step

ROOT = Path(__file__).resolve().parents[1]
STAGE2 = ROOT / "configs" / "train" / "tiny_stage2.yaml"
CHUNKS = [(0, 9), (8, 17)]  # chunk_schedule(17, 9, 1)

GENERATOR_INPUTS = (
    "encoder_hidden_states",
    "condition",
    "audio_embeds",
    "lip_mask",
    "face_mask",
    "context_embeds",
    "context_mask",
)
LCU_INPUTS = (
    "user_audio",
    "clip_frames",
    "user_audio_mask",
    "user_video",
    "user_face_mask",
    "understanding",
    "understanding_mask",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from training.testing import make_tiny_training_set

    # The session's base folder is shared by every test module, so the set is prepared once per run.
    return make_tiny_training_set(tmp_path_factory.getbasetemp() / "echo_tiny_training", num_frames=17)


@pytest.fixture(scope="module")
def components():
    # ECHO additions acting as after training, so the audio and user streams change the generator's features
    components = tiny_components_as_trained()
    return components


@pytest.fixture(scope="module")
def windows(data_root):
    """Dataset items of the first clip whose windows are the pipeline's chunks [0, 9) and [8, 17)."""
    clip = sorted(p.parent for p in Path(data_root).glob("*/meta.json"))[0]
    dataset = ConversationDataset(
        clip, num_frames=9, resolution=64, use_user_video=True, user_video_size=32, use_understanding=True
    )
    assert dataset.clips[0].num_frames == 17
    found = {}
    for epoch in range(200):
        dataset.set_epoch(epoch)
        item = dataset[0]
        found.setdefault(item["window_start"], item)
        if all(start in found for start, _ in CHUNKS):
            return clip, [found[start] for start, _ in CHUNKS]
    raise AssertionError(f"no windows starting at {[s for s, _ in CHUNKS]} in 200 epochs: {sorted(found)}")


def _config(data_root, *overrides):
    config = load_config(STAGE2, ["model.stage1_dir=unused", f"data.root={data_root}", *overrides])
    assert (config.data.num_frames, config.data.resolution, config.data.user_video_size) == (9, 64, 32)
    return config


def _models(components, ref_transformer=None) -> TrainingModels:
    return TrainingModels(
        module=EchoTrainingModule(components["transformer"], components["context_encoder"]),
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        ref_transformer=ref_transformer,
        scheduler=components["scheduler"],
        adapter_name="stage2",
        trainable_pattern="",
    )


class Capture:
    """Forward pre-hooks on the generator and the LCU: the named inputs of every call, by name."""

    def __init__(self, transformer, lcu, chunk_of=lambda: None):
        self.generator, self.lcu, self.chunk_of = [], [], chunk_of
        self.handles = [
            transformer.register_forward_pre_hook(self._generator, with_kwargs=True),
            lcu.register_forward_pre_hook(self._lcu, with_kwargs=True),
        ]

    def _generator(self, module, args, kwargs):
        named = dict(zip(("hidden_states", "timestep", "encoder_hidden_states"), args), **kwargs)
        self.generator.append((self.chunk_of(), {k: _clone(named.get(k)) for k in GENERATOR_INPUTS}))

    def _lcu(self, module, args, kwargs):
        named = dict(zip(("user_audio", "clip_frames"), args), **kwargs)
        self.lcu.append((self.chunk_of(), {k: _clone(named.get(k)) for k in LCU_INPUTS}))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _clone(value):
    return value.detach().clone() if torch.is_tensor(value) else value


def _assert_identical(pipeline: dict, training: dict, what: str):
    assert pipeline.keys() == training.keys()
    for name in pipeline:
        a, b = pipeline[name], training[name]
        if torch.is_tensor(a) or torch.is_tensor(b):
            assert torch.is_tensor(a) and torch.is_tensor(b), f"{what} `{name}`: {type(a)} vs {type(b)}"
            assert a.dtype == b.dtype and a.shape == b.shape, (
                f"{what} `{name}`: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
            )
            assert torch.equal(a, b), f"{what} `{name}` differs by up to {(a.float() - b.float()).abs().max():.3g}"
        else:
            assert a == b, f"{what} `{name}`: {a!r} vs {b!r}"


def _pipeline_inputs(pipe, clip, item, motion_frames_video, chunk):
    """Render the 17-frame conversation with the item's reference and the clip's own streams; returns the inputs the
    generator's and the LCU's first call of chunk ``chunk`` got. The first chunk's decoded frames are pinned to the
    ground truth, so a continuation chunk's motion frames are the real frames 8 (what a training window starts with)."""
    pipe.decode_latents = lambda latents: motion_frames_video
    landmarks = clip_format.read_landmarks(clip, "avatar")
    emotion = [item["emotion_text"]] * len(CHUNKS)
    understanding = [item["understanding"]] * len(CHUNKS)
    with Capture(pipe.transformer, pipe.context_encoder, lambda: pipe.current_chunk) as capture:
        pipe(
            reference_image=item["reference"],  # (3, 64, 64) in [-1, 1], as the dataset gives it
            reference_landmarks=landmarks[item["reference_frame"]],  # pixels of the 64² crop
            avatar_audio_features=clip_format.read_w2v(clip, "avatar"),
            user_video=clip_format.read_video_frames(clip / clip_format.video_name("user"), range(17)),
            user_audio_features=clip_format.read_w2v(clip, "user"),
            user_landmarks=clip_format.read_landmarks(clip, "user"),
            understanding=understanding,
            emotion=emotion,
            num_frames=17,
            num_inference_steps=1,
            audio_guidance_scale=1.0,  # one generator pass per step: the full-condition one
            user_guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            frame_inputs=False,  # the clip's frames already are echo-prep's head crops
        )
    generator_calls = [inputs for c, inputs in capture.generator if c == chunk]
    lcu_calls = [inputs for c, inputs in capture.lcu if c == chunk]
    return generator_calls[0], lcu_calls[0]


def _training_inputs(components, data_root, item, *overrides):
    config = _config(data_root, *overrides)
    models = _models(components)
    prompt_encoder = PromptEncoder(components["text_encoder"], components["tokenizer"], config.data.max_sequence_length)
    batch = collate_conversations([item])
    with Capture(components["transformer"], components["context_encoder"]) as capture:
        training_step(
            models,
            models.module,
            batch,
            config,
            prompt_encoder,
            step_generator(0, 0, 0),
            torch.device("cpu"),
            torch.float32,
        )
    (generator_inputs,), (lcu_inputs,) = [c[1] for c in capture.generator], [c[1] for c in capture.lcu]
    return generator_inputs, lcu_inputs


@pytest.mark.parametrize("chunk", [0, 1], ids=["first_chunk", "continuation_chunk"])
def test_parity_pipeline_and_training_step_feed_identical_inputs(components, data_root, windows, chunk):
    clip, items = windows
    item = items[chunk]
    assert item["window_start"] == CHUNKS[chunk][0]
    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.settings.motion_frames == 1 and pipe.settings.num_frames_per_chunk == 9
    first_window = items[0]["video"][None]  # 1, 3, 9, 64, 64: ground-truth frames 0-8
    pipeline_generator, pipeline_lcu = _pipeline_inputs(pipe, clip, item, first_window, chunk)
    # A first-chunk window is never a continuation; a continuation window always is (loss.motion_prob).
    motion_prob = "loss.motion_prob=1.0" if chunk else "loss.motion_prob=0.0"
    training_generator, training_lcu = _training_inputs(components, data_root, item, motion_prob)

    _assert_identical(pipeline_lcu, training_lcu, "LCU input")
    _assert_identical(pipeline_generator, training_generator, "generator input")
    # The comparison is not vacuous: the streams are there and informative.
    condition = training_generator["condition"]
    assert condition.shape == (1, 36, 3, 8, 8) and condition[:, 20:].abs().max() > 0.1
    # one given latent frame: the reference (first chunk) or the one motion frame (continuation), the reference plane
    assert condition[:, :4, :1].eq(1).all() and not condition[:, :4, 1:].any()
    given_is_reference = torch.equal(condition[:, 4:20, :1], condition[:, 20:, :1])
    assert given_is_reference == (chunk == 0)
    # [mask, given latents] is Wan I2V's condition (diffusers' `WanImageToVideoPipeline.prepare_latents`) of the given
    # frame, bit for bit: the reference image in a first chunk, the one motion frame (frame 8) in a continuation.
    given_frame = item["reference"][None] if chunk == 0 else first_window[:, :, -1]
    wan_condition = wan_i2v_condition(components["vae"], given_frame, 9)
    torch.testing.assert_close(condition[:, :20], wan_condition, rtol=0, atol=0)
    assert condition[:, 4:20, 1:].abs().max() > 0.1  # the frames after the given one: encoded zero frames, not zeros
    assert training_generator["lip_mask"].any() and training_generator["face_mask"].any()
    assert training_lcu["user_video"].shape[:2] == (1, CHUNKS[chunk][1]) and training_lcu["clip_frames"] == 9
    assert training_lcu["user_face_mask"].any()


def test_training_continuation_window_is_conditioned_on_the_reference_and_the_motion_frames(
    components, data_root, windows
):
    """Eq. 1 in training: a continuation window's condition holds the latents of its first frame (the motion frame)
    at latent frame 0, followed by Wan I2V's encoding of zero frames after it, and the reference frame's latent in
    the reference plane at every latent frame."""
    _, items = windows
    item = items[1]
    generator_inputs, _ = _training_inputs(components, data_root, item, "loss.motion_prob=1.0")
    condition = generator_inputs["condition"]
    vae = components["vae"]
    reference = encode_latents(vae, item["reference"][None, :, None])  # 1, 16, 1, 8, 8
    motion = encode_latents(vae, item["video"][None, :, :1])  # 1, 16, 1, 8, 8
    assert (reference - motion).abs().max() > 1e-2  # the two are told apart (atol 0 below)
    torch.testing.assert_close(condition[:, 20:], reference.expand(-1, -1, 3, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(condition[:, 4:20, :1], motion, rtol=0, atol=0)
    condition_video = torch.cat([item["video"][None, :, :1], torch.zeros(1, 3, 8, 64, 64)], 2)
    torch.testing.assert_close(condition[:, 4:20], encode_latents(vae, condition_video), rtol=0, atol=0)
    assert condition[:, :4, 0].eq(1).all() and not condition[:, :4, 1:].any()


def test_f_ref_sees_the_condition_dropout_of_the_adapted_model(components, data_root, windows):
    """Eq. 12: with every sample's audio dropped (`loss.audio_drop_prob = 1`), the frozen f_ref computes with the
    audio dropped too, exactly as the adapted generator does; its features equal f_ref's without any audio."""
    _, items = windows
    ref_transformer = copy.deepcopy(components["transformer"]).requires_grad_(False).eval()
    models = _models(components, ref_transformer=ref_transformer)
    config = _config(data_root, "loss.audio_drop_prob=1.0", "loss.align_weight=1.0", "loss.align_blocks=2")
    prompt_encoder = PromptEncoder(components["text_encoder"], components["tokenizer"], config.data.max_sequence_length)
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((args, dict(kwargs), {i: f.clone() for i, f in output.block_features.items()}))

    handle = ref_transformer.register_forward_hook(capture, with_kwargs=True)
    try:
        batch = collate_conversations([items[0]])
        training_step(
            models,
            models.module,
            batch,
            config,
            prompt_encoder,
            step_generator(0, 0, 0),
            torch.device("cpu"),
            torch.float32,
        )
    finally:
        handle.remove()
    ((args, kwargs, features),) = calls
    assert kwargs["audio_mask"] is not None and not kwargs["audio_mask"].any()
    with torch.no_grad():
        without_audio = ref_transformer(*args, **{**kwargs, "audio_embeds": None, "audio_mask": None})
        with_audio = ref_transformer(*args, **{**kwargs, "audio_mask": None})
    for index, feature in features.items():
        torch.testing.assert_close(feature, without_audio.block_features[index], rtol=0, atol=1e-6)
    assert any((f - with_audio.block_features[i]).abs().max() > 1e-4 for i, f in features.items())


def test_f_ref_sees_the_stage1_inputs_the_empty_prompt(components, data_root, windows):
    """Stage 2's f_ref is the stage-1 generator, trained only on the empty prompt (`ablation.use_emotion: false` in
    every stage-1 config): it reads the embedding of "" while the adapted generator reads the window's emotion text;
    with cached embeddings, the batch's cached embedding of ""."""
    from training.step import stage1_prompt_embeds

    _, items = windows
    item = items[1]
    assert item["emotion_text"] not in ("", None)
    ref_transformer = copy.deepcopy(components["transformer"]).requires_grad_(False).eval()
    models = _models(components, ref_transformer=ref_transformer)
    config = _config(data_root, "loss.align_weight=1.0", "loss.align_blocks=2")
    assert config.ablation.use_emotion
    prompt_encoder = PromptEncoder(components["text_encoder"], components["tokenizer"], config.data.max_sequence_length)
    texts = []
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: texts.append((name, args[2].clone())), with_kwargs=True
        )
        for name, module in (("f_ref", ref_transformer), ("generator", components["transformer"]))
    ]
    try:
        training_step(
            models,
            models.module,
            collate_conversations([item]),
            config,
            prompt_encoder,
            step_generator(0, 0, 0),
            torch.device("cpu"),
            torch.float32,
        )
    finally:
        for handle in handles:
            handle.remove()
    seen = dict(texts)
    empty, emotion = prompt_encoder([""]), prompt_encoder([item["emotion_text"]])
    torch.testing.assert_close(seen["f_ref"], empty, rtol=0, atol=0)
    torch.testing.assert_close(seen["generator"], emotion, rtol=0, atol=0)
    assert (empty - emotion).abs().max() > 1e-3
    cached = torch.randn(2, 7, 32)
    torch.testing.assert_close(
        stage1_prompt_embeds({"empty_embeds": cached}, None, 2, torch.device("cpu"), torch.float32), cached
    )


def test_parity_avatar_audio_windows_read_across_clip_boundaries(components, tmp_path_factory):
    """One rule for the avatar's ±2 audio windows: a training window at a clip's edge reads the neighbouring clip's
    rows (clamped only at the conversation's edges), exactly the windows the pipeline gives the generator for the same
    frames of the conversation. Conversation of 80 frames in clips of 18; the window is frames 8-16 of clip 0, the
    pipeline's chunk [8, 17) (9-frame chunks, 1 motion frame)."""
    from data_prep.testing import make_tiny_conversation_clips

    root = make_tiny_conversation_clips(tmp_path_factory.getbasetemp() / "echo_audio_rows")
    clips = sorted(root.glob("conv0005_A_c*"))
    dataset = ConversationDataset(clips[0], num_frames=9, resolution=64)
    for epoch in range(300):
        dataset.set_epoch(epoch)
        item = dataset[0]
        if item["window_start"] == 8:
            break
    assert item["window_start"] == 8, "no window starting at frame 8 in 300 epochs"
    rows = torch.from_numpy(np.concatenate([clip_format.read_w2v(c, "avatar") for c in clips]).astype(np.float32))
    assert rows.shape[0] == 80
    # frames 15 and 16 read rows 17 and 18 (clip 1's first row), not clip 0's last row repeated
    torch.testing.assert_close(item["avatar_audio"][-1, -1], rows[18], rtol=0, atol=0)
    assert (rows[18] - rows[17]).abs().max() > 1e-3

    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    session = pipe.start_session(
        reference_image=item["reference"],
        lip_mask=item["lip_mask"],
        face_mask=item["face_mask"],
        with_user=False,
        num_frames=80,
        height=64,
        width=64,
        num_frames_per_chunk=9,
        motion_frames=1,
        num_inference_steps=1,
        frame_inputs=False,
    )
    session.push(avatar_audio_features=rows)
    with Capture(pipe.transformer, pipe.context_encoder, lambda: pipe.current_chunk) as capture:
        assert [session.pull().index, session.pull().index] == [0, 1]
    audio_embeds = next(i["audio_embeds"] for c, i in capture.generator if c == 1 and i["audio_embeds"] is not None)
    torch.testing.assert_close(audio_embeds[0], item["avatar_audio"].to(audio_embeds.dtype), rtol=0, atol=0)


class StandInUnderstanding:
    """Φ stand-in for `OmniUnderstanding`: its tokens say which history it saw (``n`` frames and ``n·640`` samples from
    the conversation's start), so two sides agree only if they reasoned at the same frame."""

    max_frames, hidden_size = 64, 32

    def __init__(self):
        self.seen = []

    def __call__(self, frames, audio):
        n = len(frames)
        assert len(audio) == n * 640, (len(audio), n)
        self.seen.append(n)
        last = torch.from_numpy(np.asarray(frames[-1], np.float32)).mean()  # and what it saw last
        return torch.full((1 + n % 3, self.hidden_size), float(n)) + last


class StandInReasoner:
    """`EmotionReasoner` stand-in: its text says up to when it read the dialogue and what was said by then."""

    def __init__(self):
        self.seen = []

    def describe(self, history, clip_end, avatar_speaker="avatar"):
        self.seen.append(round(clip_end * 25))
        said = " ".join(s["text"] for s in history if float(s["start"]) < clip_end)
        return f"at {clip_end:.2f} s after: {said}"


def test_parity_understanding_and_emotion_are_reasoned_at_the_same_frames(components, data_root, tmp_path, monkeypatch):
    """One rule (`echo.clip_format.reasoning_frame`) for both sides: a training window and a session chunk ending at
    the same frame read the understanding tokens and the emotion text reasoned at the same reasoning frame (the latest
    k·stride − 1 at or before the end; none / `default_emotion` before the first), exactly. The dataset's caches are
    written by echo-prep's own ``omni`` and ``emotion`` stages with stand-in models (strides 6 and 7); the pipeline
    runs the same stand-ins itself, with the strides the dataset reports (saved with a trained model). Chunks of 5
    frames with 1 motion frame end at 4 (before both first reasoning frames), 8 (between), 12 and 16 (one reusing the
    older result)."""
    from data_prep.caches import cache_emotion, cache_omni
    from pipelines.session import EchoSession

    clip = tmp_path / "clip"
    shutil.copytree(sorted(p.parent for p in Path(data_root).glob("*/meta.json"))[0], clip)
    for name in (clip_format.USER_OMNI, clip_format.EMOTION):
        (clip / name).unlink()
    dialogue = [
        {"speaker": "user", "start": 0.1, "end": 0.3, "text": "hello there"},
        {"speaker": "avatar", "start": 0.4, "end": 0.6, "text": "great to see you"},
    ]
    clip_format.write_transcript(clip, {"segments": dialogue})  # the clip starts the conversation: same clock
    cache_omni(clip, StandInUnderstanding(), stride=6)  # reasoning frames 5, 11
    cache_emotion(clip, StandInReasoner(), stride=7)  # reasoning frames 6, 13
    assert clip_format.read_understanding_index(clip, 17).end_frames.tolist() == [5, 11]
    assert [w["end_frame"] for w in clip_format.read_emotion_windows(clip)] == [6, 13]

    # 1. The training windows that are the chunks [0, 5), [4, 9), [8, 13), [12, 17)
    dataset = ConversationDataset(
        clip,
        num_frames=5,
        resolution=64,
        use_user_video=True,
        user_video_size=32,
        use_understanding=True,
        window_stride=4,
        default_emotion="a neutral face",
    )
    assert dataset.reasoning_strides == {"understanding_stride": 6, "emotion_stride": 7}
    items = {}
    for epoch in range(200):
        dataset.set_epoch(epoch)
        item = dataset[0]
        items.setdefault(item["window_start"], item)
        if len(items) == 4:
            break
    assert sorted(items) == [0, 4, 8, 12]

    # 2. The session with the stand-ins, the model's settings holding the dataset's strides
    pipe = EchoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(settings=pipe.settings.replace(**dataset.reasoning_strides).to_dict())
    texts = {}
    emotion_text = EchoSession._emotion_text

    def recording_emotion_text(session, index, stop):
        texts[index] = emotion_text(session, index, stop)
        return texts[index]

    monkeypatch.setattr(EchoSession, "_emotion_text", recording_emotion_text)
    understanding, reasoner = StandInUnderstanding(), StandInReasoner()
    with Capture(pipe.transformer, pipe.context_encoder, lambda: pipe.current_chunk) as capture:
        pipe(
            reference_image=items[0]["reference"],
            reference_landmarks=clip_format.read_landmarks(clip, "avatar")[items[0]["reference_frame"]],
            avatar_audio_features=clip_format.read_w2v(clip, "avatar"),
            user_video=clip_format.read_video_frames(clip / clip_format.video_name("user"), range(17)),
            user_audio=clip_format.read_clip_wav(clip, "user"),
            user_audio_features=clip_format.read_w2v(clip, "user"),
            user_landmarks=clip_format.read_landmarks(clip, "user"),
            understanding_model=understanding,
            emotion_reasoner=reasoner,
            dialogue=dialogue,
            default_emotion="a neutral face",
            num_frames=17,
            num_frames_per_chunk=5,
            motion_frames=1,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            frame_inputs=False,
        )
    lcu = {chunk: inputs for chunk, inputs in capture.lcu}
    assert sorted(lcu) == sorted(texts) == [0, 1, 2, 3]

    # 3. The same entry and the same text for every window, exactly
    for chunk, start in enumerate([0, 4, 8, 12]):
        item = items[start]
        assert texts[chunk] == item["emotion_text"], (chunk, texts[chunk], item["emotion_text"])
        tokens, mask = lcu[chunk]["understanding"], lcu[chunk]["understanding_mask"]
        expected = item["understanding"]
        if expected.shape[0] == 0:  # nothing understood yet: one hidden zero token, as the training batch holds it
            assert not mask.any() and tokens.shape[:2] == (1, 1) and not tokens.any()
        else:
            assert mask.all() and torch.equal(tokens[0], expected), chunk
    # the windows cover every case of the rule: before the first reasoning frame, between two, reused
    assert [items[s]["understanding"].shape[0] for s in (0, 4, 8, 12)] == [0, 1 + 6 % 3, 1 + 12 % 3, 1 + 12 % 3]
    assert [items[s]["understanding"][0, 0] > 0 for s in (4, 8)] == [True, True]
    assert [items[s]["emotion_text"] for s in (0, 4, 8, 12)] == [
        "a neutral face",
        "at 0.28 s after: hello there",
        "at 0.28 s after: hello there",
        "at 0.56 s after: hello there great to see you",
    ]
    # each side reasoned once per reasoning frame, on the history up to it
    assert understanding.seen == [6, 12] and reasoner.seen == [7, 14]
