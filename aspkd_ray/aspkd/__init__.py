"""The ASPKD core: active selection, self-paced pseudo-labels, distillation, the round loop.

Pure algorithm code: arrays and tensors in, arrays and tensors out; no Ray.
"""
