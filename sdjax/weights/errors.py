"""The one exception type for everything that can go wrong getting weights into a model."""


class WeightsError(Exception):
    """Weights missing, corrupt, or not matching the model; the message names the problem."""
