"""Framework adapters, one module per backend with the same shape: ``numpy`` (the reference path).

PyTorch, JAX/optax and CuPy adapters arrive with the adapters issue. Importing this
package imports no framework.
"""
