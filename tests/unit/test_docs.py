"""The documentation holds to the code: generated pages equal what their scripts write now,
every config key is described, the error messages the troubleshooting page quotes are the
code's own, the README stays short with links that resolve, and the site builds strictly."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / "gen" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_the_schema():
    page = (DOCS / "reference" / "config.md").read_text()
    assert page == load_script("config_reference").render(), \
        "docs/reference/config.md differs from vcl_dist/config.py: run python docs/gen/config_reference.py"


def test_every_config_key_has_type_default_and_description():
    from vcl_dist.config import Config

    reference = load_script("config_reference")
    undescribed = []
    seen = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            nested = reference.section_of(field.annotation) or reference.item_model(field.annotation)
            if not field.description and not (prefix == "" and nested is not None):
                undescribed.append(key)
            if nested is not None:
                walk(nested, f"{key}.")

    walk(Config, "")
    assert not undescribed, f"config keys without a description: {undescribed}"
    page = (DOCS / "reference" / "config.md").read_text()
    for key in ("train.batch_size", "loss.chunk_size", "data.sources[…].weight", "tune.space[…].low"):
        assert f"| `{key}` |" in page


def test_config_reference_renders_types_defaults_and_bounds():
    page = (DOCS / "reference" / "config.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `data.image_size` |"))
    assert row.split(" | ")[1:4] == ["int", "`48`", "≥ 16, ≤ 1024"]
    row = next(line for line in page.splitlines() if line.startswith("| `loss.name` |"))
    assert "triplet \\| vcrl \\| infonce \\| sigmoid" in row and "`triplet`" in row


def test_command_reference_is_the_parsers():
    reference = load_script("command_reference")
    page = (DOCS / "reference" / "commands.md").read_text()
    made_with = reference.generated_with(page)
    if made_with != reference.python_version():
        pytest.skip(f"the page was made with Python {made_with}; argparse words help differently on {reference.python_version()}")
    assert page == reference.render(), \
        "docs/reference/commands.md differs from the jobs' parsers: run python docs/gen/command_reference.py"
    for job in reference.JOBS:
        assert f"## `jobs/{job}.py`" in page
    assert sorted(reference.JOBS) == sorted(p.stem for p in (ROOT / "jobs").glob("*.py")), "a job is missing from the page"


def source_text() -> str:
    files = list((ROOT / "vcl_dist").rglob("*.py")) + list((ROOT / "jobs").glob("*.py"))
    return "\n".join(path.read_text() for path in files)


def quoted_messages(page: str) -> list[str]:
    """The code spans of the first column of the troubleshooting tables."""
    spans = []
    for line in page.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            spans += re.findall(r"`([^`]+)`", first)
    return spans


def test_troubleshooting_quotes_the_code_s_own_messages():
    page = (DOCS / "troubleshooting.md").read_text()
    messages = quoted_messages(page)
    assert len(messages) >= 25
    source = source_text()
    missing = []
    for message in messages:
        # <placeholders> stand for what the message fills in; each literal piece must be in the code.
        for piece in re.split(r"<[^>]+>", message):
            piece = piece.strip()
            if len(piece) >= 4 and piece not in source:
                missing.append(f"{message!r}: {piece!r}")
    assert not missing, "messages quoted in docs/troubleshooting.md that the code no longer says:\n" + "\n".join(missing)


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    # The two commands come first: the default run, then the tests.
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert "jobs/train.py" in blocks[0] and "pytest" in blocks[1]
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the docs tools are not installed")
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


API_PACKAGES = ("vcl_dist/losses", "vcl_dist/models", "vcl_dist/retrieval", "vcl_dist/evaluate.py")


def public_definitions():
    """``(file, name, node)`` of every public module-level function and class of the API
    packages, and of every public method of those classes."""
    import ast

    for package in API_PACKAGES:
        root = ROOT / package
        for path in sorted([root] if root.suffix == ".py" else root.rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                    yield path, node.name, node
                    if isinstance(node, ast.ClassDef):
                        for member in node.body:
                            if isinstance(member, ast.FunctionDef) and not member.name.startswith("_"):
                                yield path, f"{node.name}.{member.name}", member


def test_every_public_function_and_class_of_the_api_has_a_docstring():
    import ast

    missing = [f"{path.relative_to(ROOT)}: {name}" for path, name, node in public_definitions() if not ast.get_docstring(node)]
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_api_docstrings_parse_as_google_style():
    griffe = pytest.importorskip("griffe")
    import logging

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("griffe")
    logger.addHandler(handler)
    try:
        def parse(obj) -> None:
            if obj.docstring:
                obj.docstring.parse("google")
            for member in obj.members.values():
                if not member.is_alias:
                    parse(member)

        for package in ("vcl_dist.losses", "vcl_dist.models", "vcl_dist.retrieval", "vcl_dist.evaluate"):
            parse(griffe.load(package, search_paths=[str(ROOT)]))
    finally:
        logger.removeHandler(handler)
    assert not warnings, "docstrings that do not parse as Google style:\n" + "\n".join(warnings)


def test_shown_command_output_is_what_the_commands_print_now():
    output = load_script("command_output")
    quick = [example for example in output.EXAMPLES if not example.slow]
    assert quick
    for example in quick:
        kept = (output.OUTPUT / f"{example.name}.txt").read_text()
        assert kept == output.run(example), \
            f"docs/gen/output/{example.name}.txt is stale: run python docs/gen/command_output.py"
    # The pages include what they show from there.
    assert '--8<-- "config_unknown_key.txt"' in (DOCS / "troubleshooting.md").read_text()


def test_every_figure_on_the_benchmarks_page_names_its_commit_and_date():
    page = (DOCS / "benchmarks.md").read_text()
    provenance = re.compile(r"[Cc]ommit [0-9a-f]{7,40}, \d{4}-\d\d-\d\d")
    overview = [line for line in page.split("\n## ")[0].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert overview, "the overview table is gone"
    assert all(provenance.search(row) for row in overview), [row[:60] for row in overview if not provenance.search(row)]
    sections = page.split("\n## ")[1:]
    # Every section with a measured table says which commit and date measured it.
    unnamed = [s.splitlines()[0] for s in sections if "\n|---" in s and not provenance.search(s)]
    assert not unnamed, f"sections whose figures name no commit and date: {unnamed}"


# Errors that never reach a user as such: a run's end carried between processes.
INTERNAL_ERRORS = {"RunEndedByFatalError", "FatalTrainingError"}


def test_troubleshooting_names_every_error_the_code_defines():
    page = (DOCS / "troubleshooting.md").read_text()
    defined = set(re.findall(r"^class (\w+Error)\(", source_text(), re.MULTILINE)) - INTERNAL_ERRORS
    assert defined, "no error classes found"
    missing = sorted(name for name in defined if f"`{name}`" not in page)
    assert not missing, f"errors that docs/troubleshooting.md does not explain: {missing}"


def test_the_benchmark_plots_are_drawn_from_the_figures_of_their_result_files(tmp_path, monkeypatch):
    plots = load_script("benchmark_plots")
    assert plots.main(["--check"]) == 0, "a plot is stale: run python docs/gen/benchmark_plots.py"
    page = (DOCS / "benchmarks.md").read_text()
    for plot in plots.PLOTS:
        assert f"(images/benchmarks/{plot.name}.png)" in page and plot.source in page, plot.name
    # A figure changed in a result file makes its plot stale.
    for plot in plots.PLOTS:
        (tmp_path / plot.source).write_text((plots.RESULTS / plot.source).read_text())
    first = tmp_path / plots.PLOTS[0].source
    first.write_text(first.read_text().replace("| 908 |", "| 907 |", 1))
    monkeypatch.setattr(plots, "RESULTS", tmp_path)
    assert plots.main(["--check"]) == 1
