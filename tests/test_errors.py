"""pipeline.errors.first_line: one line for a one-sentence error, whatever the exception carries."""
from __future__ import annotations

import pytest

from pipeline.errors import first_line


@pytest.mark.parametrize("exc, want", [
    (ValueError("bad shape\n  at node 3\n  at node 4"), "ValueError: bad shape"),
    (RuntimeError("\n\n  [ONNXRuntimeError] : 1 : FAIL\ndetails"), "RuntimeError: [ONNXRuntimeError] : 1 : FAIL"),
    (KeyError(), "KeyError"),               # no message: "".splitlines()[0] raised IndexError here
    (RuntimeError("   \n  "), "RuntimeError"),  # whitespace only counts as empty
])
def test_first_line_takes_the_first_non_empty_line_or_the_type(exc, want):
    assert first_line(exc) == want
