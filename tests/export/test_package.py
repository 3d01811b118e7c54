"""The modules of qimera.export import one way only: each from the modules above it."""

import ast
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import qimera.export

PACKAGE = "qimera.export"
DIRECTORY = Path(qimera.export.__file__).parent
#: the package's order (qimera/export/__init__.py's docstring): a module may import only earlier ones
ORDER = ("integer", "onnx_qdq", "onnx_layout", "onnx_int8", "onnx", "deploy", "bundle", "__init__")


def _absolute(node: ast.ImportFrom) -> str:
    """The absolute name a ``from ... import`` in a module of the package reads from."""
    if not node.level:
        return node.module or ""
    package = PACKAGE.split(".")  # every module, __init__ too, is in the package itself
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def sibling_imports(path: Path) -> set[str]:
    """The modules of the package that the file at ``path`` imports (at any depth, inside
    functions too); ``"__init__"`` for names taken from the package itself."""
    found: set[str] = set()

    def add(name: str, imported: str | None = None) -> None:
        if imported is not None and f"{name}.{imported}" == PACKAGE:  # from qimera import export
            found.add("__init__")
        elif name == PACKAGE:
            found.add(imported if imported in ORDER else "__init__")
        elif name.startswith(PACKAGE + "."):
            found.add(name[len(PACKAGE) + 1:].split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            name = _absolute(node)
            for alias in node.names:
                add(name, alias.name)
    return found


def test_every_module_has_a_place_in_the_order():
    assert {p.stem for p in DIRECTORY.glob("*.py")} == set(ORDER)
    documented = re.findall(r"^    (\w+)\.py ", qimera.export.__doc__, flags=re.MULTILINE)
    assert documented == list(ORDER[:-1])  # the order the package's docstring shows


def test_the_package_imports_one_way():
    wrong = {}
    for path in sorted(DIRECTORY.glob("*.py")):
        rank = ORDER.index(path.stem) if path.stem in ORDER else len(ORDER)  # (the test above fails)
        later = sorted(m for m in sibling_imports(path) if m not in ORDER[:rank])
        if later:
            wrong[path.stem] = later
    assert not wrong, f"modules of {PACKAGE} that import a module not earlier in {ORDER}: {wrong}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    bad = tmp_path / "integer.py"
    bad.write_text("import torch\n\n\ndef f():\n    from .bundle import export_deployables\n"
                   "    from qimera.export.onnx import export_onnx\n    import qimera.export.deploy\n"
                   "    from qimera.export import onnx_qdq, ExportError\n    from . import onnx_int8\n"
                   "    from .. import export\n    from ..export.integer import load_integer\n")
    assert sibling_imports(bad) == {"bundle", "onnx", "deploy", "onnx_qdq", "__init__", "onnx_int8", "integer"}


def test_the_public_names_come_from_their_modules():
    for name in qimera.export.__all__:
        module = import_module(f"{PACKAGE}.{qimera.export._EXPORTS[name]}")
        assert getattr(qimera.export, name) is getattr(module, name)
        assert name in vars(module)
        defined = getattr(vars(module)[name], "__module__", module.__name__)
        assert defined == module.__name__, (name, defined)  # defined there, not imported


def test_importing_the_package_loads_no_onnx_module():
    code = ("import sys, qimera.export; qimera.export.ExportError; "
            "print(sorted(m for m in sys.modules if m.startswith('qimera.export.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['qimera.export.integer']"
