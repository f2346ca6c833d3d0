"""The multi-adapter server: one base model, many adapters hot-swapped from storage."""
