"""The integer codes shared with the kernels: Python (kdkernels/_core/codes.py) and C++
(csrc/include/kdkernels/api.h) must declare the same enums, names and values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdkernels._core import codes

API_H = Path(__file__).resolve().parents[1] / "csrc" / "include" / "kdkernels" / "api.h"


def c_enums(text: str) -> dict[str, dict[str, int]]:
    """{enum name: {member name without the leading k, lower case: value}} of api.h."""
    out = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*int\s*\{([^}]*)\}", text):
        members = {}
        for item in body.split(","):
            item = re.sub(r"//.*", "", item).strip()
            if item:
                key, value = (p.strip() for p in item.split("="))
                members[key.removeprefix("k").lower()] = int(value)
        out[name] = members
    return out


def py_members(enum) -> dict[str, int]:
    return {m.name.replace("_", "").lower(): int(m.value) for m in enum}


C = c_enums(API_H.read_text())


@pytest.mark.parametrize("enum", codes.ENUMS, ids=lambda e: e.__name__)
def test_python_enum_matches_the_c_header(enum):
    assert enum.__name__ in C, f"api.h declares no enum {enum.__name__}"
    assert py_members(enum) == C[enum.__name__]


def test_every_c_enum_has_a_python_twin():
    assert set(C) == {e.__name__ for e in codes.ENUMS}


def test_the_parser_sees_a_drift():
    drifted = API_H.read_text().replace("kRevKL = 2", "kRevKL = 9")
    assert py_members(codes.Div) != c_enums(drifted)["Div"]
