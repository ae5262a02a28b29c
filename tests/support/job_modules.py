"""Import a ``jobs/*.py`` entry point as a module, to call its ``main(argv)`` in the test process."""

import importlib.util
from pathlib import Path

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
