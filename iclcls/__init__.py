"""iclcls: classify text and images with LLMs learning in context."""

from iclcls.errors import UntrustedStateError
from iclcls.types import Example, LabelSpace, Prediction

__all__ = ["Example", "LabelSpace", "Prediction", "ICLClassifier", "UntrustedStateError"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing iclcls must not load torch
    if name == "ICLClassifier":
        from iclcls.classifier import ICLClassifier

        return ICLClassifier
    raise AttributeError(name)
