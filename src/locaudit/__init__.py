"""locaudit: how much evidence does an edit give that a behaviour is localized in an LLM?

The package follows the data's way: models -> data -> localize -> edit -> evaluate -> study -> cli.
"""

from locaudit.heads import HeadSet

__all__ = ["HeadSet"]
__version__ = "0.1.0"
