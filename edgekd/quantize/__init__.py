"""INT8 quantization: the network as deployed (:mod:`.fuse`), where quantizers go (:mod:`.placement`),
activation ranges (:mod:`.calibrate`; learned in QAD: :mod:`.ranges`), fake-quant and its checkpoints
(:mod:`.fakequant`, modelopt reached only through :mod:`.modelopt_api`), post-training calibration
(:mod:`.ptq`), quantization-aware distillation (:mod:`.qad`), per-layer sensitivity and the accuracy
budget (:mod:`.sensitivity`, :mod:`.budget`), and the stage (:mod:`.stage`: :func:`run_qad`)."""

from edgekd.quantize.fuse import fold_batchnorm, reparameterize
from edgekd.quantize.placement import LAYOUTS, insert_activation_quantizers, traced_for_placement
from edgekd.quantize.fakequant import (QUANT_FORMAT, QUANTIZED_KIND, activation_quantizers, default_weight_bits, enabled_quantizers,
                                 for_target, forward_loop_over, weight_config, is_quantized, load_quantized, quantize_model, quantizer_summary, recalibrate_activations, save_quantized)
from edgekd.quantize.sensitivity import fit_accuracy_budget, float_layers_of, measure_sensitivity, quantized_layers, set_float_layers
from edgekd.quantize.budget import search_float_layers
from edgekd.quantize.ptq import calibrate, top1_on
from edgekd.quantize.qad import keep_calibrated_if_better
from edgekd.quantize.stage import QadJob, run_qad

__all__ = ["LAYOUTS", "QadJob", "calibrate", "top1_on", "QUANT_FORMAT", "QUANTIZED_KIND", "activation_quantizers", "default_weight_bits", "enabled_quantizers", "for_target", "fold_batchnorm", "forward_loop_over", "weight_config",
           "is_quantized", "keep_calibrated_if_better", "load_quantized", "insert_activation_quantizers", "traced_for_placement", "quantize_model", "quantizer_summary",
           "recalibrate_activations", "reparameterize", "run_qad", "save_quantized", "fit_accuracy_budget", "float_layers_of",
           "measure_sensitivity", "quantized_layers", "search_float_layers", "set_float_layers"]
