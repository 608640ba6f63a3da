"""Moved: the report helpers live in :mod:`iclcls.experiment.report` (this name stays importable)."""

from iclcls.experiment.report import *  # noqa: F401,F403
