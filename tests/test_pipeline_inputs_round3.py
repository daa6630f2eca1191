"""Pipeline inputs of issue 23 (round 3 of the robustness probe), each checked once in `pipelines.inputs` /
`EchoPipeline.check_inputs` and refused (or warned about) with a message naming the input: audio without its rate,
empty avatar audio, ``"settings": null`` in model_index.json, a length that cannot fit in memory, a chunk longer than
the transformer's positions, a step callback or an emotion reasoner returning `None`, and a second `close`."""

import json
import logging

import numpy as np
import pytest
import torch

from echo.emotion import reason_emotion
from pipelines import EchoPipeline
from tests.render_inputs import tiny_render_inputs
from tests.tiny_models import tiny_components_as_trained


@pytest.fixture(scope="module")
def pipe():
    pipe = EchoPipeline(**tiny_components_as_trained())
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(settings=pipe.settings.replace(emotion_stride=4).to_dict())  # reasoned at frames 3, 7
    return pipe


@pytest.fixture(scope="module")
def inputs():
    return {**tiny_render_inputs(num_frames=9), "num_frames_per_chunk": 9, "motion_frames": 5}


def _session(pipe, inputs, **kwargs):
    return pipe.start_session(
        reference_image=inputs["reference_image"],
        with_user=False,
        height=32,
        width=32,
        num_inference_steps=1,
        num_frames_per_chunk=9,
        motion_frames=5,
        lip_mask=inputs["lip_mask"],
        face_mask=inputs["face_mask"],
        frame_inputs=False,
        **kwargs,
    )


def test_audio_without_its_sampling_rate_is_taken_at_16khz_with_a_warning(pipe, inputs, caplog):
    audio = np.zeros(int(0.68 * 44_100), dtype=np.float32)  # 0.68 s at 44.1 kHz
    with caplog.at_level(logging.WARNING, logger="pipelines.session"):
        session = _session(pipe, inputs)
        session.push(avatar_audio=audio)
        session.close()
    assert "No `sampling_rate` was given" in caplog.text and "sampling_rate=" in caplog.text
    assert session.num_frames == 47  # read as 16 kHz: what the warning is about

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.session"):
        session = _session(pipe, inputs, sampling_rate=44_100)
        session.push(avatar_audio=audio)
        session.close()
    assert "sampling_rate" not in caplog.text
    assert session.num_frames == 17  # 0.68 s at 25 fps

    session = _session(pipe, inputs)
    session.push(avatar_audio=audio, sampling_rate=44_100)  # stated with the piece: no warning, the right length
    session.close()
    assert session.num_frames == 17


def test_empty_avatar_audio_is_refused(pipe, inputs):
    with pytest.raises(ValueError, match=r"`avatar_audio` is empty \(0 samples\)"):
        pipe(**{**inputs, "avatar_audio": np.zeros(0, dtype=np.float32), "num_frames": None})
    session = _session(pipe, inputs)
    session.push(avatar_audio=np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"`avatar_audio` is empty \(0 samples\) and no `num_frames`"):
        session.close()


def test_settings_null_in_model_index_is_refused_at_load_naming_it(pipe, tmp_path):
    import diffusers

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["settings"] = None
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for loader in (EchoPipeline, diffusers.DiffusionPipeline):
        with pytest.raises(ValueError, match=r'model_index.json has `"settings": null`'):
            loader.from_pretrained(tmp_path)


def test_a_num_frames_beyond_memory_is_refused_before_allocating(pipe, inputs):
    with pytest.raises(ValueError, match=r"`num_frames` = 10000000 at 32x32 needs .* GiB.*start_session"):
        pipe(**{**inputs, "num_frames": 10**7})
    # A session streams: it holds no list of the chunks, only their count
    session = _session(pipe, inputs, num_frames=10**7)
    assert session.num_chunks == 2_499_999 and session.total_frames == 10**7 + 1
    assert session.chunk_range(session.num_chunks - 1) == (9_999_992, 10_000_001)


def test_a_chunk_longer_than_the_transformers_positions_is_refused_early_naming_it(pipe, inputs):
    positions = pipe.transformer.config.rope_max_seq_len
    longest = 4 * (positions - 1) + 1
    with pytest.raises(ValueError, match=rf"`num_frames_per_chunk` is 1001: .* at most {longest} frames per chunk"):
        pipe(**{**inputs, "num_frames_per_chunk": 1001})
    with pytest.raises(ValueError, match=r"`num_frames_per_chunk` is 1001"):
        pipe.start_session(reference_image=inputs["reference_image"], num_frames_per_chunk=1001, frame_inputs=False)


def test_a_step_callback_returning_none_is_named(pipe, inputs):
    with pytest.raises(ValueError, match=r"`callback_on_step_end` returned None \(NoneType\) at step 0 of chunk 0"):
        pipe(**inputs, callback_on_step_end=lambda pipe, step, timestep, kwargs: None)


class _SilentReasoner:
    def describe(self, history, clip_end, avatar_speaker):
        return None


def test_an_emotion_reasoner_returning_none_is_named(pipe, inputs):
    dialogue = [{"speaker": "avatar", "start": 0.0, "end": 0.1, "text": "Hello."}]
    with pytest.raises(ValueError, match=r"emotion reasoner's `describe\(.*\)` returned None"):
        reason_emotion(_SilentReasoner(), dialogue, 3)
    with pytest.raises(ValueError, match=r"emotion reasoner's `describe\(.*\)` returned None"):
        pipe(**inputs, emotion_reasoner=_SilentReasoner(), dialogue=dialogue)


def test_a_second_close_with_another_num_frames_is_refused(pipe, inputs):
    session = _session(pipe, inputs)
    session.push(avatar_audio=inputs["avatar_audio"], sampling_rate=16_000)
    session.close()
    assert session.num_frames == 9
    session.close()  # again, nothing asked: a no-op
    session.close(num_frames=9)  # the same length: honoured (nothing to change)
    with pytest.raises(ValueError, match=r"`close\(num_frames=20\)` after the session was closed with 9 frames"):
        session.close(num_frames=20)
    assert session.num_frames == 9 and torch.cat([chunk.video for chunk in session], dim=2).shape[2] == 9
