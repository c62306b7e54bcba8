"""`--help` and a mistaken setting or path answer without importing torch or transformers (seconds each), so the
error line comes at once: the parser and each command's checks import only the light modules."""

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "transformers", "accelerate", "peft")


def _in_fresh_interpreter(code: str) -> dict:
    """Run `code` in a new interpreter; it prints one JSON object, returned with the heavy modules it imported."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        result["heavy"] = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps(result))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_help_of_every_command_imports_no_torch():
    result = _in_fresh_interpreter(
        """
        import contextlib, io
        from internvl_tune.cli import build_parser, main

        parser = build_parser()
        commands = parser._subparsers._group_actions[0].choices
        helps = {name: command.format_help() for name, command in commands.items()}
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["--help"])
            except SystemExit as e:
                code = e.code
        result = {"commands": sorted(helps), "code": code, "help": out.getvalue(), "sft": helps["sft"]}
        """
    )
    assert result["code"] == 0 and "sft" in result["help"] and "--debug" in result["help"]
    assert {"sft", "mpo", "eval", "sample", "build-pairs", "convert", "export", "chat"} <= set(result["commands"])
    assert "train.learning_rate" in result["sft"]  # the field list: the config's docs, read without torch
    assert result["heavy"] == []


def test_setting_and_path_mistakes_import_no_torch(tmp_path):
    model, meta = tmp_path / "model", tmp_path / "meta.json"
    model.mkdir()
    meta.write_text("{}")
    run_file = tmp_path / "sft.yaml"
    run_file.write_text(f"model: {{model_name_or_path: {model}}}\ndata: {{meta_path: {meta}}}\n")
    missing = tmp_path / "missing"
    cases = [
        ["sft", "--config", run_file, "learning_rate=-1"],
        ["sft", "--config", run_file, "conv_style=chatml"],
        ["sft", "--config", run_file, f"model_name_or_path={missing}"],
        ["sft", "--config", missing],
        ["check-data", meta, "--model", missing],
        ["convert", missing, tmp_path / "out", "--to", "hf"],
        ["export", missing, tmp_path / "out"],
        ["chat", missing, "Hi?"],
        ["sample", missing, "--out", tmp_path / "out", "--model", model],
        ["eval", missing, "--out", tmp_path / "out", "--model", model],
        ["build-pairs", missing, "--out", tmp_path / "out"],
        ["plot", missing],
        ["tiny-model", tmp_path / "out", "--data", missing / ".." / "out"],  # one folder for both: refused
    ]
    result = _in_fresh_interpreter(
        f"""
        import contextlib, io, time
        from internvl_tune.cli import main

        result = {{"runs": []}}
        for argv in {[[str(a) for a in case] for case in cases]!r}:
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()) as err:
                code = main(argv)
            result["runs"].append([argv[0], code, err.getvalue(), time.perf_counter() - start])
        """
    )
    for command, code, err, _ in result["runs"]:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (command, err)
    assert [run[2].count(str(missing)) for run in result["runs"][2:]] == [1] * (len(cases) - 2)
    assert result["heavy"] == []
