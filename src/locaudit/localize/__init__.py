"""Localize a behaviour: per-head activations (activations.py), all-head probes (probe.py), figures (plots.py)."""

from locaudit.localize.activations import ActivationSet, collect_activations, collect_probe_activations
from locaudit.localize.probe import ProbeResult, probe_activations, train_probes

__all__ = ["ActivationSet", "ProbeResult", "collect_activations", "collect_probe_activations", "probe_activations",
           "train_probes"]
