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
