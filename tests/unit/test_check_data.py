"""check-data: integer histograms, empty answers, original-layout models, MPO run files."""

import re
from pathlib import Path

import pytest
from conftest import draw_image, make_colour_dataset, write_jsonl, write_meta

from internvl_tune.cli import main
from internvl_tune.data.check import histogram
from internvl_tune.data.errors import DataError
from internvl_tune.data.transform import record_to_conversation
from internvl_tune.testing.original_checkpoint import build_original_checkpoint


def _ranges(lines: list[str]) -> list[tuple[int, int, int]]:
    """(first, last, count) of each histogram line."""
    rows = []
    for line in lines:
        match = re.fullmatch(r"\s+(\d+)(?:-(\d+))?\s+(\d+)(?:\s+#+)?", line)
        assert match, line
        first, last, count = match.groups()
        rows.append((int(first), int(last or first), int(count)))
    return rows


def test_histogram_worked_example():
    assert histogram([1, 2, 2, 9], bins=4) == [
        "                  1-3        3  ########################################",
        "                  4-6        0",
        "                  7-9        1  #############",
    ]


@pytest.mark.parametrize(
    "values",
    [[177, 180, 183, 183, 184, 184], [0, 1, 2], [0, 4, 4, 48, 0, 0], [0, 1, 1, 2, 12], [5, 5], list(range(100))],
)
def test_histogram_ranges_are_whole_disjoint_and_empty_runs_merged(values):
    """The old equal-width float bins printed `[177, 178)` for a bin holding nothing and `[0, 0)` for small ranges."""
    rows = _ranges(histogram(values))
    assert rows[0][0] == min(values) and rows[-1][1] == max(values)
    assert all(first <= last for first, last, _ in rows)
    assert all(nxt[0] == row[1] + 1 for row, nxt in zip(rows, rows[1:], strict=False))  # contiguous, no overlap
    assert not any(a[2] == 0 and b[2] == 0 for a, b in zip(rows, rows[1:], strict=False))  # empty runs are one line
    assert sum(count for *_, count in rows) == len(values) and len(rows) <= 8
    for first, last, count in rows:
        assert count == sum(first <= v <= last for v in values)


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_empty_answer_is_a_data_error(answer):
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": answer}]}
    with pytest.raises(DataError, match=r"conversations\[1\] is an empty 'gpt' answer") as info:
        record_to_conversation(record, "a.jsonl:3")
    assert info.value.kind == "empty answer"


def test_check_data_reports_empty_answers(tmp_path, tiny_model_dir, capsys):
    empty = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]},
    ]
    meta = make_colour_dataset(tmp_path / "data", num=3, extra_records=empty)
    assert main(["check-data", str(meta), "--model", str(tiny_model_dir)]) == 1
    out = capsys.readouterr().out
    assert "records: 6   ok: 4   errors: 2" in out and "empty answer: 2" in out
    assert "train.jsonl:5" in out and "train.jsonl:6" in out


def test_check_data_reads_an_original_layout_model(tmp_path, capsys):
    """The original folder's config is read as plain JSON (AutoConfig refused `internvl_chat`); its report equals
    the one for its HF conversion."""
    from internvl_tune.checkpoints.write import convert_to_hf

    build_original_checkpoint(tmp_path / "original")
    convert_to_hf(tmp_path / "original", tmp_path / "hf")
    meta = make_colour_dataset(tmp_path / "data", num=4)
    reports = []
    for model in ("original", "hf"):
        assert main(["check-data", str(meta), "--model", str(tmp_path / model)]) == 0
        reports.append(capsys.readouterr().out)
    assert "records: 5   ok: 5   errors: 0" in reports[0] and reports[0] == reports[1]


def test_check_data_takes_an_mpo_run_file(tmp_path, tiny_model_dir, capsys):
    """A run file with an mpo section means pair data, with or without --preference."""
    make_colour_dataset(tmp_path / "data", num=4)  # the images
    write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"image": f"{i}.png", "question": "What colour?", "chosen": "red", "rejected": "blue"} for i in range(4)],
    )
    pairs = write_meta(
        tmp_path / "pairs.json", {"p": {"root": str(tmp_path / "data" / "images"), "annotation": "pairs.jsonl"}}
    )
    run_file = tmp_path / "mpo.yaml"
    run_file.write_text("data: {max_dynamic_patch: 1}\ntrain: {per_device_train_batch_size: 2}\nmpo: {beta: 0.2}\n")
    for argv in ([str(pairs)], [str(pairs), "--preference"]):
        assert main(["check-data", *argv, "--model", str(tiny_model_dir), "--config", str(run_file)]) == 0
        out = capsys.readouterr().out
        assert "errors: 0" in out and "padding waste at batch size 2" in out
        assert " in 4 tiles" in out  # one per image: max_dynamic_patch=1 comes from the run file


def _video_dataset(root: Path) -> Path:
    """Two one-tile images, a text record (lines 1-3) and four records of a 12-frame video (lines 4-7)."""
    frames = root / "images" / "clip"
    frames.mkdir(parents=True)
    for k in range(12):
        draw_image(frames / f"{k}.png", (56, 56), "red")
    video = {"video": "clip", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}]}
    return make_colour_dataset(root, num=2, extra_records=[video] * 4)


VIDEO_DATA = "min_num_frame: 1, max_num_frame: 12, max_dynamic_patch: 1, num_images_expected: 8"


def test_check_data_reports_what_packed_training_refuses(tmp_path, tiny_model_dir, capsys):
    """Videos of 1 to 12 frames (one tile each) against a budget of 8 tiles: a draw may fit, the most frames a video
    can get does not. Packed training plans with that maximum and refuses each one; check-data measured one draw and
    printed "0 over budget" (here 3, one of its draws had 8 frames), exit 0. Now it reports every sample training
    refuses, with training's message, and the packing line counts them."""
    meta = _video_dataset(tmp_path / "data")
    run_file = tmp_path / "sft.yaml"
    run_file.write_text(
        f"data: {{packing: true, {VIDEO_DATA}, meta_path: {meta}}}\nmodel: {{model_name_or_path: {tiny_model_dir}}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 1}}\n"
    )
    assert main(["check-data", str(meta), "--model", str(tiny_model_dir), "--config", str(run_file)]) == 1
    out = capsys.readouterr().out
    refused = [line.strip() for line in out.splitlines() if "more than a packed row holds" in line]
    assert [line.split(":")[1] for line in refused] == ["4", "5", "6", "7"]  # the four videos, by file:line
    assert (
        "over packing budget: 4" in out
        and "4 over budget (packed training stops on them; data.oversize_sample=alone" in out
    )

    assert main(["sft", "--config", str(run_file)]) == 2  # training stops on the first, with the same message
    error = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error: "))
    assert error.removeprefix("error: ") in refused


@pytest.mark.parametrize("packing", ["packing: false", "packing: true, oversize_sample: alone"])
def test_check_data_counts_over_budget_samples_without_refusing_them_when_training_does_not(
    tmp_path, tiny_model_dir, capsys, packing
):
    """Without data.packing, or with oversize_sample=alone, training refuses nothing: the packing line counts the
    videos over budget and they are no errors. Each video is checked at its most frames: 2 + 4 x 12 tiles."""
    meta = _video_dataset(tmp_path / "data")
    run_file = tmp_path / "sft.yaml"
    run_file.write_text(f"data: {{{packing}, {VIDEO_DATA}}}\n")
    assert main(["check-data", str(meta), "--model", str(tiny_model_dir), "--config", str(run_file)]) == 0
    out = capsys.readouterr().out
    assert "errors: 0" in out and "more than a packed row holds" not in out
    assert " in 50 tiles" in out and "4 over budget" in out


def test_check_data_reports_the_same_with_several_workers(tmp_path, tiny_model_dir, capsys):
    """--workers 1, 2 and 3 (spans of lines checked in a pool) print and write the same report: the same counts,
    problems by kind with their file:line in file order, histograms and packing line."""
    meta = make_colour_dataset(
        tmp_path / "data",
        num=10,
        extra_records=[
            {"image": "missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
            "{not json",
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]},
        ],
    )
    outputs = []
    for workers in ("1", "2", "3"):
        report = tmp_path / f"report{workers}.json"
        args = ["check-data", str(meta), "--model", str(tiny_model_dir), "--workers", workers, "--json", str(report)]
        assert main(args) == 1
        outputs.append((capsys.readouterr().out, report.read_text()))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert "train.jsonl:12: " in outputs[0][0] and "train.jsonl:13: malformed JSON" in outputs[0][0]
