"""INT8 quantization: where quantizers go (:mod:`.placement`) and quantization-aware distillation (:mod:`.qad`)."""

from edgekd.quantize.placement import LAYOUTS, fold_batchnorm, insert_activation_quantizers, reparameterize, traced_for_placement
from edgekd.quantize.qad import (QUANT_FORMAT, QUANTIZED_KIND, _tensor_quantizer_cls, activation_quantizers, enabled_quantizers, forward_loop_over,
                                 weight_config, is_quantized, keep_calibrated_if_better, load_quantized, quantize_model, quantizer_summary,
                                 recalibrate_activations, run_qad, save_quantized)

__all__ = ["LAYOUTS", "QUANT_FORMAT", "QUANTIZED_KIND", "activation_quantizers", "enabled_quantizers", "fold_batchnorm", "forward_loop_over", "weight_config",
           "is_quantized", "keep_calibrated_if_better", "load_quantized", "insert_activation_quantizers", "traced_for_placement", "quantize_model", "quantizer_summary",
           "recalibrate_activations", "reparameterize", "run_qad", "save_quantized", "_tensor_quantizer_cls"]
