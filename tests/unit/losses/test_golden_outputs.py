"""A small fixed dual encoder on fixed inputs gives the embeddings and losses kept in
``tests/data/golden_outputs.json`` (regenerate: ``python tests/support/golden_outputs.py --write``,
only for an intended change, with the reason in the commit)."""

import json

from golden_outputs import GOLDEN, compute, largest_drift

TOLERANCE = 1e-6


def test_no_embedding_or_loss_drifts_from_its_golden_value():
    golden = json.loads(GOLDEN.read_text())
    now = compute()
    assert set(now["losses"]) == set(golden["losses"]), "a loss was added or removed: regenerate the golden outputs"
    drifted = {key: value for key, value in largest_drift(golden, now).items() if not value <= TOLERANCE}
    assert not drifted, f"drifted beyond {TOLERANCE}: {drifted}"


def test_the_check_sees_a_drift():
    """A changed number is caught (the check would pass vacuously if it compared nothing)."""
    golden = json.loads(GOLDEN.read_text())
    moved = json.loads(GOLDEN.read_text())
    moved["losses"]["sigmoid"] += 2e-6
    moved["image_embeddings"][3][5] -= 2e-6
    drift = largest_drift(golden, moved)
    assert drift["loss sigmoid"] > TOLERANCE and drift["image_embeddings"] > TOLERANCE
    assert drift["loss infonce"] == 0 and drift["text_embeddings"] == 0
