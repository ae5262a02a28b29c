"""The tracked tree speaks of the project, not of how its work was organised.

No text file, file name or test name may name a round of work or a work item by number, or set
a figure against older code (the patterns: ORGANISATION below).
A third-party project's issue is a genuine reference: it names its project ("Ray issue 37633",
"open_clip issues 616 and 894") or is a URL.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A work item or a round of work by number, and figures set against older code.
ORGANISATION = re.compile(
    r"\bissues?\s*#?\s*\d+"
    r"|\b(?:sessions?|stops?|sprints?|milestones?)\s*#?\s*\d+\b"
    r"|\brounds? of work\b|\bwork items?\b"
    r"|\b(?:earlier|previous|older|old)\s+code\b"
    r"|\bcommit\s+[0-9a-f]{7,40}'s\s+code\b",
    re.IGNORECASE,
)
# Projects whose own issue numbers the tree may cite.
THIRD_PARTY = r"(?:ray|pytorch-metric-learning|pytorch|torch|open_clip|openclip|transformers|pyarrow|moto|kuberay|mkdocs|faiss)"
THIRD_PARTY_ISSUE = re.compile(THIRD_PARTY + r"(?:'s)?\s+(?:github\s+)?issues?\s*#?\s*\d+", re.IGNORECASE)
# A result file is named by what it measures and the machine: no commit, no round of work.
RESULT_NAME = re.compile(r"(?:^|[-_.])(?:[0-9a-f]{7,40}|first-run|second-run|session\d*|stop\d*|old|new)(?=[-_.]|$)")

BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".ico", ".parquet", ".tar", ".gz", ".whl", ".pt",
                   ".safetensors", ".npy", ".faiss", ".pdf"}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def organisation_words(text: str) -> list[str]:
    """The matches in ``text`` that are not a third-party project's issue."""
    allowed = [m.span() for m in THIRD_PARTY_ISSUE.finditer(text)]
    found = []
    for match in ORGANISATION.finditer(text):
        if any(start <= match.start() and match.end() <= end for start, end in allowed):
            continue
        found.append(match.group(0))
    return found


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_no_tracked_text_names_how_the_work_was_organised():
    offences = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tests/unit/test_project_text.py":
            continue  # this file spells the patterns out
        for word in organisation_words(rel):
            offences.append(f"{rel}: file name: {word!r}")
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for word in organisation_words(line):
                offences.append(f"{rel}:{number}: {word!r}")
    assert not offences, "text that names how the work was organised:\n" + "\n".join(offences[:50])


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_result_files_are_named_by_what_they_measure():
    names = [p.name for p in tracked_files() if p.parent == ROOT / "benchmarks" / "results"]
    assert names, "benchmarks/results/ holds no result"
    bad = [name for name in names if RESULT_NAME.search(Path(name).stem)]
    assert not bad, f"result files named by when or by whom, not by what they measure: {bad}"


# The offending examples are assembled from parts, so that this file does not itself hold them.
ISSUE, SESSION, STOP = "iss" + "ue", "sess" + "ion", "st" + "op"


@pytest.mark.parametrize("text, found", [
    (f"Targets ({ISSUE} 17): HNSW recall", [f"{ISSUE} 17"]),
    (f"as {ISSUE} #18 asked", [f"{ISSUE} #18"]),
    (f"measured in {SESSION} 13", [f"{SESSION} 13"]),
    (f"{STOP} 4 landed", [f"{STOP} 4"]),
    ("the same scenario on the earlier code", ["earlier code"]),
    ("on commit 41d1ed9's code", ["commit 41d1ed9's code"]),
    ("Ray Data cannot seek into an epoch (Ray issues 37633, 48224)", []),
    ("open_clip issues 616 and 894", []),
    ("https://github.com/ray-project/ray/issues/37633", []),
    ("steps 11-20, every step 4 and iteration 1", []),
    ("commit 376a067, 2026-12-01, 2 cores", []),
])
def test_the_patterns(text, found):
    assert organisation_words(text) == found


@pytest.mark.parametrize("name, bad", [
    ("train_speed-2cores-376a067", True), ("gpu_check-h200-first-run", True),
    ("train_speed-vs_plain_ddp-2cores", False), ("ann_index-1M-128d", False), ("gpu_check-h200", False),
])
def test_result_name_pattern(name, bad):
    assert bool(RESULT_NAME.search(name)) is bad
