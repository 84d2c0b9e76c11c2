"""INT8 quantization: the network as deployed (:mod:`.fuse`), where quantizers go (:mod:`.placement`), activation ranges (:mod:`.calibrate`, learned in QAD: :mod:`.ranges`), fake-quant and checkpoints (:mod:`.qad`),
per-layer sensitivity and mixed precision (:mod:`.sensitivity`), and the stage (:mod:`.stage`)."""

from edgekd.quantize.fuse import fold_batchnorm, reparameterize
from edgekd.quantize.placement import LAYOUTS, insert_activation_quantizers, traced_for_placement
from edgekd.quantize.qad import (QUANT_FORMAT, QUANTIZED_KIND, _tensor_quantizer_cls, activation_quantizers, default_weight_bits, enabled_quantizers,
                                 for_target, forward_loop_over, weight_config, is_quantized, load_quantized, quantize_model, quantizer_summary, recalibrate_activations, save_quantized)
from edgekd.quantize.sensitivity import fit_accuracy_budget, float_layers_of, measure_sensitivity, quantized_layers, set_float_layers
from edgekd.quantize.stage import keep_calibrated_if_better, run_qad, search_float_layers

__all__ = ["LAYOUTS", "QUANT_FORMAT", "QUANTIZED_KIND", "activation_quantizers", "default_weight_bits", "enabled_quantizers", "for_target", "fold_batchnorm", "forward_loop_over", "weight_config",
           "is_quantized", "keep_calibrated_if_better", "load_quantized", "insert_activation_quantizers", "traced_for_placement", "quantize_model", "quantizer_summary",
           "recalibrate_activations", "reparameterize", "run_qad", "save_quantized", "_tensor_quantizer_cls", "fit_accuracy_budget", "float_layers_of",
           "measure_sensitivity", "quantized_layers", "search_float_layers", "set_float_layers"]
