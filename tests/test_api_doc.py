"""docs/api.md is the reference of every public name, as scripts/api_doc.py writes it from the code."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import moonlet
import moonlet.mooncake

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_api_reference_is_current_and_complete():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_doc.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # else: python scripts/api_doc.py, and commit docs/api.md
    text = (ROOT / "docs" / "api.md").read_text()
    for module, names in (("moonlet", moonlet.__all__), ("moonlet.mooncake", moonlet.mooncake.__all__)):
        for name in names:
            assert f"### `{module}.{name}" in text, name
    assert "### `moonlet.metrics.register(" in text
    assert "requests: list[Request] | int," in text and "'list[Request] | int'" not in text  # no quotes
