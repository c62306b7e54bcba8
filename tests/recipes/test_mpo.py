"""The MPO recipe end to end through the CLI on a tiny model, with the three kinds of reference."""

from pathlib import Path

import pytest
from conftest import COLOURS, draw_image, write_jsonl, write_meta

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
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    colours = list(COLOURS)
    records = []
    for i in range(12):
        colour, wrong = colours[i % 3], colours[(i + 1) % 3]
        draw_image(root / "images" / f"{i}.png", [(56, 56), (112, 56)][i % 2], colour)
        records.append(
            {
                "image": f"{i}.png",
                "question": "What colour is the shape?",
                "chosen": colour,
                "rejected": f"The shape is {wrong}.",
                "answer_gt": colour,
            }
        )
    write_jsonl(root / "pairs.jsonl", records)
    return write_meta(
        root / "meta.json", {"colours": {"root": "images", "annotation": "pairs.jsonl", "repeat_time": 1}}
    )


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
        "pairs_per_s",
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
    with pytest.raises(ValueError, match="stale cache: data settings changed"):
        _run(
            tmp_path,
            tiny_model_dir,
            meta,
            "max_steps=1",
            "reference=precomputed",
            f"reference_cache={cache}",
            "max_dynamic_patch=2",
            name="stale",
        )


def test_separate_layout_gives_the_same_training(tmp_path, tiny_model_dir, meta):
    _, shared = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", name="shared")
    _, separate = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", "pair_layout=separate", name="separate")
    a, b = read_metrics(shared / "metrics.jsonl"), read_metrics(separate / "metrics.jsonl")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)


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
