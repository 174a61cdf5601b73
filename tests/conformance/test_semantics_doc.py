"""docs/semantics.md states every conformance rule, under its category, with its case id."""

from __future__ import annotations

import re

from conformance.case import CATEGORIES, REGISTRY
from conformance.semantics_doc import DOC, render


def test_every_case_is_in_the_semantics_doc_under_its_category():
    with open(DOC) as f:
        text = f.read()
    titles = {key: title[0].upper() + title[1:] for key, title in CATEGORIES.items()}
    for case in REGISTRY.values():
        section = text.split(f"## {titles[case.category]}\n", 1)[1].split("\n## ", 1)[0]
        assert f"[**{case.id}**]" in section, f"{case.id} missing under '{titles[case.category]}' (regenerate: " \
                                             "python -m conformance.semantics_doc)"
        assert case.statement in section, f"{case.id}'s rule changed; regenerate docs/semantics.md"


def test_regenerating_the_doc_changes_at_most_the_source_line_anchors():
    with open(DOC) as f:
        text = f.read()
    strip = lambda s: re.sub(r"\.py#L\d+\)", ".py)", s)  # noqa: E731 - line anchors move with edits
    assert strip(render(text)) == strip(text)
