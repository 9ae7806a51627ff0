"""Tools built on the library (CLI, demo, benchmarks, plots, model zoo); the library never imports them."""
