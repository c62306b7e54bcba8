"""The prompts of the InternVL preference-data pipelines: a question as the model is asked it when answers are sampled.

A question is wrapped by a prompt version, the texts of the original MMPR pipeline (word for word, so responses
parse as the original's do):

- `en` / `zh`: reason step by step, then "Final answer: .." (`zh`: "答案: ..."); the question comes last.
- `en_v2` / `zh_v2`: the question first, then: end with the line "Answer: \\boxed{$FINAL_ANSWER}".
- `en_r1` / `zh_r1`: an R1-style protocol (think inside `<think>` tags, then answer), then the question, then: put
  the final answer within \\boxed{}.

Before wrapping, one trailing short-answer instruction ("Answer the question using a single word or phrase." and
three others, `SHORT_ANSWER_INSTRUCTIONS`) is cut off, since it asks for the very opposite of reasoning. After
wrapping, an item with images gets its `<image>` placeholder at the front: a question with exactly one placeholder
has it moved to the front as `"<image>\\n"`, a question without one gets them there (`user_turn`), and several
placeholders stay where they are. Worked example (`en_v2`, one image)::

    "<image>\\nWhat colour is the shape?\\nAnswer the question using a single word or phrase."
    -> "<image>\\nWhat colour is the shape?\\nAnswer the preceding question. The last line of your response should
        follow this format: 'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), ..."

A prompt file whose name contains `_zh_` is Chinese: its version switches from `en*` to the matching `zh*`, as the
original does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.placeholders import user_turn
from internvl_tune.errors import UserError

R1_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n"
    "\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n"
    "\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate "
    "the answer from the think section with a newline.\n"
    "\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)

# `{question}` is replaced with str.replace, not str.format: the v2 texts hold braces of their own.
PROMPT_VERSIONS: dict[str, str] = {
    "en": (
        "Your task is to answer the question below. Give step by step reasoning before you answer, and when you're "
        'ready to answer, please use the format "Final answer: .."\n\nQuestion:\n\n{question}'
    ),
    "zh": '你的任务是回答以下问题。在回答之前，请逐步推理说明您的思路。当你准备好给出答案时，请使用以下格式："答案: ..."'
    "\n\n问题:\n\n{question}",
    "en_v2": (
        "{question}\nAnswer the preceding question. The last line of your response should follow this format: "
        "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where 'FINAL_ANSWER' is your conclusion based on the "
        "reasoning provided. If you are uncertain or the problem is too complex, make a reasoned guess based on the "
        "information provided. Avoid repeating steps indefinitely—provide your best guess even if unsure. Think step "
        "by step logically, considering all relevant information before answering."
    ),
    "zh_v2": (
        "{question}\n请回答上述问题。你的回答最后一行应遵循以下格式："
        "“答案：\\boxed{$FINAL_ANSWER}”（不包含引号），其中“FINAL_ANSWER”是你根据推理得出的最终结论。"
        "如果你不确定答案或问题过于复杂，请基于已有信息做出有理有据的猜测。"
        "避免无限重复推理步骤——即使不完全确定，也请给出你认为最合理的答案。"
        "请一步一步进行逻辑思考，充分考虑所有相关信息后再作答。"
    ),
    "en_r1": R1_SYSTEM_PROMPT + "\n{question}\nPlease answer the question and put the final answer within \\boxed{}.",
    "zh_r1": R1_SYSTEM_PROMPT + "\n{question}\n请详细回答这个问题并将最终答案用\\boxed{}包住。",
}

# The original has no default (it refuses to run without one); its InternVL3 data-construction script uses en_v2.
DEFAULT_PROMPT_VERSION = "en_v2"

SHORT_ANSWER_INSTRUCTIONS = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer Yes or No.",
    "Please answer the question and put the final answer within \\boxed{}.",
)


def version_for_file(version: str, path: str | Path) -> str:
    """The prompt version for a prompt file: `en*` becomes `zh*` when the file name contains `_zh_`.

    Example: `version_for_file("en_v2", "data/geoqa_zh_train.jsonl") == "zh_v2"`.
    """
    if version not in PROMPT_VERSIONS:
        raise UserError(f"unknown prompt version {version!r}; choose one of {', '.join(PROMPT_VERSIONS)}")
    return version.replace("en", "zh") if "_zh_" in Path(path).name else version


def strip_short_answer_instruction(question: str) -> str:
    """The question without a trailing short-answer instruction (and the whitespace before it).

    Example: `"How many?\\nAnswer the question using a single word or phrase."` -> `"How many?"`.
    """
    for instruction in SHORT_ANSWER_INSTRUCTIONS:
        if question.endswith(instruction):
            question = question[: -len(instruction)].strip()
    return question


def wrap_question(question: str, version: str, num_images: int) -> str:
    """The sampling prompt for a question about `num_images` images: instruction stripped, wrapped by `version`,
    the `<image>` placeholders placed (module docstring).

    Example: `wrap_question("<image>\\nHow many?", "en", 1)` ==
    `"<image>\\nYour task is to answer the question below. ... \\n\\nQuestion:\\n\\nHow many?"`.
    """
    prompt = PROMPT_VERSIONS[version].replace("{question}", strip_short_answer_instruction(question))
    if not num_images:
        return prompt
    if prompt.count(IMAGE_PLACEHOLDER) == 1:
        prompt = prompt.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1)
    return user_turn(prompt, num_images)


def mpo_cot_prompt(question: str, options: Mapping[str, str] | None = None) -> str:
    """The chain-of-thought prompt MPO models are evaluated with (VLMEvalKit's `use_mpo_prompt`): the `en` version
    around the question, with the options of a multiple-choice question as `"A. ..."` lines after it.

    Example: `mpo_cot_prompt("Which is red?", {"A": "the circle", "B": "the square"})` ends with
    `"Question:\\n\\nWhich is red?\\nA. the circle\\nB. the square"`.
    """
    if options:
        question = question + "\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return PROMPT_VERSIONS["en"].replace("{question}", question).strip()
