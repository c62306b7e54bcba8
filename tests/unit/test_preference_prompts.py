"""The prompt versions of the preference-data pipeline (preference_data/prompts.py): the original's texts, the
short-answer instruction stripping, the `<image>` placement, the `_zh_` file rule, the MPO chain-of-thought prompt."""

import hashlib

import pytest

from internvl_tune.preference_data.prompts import (
    PROMPT_VERSIONS,
    mpo_cot_prompt,
    strip_short_answer_instruction,
    version_for_file,
    wrap_question,
)

# sha256 (first 16 hex digits) and length of each text as the original pipeline defines it
# (internvl_chat/tools/reasoning_data_pipeline/utils/constants.py: INSTRUCTION_EN, _ZH, _BOXED_EN, _BOXED_ZH,
# _R1_EN, _R1_ZH), computed from those strings.
ORIGINAL_TEXTS = {
    "en": ("fd10a22a4b1fafa1", 186),
    "zh": ("38d144402c41be3f", 75),
    "en_v2": ("0b2a330093564c75", 491),
    "zh_v2": ("598e191452547200", 193),
    "en_r1": ("01fed6da165474d2", 688),
    "zh_r1": ("9b3031c53525d1c1", 647),
}


def test_prompt_texts_are_the_originals():
    assert set(PROMPT_VERSIONS) == set(ORIGINAL_TEXTS)
    for version, (digest, length) in ORIGINAL_TEXTS.items():
        text = PROMPT_VERSIONS[version]
        assert (hashlib.sha256(text.encode()).hexdigest()[:16], len(text)) == (digest, length), version
        assert text.count("{question}") == 1


def test_en_wraps_the_question_last_and_v2_first():
    assert wrap_question("How many?", "en", 0) == (
        "Your task is to answer the question below. Give step by step reasoning before you answer, and when you're "
        'ready to answer, please use the format "Final answer: .."\n\nQuestion:\n\nHow many?'
    )
    assert wrap_question("How many?", "en_v2", 0).startswith(
        "How many?\nAnswer the preceding question. The last line of your response should follow this format: "
        "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes)"
    )
    r1 = wrap_question("How many?", "en_r1", 0)
    assert r1.startswith("You are an AI assistant that rigorously follows this response protocol:\n\n1. First,")
    assert r1.endswith(
        "reference the thinking section.\nHow many?\nPlease answer the question and put the final answer within \\boxed{}."
    )
    assert wrap_question("多少?", "zh_v2", 0).startswith("多少?\n请回答上述问题。")


@pytest.mark.parametrize(
    "question, stripped",
    [
        ("How many?\nAnswer the question using a single word or phrase.", "How many?"),
        ("Which?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.", "Which?\nA. x\nB. y"),
        ("Is it red? Please answer Yes or No.", "Is it red?"),
        ("2+2=?\nPlease answer the question and put the final answer within \\boxed{}.", "2+2=?"),
        ("Answer the question using a single word or phrase. How many?", None),  # only a trailing one
        ("How many?", None),
    ],
)
def test_short_answer_instruction_is_stripped_when_trailing(question, stripped):
    assert strip_short_answer_instruction(question) == (question if stripped is None else stripped)


def test_image_placeholder_moves_to_the_front():
    """One placeholder anywhere -> removed (with its newline) and put first; none -> put first; text-only: untouched;
    several images with their placeholders -> left in place; several without -> numbered lines (user_turn)."""
    en_head = "Your task is to answer the question below."
    assert wrap_question("<image>\nHow many?", "en", 1).startswith(f"<image>\n{en_head}")
    assert wrap_question("<image>\nHow many?", "en", 1).endswith("Question:\n\nHow many?")
    assert wrap_question("How many <image> shapes?", "en_v2", 1).startswith("<image>\nHow many  shapes?\nAnswer the")
    assert wrap_question("How many?", "en", 1) == "<image>\n" + wrap_question("How many?", "en", 0)
    assert wrap_question("<image>\n<image>\nSame?", "en_v2", 2).startswith("<image>\n<image>\nSame?\nAnswer")
    assert wrap_question("Same?", "en_v2", 2).startswith("Image-1: <image>\nImage-2: <image>\nSame?\nAnswer")
    assert "<image>" not in wrap_question("How many?", "en", 0)


def test_zh_file_names_switch_the_version():
    assert version_for_file("en_v2", "data/geoqa_zh_train.jsonl") == "zh_v2"
    assert version_for_file("en_r1", "geoqa_zh_x.jsonl") == "zh_r1"
    assert version_for_file("en", "zh_data/geoqa.jsonl") == "en"  # the folder does not count, as in the original
    assert version_for_file("zh", "chartqa_en.jsonl") == "zh"
    with pytest.raises(ValueError, match="unknown prompt version 'en_v3'"):
        version_for_file("en_v3", "a.jsonl")


def test_mpo_cot_prompt_is_the_en_version_with_options():
    assert mpo_cot_prompt("How many?") == wrap_question("How many?", "en", 0)
    prompt = mpo_cot_prompt("Which is red?", {"A": "the circle", "B": "the square"})
    assert prompt.endswith('"Final answer: .."\n\nQuestion:\n\nWhich is red?\nA. the circle\nB. the square')
