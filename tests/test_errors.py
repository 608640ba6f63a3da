"""The error hierarchy (one base, ``iclcls.IclclsError``) and the CLI's exit code per class.

Fast: no model is loaded; the CLI cases fail before any fitting or embedding.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
from sklearn.exceptions import NotFittedError as SklearnNotFitted
from typer.testing import CliRunner

import iclcls
from iclcls import errors
from iclcls.errors import (
    CapabilityError,
    ConfigError,
    DataError,
    IclclsError,
    LMBackendError,
    LMServerError,
    UnknownNameError,
    UntrustedStateError,
)


def test_every_class_is_an_iclcls_error_and_keeps_its_builtin():
    from iclcls.experiment.checkpoint import ResumeError
    from iclcls.label.readers import LabelInputError
    from iclcls.label.rows import LMUnavailable
    from iclcls.store.base import StoreError

    assert iclcls.IclclsError is IclclsError
    assert issubclass(iclcls.UntrustedStateError, iclcls.IclclsError)
    assert issubclass(UntrustedStateError, ConfigError) and issubclass(UntrustedStateError, ValueError)
    for cls, builtin in [
        (DataError, ValueError),
        (ConfigError, ValueError),
        (LabelInputError, ValueError),
        (ResumeError, RuntimeError),
        (StoreError, RuntimeError),
        (LMBackendError, RuntimeError),
        (LMServerError, RuntimeError),
        (CapabilityError, RuntimeError),
        (LMUnavailable, RuntimeError),
        (UnknownNameError, KeyError),
    ]:
        assert issubclass(cls, IclclsError) and issubclass(cls, builtin), cls
    assert issubclass(LabelInputError, DataError) and issubclass(ResumeError, ConfigError)
    assert issubclass(CapabilityError, LMBackendError) and issubclass(LMUnavailable, LMBackendError)
    assert str(UnknownNameError("unknown selector 'x'")) == "unknown selector 'x'"  # not KeyError's repr


def test_not_fitted_error_is_also_scikit_learns_and_built_lazily():
    nf = errors.NotFittedError
    assert nf is iclcls.NotFittedError is errors.NotFittedError  # built once, cached
    e = nf("call fit first")
    assert isinstance(e, IclclsError) and isinstance(e, SklearnNotFitted) and isinstance(e, ValueError)
    assert type(pickle.loads(pickle.dumps(e))) is nf
    # importing iclcls loads neither scikit-learn nor torch
    code = "import sys, iclcls; assert iclcls.IclclsError; print('sklearn' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


def test_data_error_names_file_location_and_field():
    e = DataError("must be text", path="d/train.csv", location="line 3", field="text")
    assert (e.problem, e.path, e.location, e.field) == ("must be text", "d/train.csv", "line 3", "text")
    assert str(e) == "d/train.csv, line 3, field 'text': must be text"
    assert str(DataError("no rows")) == "no rows"


def test_exit_code_by_class():
    from iclcls.cli import exit_code
    from iclcls.store.base import StoreLocked

    assert [
        exit_code(e)
        for e in (
            DataError("x"),
            FileNotFoundError("x"),
            LMServerError("x"),
            UntrustedStateError("x"),
            ConfigError("x"),
            UnknownNameError("x"),
            CapabilityError("x"),
            StoreLocked("x"),
            ValueError("x"),
            KeyError("x"),
        )
    ] == [65, 66, 75, 77, 78, 78, 78, 2, 2, 2]


@pytest.fixture
def cli():
    from iclcls.cli import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_cli_exit_codes(cli, tmp_path):
    res = cli("fit", tmp_path / "missing.yaml", "--out", tmp_path / "s")
    assert res.exit_code == 66 and "not found" in res.output, res.output
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: {benchmark: sample}\nclassifier: {shots: -2}\n")
    res = cli("fit", bad_yaml, "--out", tmp_path / "s")
    assert res.exit_code == 78 and "classifier.shots" in res.output, res.output
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "hello", "label": "a"}\n{"text": "bye", "label": \n')
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"data: {{train: {train}}}\nclassifier: {{}}\n")
    res = cli("fit", cfg, "--out", tmp_path / "s")
    assert res.exit_code == 65 and "line 2" in res.output, res.output


def test_cli_untrusted_state_exits_77(cli, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.json").write_text(
        json.dumps({"format": "iclcls-classifier", "version": 1, "params": {"lm": "./local-weights"}, "embedder_name": "x"})
    )
    inputs = tmp_path / "in.txt"
    inputs.write_text("I lost my card\n")
    res = cli("label", inputs, "--state", state, "--out", tmp_path / "out.jsonl")
    assert res.exit_code == 77 and "--trust-state" in res.output, res.output
