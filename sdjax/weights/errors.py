"""The exception types for everything that can go wrong getting weights into a model."""


class WeightsError(Exception):
    """Weights missing, corrupt, or not matching the model; the message names the problem."""


class AdapterError(WeightsError, ValueError):
    """A LoRA or embedding file that cannot be applied to this model. A ValueError too: in
    Python it is a bad argument value, like any other."""
