"""Toy preference pairs for the training tests (the `fresh_caches` fixture they use is in tests/conftest.py)."""

from __future__ import annotations

from locaudit.data.types import PreferencePair


def toy_pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    return [PreferencePair(f"q{i}", f"What is item {i}?", f"It is good {i % 4}.", f"Bad bad {i % 3}!")
            for i in range(offset, offset + n)]
