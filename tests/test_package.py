import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_never_imports_streamlit():
    modules = sorted(p.stem for p in (ROOT / "ufm").glob("*.py") if p.stem != "__main__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module('ufm.' + m if m != '__init__' else 'ufm')\n"
            "bad = [m for m in sys.modules if m == 'streamlit' or m.startswith('streamlit.')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "ufm", "measure", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--canary-index" in proc.stdout and "--feature-size" in proc.stdout


CLI = ROOT / "ufm" / "cli"
ENTRY_POINTS = {"__init__", "__main__"}  # the package itself: it assembles the verbs


def _subpackage_modules(package: str) -> list[str]:
    return sorted(f"ufm.{package}" + ("" if p.stem == "__init__" else f".{p.stem}")
                  for p in (ROOT / "ufm" / package).glob("*.py") if p.stem != "__main__")


def test_subpackage_modules_import_on_their_own_without_streamlit():
    for module in _subpackage_modules("cli") + _subpackage_modules("store"):
        code = (f"import importlib, sys\nimportlib.import_module({module!r})\n"
                "bad = [m for m in sys.modules if m == 'streamlit' or m.startswith('streamlit.')]\n"
                "print(bad); sys.exit(1 if bad else 0)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, f"{module}: {proc.stdout}{proc.stderr}"


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module an ``import`` in ``path`` names, function-local ones too, made absolute
    (``from .common import x`` in ufm/cli/runs.py -> ufm.cli.common; ``from . import runs`` ->
    ufm.cli and ufm.cli.runs)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_cli_verb_modules_import_only_common_never_the_package_or_each_other():
    verbs = {p.stem for p in CLI.glob("*.py")} - ENTRY_POINTS
    assert {"common", "measure", "runs"} <= verbs
    for path in sorted(CLI.glob("*.py")):
        if path.stem in ENTRY_POINTS:
            continue
        imported = _imported_modules(path, "ufm.cli")
        bad = sorted(m for m in imported
                     if m == "ufm.cli" or (m.startswith("ufm.cli.") and m.split(".")[2] in verbs - {"common"}))
        assert not bad, f"ufm/cli/{path.name} imports {bad}: share it through ufm/cli/common.py instead"
