"""What `internvl-tune tiny-model` writes: a random tiny InternVL folder, and optionally a small dataset, to try the
commands on in seconds before fetching a real checkpoint.

    internvl-tune tiny-model tiny-hf --data tiny-data         # HF layout (InternVLForConditionalGeneration)
    internvl-tune tiny-model tiny-orig --layout original      # the original remote-code layout (InternVLChatModel)
    internvl-tune tiny-model tiny-oss --llm gpt_oss           # an InternVL3.5 LLM: qwen3, qwen3_moe or gpt_oss

The model is random (its answers are noise), a few MB, with a tokenizer trained on the demo's shapes task, and it
loads wherever a model path is taken. The dataset is that task (`demo/task.py`), with paths relative to its folder:

    meta.json + train.jsonl                   SFT records, for `sft` and `check-data`
    pairs_train_meta.json + pairs_train.jsonl preference pairs (MMPR format), for `mpo` and `check-data --preference`
    benchmark.jsonl                           {image, question, answer, source}, for `eval`
    prompts.jsonl                             {image, question, answer}, for `sample`
    prompts_meta.json                         names prompts.jsonl, for `rl`
    pairs_eval_meta.json + pairs_eval.jsonl   held-out pairs (the benchmark's questions)
    images/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from internvl_tune.atomic import atomic_dir
from internvl_tune.errors import UserError

LAYOUTS = ("hf", "original")
LLMS = ("qwen2", "qwen3", "qwen3_moe", "gpt_oss")  # InternVL 2.5 / 3's Qwen2, or one of InternVL3.5's


def template_of(llm: str) -> str:
    """The template the original trains an LLM family with (what a run on the tiny folder sets as conv_style)."""
    return "internvl3_5_gpt_oss" if llm == "gpt_oss" else "internvl2_5"


# Sizes of the dataset: enough for a few training steps and a benchmark with every question type.
NUM_TRAIN = 32
NUM_EVAL = 4  # benchmark images; 3 questions each
NUM_PROMPTS = 4  # prompt images; 3 questions each


@dataclass(frozen=True)
class TinyFolders:
    """What `write_tiny_model` wrote."""

    model: Path
    layout: str
    data: Path | None = None
    llm: str = "qwen2"

    def format(self) -> str:
        """The lines `tiny-model` prints: what each folder holds and what it is for."""
        lines = [
            f"wrote {self.model}: a random tiny InternVL ({self.llm} LLM) in the {self.layout} layout (for trying the "
            "commands)"
        ]
        if self.data is not None:
            lines.append(
                f"wrote {self.data}: meta.json ({NUM_TRAIN} SFT samples), pairs_train_meta.json ({NUM_TRAIN} "
                f"preference pairs), benchmark.jsonl ({3 * NUM_EVAL} questions), prompts.jsonl ({3 * NUM_PROMPTS} "
                "questions) with prompts_meta.json, images/"
            )
        return "\n".join(lines)


def write_tiny_model(
    out: str | Path, *, layout: str = "hf", data: str | Path | None = None, seed: int = 0, llm: str = "qwen2"
) -> TinyFolders:
    """Write a tiny random InternVL with a `llm` LLM to `out` in `layout` ("hf" or "original") and, with `data`, the
    shapes task's files there. Each folder is written under a temporary name and renamed when complete; an existing
    non-empty folder is refused (nothing is overwritten)."""
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if llm not in LLMS:
        raise UserError(f"llm must be one of {', '.join(LLMS)}, got {llm!r}")
    targets = [Path(out)] + ([Path(data)] if data is not None else [])
    if len(targets) == 2 and targets[0].resolve() == targets[1].resolve():
        raise UserError(f"{out} and {data}: the model and the data need two folders")
    for path in targets:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path} exists and is not empty: name a new folder or remove it")

    # The arguments are checked before torch and transformers load: a mistake is reported in a second.
    from transformers.utils import logging as transformers_logging

    from internvl_tune.demo.task import make_pairs, make_task, task_texts
    from internvl_tune.testing.original_checkpoint import build_original_checkpoint
    from internvl_tune.testing.tiny import save_tiny_model, tiny_tokenizer_for

    texts = task_texts()  # the task's prompts and answers tokenize compactly
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar for one shard of a few MB is noise
    try:
        with atomic_dir(out) as tmp:
            if layout == "hf":
                save_tiny_model(tmp, extra_texts=texts, seed=seed, llm=llm)
            else:
                build_original_checkpoint(
                    tmp, tokenizer=tiny_tokenizer_for(llm, texts), seed=seed, llm=llm, template=template_of(llm)
                )
    finally:
        if bar:
            transformers_logging.enable_progress_bar()
    if data is not None:
        with atomic_dir(data) as tmp:
            make_pairs(make_task(tmp, NUM_TRAIN, NUM_EVAL, seed, NUM_PROMPTS), seed)
    return TinyFolders(Path(out), layout, Path(data) if data is not None else None, llm)
