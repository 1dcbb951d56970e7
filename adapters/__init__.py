"""Framework adapters, one module per backend, each giving a `Model` and an `Optimizer`.

- ``hybrid_core.adapters.numpy``: the reference path (pure array-API `MLP`, `SGD`, `Adam`, `AdamW`)
  for NumPy, array-api-strict and any other array-API namespace.
- ``hybrid_core.adapters.torch``: `TorchModel` (an ``nn.Module`` plus a loss) and `TorchOptimizer`
  (any ``torch.optim`` optimizer, with an optional LR scheduler and gradient clipping).
- ``hybrid_core.adapters.jax``: `JaxModel` (a loss over a parameter pytree), `EquinoxModel` and
  `NNXModel` (an ``eqx.Module`` or a Flax ``nnx.Module``) and `OptaxOptimizer` (any optax
  ``GradientTransformation``, its learning rate known on the host).

Importing this package imports no framework; each module imports its own on first use.
"""
