"""Applications built on the core (CLI, demo, benchmarks, router, bundled data); the core never imports them."""
