"""The dependency rules of the README's architecture, checked on the code's imports (ast).

Dependencies point one way: jobs → tune → train, retrieval → models, losses, data, evaluate →
config. The two wings (train/, retrieval/) never import each other: what they share — the
model's files, the Ray connection — lives below both (models/artifacts.py, ray_cluster.py).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vcl_dist"


def room_of(module: str) -> str:
    """``vcl_dist.train.loop`` -> ``train``; ``vcl_dist.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(path: Path) -> set[str]:
    """The absolute names of the modules a file imports (relative imports resolved)."""
    if path.is_relative_to(PACKAGE):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path.name != "__init__.py":
            package = package.rsplit(".", 1)[0]
    else:
        package = ""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def rooms_imported(path: Path) -> set[str]:
    return {room_of(name) for name in imports_of(path) if name.startswith("vcl_dist.")}


# room -> rooms of vcl_dist it must not import
FORBIDDEN = {
    "train": {"retrieval", "tune"},
    "retrieval": {"train", "tune"},
    "models": {"train", "retrieval", "tune", "losses"},
    "data": {"train", "retrieval", "tune", "models", "losses", "evaluate"},
    "losses": {"train", "retrieval", "tune", "models", "data", "evaluate", "ray_cluster", "storage"},
    "evaluate": {"train", "retrieval", "tune", "models", "losses", "data"},
    "config": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "storage", "ray_cluster"},
    "storage": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate"},
    "ray_cluster": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate"},
    "reservation": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "tracking", "serving"},
    # Masking secrets is a leaf every room may use.
    "redaction": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "tracking", "serving", "config",
                  "storage", "ray_cluster", "reservation"},
    # Watching a run knows the config and nothing of what runs; serving sits on the retrieval wing.
    "tracking": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "serving"},
    "step_phases": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "tracking", "config"},
    "serving": {"train", "tune", "losses", "tracking"},
}
FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_imports_point_one_way(path):
    room = room_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
    wrong = rooms_imported(path) & FORBIDDEN.get(room, set())
    assert not wrong, f"{path.relative_to(ROOT)} ({room}) imports {sorted(wrong)}"


def test_the_losses_know_nothing_of_ray():
    for path in (PACKAGE / "losses").glob("*.py"):
        assert not any(name == "ray" or name.startswith("ray.") for name in imports_of(path)), path


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_jobs_ask_the_model_not_the_losses(path):
    assert "losses" not in rooms_imported(path), path


def test_the_checker_sees_relative_imports(tmp_path):
    """The rules would pass vacuously if relative imports were missed."""
    assert "vcl_dist.models.artifacts" in imports_of(PACKAGE / "train" / "loop.py")
    assert "train" in rooms_imported(PACKAGE / "tune" / "search.py")
