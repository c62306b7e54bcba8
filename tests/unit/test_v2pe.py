"""V2PE (data/v2pe.py): positions by hand, random strides seeded per sample, stride = tokens per tile equals plain
positions (logits too), packed == padded and shared-prefix == separate with V2PE on, generation continuing the V2PE
positions, and chat / eval reading the stride a checkpoint records.

The tiny model has 4 image tokens per tile (N = 4), so a stride S gives delta = S / 4 per image token. Tolerances:
fp32 on CPU; packed rows and shared-prefix rows run attention per segment where padded rows use a padding mask, so
sums are taken in another order (1e-6 on per-token mean losses, 1e-5 on summed log-probs, as tests/unit/test_pairs.py).
"""

import json
import random
from dataclasses import replace

import pytest
import torch
from conftest import draw_image, make_colour_dataset, write_meta
from PIL import Image

from internvl_tune.chat import ChatSession
from internvl_tune.checkpoints.metadata import checkpoint_sample_settings, metadata_for
from internvl_tune.config import ConfigError, MPOConfig, SFTConfig, load_config
from internvl_tune.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.data.collate import pack_collate, pad_collate, pair_collate
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.meta import DatasetEntry
from internvl_tune.data.placeholders import user_turn
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.prompt import build_inference_prompt
from internvl_tune.data.transform import SampleBuilder, SampleSettings
from internvl_tune.data.v2pe import random_strides, v2pe_position_ids
from internvl_tune.evaluate.generate import item_prompt
from internvl_tune.generation.base import GenerationRequest, SamplingParams
from internvl_tune.generation.hf import HFBackend
from internvl_tune.model.attention import resolve_attn_implementation
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.logprobs import label_gather, pair_logps
from internvl_tune.model.prepare import sample_settings
from internvl_tune.testing.tiny import build_tiny_model

N = 4  # image tokens per tile of the tiny model
T, S, C, E = 7, 1, 3, 2  # text, <img>, <IMG_CONTEXT>, </img> ids for the rule by itself


def _settings(**overrides) -> SampleSettings:
    return SampleSettings(**{"image_size": 56, "num_image_token": N, "max_dynamic_patch": 4, **overrides})


def test_positions_by_hand_one_image():
    """Two text tokens, one image of 2 tiles (8 tokens), two text tokens; S = 2: delta 1/2, the image spans 4."""
    ids = [T, T, S, *[C] * 8, E, T, T]
    positions = v2pe_position_ids(ids, [2], tokens_per_tile=N, img_start_id=S, img_end_id=E)
    assert positions.dtype == torch.float32
    assert positions.tolist() == [0, 1, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8, 9]


def test_positions_by_hand_two_images():
    """Two one-tile images, strides 1 (delta 1/4) and 4 (delta 1): each stride per image, text always + 1."""
    ids = [T, S, C, C, C, C, E, T, S, C, C, C, C, E, T]
    positions = v2pe_position_ids(ids, [1, 4], tokens_per_tile=N, img_start_id=S, img_end_id=E)
    assert positions.tolist() == [0, 1, 1.25, 1.5, 1.75, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="2 images in the sequence for 3 strides"):
        v2pe_position_ids(ids, [1, 4, 4], tokens_per_tile=N, img_start_id=S, img_end_id=E)


def test_random_strides_are_the_powers_of_two_up_to_a_tile():
    assert random_strides(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert random_strides(4) == [1, 2, 4]
    assert random_strides(6) == [1, 2, 4, 6]  # the tile itself (delta 1) is always among them


def _record(tmp_path):
    """Two images (1 tile: 56x56; 3 tiles: 112x56 = 2x1 + thumbnail) between text."""
    draw_image(tmp_path / "a.png", (56, 56), "red")
    draw_image(tmp_path / "b.png", (112, 56), "blue")
    return {
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nand\n<image>\nSame colour?"},
            {"from": "gpt", "value": "No, red and blue."},
        ],
    }


def _entry(root, augment=False):
    return DatasetEntry(name="d", root=str(root), annotation=root / "d.jsonl", data_augment=augment, repeat_time=1)


def test_a_samples_positions_follow_the_rule(tokenizer, tmp_path):
    """Fixed S = 2 on a real sample: positions count 1 up to each <img>, image tokens 1/2 apart, and after an image of
    k tiles the text continues 2k + 1 after its <img> (plain positions: 4k + 1)."""
    builder = SampleBuilder(tokenizer, _settings(v2pe="fixed", v2pe_stride=2))
    sample = builder(_record(tmp_path), "d.jsonl:1", _entry(tmp_path), random.Random(0))
    ids, positions = sample["input_ids"].tolist(), sample["position_ids"]
    start = tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
    end = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    first, second = [i for i, t in enumerate(ids) if t == start]
    assert sample["num_tiles"] == [1, 3] and ids.index(end) == first + 5
    expected = list(range(first + 1))  # text and the first <img>
    expected += [first + 0.5 * k for k in range(1, 5)]  # 4 image tokens, the tile spans 2
    expected += [first + 3 + j for j in range(second - first - 4)]  # </img>, the text, the second <img>
    p = expected[-1]
    expected += [p + 0.5 * k for k in range(1, 13)]  # 12 image tokens, 3 tiles span 6
    expected += [p + 7 + j for j in range(len(ids) - len(expected))]  # </img> and the rest of the text
    assert positions.tolist() == expected
    # Off: plain positions, long, as before V2PE.
    plain = SampleBuilder(tokenizer, _settings())(_record(tmp_path), "d.jsonl:1", _entry(tmp_path), random.Random(0))
    assert plain["position_ids"].dtype == torch.long and plain["position_ids"].tolist() == list(range(len(ids)))


def test_random_mode_draws_per_image_from_the_set_seeded_per_sample(tokenizer, tmp_path):
    """Each image's delta is one of 1/4, 1/2, 1; a sample gets the same positions each time it is built (a function
    of seed, epoch and index), other samples and epochs other draws; augmentation stays as without V2PE."""
    meta = make_colour_dataset(tmp_path, num=12)
    augmented = json.loads(meta.read_text())
    augmented["colours"]["data_augment"] = True
    meta = write_meta(tmp_path / "augmented.json", augmented)
    context = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    datasets = {
        mode: RecordDataset(meta, SampleBuilder(tokenizer, _settings(v2pe=mode, v2pe_stride=N)), seed=3)
        for mode in ("random", "off")
    }
    data = datasets["random"]
    deltas = []
    for index in range(2 * len(data)):  # two epochs
        sample = data[index]
        assert torch.equal(sample["position_ids"], data[index]["position_ids"])
        image = sample["input_ids"] == context
        if image.any():
            assert torch.equal(sample["pixel_values"], datasets["off"][index]["pixel_values"])  # same augmentation
            steps = torch.diff(sample["position_ids"][image])
            assert torch.all(steps == steps[0])  # one stride per image
            deltas.append(steps[0].item())
    assert set(deltas) == {0.25, 0.5, 1.0}
    epoch_0 = [data[i]["position_ids"] for i in range(len(data))]
    epoch_1 = [data[len(data) + i]["position_ids"] for i in range(len(data))]
    assert any(not torch.equal(a, b) for a, b in zip(epoch_0, epoch_1, strict=True))


def _samples(tokenizer, tmp_path, settings):
    draw_image(tmp_path / "wide.png", (168, 56), "green")  # 3x1 + thumbnail = 4 tiles
    text = {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi, how are you?"}]}
    one = {"image": "wide.png", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "g"}]}
    builder = SampleBuilder(tokenizer, settings)
    records = [_record(tmp_path), text, one]
    return [builder(r, f"d.jsonl:{i}", _entry(tmp_path), random.Random(i)) for i, r in enumerate(records)]


def _model(tokenizer, kernel="sdpa_segments"):
    model, _ = build_tiny_model(tokenizer, seed=2)
    model.set_attn_implementation(resolve_attn_implementation(kernel, "cpu"))
    return model.eval()


def _sharpen(model):
    """Queries and keys x 8: the random tiny model's attention is nearly uniform, so its greedy tokens hardly depend
    on positions; sharper attention makes them (generation tests)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _logits(model, batch):
    layout = ("attention_groups", "attention_roles") if "attention_groups" in batch else ("attention_mask",)
    with torch.no_grad():
        return InternVLTrainingForward(model)(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            pixel_values=batch["pixel_values"],
            image_flags=batch["image_flags"],
            **{"attention_mask": None, **{k: batch[k] for k in layout}},
        )


def test_stride_of_a_whole_tile_is_exactly_the_plain_positions_and_logits(tokenizer, tmp_path):
    """S = N gives delta 1: the same position values (float32 where off gives long) and bit-identical logits."""
    plain = _samples(tokenizer, tmp_path, _settings())
    v2pe = _samples(tokenizer, tmp_path, _settings(v2pe="fixed", v2pe_stride=N))
    for a, b in zip(plain, v2pe, strict=True):
        assert b["position_ids"].dtype == torch.float32 and torch.equal(a["position_ids"].float(), b["position_ids"])
    model = _model(tokenizer)
    dummy = torch.zeros(3, 56, 56)
    batches = [pad_collate(samples, tokenizer.pad_token_id, dummy) for samples in (plain, v2pe)]
    assert batches[1]["position_ids"].dtype == torch.float32
    assert torch.equal(_logits(model, batches[0]), _logits(model, batches[1]))
    # A smaller stride moves the image tokens, and the logits change: the positions reach the rotary embedding.
    smaller = pad_collate(_samples(tokenizer, tmp_path, _settings(v2pe="fixed", v2pe_stride=1)), 0, dummy)
    assert not torch.allclose(_logits(model, batches[0]), _logits(model, smaller), atol=1e-3)


def _sample_losses(model, batch) -> torch.Tensor:
    """Each sample's mean NLL over its trained tokens, from the training forward's gathered log-probs."""
    index, targets, _ = label_gather(batch["labels"])
    layout = ("attention_groups", "attention_roles") if "attention_groups" in batch else ("attention_mask",)
    with torch.no_grad():
        logps = InternVLTrainingForward(model)(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            pixel_values=batch["pixel_values"],
            image_flags=batch["image_flags"],
            logp_index=index,
            logp_targets=targets,
            **{"attention_mask": None, **{k: batch[k] for k in layout}},
        )
    sample = batch["sample_ids"].view(-1)[index + 1]
    sums = torch.zeros(batch["num_samples"]).index_add(0, sample, -logps)
    return sums / batch["num_labels"]


@pytest.mark.parametrize("kernel", ["sdpa_segments", "sdpa"])
def test_packed_equals_padded_with_v2pe(tokenizer, tmp_path, kernel):
    """Fixed S = 1 (delta 1/4): the three samples packed into one row (positions restart per sample, kept as V2PE
    made them) give each sample's loss of the padded batch to 1e-6."""
    samples = _samples(tokenizer, tmp_path, _settings(v2pe="fixed", v2pe_stride=1))
    model = _model(tokenizer, kernel)
    dummy = torch.zeros(3, 56, 56)
    padded = pad_collate(samples, tokenizer.pad_token_id, dummy)
    packed = pack_collate([{**s, "row": 0} for s in samples], tokenizer.pad_token_id, dummy, max_packed_tokens=4096)
    assert packed["position_ids"].shape[0] == 1 and packed["position_ids"].dtype == torch.float32
    torch.testing.assert_close(_sample_losses(model, packed), _sample_losses(model, padded), atol=1e-6, rtol=0)
    plain = pad_collate(_samples(tokenizer, tmp_path, _settings()), tokenizer.pad_token_id, dummy)
    # Plain positions give other losses, by far more than the tolerance (the random tiny model: about 4e-5).
    assert (_sample_losses(model, plain) - _sample_losses(model, padded)).abs().max() > 1e-5


@pytest.mark.parametrize("kernel", ["sdpa_segments", "sdpa"])
def test_shared_prefix_pairs_equal_separate_forwards_with_v2pe(tokenizer, tmp_path, kernel):
    """Random strides: chosen and rejected share their prompt's positions (one draw per image for the pair), the
    rejected answer continues from the prompt's end, and the shared row gives the separate rows' log-probs."""
    draw_image(tmp_path / "a.png", (56, 56), "red")
    draw_image(tmp_path / "b.png", (112, 56), "blue")
    records = [
        {"image": ["a.png", "b.png"], "question": "<image>\n<image>\nSame?", "chosen": "No.", "rejected": "Yes, both."},
        {"image": "b.png", "question": "Colour?", "chosen": "blue", "rejected": "It is a red one."},
    ]
    builder = PairBuilder(SampleBuilder(tokenizer, _settings(v2pe="random", v2pe_stride=N, max_seq_length=4096)))
    pairs = [builder(r, f"p.jsonl:{i}", _entry(tmp_path), random.Random(i)) for i, r in enumerate(records)]
    for pair in pairs:
        end = pair["prompt_position_ids"][-1]
        assert pair["prompt_position_ids"].dtype == torch.float32
        assert pair["chosen_position_ids"].tolist() == [end + 1 + k for k in range(len(pair["chosen_ids"]))]
        assert pair["rejected_position_ids"].tolist() == [end + 1 + k for k in range(len(pair["rejected_ids"]))]
    model = _model(tokenizer, kernel)
    dummy = torch.zeros(3, 56, 56)
    logps = {}
    for mode in ("shared", "separate"):
        with torch.no_grad():
            out = pair_logps(InternVLTrainingForward(model), pair_collate(pairs, 0, dummy, mode=mode), "cpu")
        logps[mode] = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    torch.testing.assert_close(logps["shared"], logps["separate"], atol=1e-5, rtol=0)
    # And a plain forward of each prompt + answer with its V2PE positions.
    for i, pair in enumerate(pairs):
        for side, offset in (("chosen", 0), ("rejected", len(pairs))):
            ids = torch.cat([pair["prompt_ids"], pair[f"{side}_ids"]])[None]
            positions = torch.cat([pair["prompt_position_ids"], pair[f"{side}_position_ids"]])[None]
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=positions, pixel_values=pair["pixel_values"]).logits[0]
            labels, p = pair[f"{side}_labels"], len(pair["prompt_ids"])
            logp = torch.log_softmax(logits[p - 1 : p - 1 + len(labels)], -1)
            expected = sum(logp[j, t] for j, t in enumerate(labels.tolist()) if t != -100)
            assert logps["shared"][offset + i].item() == pytest.approx(expected.item(), abs=1e-5)


def _greedy_by_hand(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding without a cache: every step a full forward with the prompt's positions, then + 1 per token."""
    ids, positions = list(prompt.input_ids), prompt.position_ids.tolist()
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.tensor([positions]),
                pixel_values=prompt.pixel_values,
            ).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.convert_tokens_to_ids("<|im_end|>"):
            break
        new.append(token)
        ids.append(token)
        positions.append(positions[-1] + 1)
    return tokenizer.decode(new, skip_special_tokens=True)


QUESTIONS = [("<image>\nWhat colour is the shape?", "wide"), ("Image-1: <image>\nImage-2: <image>\nSame?", "both")]


def _requests(images, params):
    return [
        GenerationRequest([{"role": "user", "content": question}], images[which], params)
        for question, which in QUESTIONS
    ]


def _images():
    red, blue = Image.new("RGB", (168, 56), (255, 0, 0)), Image.new("RGB", (56, 56), (0, 0, 255))
    return {"wide": [red], "both": [red, blue]}


def test_generation_continues_the_v2pe_positions(tokenizer):
    """Batched generate (left-padded, KV cache) with S = 1 equals decoding by hand with the V2PE positions, differs
    from plain positions, and S = N generates what V2PE off does."""
    model = _sharpen(_model(tokenizer))
    params = SamplingParams(n=1, temperature=0, max_new_tokens=8)
    images = _images()
    texts = {}
    for name, settings in (
        ("plain", _settings()),
        ("tile", _settings(v2pe="fixed", v2pe_stride=N)),
        ("v2pe", _settings(v2pe="fixed", v2pe_stride=1)),
    ):
        texts[name] = [t[0] for t in HFBackend(model, tokenizer, settings).generate(_requests(images, params))]
    settings = _settings(v2pe="fixed", v2pe_stride=1)
    by_hand = [
        _greedy_by_hand(model, tokenizer, build_inference_prompt(tokenizer, r.messages, r.images, settings), 8)
        for r in _requests(images, params)
    ]
    assert texts["v2pe"] == by_hand
    assert texts["tile"] == texts["plain"]
    assert texts["v2pe"] != texts["plain"]


@pytest.fixture(scope="module")
def v2pe_checkpoint(tmp_path_factory):
    """The (sharpened) tiny model with the metadata a v2pe=random, v2pe_stride=1 run writes."""
    path = tmp_path_factory.mktemp("v2pe") / "model"
    model, tokenizer = build_tiny_model()
    _sharpen(model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    settings = _settings(v2pe="random", v2pe_stride=1)
    metadata = metadata_for(model.config, vars(settings))
    assert metadata["v2pe"] == {"mode": "random", "stride": 1}
    (path / "internvl_tune.json").write_text(json.dumps(metadata))
    return path


def test_chat_and_eval_ask_with_the_recorded_stride(v2pe_checkpoint, tmp_path):
    """Chat and evaluation read {"mode": "random", "stride": 1} from internvl_tune.json and build their prompts at the
    fixed stride 1; chat's streamed answer is the one decoded by hand with those positions, and eval's (the hf backend
    of the folder) too."""
    Image.new("RGB", (168, 56), (255, 0, 0)).save(tmp_path / "wide.png")
    image = str(tmp_path / "wide.png")
    question = "What colour is the shape?"
    session = ChatSession(str(v2pe_checkpoint), max_new_tokens=8)
    assert (session.settings.v2pe, session.settings.v2pe_stride) == ("random", 1)
    settings = checkpoint_sample_settings(v2pe_checkpoint, session.model.config)  # what evaluation is given
    prompt = item_prompt(session.tokenizer, {"image": image, "question": question}, settings)
    fixed = build_inference_prompt(
        session.tokenizer,
        [{"role": "user", "content": user_turn(question, 1)}],
        [image],
        replace(settings, v2pe="fixed"),
    )
    assert torch.equal(prompt.position_ids, fixed.position_ids) and prompt.position_ids.dtype == torch.float32
    assert prompt.position_ids[-1] < len(prompt.input_ids) - 1  # 16 image tokens span 4 positions
    expected = _greedy_by_hand(session.model, session.tokenizer, prompt, 8)
    assert "".join(session.ask(question, [image])).strip() == expected.strip()
    backend = HFBackend.from_folder(v2pe_checkpoint)
    request = GenerationRequest(
        [{"role": "user", "content": user_turn(question, 1)}],
        [image],
        SamplingParams(n=1, temperature=0, max_new_tokens=8),
    )
    assert backend.generate([request])[0][0] == expected
    plain = build_inference_prompt(
        session.tokenizer, [{"role": "user", "content": user_turn(question, 1)}], [image], replace(settings, v2pe="off")
    )
    assert _greedy_by_hand(session.model, session.tokenizer, plain, 8) != expected  # the stride made a difference


def test_settings_are_checked(tmp_path, tiny_model_dir):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    base = [f"model_name_or_path={tiny_model_dir}", f"meta_path={meta}"]
    with pytest.raises(ConfigError, match="data.v2pe=fixed needs data.v2pe_stride"):
        load_config(SFTConfig, overrides=[*base, "v2pe=fixed"])
    with pytest.raises(ConfigError, match="data.v2pe_stride must be >= 1"):
        load_config(SFTConfig, overrides=[*base, "v2pe=random", "v2pe_stride=0"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(SFTConfig, overrides=[*base, "v2pe=on"])
    with pytest.raises(ConfigError, match="mpo.reference=precomputed needs data.v2pe off or fixed"):
        load_config(MPOConfig, overrides=[*base, "v2pe=random", "v2pe_stride=2", "reference=precomputed"])
    config = load_config(SFTConfig, overrides=[*base, "v2pe=fixed", "v2pe_stride=8"])
    model, _ = build_tiny_model()
    with pytest.raises(ConfigError, match="v2pe_stride=8 is more than the model's 4 image tokens per tile"):
        sample_settings(config.data, model.config)
    config.data.v2pe_stride = 4
    assert sample_settings(config.data, model.config).v2pe_stride == 4
