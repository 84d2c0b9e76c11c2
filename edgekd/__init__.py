"""edgekd: fine-tune, distill, quantize (QAD), export and benchmark image classifiers for edge devices."""

__version__ = "0.1.0"
