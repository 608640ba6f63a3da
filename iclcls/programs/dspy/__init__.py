"""Infer-Retrieve-Rank as a compiled DSPy program on current DSPy (3.x), over iclcls's parts.

``IReRa`` (with ``Infer``, ``Retrieve``, ``Rank``) is a ``dspy.Module``; ``dspy_lm`` serves
it from any iclcls LM backend, ``served_lm`` from a vLLM server with guided JSON; the
``compile`` module compiles, saves and loads it (DSPy JSON state, no pickle), by default with
``select.HonestCompiler`` (the one-SE rule: the program is never worse than its retriever
beyond noise). Importing this package imports DSPy; ``import iclcls`` does not.
"""

from iclcls.programs.dspy.lm import CoalescingLM, GuidedDecoder, IclclsEngine, dspy_lm, served_lm
from iclcls.programs.dspy.modules import Infer, IReRa, Rank, Retrieve, StepStats, as_dspy_examples, map_threads, rp_at_k_metric
from iclcls.programs.dspy.select import HonestCompiler

__all__ = [
    "CoalescingLM",
    "GuidedDecoder",
    "HonestCompiler",
    "IReRa",
    "IclclsEngine",
    "Infer",
    "Rank",
    "Retrieve",
    "StepStats",
    "as_dspy_examples",
    "dspy_lm",
    "map_threads",
    "rp_at_k_metric",
    "served_lm",
]
