"""Deployment: a trained jaxkd model as a TFLite or ONNX file, verified and measured.

    from jaxkd import export
    figures = export.export("runs/food101_eca", "tflite", quantize="int8")

Command line: ``python -m jaxkd.export WORKDIR --format=tflite|onnx [--quantize=...]``
(docs/deploy.md). The exporters and runtimes are the ``export`` extra
(``pip install -e .[export]``: ai-edge-litert, jax2onnx, onnx, onnxruntime); without them
``MissingExtraError`` names it. Modules: ``fold`` (BatchNorm folding, the inference
graph), ``images`` (the input crops), ``tflite`` and ``onnx`` (conversion, runners),
``deploy`` (``export``: convert, verify, measure).
"""
from jaxkd.export.deploy import (
                                 FLOAT32_TOLERANCE,
                                 FORMATS,
                                 QUANTIZATIONS,
                                 Deployable,
                                 ExportError,
                                 data_source,
                                 default_out,
                                 export,
                                 load,
                                 load_run,
)
from jaxkd.export.extra import MissingExtraError

__all__ = ["FLOAT32_TOLERANCE", "FORMATS", "QUANTIZATIONS", "Deployable", "ExportError",
           "MissingExtraError", "data_source", "default_out", "export", "load", "load_run"]
