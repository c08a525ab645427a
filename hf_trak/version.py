"""hf_trak's version (recorded in every store's config)."""

__version__ = "0.1.0"
