"""locaudit: how much evidence does an edit give that a behaviour is localized in an LLM?

The package follows the data's way: models -> data -> localize -> edit -> evaluate -> study -> cli.
The Python API (locaudit/api.py) is importable from here, loaded on first use:

    from locaudit import load_model, load_behaviour, collect, probe, locate, fit_iti, train_edit, evaluate_edit
    from locaudit import compare   # the candidate location's edit vs random locations: the verdict
"""

from locaudit.heads import HeadSet

API = ("load_model", "load_behaviour", "collect", "probe", "locate", "fit_iti", "train_edit", "evaluate_edit",
       "compare")
__all__ = ["HeadSet", *API]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in API:  # lazy: `import locaudit` stays light for the CLI
        from locaudit import api

        return getattr(api, name)
    raise AttributeError(f"module 'locaudit' has no attribute {name!r}")
