"""An exported model run by OpenVINO on the CPU: ``<model>@openvino`` and ``<model>@openvino-int8``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclcls.embed.exported import ExportedEmbedder


class OpenVINOEmbedder(ExportedEmbedder):
    """float32 OpenVINO IR (``int8=False``) or its NNCF static int8 twin.

    Inference precision is pinned to f32: on CPUs with avx512_bf16 OpenVINO would otherwise
    compute in bf16, a silent accuracy change that the spec does not ask for.
    """

    def __init__(self, model_folder: str | Path, *, name: str, int8: bool = False, **options: Any) -> None:
        self.backend = "openvino-int8" if int8 else "openvino"
        super().__init__(model_folder, name=name, **options)

    def _load(self, model_file: Path) -> Any:
        import openvino as ov

        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return ov.Core().compile_model(str(model_file), "CPU", config)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        result = self._runtime({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(result[0])
