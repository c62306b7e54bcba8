"""Every command on tiny InternVL3.5 models of each new LLM family (Qwen3, Qwen3-MoE, GPT-OSS), in both checkpoint
layouts, with the shipped 3.5 run files: check-data, sft (packed), mpo, precompute-ref, sample, eval, chat, convert,
export. What each one computes is tested elsewhere (conversion, templates, attention, router loss); here they must
run end to end on these folders, choose the template from the checkpoint, and refuse a wrong one in one line."""

from __future__ import annotations

import json

import pytest

from internvl_tune.cli import main
from internvl_tune.demo.tiny_folder import template_of, write_tiny_model

CASES = [("qwen3", "hf"), ("qwen3_moe", "original"), ("gpt_oss", "hf"), ("gpt_oss", "original"), ("qwen3_moe", "hf")]
SMALL = [
    "data.max_dynamic_patch=2",
    "data.max_seq_length=1024",
    "train.bf16=false",
    "model.grad_checkpoint=false",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.save_steps=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data35")
    write_tiny_model(root / "unused", data=root / "data")
    return root / "data"


@pytest.fixture(scope="module", params=CASES, ids=[f"{llm}-{layout}" for llm, layout in CASES])
def case(request, tmp_path_factory):
    llm, layout = request.param
    root = tmp_path_factory.mktemp(f"{llm}_{layout}")
    write_tiny_model(root / "model", layout=layout, llm=llm)
    return llm, layout, root


def test_every_command_runs(case, data, capsys):
    llm, layout, root = case
    model, template = root / "model", template_of(llm)
    style = f"data.conv_style={template}"
    assert (
        main(
            [
                "check-data",
                str(data / "meta.json"),
                "--model",
                str(model),
                "--config",
                "configs/sft/internvl3_5_1b_full.yaml",
                style,
            ]
        )
        == 0
    )

    sft = root / "sft"
    assert (
        main(
            [
                "sft",
                "--config",
                "configs/sft/internvl3_5_1b_full.yaml",
                f"model.model_name_or_path={model}",
                f"data.meta_path={data / 'meta.json'}",
                f"train.output_dir={sft}",
                "train.max_steps=2",
                "data.max_packed_tokens=1024",
                style,
                *SMALL,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    # GPT-OSS SFT adds the router loss as the original does; Qwen3-MoE only when its config asks; Qwen3 has none.
    assert ("aux_loss" in rows[0]) == (llm == "gpt_oss")
    metadata = json.loads((sft / "final" / "internvl_tune.json").read_text())
    assert metadata["template"] == template and metadata["llm_family"] == llm

    mpo = root / "mpo"
    common = [
        "--config",
        "configs/mpo/internvl3_5_1b_mpo.yaml",
        f"model.model_name_or_path={sft / 'final'}",
        f"data.meta_path={data / 'pairs_train_meta.json'}",
        "train.max_steps=1",
        style,
        *SMALL,
    ]
    assert main(["mpo", *common, f"train.output_dir={mpo}"]) == 0
    cache = root / "reference_logps.pt"
    assert main(["precompute-ref", *common, f"train.output_dir={root / 'pre'}", f"mpo.reference_cache={cache}"]) == 0
    assert (
        main(
            [
                "mpo",
                *common,
                f"train.output_dir={root / 'mpo_pre'}",
                "mpo.reference=precomputed",
                f"mpo.reference_cache={cache}",
            ]
        )
        == 0
    )

    final = mpo / "final"
    assert (
        main(
            [
                "sample",
                str(data / "prompts.jsonl"),
                "--out",
                str(root / "samples"),
                "--model",
                str(final),
                "--num-return-sequences",
                "2",
                "--max-new-tokens",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(data / "benchmark.jsonl"),
                "--out",
                str(root / "eval"),
                "--model",
                str(model),
                "--max-new-tokens",
                "4",
                "--thinking",  # the template's thinking prompt (each family has one)
                "--no-progress",
            ]
        )
        == 0
    )
    image = next((data / "images").iterdir())
    assert main(["chat", str(model), "What colour is the shape?", "--image", str(image), "--max-new-tokens", "5"]) == 0

    # eval --thinking on a folder we wrote: the thinking system message replaces the plain one it records.
    from internvl_tune.generation.hf import HFBackend

    def system_of(backend):
        return backend.settings.system_message or backend.template.system_message

    assert system_of(HFBackend.from_folder(final, thinking=True)) != system_of(HFBackend.from_folder(final))

    other = "original" if layout == "hf" else "hf"
    assert main(["convert", str(model), str(root / "converted"), "--to", other]) == 0
    assert main(["export", str(final), str(root / "exported"), "--to", "original"]) == 0
    exported = json.loads((root / "exported" / "config.json").read_text())
    assert exported["template"] == template and exported["llm_config"]["model_type"] == llm


def test_a_template_other_than_the_checkpoints_is_refused_in_one_line(case, data, capsys):
    llm, layout, root = case
    wrong = "internvl2_5" if llm == "gpt_oss" else "internvl3_5_gpt_oss"
    code = main(
        [
            "sft",
            "--config",
            "configs/sft/internvl3_5_1b_full.yaml",
            f"model.model_name_or_path={root / 'model'}",
            f"data.meta_path={data / 'meta.json'}",
            f"train.output_dir={root / 'wrong'}",
            "train.max_steps=1",
            f"data.conv_style={wrong}",
            *SMALL,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and f"trained with the {template_of(llm)} template" in err[0]
