"""Versioned prompt formats. A prompt's version is part of every generation's cache key and lineage:
change the wording or schema, bump the version."""
