"""iclcls: classify text and images with LLMs learning in context."""

from iclcls.errors import ConfigError, DataError, IclclsError, LMBackendError, UntrustedStateError
from iclcls.types import Example, LabelSpace, Prediction

__all__ = [
    "Example", "LabelSpace", "Prediction", "ICLClassifier",
    "IclclsError", "DataError", "ConfigError", "UntrustedStateError", "LMBackendError", "NotFittedError",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing iclcls must not load torch (nor sklearn)
    if name == "ICLClassifier":
        from iclcls.classifier import ICLClassifier

        return ICLClassifier
    if name == "NotFittedError":
        from iclcls.errors import NotFittedError

        return NotFittedError
    raise AttributeError(name)
