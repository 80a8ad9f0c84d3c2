"""fewstep.export: checkpoint → ONNX (plain, fused step, fused sampler) → TensorRT plan."""
