"""The online RL recipe end to end through the CLI on a tiny model: it trains and logs, its first update is on-policy,
a resume reproduces the loss sequence, and a bad setting is one line."""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import RL_REWARD_MODULE, make_prompts

from internvl_tune.cli import main
from internvl_tune.generation.hf import HFBackend
from internvl_tune.generation.serve import ChatCompletionsServer, start_server
from internvl_tune.training.metrics import read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=4",
    "max_seq_length=512",
    "learning_rate=5e-3",
    "logging_steps=1",
    "rl.num_generations=4",
    "rl.prompts_per_step=2",
    "rl.max_new_tokens=8",
    "rl.prompt_version=direct",
    "rl.mini_batch_size=2",
]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_prompts(tmp_path_factory.mktemp("rl_prompts"))


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "rl_test_rewards.py").write_text(RL_REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rl_test_rewards:letters"


@dataclass
class PolicyServer:
    """serve.py in this process on `folder`, a copy of the tiny checkpoint that the runs' pushes overwrite."""

    server: ChatCompletionsServer
    backend: HFBackend
    folder: Path

    @property
    def overrides(self) -> tuple[str, ...]:
        """The settings of a run that samples on this server."""
        return (
            "rl.rollout_backend=server",
            f"rl.server_url={self.server.base_url}",
            f"rl.server_weights_dir={self.folder}",
        )


@pytest.fixture()
def policy_server(tmp_path, tiny_model_dir):
    folder = tmp_path / "served"
    shutil.copytree(tiny_model_dir, folder)
    backend = HFBackend.from_folder(folder)
    server = start_server(backend, model_name="policy", weights_dir=folder)
    yield PolicyServer(server, backend, folder)
    server.shutdown()


def _run(tmp_path, model_dir, meta, *overrides, name="run"):
    config = tmp_path / "rl.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / name
    return main(["rl", "--config", str(config), *BASE, f"output_dir={out}", *overrides]), out


def test_rl_trains_logs_and_its_first_update_is_on_policy(tmp_path, tiny_model_dir, meta, reward_module):
    """One update per step (mini-batch = the step's prompts): the ratio of its update is exactly 1 (old log-probs
    from the same weights), so nothing is clipped; rewards and advantages are logged per term."""
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=3",
        "rl.mini_batch_size=2",
        f"rl.rewards=[{reward_module}, length]",
        "rl.reward_weights=[1.0, 0.5]",
        "per_device_train_batch_size=1",
        "rl.kl_coef=0.1",
        "rl.log_rollouts=true",
    )
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3
    # The rollout log: a file per step, a line per response, whose rewards are those the metrics averaged and whose
    # advantages are the group's (rewards minus the group mean, over its std: each group's sum is 0).
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == [f"step_00000{i}.jsonl" for i in (1, 2, 3)]
    prompt_lines = (meta.parent / "prompts.jsonl").read_text().splitlines()
    for row in rows:
        logged = [json.loads(line) for line in (out / "rollouts" / f"step_{row['step']:06d}.jsonl").open()]
        assert len(logged) == row["num_responses"] == 8 and {r["step"] for r in logged} == {row["step"]}
        assert sum(r["reward"] for r in logged) / 8 == pytest.approx(row["reward/mean"], abs=1e-9)
        for record in logged:
            terms = record["rewards"]
            assert set(terms) == {reward_module, "length"}
            assert record["reward"] == pytest.approx(terms[reward_module] + 0.5 * terms["length"], abs=1e-9)
            path, line = record["prompt"].rsplit(":", 1)
            source = json.loads(prompt_lines[int(line) - 1])
            assert Path(path).name == "prompts.jsonl" and record["question"] == source["question"]
            assert record["answer"] == source["answer"] and 0 < record["num_tokens"] <= 8
        assert [r["prompt_index"] for r in logged] == sorted(r["prompt_index"] for r in logged)
        for group in {r["prompt_index"] for r in logged}:
            members = [r for r in logged if r["prompt_index"] == group]
            assert sorted(r["response_index"] for r in members) == [0, 1, 2, 3]
            rewards = torch.tensor([r["reward"] for r in members], dtype=torch.float64)
            expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # verl: unbiased std, epsilon 1e-6
            assert [r["advantage"] for r in members] == pytest.approx(expected.tolist(), abs=1e-5)
    first = rows[0]
    for key in (
        "loss",
        "loss/policy",
        "reward/mean",
        "reward/std",
        f"reward/{reward_module}",
        "reward/length",
        "response_length/mean",
        "zero_variance_groups",
        "clip_fraction",
        "ratio_mean",
        "ratio_max",
        "rollout_time_share",
        "update_time_share",
        "grad_norm",
    ):
        assert key in first, key
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-5) and first["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert first["clip_fraction"] == 0.0
    assert first["num_responses"] == 8
    assert first["grad_norm"] > 0  # the user reward differs within groups: there was something to learn
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    assert 0 < first["entropy"] <= math.log(vocab)  # token mean of the sampling policy's next-token entropy
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert rows[-1]["kl"] > 0
    assert (out / "final" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3


def test_rl_resume_reproduces_the_loss_sequence(tmp_path, tiny_model_dir, meta, reward_module):
    """Two updates per step (mini-batch 1 of 2 prompts), so later updates are off-policy and clipping can act; a run
    resumed from checkpoint-2 draws the same prompts, samples the same responses and logs the same numbers."""
    common = ("max_steps=4", "rl.mini_batch_size=1", f"rl.rewards=[{reward_module}]", "rl.reward_weights=[1.0]")
    common += ("rl.log_rollouts=true",)
    code, out = _run(tmp_path, tiny_model_dir, meta, *common, "save_steps=2")
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    code, resumed = _run(
        tmp_path, tiny_model_dir, meta, *common, f"resume_from_checkpoint={out}/checkpoint-2", name="resumed"
    )
    assert code == 0
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [3, 4]
    for key in ("loss", "reward/mean", "ratio_mean", "response_length/mean"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in rows[2:]], abs=1e-6), key
    assert any(r["ratio_max"] != pytest.approx(1.0, abs=1e-7) for r in rows)  # the second updates were off-policy
    # The resumed run logs steps 3 and 4 with the same responses and rewards as the straight run.
    assert sorted(p.name for p in (resumed / "rollouts").iterdir()) == ["step_000003.jsonl", "step_000004.jsonl"]
    for name in ("step_000003.jsonl", "step_000004.jsonl"):
        straight = [json.loads(line) for line in (out / "rollouts" / name).open()]
        replayed = [json.loads(line) for line in (resumed / "rollouts" / name).open()]
        assert [(r["response"], r["reward"]) for r in replayed] == [(r["response"], r["reward"]) for r in straight]


@pytest.mark.parametrize("reward", ["letters", "fewer_letters"])
def test_rl_raises_the_reward_it_is_given(tmp_path, tiny_model_dir, meta, reward_module, reward):
    """The direction of learning: 15 steps of 2 prompts x 8 responses raise the mean reward, for a reward and for its
    negation alike (more distinct characters, fewer), so neither the advantage's nor the loss's sign is flipped.
    Measured: letters 1.24 -> 1.42, fewer_letters -1.20 -> -1.05 (mean of the first vs the last 5 steps)."""
    module = reward_module.split(":")[0]
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=15",
        "rl.num_generations=8",
        f"rl.rewards=[{module}:{reward}]",
        "rl.reward_weights=[1.0]",
    )
    assert code == 0
    rewards = [r["reward/mean"] for r in read_metrics(out / "metrics.jsonl")]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards


def test_rl_settings_errors_are_one_line(tmp_path, tiny_model_dir, meta, capsys):
    code, _ = _run(tmp_path, tiny_model_dir, meta, "rl.mini_batch_size=3")
    assert code == 2
    assert "rl.prompts_per_step=2 must be a multiple of rl.mini_batch_size=3" in capsys.readouterr().err
    code, _ = _run(tmp_path, tiny_model_dir, meta, "rl.rewards=[accuracy, nosuch]", "rl.reward_weights=[1, 1]")
    assert code == 2
    assert "unknown reward 'nosuch'" in capsys.readouterr().err
    code, _ = _run(tmp_path, tiny_model_dir, meta, "rl.max_new_tokens=600")
    assert code == 2
    assert "leaves no room for a prompt" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rl_through_a_server_equals_rl_in_process_and_pushes_each_step(
    tmp_path, tiny_model_dir, meta, reward_module, policy_server, temperature
):
    """rollout_backend=server against serve.py started on a copy of the checkpoint: the policy is pushed after each
    step and the server samples from it, so three steps log what the in-process rollouts log (the same seeded
    requests, one per batch on both sides); the served folder ends with trained weights. At temperature 0.7 the
    trainer scores softmax(logits / 0.7), the distribution sampled from: the first update's ratio is 1 and the
    server's log-probs (at the same temperature) equal the trainer's."""
    from safetensors.torch import load_file

    served, backend = policy_server.folder, policy_server.backend
    common = ("max_steps=3", f"rl.rewards=[{reward_module}]", "rl.reward_weights=[1.0]", "rl.rollout_batch_size=4")
    common += (f"rl.temperature={temperature}",)
    code, out = _run(
        tmp_path, tiny_model_dir, meta, *common, *policy_server.overrides, "rl.server_concurrency=1", name="server"
    )
    assert code == 0
    code, local = _run(tmp_path, tiny_model_dir, meta, *common, name="local")
    assert code == 0
    rows, expected = read_metrics(out / "metrics.jsonl"), read_metrics(local / "metrics.jsonl")
    assert len(rows) == 3
    for key in ("loss", "reward/mean", "response_length/mean", "ratio_mean", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in expected], abs=1e-6), key
    assert all(r["push_time_share"] > 0 for r in rows[:2])
    # The server's log-probs of what it sampled match the trainer's (the same fp32 weights after each push).
    assert all(r["sampler_logp_gap/max"] < 1e-4 for r in rows)
    assert rows[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert "sampler_logp_gap/mean" not in expected[0]  # in process there is no separate sampler
    pushed = load_file(next(served.glob("*.safetensors")))
    start = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    assert any(not torch.equal(pushed[k], start[k]) for k in start)  # trained weights were pushed
    on_disk = type(backend.model).from_pretrained(served).state_dict()
    served_state = backend.model.state_dict()
    assert served_state.keys() == on_disk.keys()
    assert all(torch.equal(served_state[k], on_disk[k]) for k in on_disk)  # and reloaded by the server


def test_rl_server_settings_errors_are_one_line(tmp_path, tiny_model_dir, meta, capsys):
    code, _ = _run(tmp_path, tiny_model_dir, meta, "rl.rollout_backend=server")
    assert code == 2
    assert "rl.rollout_backend=server needs rl.server_url" in capsys.readouterr().err
    code, _ = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "rl.rollout_backend=server",
        "rl.server_url=http://127.0.0.1:9/v1",
        f"rl.server_weights_dir={tiny_model_dir}",
    )
    assert code == 2
    assert "is the starting checkpoint: each step's push would overwrite it" in capsys.readouterr().err
    server_run = ("rl.rollout_backend=server", "rl.server_url=http://127.0.0.1:9/v1")
    code, _ = _run(tmp_path, tiny_model_dir, meta, *server_run, f"rl.server_weights_dir={tmp_path / 'nothing'}")
    assert code == 2
    assert "no model folder there; copy the starting checkpoint there" in capsys.readouterr().err
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text('{"architectures": ["InternVLChatModel"], "auto_map": {}}')
    code, _ = _run(tmp_path, tiny_model_dir, meta, *server_run, f"rl.server_weights_dir={original}")
    assert code == 2
    assert "holds the original (remote-code) layout" in capsys.readouterr().err


def test_a_lora_policy_is_pushed_merged(tmp_path, tiny_model_dir, meta, reward_module, policy_server):
    """A LoRA policy trains its adapter; each push writes the merged weights, so after a push the server's log-probs
    of what it samples equal the trainer's (adapter on) to fp32 rounding: the served model is the policy."""
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "max_steps=3",
        "use_llm_lora=4",
        "lora_dropout=0.0",
        f"rl.rewards=[{reward_module}]",
        "rl.reward_weights=[1.0]",
        *policy_server.overrides,
    )
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["sampler_logp_gap/max"] < 1e-4 for r in rows] == [True] * 3
    assert rows[-1]["grad_norm"] > 0 and (out / "final_adapter").is_dir()


def test_a_resumed_server_run_pushes_before_its_first_step(
    tmp_path, tiny_model_dir, meta, reward_module, policy_server
):
    """The server may hold any weights when a run resumes (here: restarted on the starting checkpoint). The resumed
    run pushes checkpoint-2's policy before sampling, so steps 3-4 log what the straight run logged."""
    import urllib.request

    common = (
        "max_steps=4",
        "rl.mini_batch_size=1",
        f"rl.rewards=[{reward_module}]",
        "rl.reward_weights=[1.0]",
        "rl.rollout_batch_size=4",
        *policy_server.overrides,
        "rl.server_concurrency=1",
    )
    code, out = _run(tmp_path, tiny_model_dir, meta, *common, "save_steps=2")
    assert code == 0
    served, base_url = policy_server.folder, policy_server.server.base_url
    shutil.rmtree(served)  # the server restarted on the starting checkpoint
    shutil.copytree(tiny_model_dir, served)
    urllib.request.urlopen(urllib.request.Request(base_url + "/reload_weights", data=b"{}")).read()
    code, resumed = _run(
        tmp_path, tiny_model_dir, meta, *common, f"resume_from_checkpoint={out}/checkpoint-2", name="resumed"
    )
    assert code == 0
    rows, again = read_metrics(out / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [3, 4]
    for key in ("loss", "reward/mean", "ratio_mean", "response_length/mean", "sampler_logp_gap/max"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in rows[2:]], abs=1e-6), key


def test_sharded_engines_need_server_rollouts():
    """FSDP2 / ZeRO shard the weights, which in-process generation needs whole on every rank: with rl.rollout_backend
    hf that is one line naming the way out; with server the layout is accepted."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from internvl_tune.config import ConfigError, RLConfig
    from internvl_tune.recipes.rl import check_layout

    fsdp = SimpleNamespace(
        num_processes=2,
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)),
    )
    config = RLConfig()
    with pytest.raises(ConfigError, match="under FSDP2 sample on a server") as error:
        check_layout(config, fsdp)
    assert "\n" not in str(error.value)
    config.rl.rollout_backend = "server"
    check_layout(config, fsdp)  # accepted


def test_a_server_that_builds_another_prompt_stops_the_run_in_one_line(
    tmp_path, tiny_model_dir, meta, capsys, policy_server
):
    """The run's system message is not the served checkpoint's: the server's prompt ids differ from the trainer's,
    and the first step stops naming the prompt's file:line, before anything is trained on it."""
    code, out = _run(
        tmp_path, tiny_model_dir, meta, "max_steps=1", "system_message=You are a pirate.", *policy_server.overrides
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "prompts.jsonl:" in err and "the server built another prompt than training does" in err
    assert not (out / "final").exists()
