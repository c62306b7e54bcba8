"""Preference pairs: validation, the shared prompt, and shared-prefix == separate forwards (values and grads)."""

import random

import pytest
import torch
from conftest import draw_image

from internvl_tune.data.collate import pair_collate
from internvl_tune.data.errors import DataError
from internvl_tune.data.meta import DatasetEntry
from internvl_tune.data.preference import PairBuilder, record_to_pair
from internvl_tune.data.transform import SampleBuilder, SampleSettings
from internvl_tune.model.attention import SEGMENTS_KWARG, dense_block_mask, resolve_attn_implementation
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.logprobs import pair_logps
from internvl_tune.testing.tiny import build_tiny_model


def _builder(tokenizer):
    settings = SampleSettings(image_size=56, num_image_token=4, max_dynamic_patch=6, max_seq_length=4096)
    return PairBuilder(SampleBuilder(tokenizer, settings))


def _entry(root):
    return DatasetEntry(name="p", root=str(root), annotation=root / "p.jsonl", data_augment=False, repeat_time=1)


def _pairs(tokenizer, tmp_path):
    draw_image(tmp_path / "wide.png", (168, 56), "red")  # 3x1 + thumbnail = 4 tiles
    draw_image(tmp_path / "a.png", (56, 56), "blue")
    draw_image(tmp_path / "b.png", (112, 56), "green")
    records = [
        {
            "image": "wide.png",
            "question": "What colour is the shape?",
            "chosen": "red",
            "rejected": "It is a blue shape, I think, or maybe green.",
            "answer_gt": "red",
        },
        {
            "image": ["a.png", "b.png"],
            "question": "<image>\n<image>\nSame colour?",
            "chosen": "No, one is blue and the other one is green.",
            "rejected": "Yes.",
        },
        {"question": "Say hello!", "chosen": "Hello!", "rejected": "Goodbye, see you later."},
    ]
    builder = _builder(tokenizer)
    return [builder(r, f"p.jsonl:{i + 1}", _entry(tmp_path), random.Random(0)) for i, r in enumerate(records)]


def test_pair_shares_its_prompt_and_labels_only_the_answers(tokenizer, tmp_path):
    pair = _pairs(tokenizer, tmp_path)[0]
    prompt = tokenizer.decode(pair["prompt_ids"])
    assert prompt.endswith("</img>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("<IMG_CONTEXT>") == 16 and pair["num_tiles"] == [4]
    chosen = pair["chosen_labels"][pair["chosen_labels"] != -100]
    assert tokenizer.decode(chosen) == "red<|im_end|>"
    assert tokenizer.decode(pair["chosen_ids"]) == "red<|im_end|>\n"
    assert pair["meta"] == {"answer_gt": "red"}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "chosen": "a"}, "field 'rejected' is required"),
        ({"question": "q", "chosen": " ", "rejected": "b"}, "field 'chosen' is required"),
        ({"question": "q", "chosen": "same", "rejected": "same "}, "are the same answer"),
        ({"image": ["a.png", "b.png"], "question": "<image> q", "chosen": "a", "rejected": "b"}, "1 '<image>'"),
    ],
)
def test_bad_pairs_are_errors(record, message):
    with pytest.raises(DataError, match=message):
        record_to_pair(record, "p.jsonl:3")


def _logps(model, batch):
    out = pair_logps(InternVLTrainingForward(model, logprob_chunk_size=7), batch, "cpu")  # chunks split answers
    return [(out[f"{s}_logps"], out[f"{s}_num_tokens"]) for s in ("chosen", "rejected")]


def sinks_that_matter(model, seed: int = 0) -> None:
    """GPT-OSS initialises its attention sinks near 0 (std 0.02), where a kernel that dropped them would still
    pass: draw them O(1)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.language_model.layers:
        if hasattr(layer.self_attn, "sinks"):
            layer.self_attn.sinks.data = torch.randn(layer.self_attn.sinks.shape, generator=generator)


@pytest.mark.parametrize("llm", ["qwen2", "gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_segments"])
def test_shared_prefix_equals_separate_forwards_values_and_gradients(tokenizer, tmp_path, kernel, llm):
    """Tolerance: fp32, 1e-5 absolute on summed log-probs (O(10-100)) and on gradients. The shared rows run the
    dense block mask (`sdpa`; `eager` for GPT-OSS, which has no SDPA path) or one SDPA call per segment
    (`sdpa_segments`, the CPU default). GPT-OSS: sliding-window layers (window 8, shorter than the prompts) and
    attention sinks; Qwen3-MoE: routed experts."""
    pairs = _pairs(tokenizer, tmp_path)
    model, _ = build_tiny_model(tokenizer, seed=1, llm=llm)
    sinks_that_matter(model)
    model.set_attn_implementation(resolve_attn_implementation(kernel, "cpu", llm))
    segment_calls = []
    if kernel == "sdpa_segments":
        model.model.language_model.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: segment_calls.append(SEGMENTS_KWARG in kwargs), with_kwargs=True
        )
    model.eval()
    dummy = torch.zeros(3, 56, 56)
    vit_tiles = []
    model.model.vision_tower.register_forward_hook(
        lambda m, args, out: vit_tiles.append(out.last_hidden_state.shape[0])
    )

    results = {}
    for mode in ("shared", "separate"):
        model.zero_grad()
        (chosen, chosen_n), (rejected, rejected_n) = _logps(
            model, pair_collate(pairs, tokenizer.pad_token_id, dummy, mode=mode)
        )
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (chosen.detach(), rejected.detach(), chosen_n, rejected_n, grads)
    assert vit_tiles == [4 + 1 + 3, 2 * (4 + 1 + 3)]  # shared: each tile through the ViT once
    assert segment_calls == ([True, False] if kernel == "sdpa_segments" else [])  # separate rows: plain SDPA

    shared, separate = results["shared"], results["separate"]
    torch.testing.assert_close(shared[0], separate[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], separate[1], atol=1e-5, rtol=0)
    assert torch.equal(shared[2], separate[2]) and torch.equal(shared[3], separate[3])
    assert shared[4].keys() == separate[4].keys() and len(shared[4]) > 50
    for name in shared[4]:
        torch.testing.assert_close(shared[4][name], separate[4][name], atol=1e-5, rtol=1e-4, msg=name)

    # And both equal a plain forward of each single sequence, without padding or masks.
    for i, pair in enumerate(pairs):
        for side, index in (("chosen", 0), ("rejected", 1)):
            ids = torch.cat([pair["prompt_ids"], pair[f"{side}_ids"]])[None]
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=pair["pixel_values"]).logits[0]
            labels = pair[f"{side}_labels"]
            p = len(pair["prompt_ids"])
            logp = torch.log_softmax(logits[p - 1 : p - 1 + len(labels)], -1)
            expected = sum(logp[j, t] for j, t in enumerate(labels.tolist()) if t != -100)
            assert shared[index][i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_pair_collate_rows_spelled_out():
    """P=2, Lc=2, Lr=1: ids [p0 p1 c0 c1 r0], positions [0 1 2 3 2]; gather positions chosen [1 2], rejected [1]."""
    pair = {
        "prompt_ids": torch.tensor([10, 11]),
        "chosen_ids": torch.tensor([20, 21]),
        "chosen_labels": torch.tensor([20, -100]),
        "rejected_ids": torch.tensor([30]),
        "rejected_labels": torch.tensor([30]),
        "prompt_position_ids": torch.arange(2),
        "chosen_position_ids": torch.arange(2, 4),
        "rejected_position_ids": torch.arange(2, 3),
        "pixel_values": None,
        "num_image_tokens": 0,
        "truncated": False,
        "key": "k",
        "where": "x",
    }
    batch = pair_collate([pair], pad_token_id=0, dummy_tile=torch.zeros(3, 2, 2))
    assert batch["input_ids"].tolist() == [[10, 11, 20, 21, 30]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert batch["attention_groups"].tolist() == [[0, 0, 0, 0, 0]]
    assert batch["attention_roles"].tolist() == [[0, 0, 1, 1, 2]]
    assert dense_block_mask(batch["attention_groups"], batch["attention_roles"])[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert batch["chosen_positions"].tolist() == [[1, 2]] and batch["chosen_mask"].tolist() == [[True, False]]
    assert batch["rejected_positions"].tolist() == [[1]] and batch["rejected_targets"].tolist() == [[30]]


def test_video_pairs_work(tokenizer, tmp_path):
    (tmp_path / "clip").mkdir()
    for i in range(4):
        draw_image(tmp_path / "clip" / f"frame_{i}.png", (56, 56), "green")
    settings = SampleSettings(image_size=56, num_image_token=4, min_num_frame=3, max_num_frame=3)
    builder = PairBuilder(SampleBuilder(tokenizer, settings))
    record = {"video": "clip", "question": "What happens?", "chosen": "Nothing.", "rejected": "A cat jumps."}
    pair = builder(record, "p.jsonl:1", _entry(tmp_path), random.Random(0))
    assert pair["num_tiles"] == [1, 1, 1] and pair["pixel_values"].shape[0] == 3
    assert "Frame-3: <img>" in tokenizer.decode(pair["prompt_ids"])


def test_pair_image_tokens_cut_is_an_error(tokenizer, tmp_path):
    draw_image(tmp_path / "wide.png", (168, 56), "red")
    settings = SampleSettings(image_size=56, num_image_token=4, max_dynamic_patch=6, max_seq_length=30)
    builder = PairBuilder(SampleBuilder(tokenizer, settings))
    record = {"image": "wide.png", "question": "Colour?", "chosen": "red", "rejected": "blue"}
    with pytest.raises(DataError) as e:
        builder(record, "p.jsonl:9", _entry(tmp_path), random.Random(0))
    assert e.value.kind == "image tokens cut" and str(e.value).startswith("p.jsonl:9: ")
