"""Pure functions: custom resource -> child object dicts. No I/O."""
