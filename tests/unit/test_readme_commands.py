"""tools/readme_commands.py: every command of README.md has a rule, and every path a run command names has a
stand-in. A README edit that adds a command or a path without one fails here (the commands themselves run in
`python tools/readme_commands.py`, minutes on a CPU)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "tools" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_readme_command_has_a_rule_and_its_paths_have_stand_ins(tool):
    commands = tool.extract_commands((ROOT / "README.md").read_text())
    texts = [c.text for c in commands]
    # Anchors, so an extraction that finds nothing cannot pass: one command of each block.
    assert {"make demo", "make test-min", 'pip install -e ".[test]"'} <= {*texts}
    assert any(t.startswith("internvl-tune chat ./merged --image cat.jpg") for t in texts)
    assert all(tool.rule_for(c) for c in commands)
    assert tool.unresolved_paths(commands) == []
    run = [c.text for c in commands if not tool.rule_for(c).skip]
    assert sum(t.startswith("internvl-tune ") for t in run) >= 8
    # The first section tries the commands on what `tiny-model` writes, and the paths it names are that output's.
    first = next(i for i, t in enumerate(run) if t.startswith("internvl-tune tiny-model "))
    assert run[first + 1].startswith("internvl-tune check-data tiny-data/")


def test_extraction_cuts_comments_joins_continuations_and_reads_inline_make(tool):
    readme = (
        "Run `make demo` first; `make` alone is a tool, not a command.\n"
        "```bash\n"
        'internvl-tune chat ./m "a # b"  # streaming\n'
        "# a whole-line comment\n"
        "internvl-tune sft --config c.yaml \\\n"
        "    x=1\n"
        "```\n"
        "```\n"
        "make layout   # not bash: not a command\n"
        "```\n"
    )
    assert [(c.line, c.text) for c in tool.extract_commands(readme)] == [
        (1, "make demo"),
        (3, 'internvl-tune chat ./m "a # b"'),
        (5, "internvl-tune sft --config c.yaml x=1"),
    ]


def test_a_new_command_or_path_without_a_rule_is_caught(tool):
    readme = (ROOT / "README.md").read_text()
    extra = "```bash\nmake lint\n```\n"
    commands = tool.extract_commands(readme + extra)
    with pytest.raises(LookupError, match=r"README.md:\d+: no rule .* `make lint`"):
        [tool.rule_for(c) for c in commands]

    extra = (
        "```bash\n"
        "internvl-tune check-data other/meta.json --model ./InternVL3-1B-hf\n"
        "internvl-tune sft --config configs/sft/internvl2_5_2b_lora.yaml\n"  # its run file names ./InternVL2_5-2B-hf
        "```\n"
    )
    commands = tool.extract_commands(readme + extra)
    missing = tool.unresolved_paths(commands)
    assert [m.split(": ", 1)[1] for m in missing] == ["other/meta.json", "InternVL2_5-2B-hf"]
