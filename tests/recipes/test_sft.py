"""The SFT recipe end to end through the CLI on a tiny model."""

import json
from pathlib import Path

import pytest
import torch
from conftest import draw_image, make_colour_dataset, write_jsonl
from safetensors.torch import load_file
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=4",
    "max_seq_length=512",
    "per_device_train_batch_size=2",
    "learning_rate=2e-3",
    "warmup_ratio=0.0",
    "logging_steps=1",
]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("data"), num=16)


def _run(tmp_path, model_dir, meta, *overrides, name="run") -> tuple[int, Path]:
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / name
    code = main(["sft", "--config", str(config), *BASE, f"output_dir={out}", *overrides])
    return code, out


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl")]


def test_sft_trains_resumes_and_exports(tmp_path, tiny_model_dir, meta):
    code, out = _run(tmp_path, tiny_model_dir, meta, "max_steps=8", "save_steps=4")
    assert code == 0
    losses = _losses(out)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5  # the loss falls

    # Resume from step 4 into a fresh folder: the following losses are the same.
    code, resumed = _run(
        tmp_path, tiny_model_dir, meta, "max_steps=8", f"resume_from_checkpoint={out}/checkpoint-4", name="resumed"
    )
    assert code == 0
    assert _losses(resumed) == pytest.approx(losses[4:], abs=1e-6)

    # The exported folder loads with plain transformers and carries its metadata.
    final = out / "final"
    model = InternVLForConditionalGeneration.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    metadata = json.loads((final / "internvl_tune.json").read_text())
    assert metadata["template"] == "internvl2_5" and metadata["image"]["num_image_token"] == 4
    assert metadata["config"]["train"]["max_steps"] == 8 and metadata["internvl_tune_version"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["num_skipped"] == 0


def test_gradient_accumulation_equals_bigger_batch(tmp_path, tiny_model_dir, meta):
    """bs 2 x accum 1 and bs 1 x accum 2 see the same samples per step; the global token mean makes them equal."""
    _, big = _run(tmp_path, tiny_model_dir, meta, "max_steps=4", name="big")
    _, accum = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=4",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=2",
        name="accum",
    )
    assert _losses(accum) == pytest.approx(_losses(big), abs=1e-5)


def test_frozen_parameters_do_not_change(tmp_path, tiny_model_dir, meta):
    code, out = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", "freeze_backbone=true", "freeze_mlp=true")
    assert code == 0
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    # Saved names use the checkpoint layout of transformers' InternVL: vision_tower.*, language_model.model.*
    frozen = [n for n in before if n.startswith(("vision_tower.", "multi_modal_projector."))]
    trained = [n for n in before if n.startswith("language_model.model.layers.") and n.endswith("proj.weight")]
    assert len(frozen) > 20 and len(trained) == 14
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not any(torch.equal(before[n], after[n]) for n in trained)


def test_lora_run_exports_a_merged_model(tmp_path, tiny_model_dir, meta):
    code, out = _run(
        tmp_path, tiny_model_dir, meta, "max_steps=2", "use_llm_lora=4", "freeze_backbone=true", "learning_rate=1e-2"
    )
    assert code == 0
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert before.keys() == after.keys()  # merged: no lora_ keys, original names
    assert not torch.equal(
        before["language_model.model.layers.0.self_attn.q_proj.weight"],
        after["language_model.model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        before["vision_tower.encoder.layer.0.mlp.fc1.weight"], after["vision_tower.encoder.layer.0.mlp.fc1.weight"]
    )


def test_checkpointing_bf16_and_drop_path_train_like_plain_fp32(tmp_path, tiny_model_dir, meta):
    """Gradient checkpointing recomputes the same fp32 forward in the backward pass: the same losses and gradient
    norms. bf16 autocast (with drop path and checkpointing) rounds differently but stays within bf16 precision."""
    _, plain = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", name="plain")
    _, checkpointed = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", "grad_checkpoint=true", name="checkpointed")
    rows, checkpointed_rows = read_metrics(plain / "metrics.jsonl"), read_metrics(checkpointed / "metrics.jsonl")
    assert [r["loss"] for r in checkpointed_rows] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [r["grad_norm"] for r in checkpointed_rows] == pytest.approx([r["grad_norm"] for r in rows], rel=1e-5)

    mixed_options = ("bf16=true", "drop_path_rate=0.1", "grad_checkpoint=true")
    code, mixed = _run(tmp_path, tiny_model_dir, meta, "max_steps=2", *mixed_options, name="mixed")
    assert code == 0
    mixed_losses = _losses(mixed)
    assert mixed_losses != [r["loss"] for r in rows]  # bf16 autocast was on
    assert mixed_losses == pytest.approx([r["loss"] for r in rows], rel=2e-3)


def test_bad_sample_errors_name_file_and_line_or_are_skipped(tmp_path, tiny_model_dir, capsys):
    bad = [
        '{"id": "broken", ',
        {
            "id": "noimg",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
        },
    ]
    meta = make_colour_dataset(tmp_path / "data", num=6, extra_records=bad)
    code, _ = _run(tmp_path, tiny_model_dir, meta, "max_steps=4", "shuffle=false", name="strict")
    assert code == 2
    err = capsys.readouterr().err
    assert "train.jsonl:8: malformed JSON line" in err

    code, out = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=3",
        "shuffle=false",
        "on_bad_sample=skip",
        "per_device_train_batch_size=3",
        name="lenient",
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_skipped"] == 2
    wheres = sorted(where for where, _ in summary["skipped"])
    assert wheres[0].endswith("train.jsonl:8") and wheres[1].endswith("train.jsonl:9")


def test_check_data_reports_and_fails_on_errors(tmp_path, tiny_model_dir, capsys):
    records = [
        {
            "id": "cut",
            "image": "0.png",
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
        },
        {"id": "order", "conversations": [{"from": "gpt", "value": "x"}]},
    ]
    meta = make_colour_dataset(tmp_path / "data", num=6, extra_records=records)
    report_file = tmp_path / "report.json"
    assert (
        main(
            ["check-data", str(meta), "--model", str(tiny_model_dir), "--json", str(report_file), "max_dynamic_patch=4"]
        )
        == 1
    )
    text = capsys.readouterr().out
    assert "records: 9   ok: 8   errors: 1" in text and "role order: 1" in text and "train.jsonl:9" in text
    assert "image tokens per sample:" in text and "padding waste" in text
    report = json.loads(report_file.read_text())
    assert report["total_image_tokens"] > 0 and report["num_over_max_length"] == 0

    # A tight max_seq_length: image samples become "image tokens cut" errors and are counted as over length.
    assert (
        main(
            [
                "check-data",
                str(meta),
                "--model",
                str(tiny_model_dir),
                "--json",
                str(report_file),
                "max_seq_length=40",
                "max_dynamic_patch=4",
            ]
        )
        == 1
    )
    report = json.loads(report_file.read_text())
    assert report["num_over_max_length"] >= 7 and len(report["problems"]["image tokens cut"]) >= 1

    clean = make_colour_dataset(tmp_path / "clean", num=4)
    assert main(["check-data", str(clean), "--model", str(tiny_model_dir)]) == 0
    capsys.readouterr()

    # An annotation file without records is a user error, not a clean report.
    write_jsonl(tmp_path / "clean" / "train.jsonl", [])
    assert main(["check-data", str(clean), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {clean}: the datasets contain no records"


def test_all_samples_bad_stops_instead_of_spinning(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", ["{broken"] * 4)
    (data / "meta.json").write_text(
        json.dumps({"bad": {"root": "", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}})
    )
    code, _ = _run(tmp_path, tiny_model_dir, data / "meta.json", "max_steps=3", "on_bad_sample=skip")
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and err.startswith("error: no record to train on: all 4 were skipped as bad; the first: ")
    assert "train.jsonl:1: malformed JSON line" in err


def test_resume_is_exact_with_prefetching_workers_and_video(tmp_path, tiny_model_dir):
    """Workers prefetch ahead of training; the saved data position counts consumed micro-batches, not fetched."""
    frames = tmp_path / "data" / "images" / "clip"
    frames.mkdir(parents=True)
    for i in range(5):
        draw_image(frames / f"frame_{i}.png", (56, 56), "blue")
    video = {
        "id": "v",
        "video": "clip",
        "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}],
    }
    meta = make_colour_dataset(tmp_path / "data", num=8, extra_records=[video])
    common = ["max_steps=6", "dataloader_num_workers=2", "min_num_frame=2", "max_num_frame=4"]
    code, out = _run(tmp_path, tiny_model_dir, meta, *common, "save_steps=3")
    assert code == 0
    code, resumed = _run(
        tmp_path, tiny_model_dir, meta, *common, f"resume_from_checkpoint={out}/checkpoint-3", name="resumed"
    )
    assert code == 0
    assert _losses(resumed) == pytest.approx(_losses(out)[3:], abs=1e-6)
