"""jaxai: reproductions of 2025 papers in one sharded, functional JAX codebase."""
