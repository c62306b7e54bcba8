"""The MPO recipe end to end through the CLI on a tiny model, with the three kinds of reference."""

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import draw_image, make_pair_dataset, write_jsonl, write_meta
from safetensors.torch import load_file

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=4",
    "max_seq_length=512",
    "per_device_train_batch_size=2",
    "learning_rate=5e-3",
    "warmup_ratio=0.0",
    "drop_path_rate=0.0",
    "logging_steps=1",
]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_pair_dataset(tmp_path_factory.mktemp("pairs"))


def _run(tmp_path, model_dir, meta, *overrides, name="run", command="mpo"):
    config = tmp_path / "mpo.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / name
    return main([command, "--config", str(config), *BASE, f"output_dir={out}", *overrides]), out


def test_mpo_trains_logs_every_term_and_resumes_with_delta(tmp_path, tiny_model_dir, meta):
    code, out = _run(tmp_path, tiny_model_dir, meta, "max_steps=6", "save_steps=3")
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    for key in (
        "loss/sigmoid",
        "loss/bco_pair",
        "loss/sft",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "delta",
        "samples_per_s",
        "vision_tokens_per_s",
        "reference_time_share",
        "vit_time_share",
    ):
        assert key in rows[0], key
    assert rows[0]["loss/sigmoid"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    # 0.8 * sigmoid + 0.2 * bco_pair + 1.0 * sft, each micro-batch-mean here (one micro-batch per step).
    first = rows[0]
    assert first["loss"] == pytest.approx(
        0.8 * first["loss/sigmoid"] + 0.2 * first["loss/bco_pair"] + first["loss/sft"], rel=1e-5
    )

    code, resumed = _run(
        tmp_path, tiny_model_dir, meta, "max_steps=6", f"resume_from_checkpoint={out}/checkpoint-3", name="resumed"
    )
    assert code == 0
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows[3:]], abs=1e-6)
    assert [r["delta"] for r in again] == pytest.approx([r["delta"] for r in rows[3:]], abs=1e-9)  # delta restored
    assert rows[3]["delta"] != 0.0


def test_precomputed_reference_equals_live_reference(tmp_path, tiny_model_dir, meta):
    code, live = _run(tmp_path, tiny_model_dir, meta, "max_steps=3", name="live")
    assert code == 0
    cache = tmp_path / "ref.pt"
    assert _run(tmp_path, tiny_model_dir, meta, f"reference_cache={cache}", command="precompute-ref")[0] == 0
    code, cached = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=3",
        "reference=precomputed",
        f"reference_cache={cache}",
        name="cached",
    )
    assert code == 0
    for a, b in zip(read_metrics(live / "metrics.jsonl"), read_metrics(cached / "metrics.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], abs=1e-5)

    # A cache for other data settings is stale and refused.
    code, _ = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=1",
        "reference=precomputed",
        f"reference_cache={cache}",
        "max_dynamic_patch=2",
        name="stale",
    )
    assert code == 2


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def test_precomputed_reference_is_checked_against_the_images_before_training(tmp_path, tiny_model_dir, capsys):
    """New pixels under an old file name, or a pair the cache lacks, stop `mpo` at start-up with one error line."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    records = []
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        draw_image(root / "images" / f"{i}.png", (56, 56), colour)
        records.append({"image": f"{i}.png", "question": "What colour?", "chosen": colour, "rejected": "grey"})
    write_jsonl(root / "pairs.jsonl", records)
    meta = write_meta(root / "meta.json", {"c": {"root": "images", "annotation": "pairs.jsonl"}})
    cache = tmp_path / "ref.pt"
    cached = ("max_steps=1", "reference=precomputed", f"reference_cache={cache}")
    assert _run(tmp_path, tiny_model_dir, meta, f"reference_cache={cache}", command="precompute-ref")[0] == 0
    assert _run(tmp_path, tiny_model_dir, meta, *cached, name="unchanged")[0] == 0
    # Touched but the same bytes: read again, still matches.
    os.utime(root / "images" / "1.png")
    assert _run(tmp_path, tiny_model_dir, meta, *cached, name="touched")[0] == 0
    capsys.readouterr()

    draw_image(root / "images" / "1.png", (56, 56), "blue")  # same name, same size, other pixels
    code, out = _run(tmp_path, tiny_model_dir, meta, *cached, name="new-pixels")
    assert code == 2 and not (out / "metrics.jsonl").exists()
    assert _error_line(capsys) == (
        f"error: {cache}: stale reference cache: 1 of 4 pairs do not match it: {root / 'pairs.jsonl'}:2 (image or "
        "video content changed); recompute it with `internvl-tune precompute-ref`"
    )

    draw_image(root / "images" / "1.png", (56, 56), "green")  # back as it was
    write_jsonl(root / "pairs.jsonl", [*records, {**records[0], "question": "Which colour?"}])
    code, out = _run(tmp_path, tiny_model_dir, meta, *cached, name="new-pair")
    assert code == 2 and not (out / "metrics.jsonl").exists()
    assert _error_line(capsys) == (
        f"error: {cache}: stale reference cache: 1 of 5 pairs do not match it: {root / 'pairs.jsonl'}:5 (not in the "
        "cache); recompute it with `internvl-tune precompute-ref`"
    )


def test_separate_layout_gives_the_same_training(tmp_path, tiny_model_dir, meta):
    _, shared = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", name="shared")
    _, separate = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", "pair_layout=separate", name="separate")
    a, b = read_metrics(shared / "metrics.jsonl"), read_metrics(separate / "metrics.jsonl")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)


def test_v2pe_shared_and_separate_layouts_train_alike_and_precompute_refuses_random(
    tmp_path, tiny_model_dir, meta, capsys
):
    """With V2PE random the pair's strides are drawn once, so the shared row and the two separate rows see the same
    positions (policy and reference alike); precomputed log-probs cannot hold per-epoch draws and are refused."""
    v2pe = ["max_steps=2", "v2pe=random", "v2pe_stride=2"]
    _, shared = _run(tmp_path, tiny_model_dir, meta, *v2pe, name="shared")
    _, separate = _run(tmp_path, tiny_model_dir, meta, *v2pe, "pair_layout=separate", name="separate")
    a, b = read_metrics(shared / "metrics.jsonl"), read_metrics(separate / "metrics.jsonl")
    assert len(a) == 2 and [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)
    capsys.readouterr()
    code, _ = _run(tmp_path, tiny_model_dir, meta, *v2pe, name="ref", command="precompute-ref")
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: precomputed reference log-probs need data.v2pe off or fixed; random draws strides per epoch"
    )


def test_lora_disabled_reference(tmp_path, tiny_model_dir, meta):
    code, out = _run(
        tmp_path, tiny_model_dir, meta, "max_steps=2", "use_llm_lora=4", "reference=lora_disabled", "learning_rate=1e-2"
    )
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["loss/sigmoid"] == pytest.approx(0.6931, abs=1e-3)  # adapters start at zero: policy == reference
    assert (out / "final_adapter" / "adapter_config.json").is_file()


def test_original_loss_spelling(tmp_path, tiny_model_dir, meta):
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=1",
        "loss_type=sigmoid,bco_pair",
        "loss_weights=null",
        "sigmoid_loss_weight=0.8",
        "bco_pair_loss_weight=0.2",
        "rpo_alpha=1.0",
    )
    assert code == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["loss"] == pytest.approx(
        0.8 * row["loss/sigmoid"] + 0.2 * row["loss/bco_pair"] + row["loss/sft"], rel=1e-5
    )


@pytest.fixture(scope="module")
def two_lengths(tmp_path_factory) -> Path:
    """Two pairs whose chosen responses differ in length, so a token mean and a mean of per-pair means differ."""
    root = tmp_path_factory.mktemp("two_lengths")
    (root / "images").mkdir()
    draw_image(root / "images" / "0.png", (56, 56), "red")
    draw_image(root / "images" / "1.png", (112, 56), "green")
    records = [
        {"image": "0.png", "question": "What colour is the shape?", "chosen": "red", "rejected": "blue"},
        {
            "image": "1.png",
            "question": "What colour is the shape?",
            "chosen": "The shape is green, a wide green ellipse on white.",
            "rejected": "red",
        },
    ]
    write_jsonl(root / "pairs.jsonl", records)
    return write_meta(root / "meta.json", {"two": {"root": "images", "annotation": "pairs.jsonl"}})


def _sft_step_by_hand(model_dir: Path, meta: Path, reduction: str) -> tuple[float, float]:
    """The SFT loss of one step over every pair of `meta`, and its gradient norm, computed here pair by pair:
    token: Σ NLL(yc) / Σ |yc|; sample: mean over pairs of NLL(yc) / |yc|."""
    import torch

    from internvl_tune.config import DataArgs, ModelArgs
    from internvl_tune.data.collate import pair_collate
    from internvl_tune.data.dataset import RecordDataset
    from internvl_tune.data.images import blank_tile
    from internvl_tune.data.preference import PairBuilder
    from internvl_tune.data.transform import SampleBuilder
    from internvl_tune.model.forward import InternVLTrainingForward
    from internvl_tune.model.logprobs import pair_logps
    from internvl_tune.model.prepare import prepare_policy, sample_settings

    model, tokenizer = prepare_policy(ModelArgs(model_name_or_path=str(model_dir), drop_path_rate=0.0))
    settings = sample_settings(DataArgs(meta_path=str(meta), max_dynamic_patch=4, max_seq_length=512), model.config)
    dataset = RecordDataset(meta, PairBuilder(SampleBuilder(tokenizer, settings)), require_data_augment=False)
    forward = InternVLTrainingForward(model).train()
    dummy = blank_tile(settings.image_size, settings.normalize_type)
    nll, num_tokens = [], []
    for i in range(len(dataset)):
        out = pair_logps(
            forward, pair_collate([dataset[i]], pad_token_id=tokenizer.pad_token_id, dummy_tile=dummy), "cpu"
        )
        nll.append(-out["chosen_logps"][0])
        num_tokens.append(int(out["chosen_num_tokens"][0]))
    assert len(set(num_tokens)) > 1
    if reduction == "token":
        loss = sum(nll) / sum(num_tokens)
    else:
        loss = sum(n / t for n, t in zip(nll, num_tokens, strict=True)) / len(nll)
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    return loss.item(), grad_norm.item()


def test_sft_reduction_sample_and_token_train_differently(tmp_path, tiny_model_dir, two_lengths):
    # One step of both pairs as two micro-batches of one pair: the loss and the gradient are the step's, normalised
    # over its 2 pairs (sample) or its chosen tokens (token), as computed pair by pair in _sft_step_by_hand.
    rows = {}
    for reduction in ("token", "sample"):
        code, out = _run(
            tmp_path,
            tiny_model_dir,
            two_lengths,
            "max_steps=1",
            "per_device_train_batch_size=1",
            "gradient_accumulation_steps=2",
            "loss_type=[sft]",
            "loss_weights=[1.0]",
            f"sft_reduction={reduction}",
            name=reduction,
        )
        assert code == 0
        (rows[reduction],) = read_metrics(out / "metrics.jsonl")
        loss, grad_norm = _sft_step_by_hand(tiny_model_dir, two_lengths, reduction)
        assert rows[reduction]["loss"] == pytest.approx(loss, rel=1e-5)
        assert rows[reduction]["loss/sft"] == pytest.approx(loss, rel=1e-5)
        assert rows[reduction]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert rows["sample"]["grad_norm"] != pytest.approx(rows["token"]["grad_norm"], rel=1e-3)


def test_one_pair_per_step_is_the_original_formula(tmp_path, tiny_model_dir, two_lengths):
    # One pair per step: the token mean of one response is its per-token mean, so both reductions train alike, and
    # the first step's loss is 0.8·log 2 + 0.2·2·log 2 + NLL(yc)/|yc| (policy == reference, δ = 0).
    runs = {}
    for reduction in ("token", "sample"):
        code, out = _run(
            tmp_path,
            tiny_model_dir,
            two_lengths,
            "max_steps=2",
            "per_device_train_batch_size=1",
            "shuffle=false",
            f"sft_reduction={reduction}",
            name=f"one-{reduction}",
        )
        assert code == 0
        runs[reduction] = read_metrics(out / "metrics.jsonl")
    for a, b in zip(runs["token"], runs["sample"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"])
    first = runs["sample"][0]
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["loss/bco_pair"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert first["loss"] == pytest.approx(
        0.8 * first["loss/sigmoid"] + 0.2 * first["loss/bco_pair"] + first["loss/sft"]
    )


ACCUMULATED = ("per_device_train_batch_size=1", "gradient_accumulation_steps=2")


def test_gradient_accumulation_equals_bigger_batch(tmp_path, tiny_model_dir, meta):
    """bs 2 x accum 1 and bs 1 x accum 2 train on the same pairs per step (the sampler cuts the same permutation)
    and normalise by the step's pairs and chosen tokens, so without bco_pair's δ (sigmoid + sft here) they are the
    same training: equal losses, gradient norms and final weights. With δ they differ by design (next test)."""
    mix = ("max_steps=2", "loss_type=[sigmoid,sft]", "loss_weights=[0.8,1.0]")
    _, big = _run(tmp_path, tiny_model_dir, meta, *mix, name="big")
    _, accum = _run(tmp_path, tiny_model_dir, meta, *mix, *ACCUMULATED, name="accum")
    big_rows, accum_rows = read_metrics(big / "metrics.jsonl"), read_metrics(accum / "metrics.jsonl")
    assert [r["loss"] for r in accum_rows] == pytest.approx([r["loss"] for r in big_rows], rel=1e-5)
    assert [r["grad_norm"] for r in accum_rows] == pytest.approx([r["grad_norm"] for r in big_rows], rel=1e-4)
    start = load_file(tiny_model_dir / "model.safetensors")
    big_weights = load_file(big / "final" / "model.safetensors")
    accum_weights = load_file(accum / "final" / "model.safetensors")
    # AdamW divides by sqrt(v): an entry with a near-zero gradient turns fp32 summation-order noise into up to ~3e-5
    # of change (measured), against the ~1e-2 that trained weights moved in 2 steps at lr 5e-3.
    assert max((big_weights[n] - start[n]).abs().max().item() for n in start) > 5e-3
    for name, tensor in big_weights.items():
        torch.testing.assert_close(accum_weights[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_bco_pair_delta_is_folded_per_micro_batch(tmp_path, tiny_model_dir, meta):
    """δ is folded in per micro-batch, so accumulation changes what the first micro-batch of a step sees, not δ
    after the step. With pairs p1, p2 of mean rewards r1, r2 in step 2 (step 1 folded zeros: policy == reference):

        bs 2 x accum 1: one update with (r1 + r2)/2         -> both pairs see δ = (r1 + r2)/4
        bs 1 x accum 2: an update with r1, then one with r2 -> p1 sees r1/3, p2 sees (r1 + r2)/4

    So step 1 is equal (every reward 0, δ = 0), the step-2 sigmoid term is equal (same weights, no δ), δ after
    step 2 is equal (an equal-weight mean of the same per-pair means), and the step-2 bco_pair term differs by
    p1's δ. Folding δ once per step would make both equal and fail here: a change to document, not to slip in."""
    _, big = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", name="big")
    _, accum = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", *ACCUMULATED, name="accum")
    (big_1, big_2), (accum_1, accum_2) = read_metrics(big / "metrics.jsonl"), read_metrics(accum / "metrics.jsonl")
    assert accum_1["loss"] == pytest.approx(big_1["loss"], rel=1e-6)
    assert accum_1["grad_norm"] == pytest.approx(big_1["grad_norm"], rel=1e-5)
    assert big_1["delta"] == accum_1["delta"] == 0.0
    assert accum_2["loss/sigmoid"] == pytest.approx(big_2["loss/sigmoid"], rel=1e-5)
    assert big_2["delta"] != 0.0 and accum_2["delta"] == pytest.approx(big_2["delta"], rel=1e-5)
    assert abs(accum_2["loss/bco_pair"] - big_2["loss/bco_pair"]) > 1e-5  # 3.8e-4 measured; fp32 noise is ~1e-7


def test_check_data_on_preference_pairs(tmp_path, tiny_model_dir, meta, capsys):
    assert main(["check-data", str(meta), "--model", str(tiny_model_dir), "--preference", "max_dynamic_patch=4"]) == 0
    assert "records: 12   ok: 12   errors: 0" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    write_jsonl(bad / "pairs.jsonl", [{"question": "q", "chosen": "a", "rejected": "a"}, {"question": "q"}])
    bad_meta = write_meta(bad / "meta.json", {"bad": {"root": "", "annotation": "pairs.jsonl"}})
    assert main(["check-data", str(bad_meta), "--model", str(tiny_model_dir), "--preference"]) == 1
    out = capsys.readouterr().out
    assert "invalid pair: 1" in out and "missing field: 1" in out and "pairs.jsonl:2" in out
