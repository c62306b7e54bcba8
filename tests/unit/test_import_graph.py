"""The package's modules import each other without a cycle (tools/import_graph.py), and tools/ stands on the
package alone (no imports from tests/)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from import_graph import find_cycles, import_graph  # noqa: E402


def test_no_import_cycle_among_package_modules():
    graph = import_graph()
    assert "internvl_tune.checkpoints.write" in graph and "internvl_tune.model.load" in graph
    assert find_cycles(graph) == []
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("0 cycles"), result.stderr


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
