"""Glue for frameworks that drive the optimizer (docs/frameworks.md). Each module here imports
its framework, so nothing in the library imports them."""
