"""Names shared by the library, the CLI, the studio and the benchmarks (one home each)."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
"""Registry name of the model every entry point uses when none is given."""

KINDS = ("keys", "values", "queries", "keys_pre_rope")
"""Tensor kinds a dump can store (``keys``/``values`` always; the others optional)."""

COMPRESSIBLE_KINDS = ("keys", "values", "keys_pre_rope")
"""Kinds a compression config has settings for (queries are never cached, so never compressed)."""
