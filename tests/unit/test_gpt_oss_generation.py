"""GPT-OSS answers through generation: a tiny model trained on one harmony sample writes the channel header and
stops at <|return|>; the `hf` backend and chat give the answer without the header, thinking as <think> text."""

import dataclasses
import json

import pytest
import torch

from internvl_tune.chat import ChatSession
from internvl_tune.checkpoints.metadata import METADATA_FILE, metadata_for
from internvl_tune.data.templates import get_template, tokenize_conversation
from internvl_tune.data.transform import SampleSettings
from internvl_tune.generation.base import GenerationRequest, SamplingParams
from internvl_tune.generation.hf import HFBackend
from internvl_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

QUESTION = "What colour is the shape?"
ANSWER = "<think>One shape.</think>Red."
DECODED = "<think>\nOne shape.\n</think>\n\nRed."


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    """A tiny model fitted to one pure-text GPT-OSS thinking sample (the case the original cannot preprocess), saved
    with internvl_tune.json naming its template and thinking mode."""
    tokenizer = build_tiny_tokenizer(harmony=True)
    model, _ = build_tiny_model(tokenizer, seed=0)
    template = get_template("internvl3_5_gpt_oss", thinking=True)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    sample = tokenize_conversation(tokenizer, template, messages)
    input_ids, labels = torch.tensor([sample.input_ids]), torch.tensor([sample.labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(300):
            loss = model(input_ids=input_ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.01:
                break
    assert loss.item() < 0.01
    path = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    settings = SampleSettings(template="internvl3_5_gpt_oss", thinking=True, image_size=56, num_image_token=4)
    (path / METADATA_FILE).write_text(json.dumps(metadata_for(model.config, dataclasses.asdict(settings))))
    return path


def test_hf_backend_decodes_the_gpt_oss_answer(gpt_oss_dir):
    backend = HFBackend.from_folder(gpt_oss_dir)
    assert backend.eos_token_id == [backend.tokenizer.convert_tokens_to_ids("<|return|>")]
    params = SamplingParams(n=1, temperature=0, max_new_tokens=40)
    requests = [
        GenerationRequest([{"role": "user", "content": QUESTION}], [], params),
        GenerationRequest([{"role": "user", "content": "Hello!"}], [], params),  # a longer batch neighbour
    ]
    [[text], _] = backend.generate(requests)
    assert text == DECODED


def test_chat_streams_the_gpt_oss_answer_and_keeps_it_in_history(gpt_oss_dir):
    session = ChatSession(str(gpt_oss_dir), max_new_tokens=40)
    pieces = list(session.ask(QUESTION))
    assert "".join(pieces) == DECODED
    assert not any("<|" in piece for piece in pieces)
    assert session.history[-1] == {"role": "assistant", "content": DECODED.strip()}
