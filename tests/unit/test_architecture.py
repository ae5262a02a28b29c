"""The architecture (docs/concepts/architecture.md), checked on the code (ast): which rooms import which, and how long
the training wing's functions and classes may grow.

Dependencies point one way: jobs → tune → train, retrieval → models, losses, data, evaluate →
config, and everything may use the runtime layer beneath (runtime/: timing, finiteness
verdicts, precision, memory, console output) — except the losses, which are lent what they
need as arguments. The two wings (train/, retrieval/) never import each other: what they share
— a model's folder, the Ray connection — lives below both (models/export.py, models/locate.py,
ray_cluster.py). The training state's format is the training wing's (train/checkpoint.py): the
model wing imports no optimizer or scheduler code.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
    "losses": {"train", "retrieval", "tune", "models", "data", "evaluate", "ray_cluster", "storage", "runtime"},
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
    # The layer under the wings: it may read the config (its errors) and mask secrets, nothing more.
    "runtime": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "tracking", "serving", "storage",
                "ray_cluster", "reservation", "class_names"},
    # The classes.txt contract, below the data and model wings alike.
    "class_names": {"train", "retrieval", "tune", "models", "losses", "data", "evaluate", "tracking", "serving",
                    "config", "storage", "ray_cluster", "reservation", "runtime"},
    "serving": {"train", "tune", "losses", "tracking"},
    # Curating data uses a trained model as the retrieval wing does; it trains nothing.
    "curation": {"train", "tune", "losses", "tracking", "serving"},
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
    assert "vcl_dist.train.checkpoint_writer" in imports_of(PACKAGE / "train" / "loop.py")
    assert "train" in rooms_imported(PACKAGE / "tune" / "search.py")


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_the_model_wing_imports_no_optimizer_or_scheduler(path):
    """A model user's code (export, locate, towers) never loads training machinery."""
    names = imports_of(path)
    assert not any(name.startswith("torch.optim") for name in names), path
    assert not any(name.startswith("vcl_dist.train") for name in names), path
    text = path.read_text()
    assert "torch.optim" not in text and "lr_scheduler" not in text, path


# The training wing stays readable: a driver step, a loop, a part of a worker each fit a screen.
FUNCTION_LINES = 60
CLASS_LINES = 120
DRIVER_STEP_LINES = 50


def definitions(path: Path):
    """(name, kind, lines) of every function and class defined in ``path`` (methods included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            yield node.name, kind, node.end_lineno - first + 1


@pytest.mark.parametrize("path", sorted((PACKAGE / "train").glob("*.py")), ids=lambda p: p.name)
def test_the_training_wing_has_no_long_functions_or_classes(path):
    too_long = [f"{name} ({kind}, {lines} lines)" for name, kind, lines in definitions(path)
                if lines > (CLASS_LINES if kind == "class" else FUNCTION_LINES)]
    assert not too_long, f"{path.relative_to(ROOT)}: {too_long}"


def test_the_driver_reads_in_one_screen():
    """``run_training`` is a sequence of named steps, each short."""
    runner = PACKAGE / "train" / "runner.py"
    lengths = {name: lines for name, kind, lines in definitions(runner) if kind == "function"}
    assert lengths["run_training"] <= DRIVER_STEP_LINES
    steps = ["check_config", "connect", "check_cluster", "reserved", "plan_data", "start_watching", "build_trainer",
             "fit", "collect_result"]
    tree = ast.parse(runner.read_text())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_training")
    called = [n.func.id for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert [name for name in called if name in steps] == steps
    assert all(lengths[name] <= DRIVER_STEP_LINES for name in steps), {name: lengths[name] for name in steps}


def test_the_length_rule_sees_long_definitions(tmp_path):
    """The length rules would pass vacuously if the measure were wrong."""
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\n\nclass Short:\n    pass\n")
    assert dict((name, lines) for name, _, lines in definitions(tmp_path / "long.py")) == {"long": 71, "Short": 2}


def test_one_home_per_contract_and_helper():
    """``classes.txt`` is named in one module; errors become lines through one formatter."""
    sources = {path: path.read_text() for path in FILES}
    named = [path.name for path, text in sources.items() if '"classes.txt"' in text]
    assert named == ["class_names.py"], named
    hand_made = [str(path.relative_to(ROOT)) for path, text in sources.items()
                 if path.name != "console.py" and (".join(str(err).split())" in text or ".join(str(cause).split())" in text)]
    assert not hand_made, hand_made
