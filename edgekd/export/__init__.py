"""Stage: export. ONNX in the Q/DQ layout of the target's runtime, and the checks that prove it is right.

- :mod:`.to_onnx`: torch -> ONNX (TorchScript exporter), metadata, FP32 / FP16.
- :mod:`.tensorrt_layout`: the ``tensorrt`` layout and its static readiness check.
- :mod:`.ort_layout`: the ``ort-cpu`` layout with the trained scales, and onnxruntime's fusion check.
- :mod:`.openvino_layout`: the ``openvino`` layout and its real-compile integer-kernel check.
- :mod:`.checks`: agreement with PyTorch and the readiness gate; :mod:`.confirm`: a sensitivity ranking checked on the exported file.
- :mod:`.mixed`: what each layer kept in float costs in latency.
- :mod:`.stage`: :func:`run_export`, the stage entry point.
"""

from edgekd.export.checks import readiness_gate, run_checks
from edgekd.export.logits import agreement, ort_logits, reference_logits
from edgekd.export.confirm import confirm_on_export
from edgekd.export.graph import Graph, QdqReport, graph_index, show_report
from edgekd.export.to_onnx import INPUT_NAME, OUTPUT_NAME, export_fp16, export_fp32, has_fake_quant, read_metadata, stamp_metadata, torch_to_onnx, without_quantizers
from edgekd.export.ort_layout import (check_ort_cpu_fusion, export_int8_ort, export_int8_ort_closest, ort_quantize_static, strip_qdq, trained_overrides,
                                      u8_params)
from edgekd.export.stage import LAYOUTS, PRECISIONS, ExportJob, ExportRequest, compare_with_fp32, export_model, load_for_export, resolve_layout, run_export
from edgekd.export.tensorrt_layout import check_tensorrt_readiness, export_int8_tensorrt

__all__ = ["INPUT_NAME", "LAYOUTS", "OUTPUT_NAME", "PRECISIONS", "ExportJob", "ExportRequest", "Graph", "QdqReport", "agreement", "check_ort_cpu_fusion",
           "check_tensorrt_readiness", "compare_with_fp32", "export_fp16", "export_fp32", "export_int8_ort", "export_int8_ort_closest",
           "export_int8_tensorrt", "export_model", "graph_index", "has_fake_quant", "load_for_export", "ort_logits", "ort_quantize_static",
           "confirm_on_export", "read_metadata", "readiness_gate", "reference_logits", "resolve_layout", "run_checks", "run_export", "show_report", "stamp_metadata",
           "strip_qdq", "torch_to_onnx", "trained_overrides", "u8_params", "without_quantizers"]
