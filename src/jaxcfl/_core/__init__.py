"""Shared pieces under both halves of jaxcfl (private: the public names are re-exported by
:mod:`jaxcfl`): IEEE rounding, Lanczos, the log-bisection search, the classification rule,
Hessian tools, fingerprints and the deterministic mode, statistics, image loading,
multi-process runs, the SGD stability limits, and result folders. Nothing here imports
:mod:`jaxcfl.pde`, :mod:`jaxcfl.nn` or the front end (``tests/test_shape.py``)."""
