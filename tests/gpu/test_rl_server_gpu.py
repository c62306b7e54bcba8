"""Online RL on a CUDA device with rollouts from serve.py (run by benchmarks/gpu_check.sh as `pytest -m gpu`; skipped
elsewhere): bf16 updates through flex attention's group-row mask, the policy pushed to the server after each step,
and the server's log-probs of its samples close to the trainer's (the training-inference gap, bf16 on both sides)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import RL_REWARD_MODULE, make_prompts

from internvl_tune.cli import main
from internvl_tune.generation.hf import HFBackend
from internvl_tune.generation.serve import start_server
from internvl_tune.training.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_rl_with_server_rollouts_on_cuda(tmp_path, tiny_model_dir, monkeypatch):
    meta = make_prompts(tmp_path / "prompts")
    (tmp_path / "rl_gpu_rewards.py").write_text(RL_REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    served = tmp_path / "served"
    shutil.copytree(tiny_model_dir, served)
    server = start_server(HFBackend.from_folder(served), model_name="policy", weights_dir=served)
    config = tmp_path / "rl.yaml"
    config.write_text(f"model: {{model_name_or_path: {tiny_model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / "run"
    try:
        code = main(
            ["rl", "--config", str(config), "bf16=true", "grad_checkpoint=false", "max_dynamic_patch=4"]
            + ["max_seq_length=512", "learning_rate=5e-3", "logging_steps=1", "max_steps=3", f"output_dir={out}"]
            + ["rl.num_generations=4", "rl.prompts_per_step=2", "rl.mini_batch_size=2", "rl.max_new_tokens=8"]
            + ["rl.prompt_version=direct", "rl.rewards=[rl_gpu_rewards:letters]", "rl.reward_weights=[1.0]"]
            + ["rl.rollout_backend=server", f"rl.server_url={server.base_url}", f"rl.server_weights_dir={served}"]
        )
    finally:
        server.shutdown()
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3
    assert rows[0]["ratio_max"] == pytest.approx(1.0, abs=1e-3)  # old log-probs under the updates' autocast
    assert all(0 <= r["sampler_logp_gap/mean"] < 0.5 for r in rows), [r["sampler_logp_gap/mean"] for r in rows]
