"""An exported model run by onnxruntime on the CPU: ``<model>@onnx`` and ``<model>@onnx-int8``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclcls.embed.exported import ExportedEmbedder


class OnnxEmbedder(ExportedEmbedder):
    """float32 ONNX export (``int8=False``) or its dynamically quantised int8 twin."""

    def __init__(self, model_folder: str | Path, *, name: str, int8: bool = False, **options: Any) -> None:
        self.backend = "onnx-int8" if int8 else "onnx"
        super().__init__(model_folder, name=name, **options)

    def _load(self, model_file: Path) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # no warnings on stderr for every load
        return ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._runtime.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
