"""The README's transition table is the one in common/pairstate.py, not a hand-drawn copy."""

from pathlib import Path

from common.pairstate import render_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_transition_table_is_generated_from_the_table() -> None:
    text = README.read_text()
    begin, end = "<!-- transitions:begin -->\n", "\n<!-- transitions:end -->"
    assert begin in text and end in text
    shown = text[text.index(begin) + len(begin) : text.index(end)]
    assert shown == render_markdown(), "README table is stale: paste render_markdown() output"
