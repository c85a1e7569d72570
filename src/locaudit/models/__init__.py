"""Models: loading (hub, folder, GGUF, the embedded default) and head sites."""

from locaudit.models.loading import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from locaudit.models.sites import SITES, ModelSites, SiteSpec, register_site

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelSites", "SITES", "SiteSpec", "load_model", "register_site", "wrap_model"]
