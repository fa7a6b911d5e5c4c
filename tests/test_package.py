import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def _library_modules(package: str = "ufm") -> list[str]:
    """Every importable module of ``package`` (dotted, e.g. "ufm.runs.store"), sub-packages
    included, recursively; __main__ modules left out (importing one runs the CLI)."""
    return sorted(name for name in package_modules(ROOT / "ufm")
                  if (name == package or name.startswith(package + ".")) and not name.endswith(".__main__"))


def test_library_never_imports_streamlit():
    modules = _library_modules()
    assert {"ufm", "ufm.runs.store.database", "ufm.measure.verdict"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m == 'streamlit' or m.startswith('streamlit.')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "ufm", "measure", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--canary-index" in proc.stdout and "--feature-size" in proc.stdout


CLI = ROOT / "ufm" / "cli"
ENTRY_POINTS = {"__init__", "__main__"}  # the package itself: it assembles the verbs


def test_subpackage_modules_import_on_their_own_without_streamlit():
    # each in a fresh interpreter: one that imports fine only after another has been imported fails here
    for module in _library_modules("ufm.cli") + _library_modules("ufm.runs.store"):
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


# --- The import check (issue 19): no import circle, no import of a module's own package or a parent
# package's namespace, no module over 400 lines. Plain functions of a root folder, so the tests
# below run them on ufm/ and on planted violations in a tmp_path package.
#
# Circles count function-local imports too: a function-local import is how a circle usually hides
# (the 0.2 canary <-> candidates shim was one), and it still ties the two modules into one unit
# that cannot be understood, tested or moved apart. Imports under `if TYPE_CHECKING:` count too:
# a signature that names another module's type depends on it. The report keeps the kinds apart
# ("module": runs at import time, "function": when the function is called, "typing": never runs)
# so a failure says which kind of circle it is. A package's __main__ is exempt from the parent
# rule only: it is the `python -m pkg` entry point, run after the package is imported, and taking
# the package's main() is its whole job.


MAX_MODULE_LINES = 400


@dataclass(frozen=True)
class ImportEdge:
    """One import in ``source`` of ``target`` (both dotted module names under the root's package);
    ``names`` are the non-module names taken from ``target``'s namespace (empty for ``import a.b``
    or a ``from a import submodule``); ``kind`` is "module" (runs at import time), "function"
    (inside a function) or "typing" (under ``if TYPE_CHECKING:``, never runs)."""
    source: str
    target: str
    line: int
    kind: str
    names: tuple[str, ...]


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` (a folder with __init__.py), recursively:
    dotted name -> file; a package's name maps to its __init__.py. __main__ modules included."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def _own_package(name: str, modules: dict[str, Path]) -> str:
    """The package a relative import in module ``name`` is relative to."""
    return name if _is_package(name, modules) else name.rpartition(".")[0]


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every Import/ImportFrom node with its kind: "function", "typing" or "module"."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, kind))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function")
            elif (isinstance(child, ast.If) and kind == "module"
                  and "TYPE_CHECKING" in {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                                          for n in ast.walk(child.test)}):
                for statement in child.body:  # the else branch runs, so it keeps the module kind
                    visit(ast.Module(body=[statement], type_ignores=[]), "typing")
                for statement in child.orelse:
                    visit(ast.Module(body=[statement], type_ignores=[]), kind)
            else:
                visit(child, kind)

    visit(tree, "module")
    return found


def import_edges(root: Path) -> list[ImportEdge]:
    """Every import from one module of the package at ``root`` to another, made absolute.
    ``from a import x`` is an edge to a.x when a.x is a module, else an edge to a with name x;
    ``import a.b.c`` is an edge to a.b.c. Imports of modules outside the package are dropped."""
    modules = package_modules(root)
    edges = []
    for source, path in modules.items():
        for node, kind in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [ImportEdge(source, alias.name, node.lineno, kind, ()) for alias in node.names
                          if alias.name in modules]
                continue
            if node.level:
                base = _own_package(source, modules).split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    edges.append(ImportEdge(source, f"{target}.{alias.name}", node.lineno, kind, ()))
                else:
                    names.append(alias.name)
            if names:
                edges.append(ImportEdge(source, target, node.lineno, kind, tuple(names)))
    return edges


ALL_KINDS = ("module", "function", "typing")


def import_circles(root: Path, kinds: Sequence[str] = ALL_KINDS) -> list[list[str]]:
    """The import circles among the package's modules: each a strongly connected set of two or more
    modules (or one module importing itself), sorted, counting imports of the given ``kinds``
    (``("module",)``: the circles that run at import time)."""
    graph: dict[str, set[str]] = {m: set() for m in package_modules(root)}
    for edge in import_edges(root):
        if edge.kind in kinds:
            graph[edge.source].add(edge.target)
    # Tarjan's strongly connected components, iterative (no recursion limit on deep trees).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    circles.append(sorted(component))
    return sorted(circles)


def parent_package_imports(root: Path) -> list[ImportEdge]:
    """Imports that take a name from the namespace of the importing module's own package or of a
    parent package (``import ufm``, ``from ufm import x`` with x no submodule, ``from .. import x``,
    ``from ufm.runs import Store`` in ufm/runs/jobs.py): they run that package's __init__ from
    inside it, the usual way circles start. Importing a submodule through its package
    (``from ufm.cli import common``) is fine: it names a module, not the namespace."""
    modules = package_modules(root)
    bad = []
    for edge in import_edges(root):
        if not _is_package(edge.target, modules) or edge.source.rpartition(".")[2] == "__main__":
            continue
        own = _own_package(edge.source, modules)
        # Any edge that lands on an ancestor package's __init__ binds its namespace: `import pkg`,
        # `from pkg import name`, `from pkg import sub` (sub a package, so its __init__).
        if own == edge.target or own.startswith(edge.target + "."):
            bad.append(edge)
    return bad


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """Modules of the package at ``root`` longer than ``limit`` lines: dotted name -> line count."""
    counts = {name: len(path.read_text().splitlines()) for name, path in package_modules(root).items()}
    return {name: n for name, n in counts.items() if n > limit}


def _describe(edges: list[ImportEdge]) -> str:
    return "; ".join(f"{e.source}:{e.line} imports {e.target}" + (f" ({', '.join(e.names)})" if e.names else "")
                     + ("" if e.kind == "module" else f" [{e.kind}]") for e in edges)


def test_no_import_circle_in_ufm():
    circles = import_circles(ROOT / "ufm")
    inside = [e for e in import_edges(ROOT / "ufm") if any(e.source in c and e.target in c for c in circles)]
    assert not circles, (f"import circles {circles} (at import time: {import_circles(ROOT / 'ufm', ('module',))}); "
                         f"their imports: {_describe(inside)}")


def test_no_ufm_module_imports_its_package_or_a_parent():
    bad = parent_package_imports(ROOT / "ufm")
    assert not bad, f"import the defining submodule instead: {_describe(bad)}"


def test_no_ufm_module_over_400_lines():
    long = long_modules(ROOT / "ufm")
    assert not long, f"split by concern (names that say what each part holds): {long}"


def test_no_dashboard_or_page_module_over_400_lines():
    long = {f"{folder}/{p.name}": n for folder in ("dashboard", "app_pages") for p in sorted((ROOT / folder).glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split by concern (names that say what each part holds): {long}"


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


CLEAN = {"pkg/__init__.py": "from pkg.version import __version__\n", "pkg/version.py": "__version__ = '1'\n",
         "pkg/sub/__init__.py": "from pkg.sub import a\n",
         "pkg/sub/a.py": "import os\nimport pkg.sub.b\nfrom pkg.version import __version__\n",
         "pkg/sub/b.py": "from . import c\nfrom .c import f\n", "pkg/sub/c.py": "def f():\n    return 1\n"}


def test_checks_pass_a_clean_planted_package(tmp_path):
    root = _plant(tmp_path, CLEAN)
    assert len(import_edges(root)) == 6
    assert import_circles(root) == [] and parent_package_imports(root) == [] and long_modules(root) == {}


def test_circle_check_fails_on_a_planted_circle_module_level_or_function_local(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "pkg/sub/c.py": "def f():\n    from pkg.sub.a import x\n    return x\n",
                             "pkg/sub/a.py": "from .b import c\nx = 1\n"})
    # a -> b -> c at import time; c -> a only inside f: a circle, and none at import time.
    assert import_circles(root) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]
    assert import_circles(root, ("module",)) == []
    root = _plant(tmp_path / "two", {**CLEAN, "pkg/sub/c.py": "import pkg.sub.b\n"})
    assert import_circles(root, ("module",)) == [["pkg.sub.b", "pkg.sub.c"]]
    root = _plant(tmp_path / "typing", {**CLEAN, "pkg/sub/c.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import f\nelse:\n    import os\n")})
    assert import_circles(root) == [["pkg.sub.b", "pkg.sub.c"]] and import_circles(root, ("module",)) == []
    root = _plant(tmp_path / "self", {**CLEAN, "pkg/sub/c.py": "from pkg.sub import c\n"})
    assert import_circles(root) == [["pkg.sub.c"]]


def test_parent_check_fails_on_each_planted_form(tmp_path):
    planted = {"import pkg\n": ("pkg", ()),
               "from pkg import __version__\n": ("pkg", ("__version__",)),
               "from pkg.sub import helper\n": ("pkg.sub", ("helper",)),
               "from .. import __version__\n": ("pkg", ("__version__",)),
               "from . import helper\n": ("pkg.sub", ("helper",)),
               "from pkg import sub\n": ("pkg.sub", ()),
               "def f():\n    from pkg import __version__\n": ("pkg", ("__version__",))}
    for i, (text, (target, names)) in enumerate(planted.items()):
        root = _plant(tmp_path / str(i), {**CLEAN, "pkg/sub/__init__.py": "helper = 1\n", "pkg/sub/c.py": text})
        bad = parent_package_imports(root)
        assert [(e.source, e.target, e.names) for e in bad] == [("pkg.sub.c", target, names)], text
    # an __init__ taking a name from its parent counts too (a submodule through its package does not:
    # CLEAN's pkg/sub/__init__.py imports pkg.sub.a so)
    root = _plant(tmp_path / "init", {**CLEAN, "pkg/sub/__init__.py": "from pkg import __version__\n"})
    assert [(e.source, e.target) for e in parent_package_imports(root)] == [("pkg.sub", "pkg")]
    # a __main__ (the `python -m pkg` entry point) may take the package's main()
    root = _plant(tmp_path / "main", {**CLEAN, "pkg/__main__.py": "from pkg import main\n"})
    assert parent_package_imports(root) == []


def test_length_check_fails_on_a_planted_401_line_module(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "pkg/sub/c.py": "x = 1\n" * 400})
    assert long_modules(root) == {}
    root = _plant(tmp_path / "long", {**CLEAN, "pkg/sub/c.py": "x = 1\n" * 401})
    assert long_modules(root) == {"pkg.sub.c": 401}


def test_every_name_imported_from_ufm_or_dashboard_exists():
    """A moved or renamed function must not leave an import behind in a page, script or test that
    only fails when that page opens (a page that imports a missing name shows its error only
    when a user opens it)."""
    code = (
        "import ast, importlib, pathlib, sys\n"
        "bad = []\n"
        "for p in sorted(pathlib.Path('.').rglob('*.py')):\n"
        "    if {'.venv', '.git', 'fixtures'} & set(p.parts): continue\n"
        "    for n in ast.walk(ast.parse(p.read_text())):\n"
        "        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module and "
        "n.module.split('.')[0] in ('ufm', 'dashboard'):\n"
        "            m = importlib.import_module(n.module)\n"
        "            for a in n.names:\n"
        "                if a.name != '*' and not hasattr(m, a.name):\n"
        "                    try: importlib.import_module(n.module + '.' + a.name)\n"
        "                    except ImportError: bad.append(f'{p}:{n.lineno} {n.module}.{a.name}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
