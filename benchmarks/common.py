"""What the step benchmarks (`mpo_step.py`, `sft_step.py`) share: model shapes and presets, the random model folder,
the synthetic images and answers, the child-process harness, counted FLOPs, device peaks, the one-step profile and
the report helpers.

Counted FLOPs (model FLOPs: what the workload needs, the same for every tool that trains on it). Parameters are
counted per token that passes through them, each multiply-add as 2 FLOPs:

- ViT: every tile is `(S/14)^2` patches + 1 class token through 24-ish layers of `4 d^2 + 2 d F` weights (QKV,
  projection, MLP) plus the patch embedding (`3 * 14^2 * d`, per patch).
- Projector: `(S/14)^2 / 4` tokens per tile (pixel shuffle 0.5) through `4 d_vit x d_llm` and `d_llm x d_llm`.
- LLM: every non-padding position through `2 d (heads * head_dim) + 2 d (kv_heads * head_dim) + 3 d F` weights per
  layer (Q, O, K, V, gate/up/down). A mixture of experts (InternVL3.5's Qwen3-MoE and GPT-OSS presets) counts the
  weights a token runs, its active parameters: `k * 3 d F_expert` for its k experts plus the router's `d E`. The
  embedding lookup is not a matmul and is not counted.
- LM head: `d x vocab`, only at the positions a loss reads (the labelled / answer tokens): both tools score only
  those (ours gathers them, TRL uses its fused LM head), and the rest of a `[B, T, V]` product would be waste.
- Attention scores and values: per layer `4 * (heads * head_dim) * pairs` for a forward, where `pairs` is the number of
  (query, key) pairs the mask allows: `T (T + 1) / 2` for a causal row of T tokens (the "causal half" of the usual
  `4 T^2 d`), `T^2` for a ViT tile; in a shared-prefix MPO row `[P | C | R]` the rejected answer sees the prompt and
  itself: `(P + C)(P + C + 1) / 2 + R P + R (R + 1) / 2`.

A trained pass costs 3 forwards (forward + backward: `6 N` per token for the weights, `3 x` the attention); a frozen
reference pass costs 1 (`2 N` per token). All parameters of the policy are trained. Not counted: recomputation by
gradient checkpointing, padding positions, norms, biases, activations, the optimizer. Achieved model TFLOP/s =
counted FLOPs of the timed steps / their wall time; on a GPU also as a share of the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SEED = 42
MODEL_SEED = 0
QUESTION = "<image>\nDescribe the image in detail."
WORDS = (
    "the red circle is left of a blue square and a green triangle sits above the yellow shape while two purple "
    "shapes are next to one white square there are three shapes in the picture"
).split()
# The tokenizer is trained on a fixed text, so the model folder depends on the shape only and both benchmarks
# (and reruns) reuse one folder per shape.
TOKENIZER_TEXTS = (QUESTION, " ".join(WORDS))
# An image whose aspect ratio 1.5 picks the 3 x 2 grid with max_dynamic_patch=6: 6 tiles + the thumbnail.
IMAGE_SIZE_PX = (1344, 896)
# Steps run after the timed ones when --profile is given: the profiler's warm-up step, then the recorded one.
PROFILE_STEPS = 2
# glibc keeps freed blocks and moves its mmap threshold with the workload, so the peak RSS of identical CPU runs here
# differs by up to 150 MiB, more than a reference copy. With a fixed threshold every block >= 128 KiB is returned to
# the system when freed, and peak RSS becomes the peak of memory actually held (identical runs agree within 1 MiB).
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# Dense bf16 tensor-core peaks (vendor data sheets), matched in this order against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


# ----------------------------------------------------------------------------------------------------------------------
# Model shapes.


@dataclass(frozen=True)
class ModelShape:
    """An InternVL: InternViT + pixel-shuffle projector + Qwen2 LLM (vocab padded to `vocab_size`)."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vocab_size: int = 151_674
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    # InternVL3.5's LLMs: the family, a head width other than hidden / heads, and a mixture of experts (each token
    # runs experts_per_token of num_experts SwiGLU experts of width expert_ffn; 0 experts = dense, text_ffn wide).
    text_model_type: str = "qwen2"
    text_head_dim: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_ffn: int = 0

    @property
    def head_dim(self) -> int:
        return self.text_head_dim or self.text_hidden // self.text_heads

    @property
    def vit_tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + the class token

    @property
    def image_tokens_per_tile(self) -> int:
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    def describe(self) -> str:
        return (
            f"ViT {self.vision_hidden} x {self.vision_layers} layers ({self.vision_heads} heads, FFN "
            f"{self.vision_ffn}), LLM {self.text_hidden} x {self.text_layers} layers ({self.text_heads} heads, "
            f"{self.text_kv_heads} KV heads, FFN {self.text_ffn}), vocab {self.vocab_size:,}, {self.image_size} px "
            f"tiles, patch {self.patch_size}, downsample {self.downsample_ratio}"
            + (f", {self.text_model_type}" if self.text_model_type != "qwen2" else "")
            + (f", head dim {self.text_head_dim}" if self.text_head_dim else "")
            + (
                f", MoE: {self.experts_per_token} of {self.num_experts} experts per token, expert FFN {self.expert_ffn}"
                if self.num_experts
                else ""
            )
        )


_VIT_300M = {"vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16, "vision_ffn": 4096}
PRESETS = {
    # InternViT-300M + Qwen2.5-0.5B
    "internvl2_5-1b": ModelShape(
        **_VIT_300M, text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_ffn=4864
    ),
    # InternViT-300M + Qwen2.5-1.5B
    "internvl3-2b": ModelShape(
        **_VIT_300M, text_hidden=1536, text_layers=28, text_heads=12, text_kv_heads=2, text_ffn=8960
    ),
    # InternViT-300M + Qwen2.5-7B
    "internvl3-8b": ModelShape(
        **_VIT_300M, text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_ffn=18944
    ),
    # InternViT-300M + Qwen3-8B
    "internvl3_5-8b": ModelShape(
        **_VIT_300M,
        text_hidden=4096,
        text_layers=36,
        text_heads=32,
        text_kv_heads=8,
        text_ffn=12288,
        text_model_type="qwen3",
        text_head_dim=128,
    ),
    # InternViT-300M + Qwen3-30B-A3B (128 experts, 8 per token)
    "internvl3_5-30b-a3b": ModelShape(
        **_VIT_300M,
        text_hidden=2048,
        text_layers=48,
        text_heads=32,
        text_kv_heads=4,
        text_ffn=6144,
        text_model_type="qwen3_moe",
        text_head_dim=128,
        num_experts=128,
        experts_per_token=8,
        expert_ffn=768,
    ),
    # InternViT-300M + GPT-OSS-20B (32 experts, 4 per token)
    "internvl3_5-gpt-oss-20b-a4b": ModelShape(
        **_VIT_300M,
        text_hidden=2880,
        text_layers=24,
        text_heads=64,
        text_kv_heads=8,
        text_ffn=2880,
        text_model_type="gpt_oss",
        text_head_dim=64,
        num_experts=32,
        experts_per_token=4,
        expert_ffn=2880,
    ),
}
# Small enough for a 2-core CPU; the vocabulary is the real one, so the LM head and embedding weigh what they do.
DEFAULT_SHAPE = ModelShape(
    vision_hidden=256,
    vision_layers=4,
    vision_heads=4,
    vision_ffn=1024,
    text_hidden=512,
    text_layers=4,
    text_heads=8,
    text_kv_heads=2,
    text_ffn=2048,
)
_SHAPE_FLAGS = [
    f.name
    for f in dataclasses.fields(ModelShape)
    if f.name not in ("patch_size", "downsample_ratio", "text_model_type")
]


def add_common_args(p: argparse.ArgumentParser, *, configs: tuple[str, ...], workdir: str, answer_tokens: int) -> None:
    """Flags both benchmarks take: model shape (preset, then single-field overrides), data, run and output."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="real InternVL shapes (flags below override fields)")
    for name in _SHAPE_FLAGS:
        default = getattr(DEFAULT_SHAPE, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"without --preset: {default}")
    p.add_argument(
        "--text-model-type", choices=("qwen2", "qwen3", "qwen3_moe", "gpt_oss"), help="the LLM family (default qwen2)"
    )
    p.add_argument("--max-dynamic-patch", type=int, default=6, help="tiles per image (a thumbnail is added)")
    p.add_argument("--answer-tokens", type=int, default=answer_tokens, help="tokens of each answer")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--timed-steps", type=int, default=4)
    p.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_false")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU); the model folder is saved in bf16")
    p.add_argument(
        "--attn-implementation",
        default="auto",
        help="our runs' model.attn_implementation (auto: flex attention on CUDA, sdpa_segments on CPU; sdpa: dense "
        "block masks); TRL loads the model with SDPA",
    )
    p.add_argument("--configs", default=",".join(configs), help=f"comma-separated subset of {configs}")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"record one more step of each run with torch.profiler ({PROFILE_STEPS} untimed steps are added: the "
        "profiler's warm-up, then the recorded one) and add a profile section to the report",
    )
    p.add_argument("--workdir", default=workdir, help="data and run outputs")
    p.add_argument("--models", help="folder of the random model folders, cached per shape (default: WORKDIR/models)")


def finish_common_args(p: argparse.ArgumentParser, args: argparse.Namespace, configs: tuple[str, ...]) -> None:
    """Validate the common flags; set `args.shape`, `args.names` and `args.steps`."""
    if args.warmup_steps < 1 or args.timed_steps < 1:
        p.error("need --warmup-steps >= 1 (TRL's step times are taken between step ends) and --timed-steps >= 1")
    base = PRESETS[args.preset] if args.preset else DEFAULT_SHAPE
    args.shape = dataclasses.replace(
        base, **{n: getattr(args, n) for n in (*_SHAPE_FLAGS, "text_model_type") if getattr(args, n) is not None}
    )
    if (args.shape.num_experts > 0) != (args.shape.text_model_type in ("qwen3_moe", "gpt_oss")):
        p.error(
            "--num-experts (with --experts-per-token, --expert-ffn) goes with --text-model-type qwen3_moe or gpt_oss"
        )
    args.names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(args.names) - set(configs))
    if unknown:
        p.error(f"--configs: unknown configuration(s) {unknown}; known: {configs}")
    args.steps = args.warmup_steps + args.timed_steps + (PROFILE_STEPS if args.profile else 0)
    args.models = args.models or str(Path(args.workdir) / "models")


# ----------------------------------------------------------------------------------------------------------------------
# The workload: a random model folder, images and answers.


def build_tokenizer():
    from internvl_tune.testing.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(TOKENIZER_TEXTS)


def model_dir_for(shape: ModelShape, models: str | Path, bf16: bool) -> Path:
    """A random InternVL of `shape` in the folder `models`, built once per shape and dtype (and reused after).

    The config is the tiny one of `internvl_tune.testing.tiny` with the shape's FFN widths, a vocabulary padded to
    `shape.vocab_size` (embedding and LM head rows past the tokenizer's ids are never produced by it) and room
    for long rows in the position settings. The folder appears only once complete.
    """
    key = json.dumps([dataclasses.asdict(shape), TOKENIZER_TEXTS, MODEL_SEED, bf16], sort_keys=True)
    path = Path(models) / f"model-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import InternVLForConditionalGeneration

    from internvl_tune.atomic import atomic_dir
    from internvl_tune.constants import IMG_CONTEXT_TOKEN
    from internvl_tune.testing.tiny import build_tiny_config

    tokenizer = build_tokenizer()
    if len(tokenizer) > shape.vocab_size:
        raise SystemExit(f"error: --vocab-size {shape.vocab_size} is below the tokenizer's {len(tokenizer)} ids")
    config = build_tiny_config(
        shape.vocab_size,
        tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        vision_hidden_size=shape.vision_hidden,
        vision_layers=shape.vision_layers,
        vision_heads=shape.vision_heads,
        text_hidden_size=shape.text_hidden,
        text_layers=shape.text_layers,
        text_heads=shape.text_heads,
        text_kv_heads=shape.text_kv_heads,
        downsample_ratio=shape.downsample_ratio,
        llm=shape.text_model_type,
    )
    config.vision_config.intermediate_size = shape.vision_ffn
    config.text_config.intermediate_size = shape.text_ffn
    text = config.text_config
    if shape.text_model_type != "qwen2":
        text.head_dim = shape.head_dim
    if shape.text_model_type == "qwen3_moe":
        text.num_experts, text.num_experts_per_tok = shape.num_experts, shape.experts_per_token
        text.moe_intermediate_size = shape.expert_ffn
    elif shape.text_model_type == "gpt_oss":
        text.num_local_experts, text.num_experts_per_tok = shape.num_experts, shape.experts_per_token
        text.intermediate_size = shape.expert_ffn  # GPT-OSS's every layer is MoE; its experts' width
        text.sliding_window = 128
    config.text_config.max_position_embeddings = 32768
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of billions of weights: faster there
    torch.manual_seed(MODEL_SEED)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config)
    if bf16:
        model = model.to(torch.bfloat16)  # training loads it as fp32 all the same; half the disk and load time
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"built {path} ({shape.describe()}) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def answer_text(seed: int, num_words: int) -> str:
    words = [WORDS[(seed * 7 + i * 13) % len(WORDS)] for i in range(num_words)]
    sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, num_words, 12)]
    return " ".join(sentences)


def answer_of_tokens(tokenizer, seed: int, num_tokens: int) -> str:
    """An answer of at least `num_tokens` tokens (the fewest words that reach it)."""
    words = answer_text(seed, 2 * num_tokens).split()
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer(" ".join(words[:mid]), add_special_tokens=False).input_ids) >= num_tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


def write_image(path: Path, i: int) -> None:
    """Image i: a few shapes on white, so tiles differ."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", IMAGE_SIZE_PX, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for k in range(6):
        x, y = (i * 97 + k * 211) % 1100, (i * 53 + k * 149) % 700
        draw.ellipse((x, y, x + 200, y + 160), fill=((k * 70) % 256, (i * 40) % 256, 200 - k * 30))
    image.save(path)


def write_dataset(data_dir: Path, records: list[dict[str, Any]]) -> Path:
    """records.jsonl (each record's image i.png is drawn) and meta.json; returns the meta path."""
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        write_image(data_dir / "images" / record["image"], i)
    (data_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = data_dir / "meta.json"
    meta.write_text(
        json.dumps(
            {"bench": {"root": "images", "annotation": "records.jsonl", "data_augment": False, "repeat_time": 1}}
        )
    )
    return meta


def active_parameters(shape: ModelShape, num_params: int) -> int:
    """Of a model folder's `num_params`, those a token runs: all but (E - k) / E of the experts' weights."""
    if not shape.num_experts:
        return num_params
    per_expert = 3 * shape.text_hidden * shape.expert_ffn
    if shape.text_model_type == "gpt_oss":
        per_expert += 2 * shape.expert_ffn + shape.text_hidden  # its experts' gate/up and down biases
    expert_weights = shape.text_layers * shape.num_experts * per_expert
    return num_params - expert_weights * (shape.num_experts - shape.experts_per_token) // shape.num_experts


def num_parameters(model_dir: Path) -> int:
    """Parameters in the folder's safetensors files (shapes from the headers; nothing is loaded)."""
    import math

    from safetensors import safe_open

    num = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                num += math.prod(f.get_slice(key).get_shape())
    return num


# ----------------------------------------------------------------------------------------------------------------------
# Counted FLOPs (the rules are in the module docstring).


@dataclass
class Work:
    """What one pass over a batch computes, padding excluded."""

    tiles: int  # ViT tiles
    llm_tokens: int  # LLM positions
    attention_pairs: int  # (query, key) pairs the LLM's masks allow, over all rows
    scored: int  # positions the LM head is applied to

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


def causal_pairs(length: int) -> int:
    """(query, key) pairs of a causal row of `length` tokens."""
    return length * (length + 1) // 2


def shared_row_pairs(prompt: int, chosen: int, rejected: int) -> int:
    """(query, key) pairs of a shared-prefix row `[prompt | chosen | rejected]`: causal over prompt + chosen, then
    the rejected answer sees the prompt and itself. P=2, C=2, R=1 (the mask drawn in `pair_collate`): 10 + 2 + 1."""
    return group_row_pairs(prompt, [chosen, rejected])


def group_row_pairs(prompt: int, responses: list[int]) -> int:
    """(query, key) pairs of a group row `[prompt | r1 | ... | rG]` (`group_collate`): causal over prompt + r1, then
    every later response sees the prompt and itself. P=2, responses [2, 1] (the row drawn there): 10 + 2 + 1."""
    first, *later = responses
    return causal_pairs(prompt + first) + sum(n * prompt + causal_pairs(n) for n in later)


def forward_flops(shape: ModelShape, work: Work) -> float:
    """Counted FLOPs of one forward pass doing `work`."""
    s = shape
    vit_weights = s.vision_layers * (4 * s.vision_hidden**2 + 2 * s.vision_hidden * s.vision_ffn)
    patch_weights = 3 * s.patch_size**2 * s.vision_hidden
    vit_tokens = work.tiles * s.vit_tokens_per_tile
    vit = 2 * (vit_weights * vit_tokens + patch_weights * work.tiles * (s.vit_tokens_per_tile - 1))
    vit += s.vision_layers * 4 * s.vision_hidden * work.tiles * s.vit_tokens_per_tile**2
    shuffled = int(s.vision_hidden / s.downsample_ratio**2)
    projector = 2 * (shuffled * s.text_hidden + s.text_hidden**2) * work.tiles * s.image_tokens_per_tile
    q_width, kv_width = s.text_heads * s.head_dim, s.text_kv_heads * s.head_dim
    if s.num_experts:  # the weights a token runs: its k experts and the router
        mlp_weights = s.experts_per_token * 3 * s.text_hidden * s.expert_ffn + s.text_hidden * s.num_experts
    else:
        mlp_weights = 3 * s.text_hidden * s.text_ffn
    llm_weights = s.text_layers * (2 * s.text_hidden * q_width + 2 * s.text_hidden * kv_width + mlp_weights)
    llm = 2 * llm_weights * work.llm_tokens + s.text_layers * 4 * q_width * work.attention_pairs
    head = 2 * s.text_hidden * s.vocab_size * work.scored
    return float(vit + projector + llm + head)


def step_flops(shape: ModelShape, trained: Work, reference: Work | None = None) -> float:
    """Counted FLOPs of a training step: forward + backward (3 forwards) of `trained`, a forward of `reference`."""
    return 3 * forward_flops(shape, trained) + (forward_flops(shape, reference) if reference else 0.0)


def device_peak_tflops(device: str) -> tuple[str, float | None]:
    """(device name, its dense bf16 peak in TFLOP/s, or None when not known / a CPU)."""
    if device != "cuda":
        return "cpu", None
    import torch

    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------------------------------
# Child processes: each configuration runs in its own process (start-up not timed, peak memory not shared).


def spawn(
    script: str, name: str, argv: list[str], args: argparse.Namespace, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run configuration `name` of `script` in a child process; its result dict, or {"error": ...}."""
    env = {**os.environ, **(env_extra or {})}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate picks a GPU whenever one is visible
    out = Path(args.workdir) / f"{name}.json"
    out.unlink(missing_ok=True)
    busy_before, own_before, start = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    completed = subprocess.run([sys.executable, script, *argv, "--child", name], env=env)
    if completed.returncode != 0:
        return {"error": f"exit code {completed.returncode} (its output is above in the log)"}
    # CPU time that other processes took from the machine while the child ran, in cores on average.
    others = (busy_cpu_s() - busy_before - (children_cpu_s() - own_before)) / (time.perf_counter() - start)
    return {**json.loads(out.read_text()), "other_cpu_cores": max(0.0, others)}


def child_main(args: argparse.Namespace, run: Callable[[], dict[str, Any]], *, profile: bool) -> None:
    """In the child: `run()` (with the one-step profiler when `profile`), then peak memory; writes the result."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU")
    if profile:
        profiler = StepProfiler(args.steps, args.device, Path(args.workdir) / f"trace-{args.child}.json")
        with profiler:
            result = run()
        result["profile"] = profiler.summary
    else:
        result = run()
    result["peak_memory_bytes"] = peak_memory_bytes(args.device)
    (Path(args.workdir) / f"{args.child}.json").write_text(json.dumps(result, indent=2))


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def trl_step_times(step_ends: list[float], warmup_steps: int, timed_steps: int) -> tuple[list[float], float]:
    """(every step's time, wall time of the timed steps) from TRL's `on_step_end` times: step k is timed from the
    end of step k - 1 (data loading included) to its own end, so step 1 has no time."""
    times = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    return times, step_ends[warmup_steps + timed_steps - 1] - step_ends[warmup_steps - 1]


def tokenizer_only_processor(tokenizer):
    """A `ProcessorMixin` holding only the tokenizer: TRL's vision path takes the tokenizer (pad id) from a
    processor, and the stock `InternVLProcessor` needs torchvision; the pixels come from our samples."""
    from transformers import ProcessorMixin

    class TokenizerOnlyProcessor(ProcessorMixin):
        attributes = ["tokenizer"]

        def __init__(self, tokenizer):
            super().__init__(tokenizer)

    return TokenizerOnlyProcessor(tokenizer)


def step_clock():
    """A TRL callback that records the time of every step end and every logged loss."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(logs)

    return StepClock()


# ----------------------------------------------------------------------------------------------------------------------
# One step under torch.profiler.


class StepProfiler:
    """Records training step `step` (1-based, steps counted by optimizer steps) of this process.

    The recipes and TRL run their own loops, so the profiler is advanced by a global optimizer step hook (a public
    torch API): a "step" is the time from one optimizer step's end to the next one's, i.e. logging of the previous
    step, data loading, forward, backward and the optimizer. Step `step - 1` is the profiler's warm-up (traced, then
    discarded), so neither recorded step is timed for throughput. On a GPU the device is synchronised at the end of
    those two steps, so the recorded window holds exactly that step's kernels.
    """

    def __init__(self, step: int, device: str, trace_path: Path, *, top: int = 8):
        assert step >= 2, "the profiler needs one warm-up step before the recorded one"
        self.step, self.device, self.trace_path, self.top = step, device, trace_path, top
        self.num_steps = 0
        self.summary: dict[str, Any] | None = None

    def __enter__(self) -> StepProfiler:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        self._synchronize = torch.cuda.synchronize if self.device == "cuda" else None
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=self.step - 2, warmup=1, active=1, repeat=1),
            on_trace_ready=self._ready,
        )
        self.hook = register_optimizer_step_post_hook(self._on_optimizer_step)
        self.profiler.start()
        return self

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.num_steps += 1
        if self._synchronize is not None and self.num_steps >= self.step - 1:
            self._synchronize()
        self.profiler.step()

    def _ready(self, profiler) -> None:
        profiler.export_chrome_trace(str(self.trace_path))
        trace = json.loads(self.trace_path.read_text())
        ops = None
        if self.device != "cuda":  # self CPU time per op; on a GPU the kernels come from the trace
            ops = [(e.key, e.count, e.self_cpu_time_total) for e in profiler.key_averages()]
        self.summary = summarize_trace(trace, self.device, ops=ops, top=self.top)
        self.summary["trace"] = str(self.trace_path)

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        self.profiler.stop()


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def summarize_trace(
    trace: dict[str, Any], device: str, *, ops: list[tuple[str, int, float]] | None = None, top: int = 8
) -> dict[str, Any]:
    """Busy time, host gaps and the top kernels / ops of the one recorded step of a Chrome trace (times in us).

    Busy: the union of GPU kernels, copies and memsets (on a GPU) or of torch ops on any thread (on a CPU) inside
    the `ProfilerStep#N` window. Host gaps: the rest of the window, when the device (or, on a CPU, torch) waits
    for Python, data loading or a synchronisation; each of the largest is named by the innermost torch op running
    on the host at its middle, or by the op it follows. Top: kernels by total GPU time (`ops`: by self CPU time
    from `key_averages()`, on a CPU).

    Example: window [0, 10], kernels [1, 3] and [2, 4], [6, 7]: busy 4 (3 + 1), gaps [0, 1], [4, 6], [7, 10].
    """
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    window = next(e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#"))
    start, end = float(window["ts"]), float(window["ts"]) + float(window["dur"])
    busy_cats = {"kernel", "gpu_memcpy", "gpu_memset"} if device == "cuda" else {"cpu_op"}
    clipped = [
        (max(start, float(e["ts"])), min(end, float(e["ts"]) + float(e["dur"])))
        for e in events
        if e.get("cat") in busy_cats
    ]
    busy = merge_intervals([(a, b) for a, b in clipped if b > a])
    gaps, cursor = [], start
    for a, b in busy:
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if end > cursor:
        gaps.append((cursor, end))
    host_ops = [
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in events if e.get("cat") == "cpu_op"
    ]

    def host_activity(gap_start: float, gap_end: float) -> str:
        middle = (gap_start + gap_end) / 2
        running = [op for op in host_ops if op[0] <= middle <= op[1]]
        if running:
            return "during " + max(running)[2]  # the latest-starting one is the innermost
        before = [op for op in host_ops if op[1] <= gap_start + 1.0]
        if before:
            return "after " + min(before, key=lambda op: (-op[1], op[0]))[2]  # the outermost of those ending last
        return "at the step start"

    largest = sorted(gaps, key=lambda g: g[0] - g[1])[:3]
    if device == "cuda":
        by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in events:
            if e.get("cat") == "kernel" and start <= float(e["ts"]) < end:
                by_name[e["name"]][0] += 1
                by_name[e["name"]][1] += float(e["dur"])
        top_rows = sorted(((n, int(c), t) for n, (c, t) in by_name.items()), key=lambda r: -r[2])[:top]
        num_kernels = sum(int(c) for c, _ in by_name.values())
    else:
        top_rows = sorted((r for r in ops or [] if not r[0].startswith("ProfilerStep")), key=lambda r: -r[2])[:top]
        num_kernels = None
    busy_us = sum(b - a for a, b in busy)
    return {
        "wall_ms": (end - start) / 1e3,
        "busy_ms": busy_us / 1e3,
        "busy_kind": "GPU busy" if device == "cuda" else "CPU op time",
        "num_kernels": num_kernels,
        "gap_ms": (end - start - busy_us) / 1e3,
        "num_gaps_over_1ms": sum(1 for a, b in gaps if b - a >= 1e3),
        "largest_gaps": [
            {"at_ms": (a - start) / 1e3, "ms": (b - a) / 1e3, "host": host_activity(a, b)} for a, b in largest
        ],
        "top": [{"name": n, "calls": c, "ms": t / 1e3} for n, c, t in top_rows],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report helpers.


def evict(paths: list[Path]) -> None:
    """Drop `paths` from the page cache, so the next read is a cold one (the I/O benchmarks)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def timed(label: str, run: Callable[[], object], *, width: int = 44, precision: int = 2) -> object:
    """Run `run`, print its wall time on a line labelled `label`, return its result."""
    start = time.perf_counter()
    out = run()
    print(f"  {label:{width}s} {time.perf_counter() - start:{precision + 5}.{precision}f} s")
    return out


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


def versions() -> str:
    import importlib.metadata as md

    found = []
    for package in ("torch", "transformers", "trl", "accelerate", "internvl-tune"):
        try:
            found.append(f"{package} {md.version(package)}")
        except md.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    name = models[0] if models else platform.processor()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def header_lines(title: str, script: str, argv: list[str], args: argparse.Namespace, num_params: int) -> list[str]:
    """Title, command, date, machine, versions and model lines of a report."""
    shape = args.shape
    name = f"preset {args.preset}" if args.preset else "custom shape"
    return [
        f"# {title}",
        "",
        f"Command: `python benchmarks/{script}{''.join(' ' + a for a in argv)}`",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(args.device)}",
        f"- Versions: {versions()}",
        f"- Model: random InternVL, {name}: {shape.describe()}; {num_params / 1e6:,.1f} M parameters"
        + (f" ({active_parameters(shape, num_params) / 1e6:,.1f} M active per token)" if shape.num_experts else "")
        + " (the tokenizer "
        "uses the first ids of the vocabulary; the other embedding and LM-head rows are padding, as in the real "
        "checkpoints, and never produced)",
    ]


def tflops_cells(flops_per_s: float, device: str) -> list[str]:
    """[achieved model TFLOP/s, share of the device's bf16 peak]."""
    _, peak = device_peak_tflops(device)
    tflops = flops_per_s / 1e12
    return [f"{tflops:.3g}" if tflops < 100 else f"{tflops:.0f}", f"{tflops / peak:.1%}" if peak else "-"]


def peak_note(device: str) -> str:
    name, peak = device_peak_tflops(device)
    if device != "cuda":
        return "Peak share: not given on a CPU."
    if peak is None:
        return f"Peak share: no dense bf16 peak known for {name}."
    return f"Peak share: of {peak:.0f} TFLOP/s, the dense bf16 peak of the {name}."


FLOP_NOTE = (
    "Model TFLOP/s counts the FLOPs the workload needs, the same for every tool on the same samples: 2 per "
    "multiply-add of every weight a token passes through (ViT on every patch of every tile, projector on every "
    "image token, LLM on every non-padding position, the LM head only at the positions a loss reads), attention "
    "as 4 x d x (query, key pairs the mask allows) per layer (T(T+1)/2 for a causal row, T^2 for a ViT tile); a "
    "trained pass is 3 forwards (forward + backward), a reference pass 1. Gradient-checkpoint recomputation, "
    "padding, norms and the optimizer are not counted (details: benchmarks/common.py)."
)


def profile_section(results: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """The markdown of the one-step profiles in `results` (configurations without one are left out)."""
    profiled = {n: r["profile"] for n, r in results.items() if r.get("profile")}
    if not profiled:
        return []
    kind = next(iter(profiled.values()))["busy_kind"]
    lines = [
        "",
        "## Profile (one step per configuration, torch.profiler)",
        "",
        f"| configuration | step wall | {kind} | share | host gaps | gaps >= 1 ms | largest gaps (at, length, host) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, p in profiled.items():
        largest = "; ".join(f"{g['at_ms']:.1f} ms: {g['ms']:.1f} ms {g['host']}" for g in p["largest_gaps"])
        lines.append(
            f"| {labels[name]} | {p['wall_ms']:.1f} ms | {p['busy_ms']:.1f} ms | {p['busy_ms'] / p['wall_ms']:.0%} "
            f"| {p['gap_ms']:.1f} ms | {p['num_gaps_over_1ms']} | {largest} |"
        )
    what = "kernels by GPU time" if kind == "GPU busy" else "ops by self CPU time"
    lines += [
        "",
        f"Top {what}:",
        "",
        "| configuration | name | calls | ms | share of step |",
        "|---|---|---:|---:|---:|",
    ]
    for name, p in profiled.items():
        for row in p["top"]:
            short = row["name"].replace("|", "/")
            short = short if len(short) <= 90 else short[:87] + "..."
            lines.append(
                f"| {labels[name]} | `{short}` | {row['calls']} | {row['ms']:.1f} | {row['ms'] / p['wall_ms']:.0%} |"
            )
    lines += [
        "",
        "The recorded step is the last of its run, after the timed ones (not in their throughput); a step spans from "
        "one optimizer step's end to the next (logging, data loading, forward, backward, optimizer). "
        + (
            "Host gaps: time in the step when no GPU kernel, copy or memset runs."
            if kind == "GPU busy"
            else "On a CPU, host gaps are the time in the step outside any torch op (Python, data loading)."
        )
        + " Traces (Chrome / Perfetto format): "
        + ", ".join(f"`{p['trace']}`" for p in profiled.values()),
    ]
    return lines


def write_report(path: str, text: str) -> None:
    if path:
        from internvl_tune.atomic import atomic_write_text

        atomic_write_text(path, text)
        print(f"wrote {path}")


def trl_run_settings(args, *, output_dir: str, batch_size: int, learning_rate: float, weight_decay: float, seed: int):
    """The TrainingArguments both TRL peers share with our recipe's run: same steps, optimizer, schedule, clipping,
    checkpointing, precision and data order; no saves, no logging sinks."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # the Trainer's default, and the kernel our recipes use
        max_length=None,  # image tokens must never be cut
        gradient_checkpointing=args.grad_checkpoint,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=True,
    )
