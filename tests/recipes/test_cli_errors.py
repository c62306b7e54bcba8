"""A user's mistake ends in one `error: ...` line and exit code 2, never a traceback; `chat` parses its question
wherever it stands and survives bad turns."""

import subprocess
import sys
import threading

import pytest
from conftest import draw_image, make_colour_dataset

from internvl_tune.cli import main


@pytest.fixture(scope="module")
def run_file(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli_errors")
    meta = make_colour_dataset(root / "data", num=4)
    path = root / "sft.yaml"
    path.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 2}}\ntrain: {{max_steps: 1, output_dir: {root / 'run'}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_image") / "a.png"
    draw_image(path, (112, 56), "red")
    return path


def _cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter, stdin closed unless text is given."""
    return subprocess.run(
        [sys.executable, "-m", "internvl_tune.cli", *map(str, argv)],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_error_line(err: str, message: str) -> None:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and message in errors[0], err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "--config", "{run_file}", "model_name_or_path=/no/such/model"], "/no/such/model: no such folder"),
        (["convert", "/no/such/folder", "{out}", "--to", "hf"], "/no/such/folder: no such folder"),
        (["convert", "{model}", "{out}", "--to", "original", "--max-shard-size", "10XB"], "'10XB' is not a size"),
        (["demo", "num_train=abc", "--output-dir", "{out}"], "override 'num_train=abc': expected int, got 'abc'"),
    ],
    ids=["missing-model", "convert-missing-folder", "shard-size", "demo-setting"],
)
def test_user_errors_in_a_subprocess(argv, message, run_file, tiny_model_dir, tmp_path):
    names = {"run_file": run_file, "model": tiny_model_dir, "out": tmp_path / "out"}
    result = _cli(*(a.format(**names) for a in argv))
    assert result.returncode == 2
    _one_error_line(result.stderr, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "--config", "{run_file}", "learning_rate=-1e-5"], "train.learning_rate must be >= 0"),
        (["mpo", "--config", "{run_file}", "conv_style=chatml"], "data.conv_style: unknown template 'chatml'"),
        (["sft", "--config", "{run_file}", "resume_from_checkpoint={tmp}"], "train_state.json"),
        (["export", "{model}", "{tmp}/out", "--base", "{model}"], "used with --merge-lora only"),
        (["chat", "{model}", "Hi?", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["chat", "{model}", "--image", "{tmp}/no.png", "Hi?"], "no.png: no such image file"),
        (["chat", "{model}", "--image", "{image}", "<image> and <image>?"], "2 <image> placeholders"),
        (["chat", "{tmp}/no_model", "Hi?"], "no_model: no such folder"),
    ],
    ids=[
        "negative-lr",
        "conv-style",
        "resume-without-state",
        "base-without-merge",
        "max-new-tokens",
        "no-image",
        "image-count",
        "chat-no-model",
    ],
)
def test_user_errors_in_process(argv, message, run_file, tiny_model_dir, image, tmp_path, capsys):
    names = {"run_file": run_file, "model": tiny_model_dir, "tmp": tmp_path, "image": image}
    assert main([a.format(**names) for a in argv]) == 2
    _one_error_line(capsys.readouterr().err, message)


def test_chat_question_after_options_and_with_equals_sign(tiny_model_dir, image, capsys):
    """The README's order, `chat MODEL --image P "question"`, was "unrecognized arguments"; a question with `=`
    after an option was taken for an override and chat went interactive."""
    answers = []
    model, question = str(tiny_model_dir), "What is 1+1=?"
    for argv in (
        [model, question, "--image", str(image), "--max-new-tokens", "4"],
        [model, "--image", str(image), question, "--max-new-tokens", "4"],
        [model, "--image", str(image), "--max-new-tokens", "4", question],
    ):
        assert main(["chat", *argv]) == 0
        captured = capsys.readouterr()
        assert "interactive" not in captured.out and "Traceback" not in captured.err
        answers.append(captured.out)
    assert answers[0].strip() and answers[0] == answers[1] == answers[2]


def test_generation_error_reaches_the_caller_instead_of_hanging(tiny_model_dir):
    from internvl_tune.chat import ChatSession

    session = ChatSession(str(tiny_model_dir), max_new_tokens=2)

    def broken_generate(**kwargs):
        raise RuntimeError("generation failed")

    session.model.generate = broken_generate
    outcome = []

    def consume():
        try:
            "".join(session.ask("Hi?"))
        except RuntimeError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the stream waited forever for a dead generation thread"
    assert outcome == ["generation failed"] and session.history == []


def test_interactive_chat_reports_bad_turns_and_goes_on(tiny_model_dir, image, tmp_path):
    """A missing `/image` path, and a turn whose `<image>` count does not match, are reported; the chat goes on."""
    turns = [
        f"/image {tmp_path / 'missing.png'}",
        "What colour?",
        f"/image {image}",
        "<image> and <image>?",
        "Hello?",
        "",
    ]
    result = _cli("chat", tiny_model_dir, "--max-new-tokens", "2", stdin="\n".join(turns) + "\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "missing.png: no such image file" in errors[0] and "placeholders" in errors[1]
    assert result.stdout.count("assistant> ") == 2  # "What colour?" and "Hello?" were answered


def test_only_our_errors_become_one_line(tmp_path, monkeypatch, capsys):
    """A ValueError that is not a user's mistake (here from inside build-pairs) is a bug: it keeps its traceback
    instead of reading like a mistyped argument."""
    from internvl_tune.preference_data import pairs

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(pairs, "build_pairs", broken)
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(ValueError, match="internal invariant"):
        main(["build-pairs", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "out")])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_a_user_errors_traceback(tmp_path, monkeypatch, capsys, how):
    argv = ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--to", "hf"]
    argv = {"flag-before": ["--debug", *argv], "flag-after": [*argv, "--debug"], "env": argv}[how]
    if how == "env":
        monkeypatch.setenv("INTERNVL_TUNE_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "MissingPathError" in err and err.splitlines()[-1].endswith("nowhere: no such folder")
    monkeypatch.setenv("INTERNVL_TUNE_DEBUG", "0")
    assert main(argv[1:] if how == "flag-before" else argv[:-1] if how == "flag-after" else argv) == 2
    _one_error_line(capsys.readouterr().err, "nowhere: no such folder")


def _absent(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")


def test_flash_attention_without_flash_attn_is_one_line_naming_the_install(run_file, capsys):
    """It ended in transformers' ImportError traceback once the model began to load."""
    _absent("flash_attn")
    assert main(["sft", "--config", str(run_file), "attn_implementation=flash_attention_2"]) == 2
    _one_error_line(capsys.readouterr().err, "needs flash-attn, which is not installed: pip install flash-attn")


def test_a_deepspeed_launch_without_deepspeed_is_one_line_naming_the_install(run_file, monkeypatch, capsys):
    """A ZeRO accelerate file (ACCELERATE_USE_DEEPSPEED=true) ended in accelerate's ImportError traceback."""
    _absent("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["mpo", "--config", str(run_file)]) == 2
    _one_error_line(capsys.readouterr().err, "asks for DeepSpeed (ZeRO), which is not installed: pip install deepspeed")


def test_transformers_progress_bars_stay_out_of_a_log(tiny_model_dir, tmp_path):
    """Output that is not a terminal (a pipe here) gets no "Loading weights" / "Writing model shards" bars."""
    result = _cli("export", tiny_model_dir, tmp_path / "exported")  # loads and saves with transformers
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    assert "wrote " in result.stdout
