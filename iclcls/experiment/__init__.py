"""The experiment core: one way to run an experiment, which ``iclcls eval``, ``study`` and
``cil`` (and the scripts in eval/) specialise and other commands reuse.

    splits      load_splits, subset: a config's data as seeded train/validation/test subsets
    fit         build_classifier, prepare: a classifier built from its config, fitted and tuned
    checkpoint  PredictionCheckpoint: predictions that survive a crash
    run         run_experiment, score_records, write_run: one run directory, resumed or re-scored
    report      markdown reports and plots
"""

from iclcls.experiment.checkpoint import (  # noqa: F401
    CHECKPOINT,
    PARTIAL,
    PREDICTIONS,
    PredictionCheckpoint,
    ResumeError,
    prediction_record,
    read_predictions,
)
from iclcls.experiment.fit import Prepared, build_classifier, prepare, remember_lm  # noqa: F401
from iclcls.experiment.run import RunResult, primary_metric, run_experiment, run_key, score_records, write_run  # noqa: F401
from iclcls.experiment.splits import Splits, load_splits, subset  # noqa: F401
