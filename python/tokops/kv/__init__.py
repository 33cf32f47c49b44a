"""Quantized KV storage: KIVI group quantization (int8/int4/int2) and fp8 e4m3."""

from .quant import Fp8Tensor, QuantizedTensor, dequantize, dequantize_fp8, quantize, quantize_fp8

__all__ = ["QuantizedTensor", "Fp8Tensor", "quantize", "dequantize", "quantize_fp8", "dequantize_fp8"]
