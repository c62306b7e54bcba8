"""Run configuration: dataclasses are the schema, YAML files set values, `key=value` overrides on the CLI.

A run file has three sections whose field names follow the original InternVL flags::

    model: {model_name_or_path: ./InternVL3-1B-hf, freeze_backbone: true, drop_path_rate: 0.1}
    data:  {meta_path: data/meta.json, conv_style: internvl2_5, max_dynamic_patch: 6}
    train: {output_dir: runs/sft, learning_rate: 4.0e-5, per_device_train_batch_size: 4}

Overrides name a field as `section.field=value` or, when the name is unique, just `field=value`; values are
parsed as YAML (`bf16=true`, `learning_rate=1e-5`, `system_message=null`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import itertools
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from internvl_tune.constants import DEFAULT_TEMPLATE
from internvl_tune.data.settings import PipelineSettings
from internvl_tune.errors import UserError

SaveDtype = Literal["auto", "bf16", "fp16", "fp32"]


# FlashAttention takes padding masks only: it cannot keep a rejected answer from its chosen one, or packed samples
# from each other (transformers would drop or misread the block mask).
ROW_MASK_KERNELS = (
    "model.attn_implementation={} cannot isolate packed samples or shared-prefix answers; "
    "use auto (flex attention on CUDA), sdpa_segments or sdpa, or set {}"
)


class ConfigError(UserError):
    """A bad configuration value; the message names the file or override and the field."""


@dataclass
class ModelArgs:
    model_name_or_path: str = ""
    """Local folder of an InternVL checkpoint in either layout: HF-native (`InternVLForConditionalGeneration` +
    tokenizer) or the original remote-code `InternVLChatModel`, converted in memory without running its code."""
    attn_implementation: str = "auto"
    """Attention kernel of training: auto (flex attention for the LLM on CUDA, with block masks for shared-prefix
    pairs and packed rows; sdpa_segments on CPU: one SDPA call per packed sample or answer), sdpa (dense block
    masks), sdpa_segments, flex_attention, eager, or flash_attention_2 (GPU with flash-attn)."""
    freeze_backbone: bool = False
    """Freeze the vision encoder (InternViT)."""
    freeze_mlp: bool = False
    """Freeze the vision-language projector (mlp1)."""
    freeze_llm: bool = False
    """Freeze the language model, including its output head."""
    unfreeze_vit_layers: int = 0
    """Make ViT layers [k:] trainable after freezing: -2 = last two layers, 2 = all but the first two."""
    unfreeze_lm_head: bool = False
    """Train the LLM output head even when the LLM is frozen or adapted with LoRA."""
    use_backbone_lora: int = 0
    """LoRA rank on the ViT attention and MLP (0 = off); alpha = 2 x rank."""
    use_llm_lora: int = 0
    """LoRA rank on the LLM attention and MLP projections (0 = off); alpha = 2 x rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    drop_path_rate: float = 0.0
    """Stochastic depth in the ViT, rising linearly over its layers up to this rate."""
    grad_checkpoint: bool = True
    """Gradient checkpointing in the ViT and the LLM (less memory, about 30% more compute)."""


@dataclass
class DataArgs(PipelineSettings):
    meta_path: str = ""
    """Meta JSON naming the datasets (root, annotation, data_augment, repeat_time, max_dynamic_patch)."""
    conv_style: str = DEFAULT_TEMPLATE
    """Conversation template: internvl2_5 (InternVL 2.5, 3 and the Qwen3-based 3.5), internvl3_5_gpt_oss, Hermes-2,
    internlm2-chat or phi3-chat; the one the checkpoint was trained with (its config's template)."""
    force_image_size: int | None = None
    """Tile size in pixels; must equal the model's vision image_size (None = take it from the model)."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """error: stop at the first bad record, naming file and line; skip: leave it out of every epoch (an epoch is one
    pass over the good records; the steps follow from them), count and list it once per epoch, report at the end."""
    dataloader_num_workers: int = 0
    """Background processes preparing batches."""
    measure_workers: int | None = None
    """Processes per rank measuring sample lengths for packing, length grouping and on_bad_sample=skip (0 or 1: in
    the rank's own process; None = the cores this process may use, divided by the ranks on its machine)."""
    packing: bool = False
    """Pack several samples (or preference pairs) into each row, isolated from each other (README "Packing");
    per_device_train_batch_size then counts packed rows."""
    max_packed_tokens: int = 16384
    """Packing: most tokens in a row (the InternVL 2.5 / 3 scripts use 16384)."""
    num_images_expected: int = 48
    """Packing: most image tiles (and video frames) in a row (the InternVL 2.5 / 3 scripts use 48)."""
    max_buffer_size: int = 20
    """Packing: most rows kept open while looking for a place for each sample (more: fuller rows)."""
    oversize_sample: Literal["error", "alone"] = "error"
    """Packing: a sample over max_packed_tokens or num_images_expected stops the run naming its file:line (error),
    or is trained in a row of its own (alone). Never cut."""
    group_by_length: bool = False
    """Without packing: batch samples of similar length together (less padding); lengths come from the length
    cache, and each epoch's order stays random across batches."""


@dataclass
class TrainArgs:
    output_dir: str = "runs/sft"
    """Where checkpoints, metrics.jsonl and the final model folder go."""
    num_train_epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run (> 0); -1 = derive from num_train_epochs (0 is refused: it trains nothing)."""
    per_device_train_batch_size: int = 1
    """Samples per micro-batch per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 4e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (the original's DeepSpeed config: 0.9)."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Schedule after warmup."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming up linearly from 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    loss_reduction: Literal["token", "sample", "square"] = "token"
    """How the SFT loss averages tokens over the whole optimizer step: token (each token alike), sample (each sample
    alike: weight 1/n), square (weight 1/sqrt(n), as InternVL's packed SFT); n = a sample's supervised tokens."""
    router_aux_loss_coef: float | None = None
    """MoE LLMs (Qwen3-MoE, GPT-OSS): weight of the router's load-balancing loss added to the loss (0 = off). None =
    as the original InternVL3.5 trains: the LLM config's router_aux_loss_coef, in SFT always for GPT-OSS and
    otherwise when the config's output_router_logits is on (docs/internvl3_5.md)."""
    bf16: bool = False
    """bfloat16 autocast (mixed precision); weights and optimizer state stay fp32."""
    save_dtype: SaveDtype = "auto"
    """Dtype of the weights in final/ (auto = the dtype the starting checkpoint's weights are stored in, so a bf16
    model is saved in bf16, not in the fp32 it trained in; or bf16, fp16, fp32)."""
    seed: int = 42
    """Seed for weights' dropout, data order, augmentation and repeat_time subsets."""
    shuffle: bool = True
    """Shuffle the data each epoch."""
    logging_steps: int = 1
    """Write metrics every this many steps."""
    save_steps: int = 0
    """Save a resumable checkpoint every this many steps (0 = only the final model)."""
    save_total_limit: int = 2
    """Keep at most this many step checkpoints (0 = keep all)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or 'auto' for the newest complete one in output_dir (none: start afresh)."""
    resume_data_check: bool = True
    """Refuse to resume when the data order differs from the checkpoint's (other samples or lengths, batch size,
    process count, seed or packing budgets), since the rows after the resume would not be the interrupted run's;
    false resumes anyway, in the new order."""
    overwrite_output_dir: bool = False
    """Delete the files of an earlier run in output_dir first (without it, such a folder is refused unless resuming)."""
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    """Also log metrics (and the resolved config) to a tracker, through accelerate; metrics.jsonl is always written.
    tensorboard: output_dir/tensorboard. wandb: project $WANDB_PROJECT (default internvl-tune), run named after
    output_dir, files in output_dir/wandb; WANDB_MODE=offline works without a network. mlflow: experiment
    $MLFLOW_EXPERIMENT_NAME (default internvl-tune), run named after output_dir, on mlflow's tracking server or
    store ($MLFLOW_TRACKING_URI). Each needs the extra of its name (pip install 'internvl-tune[wandb]')."""


def check_mlflow_store(uri: str | None) -> None:
    """Refuse, before anything loads, a tracking store MLflow would refuse at the first step: its default (a SQLite
    file, which needs the full `mlflow` with SQLAlchemy; mlflow-skinny has neither) and a file store without the
    opt-in MLflow 3 asks for."""
    if not uri and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            "train.report_to=mlflow: set MLFLOW_TRACKING_URI to your tracking server (http://HOST:5000), or to "
            "file:DIR with MLFLOW_ALLOW_FILE_STORE=true; its default SQLite store needs the full mlflow package"
        )
    is_file_store = bool(uri) and ("://" not in uri or uri.startswith("file:"))
    if is_file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(
            f"train.report_to=mlflow: MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true is set"
        )


@dataclass
class SFTConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def validate(self) -> None:
        if not self.model.model_name_or_path:
            raise ConfigError("model.model_name_or_path is required")
        if not self.data.meta_path:
            raise ConfigError("data.meta_path is required")
        from internvl_tune.data.templates import TEMPLATES, get_template  # lazily: it imports transformers

        m, d, t = self.model, self.data, self.train
        if d.conv_style not in TEMPLATES:
            raise ConfigError(f"data.conv_style: unknown template {d.conv_style!r}; known: {', '.join(TEMPLATES)}")
        try:
            get_template(d.conv_style, thinking=d.thinking)
        except UserError as e:
            raise ConfigError(f"data.thinking: {e}") from e
        if d.max_seq_length < 1:
            raise ConfigError(f"data.max_seq_length must be >= 1, got {d.max_seq_length}")
        if t.router_aux_loss_coef is not None and t.router_aux_loss_coef < 0:
            raise ConfigError(f"train.router_aux_loss_coef must be >= 0, got {t.router_aux_loss_coef}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "save_steps", "save_total_limit"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.logging_steps < 1:
            raise ConfigError(f"train.logging_steps must be >= 1, got {t.logging_steps}")
        if t.report_to != "none" and importlib.util.find_spec(t.report_to) is None:
            raise ConfigError(
                f"train.report_to={t.report_to} needs {t.report_to}: pip install 'internvl-tune[{t.report_to}]'"
            )
        if t.report_to == "mlflow":
            check_mlflow_store(os.environ.get("MLFLOW_TRACKING_URI"))
        for name in ("use_llm_lora", "use_backbone_lora"):
            if getattr(m, name) < 0:
                raise ConfigError(f"model.{name} (a LoRA rank) must be >= 0, got {getattr(m, name)}")
        for name in ("drop_path_rate", "lora_dropout"):
            if not 0 <= getattr(m, name) < 1:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(m, name)}")
        if not 1 <= d.min_dynamic_patch <= d.max_dynamic_patch:
            raise ConfigError(
                f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {d.min_dynamic_patch}, {d.max_dynamic_patch}"
            )
        if not 1 <= d.min_num_frame <= d.max_num_frame:
            raise ConfigError(f"need 1 <= min_num_frame <= max_num_frame, got {d.min_num_frame}, {d.max_num_frame}")
        if t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1:
            raise ConfigError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        if not 0 <= t.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if t.max_steps == 0 or t.max_steps < -1:
            raise ConfigError(
                f"train.max_steps={t.max_steps}: set the number of optimizer steps (> 0), or -1 to derive it from "
                "train.num_train_epochs"
            )
        if t.max_steps == -1 and t.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        for name in ("max_packed_tokens", "num_images_expected", "max_buffer_size"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(d, name)}")
        if d.measure_workers is not None and d.measure_workers < 0:
            raise ConfigError(
                f"data.measure_workers must be >= 0 (0 or 1: in the rank's process), got {d.measure_workers}"
            )
        if d.v2pe != "off" and d.v2pe_stride is None:
            raise ConfigError(
                f"data.v2pe={d.v2pe} needs data.v2pe_stride: the positions one image tile spans (1 to the model's image "
                "tokens per tile, 256 for InternVL 2.5 / 3; the stride chat and eval use)"
            )
        if d.v2pe_stride is not None and d.v2pe_stride < 1:
            raise ConfigError(f"data.v2pe_stride must be >= 1, got {d.v2pe_stride}")
        if d.packing and d.group_by_length:
            raise ConfigError("data.group_by_length is for unpacked batches; with data.packing rows are filled instead")
        if d.packing and m.attn_implementation.startswith("flash_attention"):
            raise ConfigError(ROW_MASK_KERNELS.format(m.attn_implementation, "data.packing=false"))
        if t.overwrite_output_dir and t.resume_from_checkpoint:
            raise ConfigError(
                "train.overwrite_output_dir deletes what train.resume_from_checkpoint would resume; set one"
            )


@dataclass
class MPOArgs:
    loss_type: list[str] | str = field(default_factory=lambda: ["sigmoid", "bco_pair", "sft"])
    """Loss mix: a list (or comma-separated string) of sigmoid, bco_pair, hinge, ipo, robust, sppo_hard, nca_pair,
    exo_pair, sft. Every accepted spelling, the original's included: docs/losses.md."""
    loss_weights: list[float] | None = None
    """One weight per loss_type entry; unset: MPO's 0.8, 0.2, 1.0 for [sigmoid, bco_pair, sft], 1.0 for a single
    type, else the original's sigmoid_loss_weight, bco_pair_loss_weight and rpo_alpha."""
    sigmoid_loss_weight: float | None = None
    """Original spelling (loss_weights unset): weight of sigmoid in a combination such as 'sigmoid,bco_pair'."""
    bco_pair_loss_weight: float | None = None
    """Original spelling (loss_weights unset): weight of bco_pair in a combination such as 'sigmoid,bco_pair'."""
    rpo_alpha: float | None = None
    """Original spelling (loss_weights unset): adds the SFT (chosen NLL) term with this weight."""
    beta: float = 0.1
    """DPO beta."""
    label_smoothing: float = 0.0
    """Label smoothing of sigmoid / robust / exo_pair."""
    sft_reduction: Literal["token", "sample", "square"] = "token"
    """SFT term over the step's chosen responses, weighted as train.loss_reduction: token mean (as the original),
    sample (the mean over pairs of each response's per-token mean NLL, the paper's), or square (weight 1/sqrt(n))."""
    reference: Literal["copy", "lora_disabled", "precomputed"] = "copy"
    """Reference model: a frozen copy in eval mode; the policy with its LoRA adapter disabled (no copy; needs
    use_llm_lora); or log-probs precomputed by `internvl-tune precompute-ref` (one model in memory)."""
    reference_cache: str | None = None
    """File of precomputed reference log-probs (default: output_dir/reference_logps.pt)."""
    pair_layout: Literal["shared", "separate"] = "shared"
    """shared: one [prompt | chosen | rejected] row per pair (image and prompt encoded once); separate: chosen and
    rejected as two rows, the original's layout (for checks)."""

    def loss_settings(self) -> dict[str, Any]:
        """The fields `PreferenceObjective.from_config` takes: the loss mix, beta, label_smoothing, sft_reduction."""
        names = ("loss_type", "loss_weights", "rpo_alpha", "sigmoid_loss_weight", "bco_pair_loss_weight")
        return {name: getattr(self, name) for name in (*names, "beta", "label_smoothing", "sft_reduction")}


@dataclass
class RLArgs:
    """Online RL after MPO (Cascade RL stage two, InternVL3.5): the loss and the group advantages
    (losses/rl.py, docs/losses.md "Online RL"). The defaults are the official stage: verl's GRPO advantage with
    GSPO's sequence ratio, seq-mean-token-mean, clip 0.2 / 0.2, no KL."""

    loss: Literal["gspo", "grpo"] = "gspo"
    """gspo: one importance ratio per response, the geometric mean of its token ratios (arXiv 2507.18071); grpo: the
    PPO-clipped ratio of each token (arXiv 2402.03300)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    """verl's names: token-mean (every token of the step alike), seq-mean-token-sum, seq-mean-token-mean (each
    response's token mean, then the mean over responses: verl's GSPO, whatever its loss_agg_mode), or
    seq-mean-token-sum-norm (token sums over responses x norm_length, Dr. GRPO); always over the whole step."""
    clip_ratio_low: float = 0.2
    """The ratio is clipped below at 1 - clip_ratio_low (verl's default; the GSPO paper uses 3e-4)."""
    clip_ratio_high: float = 0.2
    """The ratio is clipped above at 1 + clip_ratio_high (verl's default; the GSPO paper uses 4e-4)."""
    clip_ratio_c: float | None = None
    """grpo only: dual-clip bound c > 1, capping a token's loss at -A*c when A < 0 (arXiv 1912.09729); 0 = off;
    null = the conventions' (verl 3.0, trl off)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to the reference model, per token, aggregated as the loss (0 = off: no
    reference is needed)."""
    conventions: Literal["verl", "trl"] = "verl"
    """Where verl and TRL differ in numbers: the std epsilon, one-response groups, ratio and KL clamps, dual-clip
    and how GSPO's clip fraction is counted (docs/losses.md lists each)."""
    num_generations: int = 16
    """Responses sampled per prompt, the group of GRPO's advantage (InternVL3.5: 16)."""
    scale_rewards: Literal["group", "batch", "none", "mean"] = "group"
    """Advantage denominator: the group's reward std (GRPO), the std of the step's rewards (batch), none (Dr. GRPO,
    arXiv 2503.20783), or the group's mean reward (MaxRL, arXiv 2602.02710: weights a prompt by 1 / its pass rate;
    rewards must be >= 0)."""
    std_epsilon: float | None = None
    """Added to the std in the advantage; null = the conventions' (verl 1e-6, trl 1e-4)."""
    norm_length: int | None = None
    """seq-mean-token-sum-norm only: its constant divisor (the rollouts' most new tokens)."""
    prompts_per_step: int = 512
    """Prompts drawn per step over all ranks (each sampled num_generations times); a step is one rollout batch and
    its policy updates (InternVL3.5: 512)."""
    mini_batch_size: int = 32
    """Prompts per policy update (over all ranks, with their responses): a step makes prompts_per_step /
    mini_batch_size updates per ppo_epochs (InternVL3.5: 32)."""
    ppo_epochs: int = 1
    """Passes of policy updates over a step's rollouts (verl's ppo_epochs)."""
    responses_per_row: int | None = None
    """Responses of a group in one [prompt | r1 | ... | rk] row: None = the whole group (its image and prompt encoded
    once); fewer splits a group over rows (less memory per micro-batch, the prompt encoded once per row).
    train.per_device_train_batch_size counts these rows."""
    temperature: float = 1.0
    """Rollout sampling temperature (verl's default 1.0; 0 = greedy, useless for groups)."""
    top_k: int = 0
    """Rollout top-k (0 = no limit, as verl's -1)."""
    top_p: float = 1.0
    """Rollout nucleus sampling (1.0 = no limit)."""
    max_new_tokens: int = 4096
    """Longest response in tokens (InternVL3.5 used 32768 with vLLM); a prompt must leave this much of
    data.max_seq_length."""
    rollout_batch_size: int = 64
    """Responses generated together per `generate` call of the in-process (hf) rollout backend."""
    rollout_backend: Literal["hf", "server"] = "hf"
    """hf: rollouts by transformers generate in each rank's process, from the policy's own parameters (no weight
    push); server: by an OpenAI-compatible server (vLLM, SGLang, or our serve.py) at rl.server_url, the policy saved
    into rl.server_weights_dir and reloaded there after every step (docs/rl.md). API key: $INTERNVL_TUNE_API_KEY,
    else $OPENAI_API_KEY (never a setting: it would be written into config.resolved.json)."""
    server_url: str | None = None
    """server backend: the API root, e.g. http://localhost:8000/v1."""
    server_kind: Literal["internvl-tune", "vllm", "sglang"] = "internvl-tune"
    """server backend: whose reload endpoint the weight push calls (docs/rl.md): internvl-tune (serve.py),
    vllm (collective_rpc reload_weights, VLLM_SERVER_DEV_MODE=1) or sglang (update_weights_from_disk)."""
    server_weights_dir: str | None = None
    """server backend: the folder the server was started with; the policy is written there (atomically, HF layout,
    train.save_dtype) after each step. Never the starting checkpoint: it would be overwritten."""
    server_model: str | None = None
    """server backend: the served model's name (null: the first the server lists)."""
    server_concurrency: int = 8
    """server backend: most requests in flight per rank."""
    prompt_version: str = "en_r1"
    """How each question is asked and where the judge finds its answer: en_r1 / zh_r1 (think, then a boxed answer:
    the format reward's form), en, zh, en_v2, zh_v2 (as `internvl-tune sample`), or direct (the question as it is,
    the answer after "Answer:" or the whole response)."""
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward terms (rewards.py): accuracy, format, repetition, length, or a user's module:function."""
    reward_weights: list[float] = field(default_factory=lambda: [0.9, 0.1])
    """One weight per reward term; a response's reward is the weighted sum (InternVL3.5's geometry reward: 0.9
    accuracy + 0.1 format)."""
    length_buffer: int = 256
    """The length reward's buffer: the penalty falls from 0 at max_new_tokens - length_buffer to -1 at
    max_new_tokens (DAPO's overlong penalty)."""
    log_rollouts: bool = False
    """Write each step's responses, one line each with its prompt's file:line, question, answer, text, token count,
    reward terms and advantage, to output_dir/rollouts/step_NNNNNN.jsonl (verl's trainer.rollout_data_dir, TRL's
    log_completions). Off by default: at the official 512 prompts x 16 responses of up to 32k tokens a step is
    hundreds of MB of text."""

    def loss_settings(self) -> dict[str, Any]:
        """The fields `RLLoss` (losses/rl.py) takes."""
        names = ("loss", "loss_agg_mode", "clip_ratio_low", "clip_ratio_high", "conventions", "clip_ratio_c")
        return {name: getattr(self, name) for name in (*names, "kl_coef", "norm_length")}

    def advantage_settings(self) -> dict[str, Any]:
        """The keyword arguments of `group_advantages` (losses/rl.py)."""
        return {"conventions": self.conventions, "scale_rewards": self.scale_rewards, "std_epsilon": self.std_epsilon}

    def validate(self) -> None:
        """One `error:` line per bad value, named `rl.<field>`."""
        if self.num_generations < 1:
            raise ConfigError(f"rl.num_generations must be >= 1, got {self.num_generations}")
        if self.num_generations == 1 and self.conventions == "trl":
            raise ConfigError(
                "rl.num_generations=1: under conventions=trl a one-response group has advantage 0 (nothing to learn); "
                "sample >= 2 per prompt"
            )
        if self.scale_rewards == "mean":
            negative = [
                f"{name} (weight {weight:g})"
                for name, weight in zip(self.rewards, self.reward_weights, strict=False)
                if weight < 0 or (name in ("repetition", "length") and weight > 0)
            ]
            if negative:
                raise ConfigError(
                    f"rl.scale_rewards=mean divides by the group's mean reward, a pass rate, so rewards must be >= 0; "
                    f"{', '.join(negative)} can make them negative (use scale_rewards=group)"
                )
        if self.std_epsilon is not None and self.std_epsilon <= 0:
            raise ConfigError(
                f"rl.std_epsilon must be > 0 (a group of equal rewards has std 0), got {self.std_epsilon}"
            )
        for name in ("prompts_per_step", "mini_batch_size", "ppo_epochs", "max_new_tokens", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_step % self.mini_batch_size:
            raise ConfigError(
                f"rl.prompts_per_step={self.prompts_per_step} must be a multiple of rl.mini_batch_size="
                f"{self.mini_batch_size} (each update takes mini_batch_size prompts)"
            )
        if self.rollout_backend == "server" and not (self.server_url and self.server_weights_dir):
            raise ConfigError(
                "rl.rollout_backend=server needs rl.server_url (the API root, e.g. http://localhost:8000/v1) and "
                "rl.server_weights_dir (the folder the server was started with: each step's policy is pushed there)"
            )
        if self.server_concurrency < 1:
            raise ConfigError(f"rl.server_concurrency must be >= 1, got {self.server_concurrency}")
        if self.responses_per_row is not None and self.responses_per_row < 1:
            raise ConfigError(
                f"rl.responses_per_row must be >= 1 (or null: the whole group), got {self.responses_per_row}"
            )
        from internvl_tune.judge import EXTRACTION_VERSIONS  # lazily: the judge imports its scorers
        from internvl_tune.rewards import RewardSpec

        if self.prompt_version not in EXTRACTION_VERSIONS:
            raise ConfigError(
                f"rl.prompt_version: unknown {self.prompt_version!r}; use one of {', '.join(EXTRACTION_VERSIONS)}"
            )
        try:
            RewardSpec(tuple(self.rewards), tuple(self.reward_weights))
        except UserError as e:
            raise ConfigError(str(e)) from e
        from internvl_tune.losses.rl import RLLoss  # lazily: it imports torch

        try:
            RLLoss(**self.loss_settings())
        except ValueError as e:
            raise ConfigError(f"rl.{e}") from e


@dataclass
class RLConfig:
    """Online RL run (GSPO / GRPO after MPO): the defaults are InternVL3.5's online stage (docs/rl.md): the ViT
    frozen, at most 12 tiles per sample (split over its images), lr 1e-6 constant without warmup, clip 0.2 / 0.2,
    no KL, 16 responses per prompt, 512 prompts per step in updates of 32."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs(freeze_backbone=True))
    data: DataArgs = field(default_factory=lambda: DataArgs(max_seq_length=40960))
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            output_dir="runs/rl", learning_rate=1e-6, lr_scheduler_type="constant", warmup_ratio=0.0
        )
    )
    rl: RLArgs = field(default_factory=RLArgs)

    def validate(self) -> None:
        SFTConfig.validate(self)  # type: ignore[arg-type]
        self.rl.validate()
        if self.data.packing or self.data.group_by_length:
            raise ConfigError(
                "data.packing and data.group_by_length are for SFT and MPO: online RL rows are a prompt and its "
                "responses (rl.responses_per_row); unset them"
            )
        if self.model.attn_implementation.startswith("flash_attention"):
            raise ConfigError(
                f"model.attn_implementation={self.model.attn_implementation} cannot keep a group's responses apart "
                "in its [prompt | r1 | ... | rG] row; use auto (flex attention on CUDA), sdpa_segments or sdpa"
            )
        if self.rl.max_new_tokens >= self.data.max_seq_length:
            raise ConfigError(
                f"rl.max_new_tokens={self.rl.max_new_tokens} leaves no room for a prompt in data.max_seq_length="
                f"{self.data.max_seq_length}"
            )
        if self.rl.rollout_backend == "server" and _same_folder(
            self.rl.server_weights_dir, self.model.model_name_or_path
        ):
            raise ConfigError(
                f"rl.server_weights_dir={self.rl.server_weights_dir} is the starting checkpoint: each step's push "
                "would overwrite it; copy the checkpoint to another folder, serve that one and name it here"
            )
        if self.rl.temperature == 0 and self.rl.num_generations > 1:
            raise ConfigError(
                "rl.temperature=0 samples one response num_generations times: every group has advantage 0"
            )


def _same_folder(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


@dataclass
class MPOConfig:
    """MPO run: defaults follow the InternVL 2.5 MPO scripts (docs/original-differences.md §7.3)."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs(drop_path_rate=0.1))
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(output_dir="runs/mpo", learning_rate=1e-6, weight_decay=0.05)
    )
    mpo: MPOArgs = field(default_factory=MPOArgs)

    def validate(self) -> None:
        SFTConfig.validate(self)  # type: ignore[arg-type]
        if self.data.packing and self.mpo.pair_layout != "shared":
            raise ConfigError("data.packing packs shared-prefix pairs; set mpo.pair_layout=shared")
        if self.mpo.pair_layout == "shared" and self.model.attn_implementation.startswith("flash_attention"):
            raise ConfigError(ROW_MASK_KERNELS.format(self.model.attn_implementation, "mpo.pair_layout=separate"))
        if self.mpo.reference == "precomputed" and self.data.v2pe == "random":
            raise ConfigError(
                "mpo.reference=precomputed needs data.v2pe off or fixed: random draws other strides each epoch"
            )
        if self.mpo.reference == "lora_disabled" and not (self.model.use_llm_lora or self.model.use_backbone_lora):
            raise ConfigError("mpo.reference=lora_disabled needs a LoRA policy (use_llm_lora or use_backbone_lora)")
        # The recipe builds the objective through the same function, so a spelling accepted here trains as read.
        from internvl_tune.losses.objective import PreferenceObjective

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recipe warns about ignored settings when it builds the objective
            try:
                PreferenceObjective.from_config(**self.mpo.loss_settings())
            except ValueError as e:
                raise ConfigError(f"mpo.{e}") from e


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a field's type annotation, converting int -> float where a float is expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, where) for v in value]
    if origin is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):  # tuple[X, ...]: a YAML list
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(annotation)[0], where) for v in value)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: must be one of {list(typing.get_args(annotation))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-5" (no dot) as a string
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def set_field(section: Any, name: str, value: Any, where: str) -> None:
    """Set a dataclass field to a (YAML-parsed) value checked against its type; `where` starts the error message."""
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"{where}: unknown field {name!r}; known fields: {known}")
    setattr(section, name, _coerce(value, hints[name], where))


def apply_values(config: Any, values: dict[str, Any], where: str) -> None:
    """Set `{section: {field: value}}` on a config of sections."""
    for section_name, section_values in values.items():
        if section_name not in {f.name for f in dataclasses.fields(config)}:
            raise ConfigError(f"{where}: unknown section {section_name!r}")
        if not isinstance(section_values, dict):
            raise ConfigError(f"{where}: section {section_name!r} must be a mapping")
        section = getattr(config, section_name)
        for name, value in section_values.items():
            set_field(section, name, value, f"{where}: {section_name}.{name}")


def split_override(override: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as YAML); a value YAML cannot parse (`a: b: c`) stays a string."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value")
    key, raw = override.split("=", 1)
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return key, raw


def apply_override(config: Any, override: str) -> None:
    """Apply one `section.field=value` or unique `field=value` override."""
    key, value = split_override(override)
    if "." in key:
        section_name, name = key.split(".", 1)
        if section_name not in {f.name for f in dataclasses.fields(config)}:
            raise ConfigError(f"override {override!r}: unknown section {section_name!r}")
        set_field(getattr(config, section_name), name, value, f"override {override!r}")
        return
    owners = [
        f.name
        for f in dataclasses.fields(config)
        if key in {g.name for g in dataclasses.fields(getattr(config, f.name))}
    ]
    if len(owners) != 1:
        problem = "unknown field" if not owners else f"ambiguous field (in {owners}); write section.{key}"
        raise ConfigError(f"override {override!r}: {problem}")
    set_field(getattr(config, owners[0]), key, value, f"override {override!r}")


def check_paths(config: Any) -> None:
    """The model folder and the meta file a run reads exist: a mistyped path is reported before any work starts.

    Separate from `validate()`, so a config can be loaded and checked where its model and data are not.
    """
    model = Path(config.model.model_name_or_path)
    if not (model / "config.json").is_file():
        problem = "no such folder" if not model.is_dir() else "the folder has no config.json"
        raise ConfigError(f"model.model_name_or_path: {model}: {problem} (models are loaded from local folders)")
    if not Path(config.data.meta_path).is_file():
        raise ConfigError(f"data.meta_path: {config.data.meta_path}: no such file")


def check_installed(config: Any) -> None:
    """The optional packages the run asks for are installed: flash-attn for `flash_attention_2`, DeepSpeed for an
    accelerate ZeRO config (accelerate marks a DeepSpeed run with `ACCELERATE_USE_DEEPSPEED=true`). Without them
    the run would stop inside transformers or accelerate with a traceback, after the model or the engine started
    loading; looked up, not imported, so the check takes no time.
    """
    if config.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs flash-attn, which is not installed: pip install "
            "flash-attn (a CUDA build, see README 'GPU install'), or use auto"
        )
    if (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and importlib.util.find_spec("deepspeed") is None
    ):
        raise ConfigError(
            "the accelerate config asks for DeepSpeed (ZeRO), which is not installed: pip install deepspeed, or launch "
            "with configs/accelerate/ddp.yaml or fsdp2.yaml"
        )


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML run file, `{section: {field: value}}`, not yet checked against a config class."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return values


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build a config: defaults, then the YAML file, then the overrides, then `validate()`."""
    config = cls()
    if path is not None:
        apply_values(config, read_run_file(path), str(path))
    for override in overrides:
        apply_override(config, override)
    config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string right after each field, in the class or the dataclass it extends), for `--help`
    and the docs."""
    docs = {}
    for owner in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(inspect.getsource(owner)).body[0].body
        for node, nxt in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs
