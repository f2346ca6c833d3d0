"""Data stage: load, validate, sanitize, deduplicate, split, format."""
