"""LAU (Eq. 3): history formatting, the local and HTTP LLM backends, failure behaviour, and the T5/UMT5 encoder."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from echo.components import build_tiny_tokenizer
from echo.emotion import (
    NEUTRAL_DESCRIPTION,
    EmotionBackendError,
    EmotionReasoner,
    EmotionTextEncoder,
    format_history,
)

# A real two-speaker exchange (speaker-tagged, timed); the clip ends at 9.0 s, in the middle of the user's turn.
HISTORY = [
    {"speaker": "B", "start": 0.4, "end": 2.9, "text": "I finally heard back about the scholarship."},
    {"speaker": "A", "start": 3.1, "end": 4.0, "text": "Oh? And what did they say?"},
    {"speaker": "B", "start": 4.3, "end": 7.6, "text": "They said yes. I honestly cannot believe it, I got it."},
    {"speaker": "A", "start": 7.8, "end": 8.6, "text": "That is wonderful news!"},
    {"speaker": "B", "start": 8.7, "end": 11.7, "text": "My mother cried when I told her, she was so proud of me."},
    {"speaker": "A", "start": 12.0, "end": 13.5, "text": "You really deserve it."},
]
CLIP_END = 9.0
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_history_is_speaker_tagged_and_cut_at_the_clip_end():
    text = format_history(list(reversed(HISTORY)), CLIP_END, avatar_speaker="A")
    lines = text.splitlines()
    assert lines[0] == "[0.4-2.9] USER: I finally heard back about the scholarship."
    assert lines[1] == "[3.1-4.0] AVATAR: Oh? And what did they say?"
    assert lines[3].startswith("[7.8-8.6] AVATAR: That is wonderful")
    # the running segment keeps only the words spoken before 9.0 s (0.3 s of 3.0 s → 1 of 13 words)
    assert lines[4] == "[8.7-9.0] USER: My …"
    assert "deserve" not in text and len(lines) == 5
    # the other participant as avatar swaps the tags
    assert format_history(HISTORY, CLIP_END, avatar_speaker="B").splitlines()[0].startswith("[0.4-2.9] AVATAR:")
    assert format_history(HISTORY, 0.2, avatar_speaker="A") == ""


@pytest.fixture(scope="module")
def local_lm_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("emotion_lm")
    tokenizer = build_tiny_tokenizer(model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_transformers_backend_returns_text_from_the_history(local_lm_folder):
    reasoner = EmotionReasoner(backend="transformers", model=str(local_lm_folder), max_new_tokens=6)
    text = reasoner.describe(HISTORY, CLIP_END, avatar_speaker="A")
    assert isinstance(text, str) and text.strip() and text != NEUTRAL_DESCRIPTION
    # greedy decoding: the same history gives the same description
    assert reasoner.describe(HISTORY, CLIP_END, avatar_speaker="A") == text
    # the LM's first forward pass reads the chat-templated history, cut at the clip end
    seen = []
    handle = reasoner.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        reasoner.describe(HISTORY, CLIP_END, avatar_speaker="A")
    finally:
        handle.remove()
    prompt = reasoner.tokenizer.decode(seen[0][0])
    assert "avatar: that is wonderful news!" in prompt and "deserve" not in prompt
    assert prompt.rstrip().endswith("assistant:")


class _ChatHandler(BaseHTTPRequestHandler):
    requests = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        transcript = body["messages"][-1]["content"]
        user_lines = sum(line.split("] ")[1].startswith("USER") for line in transcript.splitlines() if "] " in line)
        content = (
            f"<think>The user shares good news.\nThe avatar is happy.</think>\n delighted, smiling ({user_lines}) "
        )
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def chat_server():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_posts_the_history_and_returns_the_answer(chat_server):
    _ChatHandler.requests.clear()
    reasoner = EmotionReasoner(backend="openai", model="qwen-7b-chat", base_url=chat_server, api_key="k", timeout=5)
    assert reasoner.describe(HISTORY, CLIP_END, avatar_speaker="A") == "delighted, smiling (3)"
    (request,) = _ChatHandler.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    body = request["body"]
    assert body["model"] == "qwen-7b-chat" and body["messages"][0]["role"] == "system"
    assert "AVATAR: That is wonderful news!" in body["messages"][-1]["content"]
    assert "deserve" not in body["messages"][-1]["content"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_endpoint_gives_the_configured_behaviour_without_hanging():
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    assert EmotionReasoner(backend="openai", model="m", base_url=url, timeout=2).describe(HISTORY, CLIP_END, "A") == (
        NEUTRAL_DESCRIPTION
    )
    with pytest.raises(EmotionBackendError, match=f"{url}/chat/completions"):
        EmotionReasoner(backend="openai", model="m", base_url=url, on_error="raise").describe(HISTORY, CLIP_END, "A")

    # a server that accepts the connection but never answers: the timeout ends the wait
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        reasoner = EmotionReasoner(backend="openai", model="m", base_url=url, timeout=0.5, on_error="raise")
        start = time.monotonic()
        with pytest.raises(EmotionBackendError, match="timed out"):
            reasoner.describe(HISTORY, CLIP_END, "A")
        assert time.monotonic() - start < 5


def test_empty_history_is_neutral_or_an_error(chat_server):
    _ChatHandler.requests.clear()
    neutral = EmotionReasoner(backend="openai", model="m", base_url=chat_server)
    assert neutral.describe(HISTORY, 0.3, "A") == NEUTRAL_DESCRIPTION
    assert neutral.describe([], 5.0, "A") == NEUTRAL_DESCRIPTION
    assert not _ChatHandler.requests  # nothing was sent
    with pytest.raises(EmotionBackendError, match="Empty dialogue history"):
        EmotionReasoner(backend="openai", model="m", base_url=chat_server, on_error="raise").describe([], 5.0, "A")


@pytest.fixture(scope="module")
def text_encoder_folder(tmp_path_factory):
    from transformers import UMT5Config, UMT5EncoderModel

    folder = tmp_path_factory.mktemp("emotion_text")
    tokenizer = build_tiny_tokenizer(model_max_length=64)
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
    )
    UMT5EncoderModel(config).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_text_encoder_round_trip_padding_and_content(text_encoder_folder):
    encoder = EmotionTextEncoder.from_pretrained(text_encoder_folder, max_length=24)
    assert type(encoder.text_encoder).__name__ == "UMT5EncoderModel"
    texts = ["happy, smiling gently", NEUTRAL_DESCRIPTION]
    c_emo, mask = encoder.encode(texts, return_mask=True)
    assert c_emo.shape == (2, 24, 32)
    # Wan-style: zeros beyond each text's tokens
    assert torch.count_nonzero(c_emo[~mask]) == 0 and mask.sum(1).min() > 1
    # the same text embeds the same way alone or next to a longer one; different emotions differ
    torch.testing.assert_close(encoder.encode(texts[0])[0], c_emo[0], atol=1e-5, rtol=1e-5)
    assert (c_emo[0, :3] - c_emo[1, :3]).abs().amax() > 1e-3
    # the loaded encoder computes what the encoder itself computes
    ids = encoder.tokenizer(texts[0], return_tensors="pt").input_ids
    direct = encoder.text_encoder(ids).last_hidden_state[0]
    torch.testing.assert_close(c_emo[0, : ids.shape[1]], direct, atol=1e-5, rtol=1e-5)
