"""The core estimator, ICLClassifier: ``estimator`` builds the stages and predicts; its mixins
add continual addition, tuning, persistence (with ``trust``: a saved state is untrusted
input) and the scikit-learn face (``predict`` labels, ``predict_proba``, ``score``)."""

from iclcls.classifier.estimator import ICLClassifier, as_examples

__all__ = ["ICLClassifier", "as_examples"]
