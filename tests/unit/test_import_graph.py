"""The package's layers (tools/import_graph.py): no cycle among modules or among packages, no command module
imported from below, no private name imported from another module; and tools/ stands on the package alone (no
imports from tests/)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from import_graph import (  # noqa: E402
    command_imports,
    find_cycles,
    import_graph,
    package_graph,
    private_imports,
)


def test_no_import_cycle_among_package_modules():
    graph = import_graph()
    assert "internvl_tune.checkpoints.write" in graph and "internvl_tune.model.load" in graph
    assert find_cycles(graph) == []
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("0 cycles"), result.stderr


def test_packages_are_layers():
    """Each package stands above the ones it imports: `checkpoints` <-> `model` (write.py loaded models, load.py
    read checkpoints) and `config` <-> `data` (transform.py took its settings from config.py) had no order; the
    generation backend imported the `chat` command and `eval` a private helper of `sample`."""
    graph = import_graph()
    packages = package_graph(graph)
    assert "internvl_tune.data" in packages["internvl_tune.config"]  # the config's data section extends data's
    assert "internvl_tune.checkpoints" in packages["internvl_tune.model"]  # models are read from checkpoints
    assert find_cycles(packages) == []
    assert command_imports(graph) == []
    assert private_imports() == []


def test_the_layer_checks_find_what_they_look_for(tmp_path):
    package = tmp_path / "internvl_tune"
    for sub in ("model", "checkpoints"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "chat.py").write_text("")
    (package / "model" / "load.py").write_text("from internvl_tune.checkpoints.read import _helper\n")
    (package / "checkpoints" / "read.py").write_text("def _helper():\n    pass\n")
    (package / "checkpoints" / "write.py").write_text("def f():\n    from internvl_tune.model import load\n")
    (package / "checkpoints" / "chat_log.py").write_text("import internvl_tune.chat\n")
    graph = import_graph(tmp_path)
    assert find_cycles(graph) == []  # no circle of modules ...
    assert find_cycles(package_graph(graph)) == [
        ["internvl_tune.checkpoints", "internvl_tune.model"]
    ]  # ... of packages
    assert command_imports(graph) == [("internvl_tune.checkpoints.chat_log", "internvl_tune.chat")]
    assert private_imports(tmp_path) == [("internvl_tune.model.load", "internvl_tune.checkpoints.read._helper")]


def test_the_cycle_finder_finds_a_circle_of_deferred_imports(tmp_path):
    """A deferred (function-level) import closes a circle as much as a top-level one: the tool must see it."""
    package = tmp_path / "internvl_tune"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text("")
    (package / "model" / "a.py").write_text("from internvl_tune.model.b import f\n")
    (package / "model" / "b.py").write_text("def f():\n    from internvl_tune.model import a\n")
    (package / "model" / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["internvl_tune.model.c"] == {"internvl_tune.model.a"}
    assert find_cycles(graph) == [["internvl_tune.model.a", "internvl_tune.model.b"]]


def test_tools_do_not_import_tests():
    for path in sorted((ROOT / "tools").glob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("tests", "unit", "recipes", "reference", "conftest") for n in names), (
                path,
                names,
            )
