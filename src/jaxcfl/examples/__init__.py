"""Training set-ups to copy from, each a function ``() -> dict(model, optimizer, data, test, ...)``.

They are what ``jaxcfl sensitivity`` runs by default, and templates for a user's own spec
(``jaxcfl sensitivity my_training.py:training``):

* :func:`jaxcfl.examples.digits.training`: a Flax NNX network with BatchNorm and Dropout,
  trained with ``optax.adamw`` on the built-in digits, with a random-shift augmentation;
* :func:`jaxcfl.examples.digits.functional_training`: the same data and a plain-JAX model
  given as two pure functions ``init(key) -> params`` and ``apply(params, x) -> logits``,
  trained with ``optax.adam``.
"""
