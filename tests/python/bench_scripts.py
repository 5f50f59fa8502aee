"""bench/'s scripts as modules, for the tests that check them (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> ModuleType:
    """bench/<name>.py, registered as expertflow_bench_<name>; its own imports (common.py)
    resolve as when it runs from bench/."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    module_name = f"expertflow_bench_{name}"
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
