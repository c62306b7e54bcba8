"""The step benchmarks' shared parts (benchmarks/common.py): counted FLOPs, the profile summary, the profiler hook,
presets, and the padded-vocabulary model folder."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402

# 28 px tiles, patch 14: 4 patches + 1 class token through the ViT, 4 * 0.5^2 = 1 image token per tile.
SMALL = common.ModelShape(
    vision_hidden=4,
    vision_layers=1,
    vision_heads=1,
    vision_ffn=8,
    text_hidden=8,
    text_layers=1,
    text_heads=2,
    text_kv_heads=1,
    text_ffn=16,
    vocab_size=10,
    image_size=28,
)


def test_forward_flops_worked_example():
    """One tile, 3 LLM tokens, 6 causal attention pairs (a row of 3), 2 scored positions:

    - ViT: weights 4*4^2 + 2*4*8 = 128 on 5 tokens, patch embedding 3*14^2*4 = 2352 on 4 patches:
      2 * (640 + 9408) = 20096; attention 4 * d=4 * 5^2 = 400.                                     -> 20496
    - projector: (4 / 0.5^2 = 16) x 8 + 8 x 8 = 192 on 1 token: 2 * 192                            -> 384
    - LLM: Q, O 2 * 8^2 = 128, K, V 2 * 8 * (1 KV head * 4 head dim) = 64, MLP 3 * 8 * 16 = 384: 576 on 3 tokens
      -> 3456; attention 4 * 8 * 6 = 192                                                           -> 3648
    - LM head: 2 * 8 * 10 on 2 positions                                                           -> 320
    Forward 24848; trained 3x = 74544; with a reference forward 99392.
    """
    work = common.Work(tiles=1, llm_tokens=3, attention_pairs=6, scored=2)
    assert common.forward_flops(SMALL, work) == 24848
    assert common.step_flops(SMALL, work) == 74544
    assert common.step_flops(SMALL, work, reference=work) == 99392


def test_forward_flops_of_a_mixture_of_experts_count_the_active_weights():
    """SMALL with a Qwen3-MoE LLM of head dim 2, 4 experts of width 6, 2 per token, on the same work: only the LLM
    changes. Q, O 2 * 8 * (2 heads * 2) = 64, K, V 2 * 8 * (1 * 2) = 32, MLP 2 experts * 3 * 8 * 6 = 288 + router
    8 * 4 = 32: 416 on 3 tokens -> 2496; attention 4 * (2 * 2) * 6 = 96 -> 2592 (dense SMALL: 3648); so the forward
    is 24848 - 3648 + 2592 = 23792. Active parameters: a folder's total less (E - k) / E = 1/2 of its 1 x 4 x 3 x 8 x
    6 = 576 expert weights."""
    moe = dataclasses.replace(
        SMALL, text_model_type="qwen3_moe", text_head_dim=2, num_experts=4, experts_per_token=2, expert_ffn=6
    )
    work = common.Work(tiles=1, llm_tokens=3, attention_pairs=6, scored=2)
    assert common.forward_flops(moe, work) == 23792
    assert common.active_parameters(moe, 1000) == 1000 - SMALL.text_layers * 4 * 3 * 8 * 6 // 2
    assert common.active_parameters(SMALL, 1000) == 1000


@pytest.mark.parametrize(("prompt", "chosen", "rejected"), [(2, 2, 1), (5, 3, 4), (1, 1, 1)])
def test_shared_row_pairs_counts_the_shared_prefix_mask(prompt, chosen, rejected):
    """The closed form against the mask rule enumerated: a query sees earlier keys, and rejected never sees chosen."""
    n = prompt + chosen + rejected
    is_chosen = [prompt <= k < prompt + chosen for k in range(n)]
    enumerated = sum(1 for q in range(n) for k in range(q + 1) if not (q >= prompt + chosen and is_chosen[k]))
    assert common.shared_row_pairs(prompt, chosen, rejected) == enumerated


@pytest.mark.parametrize(("prompt", "responses"), [(2, [2, 1]), (5, [3, 4, 1, 2]), (1, [1])])
def test_group_row_pairs_counts_the_group_row_mask(prompt, responses):
    """The closed form against the mask rule enumerated: a query sees earlier keys of the prompt and of its own
    response, never another response's."""
    owner = [-1] * prompt + [j for j, n in enumerate(responses) for _ in range(n)]  # -1: the prompt
    enumerated = sum(1 for q in range(len(owner)) for k in range(q + 1) if owner[k] == -1 or owner[k] == owner[q])
    assert common.group_row_pairs(prompt, responses) == enumerated


def test_summarize_trace_busy_gaps_and_top_kernels():
    """The docstring example: window [0, 10] us, kernels [1, 3], [2, 4], [6, 7]; a host op [4.5, 5.5] runs in the
    middle of the gap [4, 6]."""
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#5", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1, "dur": 2},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 2, "dur": 2},
        {"ph": "X", "cat": "kernel", "name": "softmax", "ts": 6, "dur": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0.5, "dur": 0.5},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 4.5, "dur": 1},
        {"ph": "X", "cat": "kernel", "name": "next_step", "ts": 12, "dur": 1},  # outside the window
    ]
    s = common.summarize_trace({"traceEvents": events}, "cuda")
    assert s["wall_ms"] == pytest.approx(0.010)
    assert s["busy_ms"] == pytest.approx(0.004)
    assert s["gap_ms"] == pytest.approx(0.006)
    assert [(g["at_ms"], g["ms"]) for g in s["largest_gaps"]] == [
        pytest.approx((0.007, 0.003)),
        pytest.approx((0.004, 0.002)),
        pytest.approx((0.0, 0.001)),
    ]
    assert s["largest_gaps"][1]["host"] == "during aten::item"
    assert s["largest_gaps"][0]["host"] == "after aten::item"
    assert s["num_kernels"] == 3
    assert [(t["name"], t["calls"]) for t in s["top"]] == [("gemm", 2), ("softmax", 1)]
    assert s["top"][0]["ms"] == pytest.approx(0.004)


def test_step_profiler_records_one_optimizer_step(tmp_path):
    """Driven by optimizer steps alone (no loop changes): the recorded step is step 4 of 5, and its summary has
    the step's matmuls."""
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    profiler = common.StepProfiler(4, "cpu", tmp_path / "trace.json")
    with profiler:
        for _ in range(5):
            model(torch.randn(8, 16)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    summary = profiler.summary
    assert summary is not None and (tmp_path / "trace.json").is_file()
    assert 0 < summary["busy_ms"] <= summary["wall_ms"]
    assert any(row["name"] in ("aten::addmm", "aten::mm") for row in summary["top"])
    assert profiler.num_steps == 5


def test_presets_and_field_overrides():
    import argparse

    p = argparse.ArgumentParser()
    common.add_common_args(p, configs=("a", "b"), workdir="/tmp/w", answer_tokens=10)
    args = p.parse_args(["--preset", "internvl3-2b", "--text-layers", "2", "--configs", "b", "--profile"])
    common.finish_common_args(p, args, ("a", "b"))
    assert args.shape == common.ModelShape(
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_ffn=4096,
        text_hidden=1536,
        text_layers=2,
        text_heads=12,
        text_kv_heads=2,
        text_ffn=8960,
    )
    assert args.shape.vocab_size == 151_674 and args.shape.image_tokens_per_tile == 256
    assert args.names == ["b"] and args.steps == 2 + 4 + common.PROFILE_STEPS
    assert args.models == "/tmp/w/models"


def test_model_folder_pads_the_vocabulary_and_is_cached(tmp_path):
    from internvl_tune.model.load import load_model

    shape = common.ModelShape(
        vision_hidden=16,
        vision_layers=1,
        vision_heads=2,
        vision_ffn=24,
        text_hidden=16,
        text_layers=1,
        text_heads=2,
        text_kv_heads=1,
        text_ffn=40,
        vocab_size=1000,
        image_size=28,
    )
    path = common.model_dir_for(shape, tmp_path, bf16=False)
    model, tokenizer = load_model(path)
    assert model.get_input_embeddings().weight.shape[0] == 1000
    assert model.lm_head.weight.shape[0] == 1000
    assert model.config.text_config.intermediate_size == 40 and model.config.vision_config.intermediate_size == 24
    assert len(tokenizer) < 1000  # the padded rows are never produced
    ids = tokenizer(common.QUESTION + " " + " ".join(common.WORDS)).input_ids
    assert max(ids) < len(tokenizer)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert common.model_dir_for(shape, tmp_path, bf16=False) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_packing_benchmark_counts_padding_as_llm_work_and_tiles_from_image_tokens():
    """Two steps by hand: 512 image tokens = 2 tiles of 256; 600 real positions in a step with padding share 0.25 are
    800 computed positions (200 of padding), 400 real with none are 400; the LM head scores 30 labelled tokens."""
    import sft_packing

    shape = common.DEFAULT_SHAPE
    rows = [
        {"num_image_tokens": 512, "num_text_tokens": 88, "padding_share": 0.25, "num_loss_tokens": 20},
        {"num_image_tokens": 0, "num_text_tokens": 400, "padding_share": 0.0, "num_loss_tokens": 10},
    ]
    work = sft_packing.counted_work(shape, rows)
    per_token = 3 * common.forward_flops(shape, common.Work(0, 1, 0, 0)) / 1e12  # the LLM's weights, trained
    assert work["llm"] == pytest.approx(1200 * per_token) and work["llm_padding"] == pytest.approx(200 * per_token)
    assert work["vit"] == pytest.approx(2 * 3 * common.forward_flops(shape, common.Work(1, 0, 0, 0)) / 1e12)
    head = 3 * 2 * shape.text_hidden * shape.vocab_size * 30 / 1e12  # 2 FLOPs per multiply-add, x3 trained
    assert work["head"] == pytest.approx(head)
    frozen = sft_packing.counted_work(shape, rows, frozen_vit=True)  # the ViT's forward only
    assert frozen["vit"] == pytest.approx(work["vit"] / 3) and frozen["llm"] == work["llm"]


def test_data_scale_benchmark_runs_the_cli_and_reports(tmp_path):
    """benchmarks/data_scale.py at 300 records: the packed cold run measures every record in 2 workers (its log
    line), the warm run measures nothing, check-data passes, and the report has a row per run and the index bytes."""
    import data_scale

    report = tmp_path / "report.md"
    results = data_scale.main(
        ["--sizes", "300", "--kinds", "sft", "--combos", "1x2", "--skip", "unpacked", "--workdir", str(tmp_path)]
        + ["--report", str(report)]
    )
    rows = {row["config"]: row for row in results["rows"]}
    assert list(rows) == ["packed cold 1x2", "packed warm 1x2", "check-data 2 workers"]
    assert all(row["returncode"] == 0 for row in rows.values()), [row["stderr_tail"] for row in rows.values()]
    assert rows["packed cold 1x2"]["measured"] == [300] and rows["packed warm 1x2"]["measured"] == []
    assert rows["packed cold 1x2"]["first_step_s"] > 0 and rows["packed cold 1x2"]["peak_rss_mib"] > 0
    text = report.read_text()
    assert "| sft | 300 | packed cold 1x2 |" in text and "Command: `python benchmarks/data_scale.py --sizes 300" in text
    index = results["index"]["sft 300"]
    assert index["records"] == 300 and 0 < index["array_bytes_per_record"] < 64


TINY_MODEL = (
    "--vision-hidden 64 --vision-layers 1 --vision-heads 2 --vision-ffn 128 --text-hidden 64 --text-layers 1 "
    "--text-heads 4 --text-kv-heads 2 --text-ffn 128 --vocab-size 4096 --image-size 112 --max-dynamic-patch 2"
).split()


def test_rl_step_benchmark_runs_every_configuration_on_the_same_update(tmp_path):
    """benchmarks/rl_step.py at a tiny size, G = 4: the group row and G separate rows take the same step (gradient
    norm, step-2 loss) and TRL's GRPOTrainer on the same rollouts the same within the advantage's epsilon (TRL 1e-4,
    ours 1e-6: 2e-4 relative); the group row is credited with less work per response. TRL is skipped when it is not
    installed (it is a benchmark-only dependency)."""
    import importlib.util

    import rl_step

    with_trl = all(importlib.util.find_spec(name) for name in ("trl", "datasets"))
    configs = "shared,separate" + (",trl" if with_trl else "")
    report = tmp_path / "report.md"
    out = rl_step.main(
        [*TINY_MODEL, "--answer-tokens", "16", "--num-generations", "4", "--warmup-steps", "1", "--timed-steps", "1"]
        + ["--no-memory-runs", "--configs", configs, "--workdir", str(tmp_path), "--results", str(report)]
    )
    results = out["results"]
    assert list(results) == configs.split(",")
    assert all("error" not in r for r in results.values()), results
    shared, separate = results["shared"], results["separate"]
    assert shared["grad_norms"][0] > 0
    assert shared["grad_norms"][0] == pytest.approx(separate["grad_norms"][0], rel=1e-4)
    assert abs(shared["losses"][0]) < 1e-6  # ratio 1 at step 1: -mean(A) = 0
    assert shared["losses"][1] == pytest.approx(separate["losses"][1], rel=1e-3)
    if with_trl:
        trl = results["trl"]
        assert trl["grad_norms"][0] == pytest.approx(shared["grad_norms"][0], rel=1e-3)
        assert trl["losses"][1] == pytest.approx(shared["losses"][1], rel=1e-2)
    flops = out["workload"]["rollouts"]["flops_per_response"]
    assert flops["shared"] < flops["separate"] == flops["trl"]
    text = report.read_text()
    assert "Same step (step-1 gradient norms within 1%): **yes**" in text
    assert "| ours, one group row per prompt |" in text
