"""Stage: export. ONNX in the Q/DQ layout of the target's runtime, and the checks that prove it is right.

- :mod:`.onnx`: torch -> ONNX (TorchScript exporter), metadata, FP32 / FP16.
- :mod:`.tensorrt_layout`: the ``tensorrt`` layout and its static readiness check.
- :mod:`.ort_layout`: the ``ort-cpu`` layout with the trained scales, and onnxruntime's fusion check.
- :mod:`.checks`: agreement with PyTorch and the readiness gate.
- :mod:`.stage`: :func:`run_export`, the stage entry point.
"""

from edgekd.export.checks import agreement, interleaved_latency_ms, ort_latency_ms, ort_logits, ort_session, readiness_gate, reference_logits, run_checks
from edgekd.export.graph import Graph, QdqReport, graph_index, show_report
from edgekd.export.onnx import INPUT_NAME, OUTPUT_NAME, export_fp16, export_fp32, has_fake_quant, read_metadata, stamp_metadata, torch_to_onnx, without_quantizers
from edgekd.export.ort_layout import (check_ort_cpu_fusion, export_int8_ort, export_int8_ort_closest, ort_quantize_static, strip_qdq, trained_overrides,
                                      u8_params)
from edgekd.export.stage import LAYOUTS, PRECISIONS, ExportRequest, compare_with_fp32, export_model, load_for_export, resolve_layout, run_export
from edgekd.export.tensorrt_layout import check_tensorrt_readiness, export_int8_tensorrt

__all__ = ["INPUT_NAME", "LAYOUTS", "OUTPUT_NAME", "PRECISIONS", "ExportRequest", "Graph", "QdqReport", "agreement", "check_ort_cpu_fusion",
           "check_tensorrt_readiness", "compare_with_fp32", "export_fp16", "export_fp32", "export_int8_ort", "export_int8_ort_closest",
           "export_int8_tensorrt", "export_model", "graph_index", "has_fake_quant", "interleaved_latency_ms", "load_for_export", "ort_latency_ms", "ort_logits", "ort_quantize_static",
           "ort_session", "read_metadata", "readiness_gate", "reference_logits", "resolve_layout", "run_checks", "run_export", "show_report", "stamp_metadata",
           "strip_qdq", "torch_to_onnx", "trained_overrides", "u8_params", "without_quantizers"]
