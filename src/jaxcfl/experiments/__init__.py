"""The paper's experiments, behind ``jaxcfl reproduce``."""
