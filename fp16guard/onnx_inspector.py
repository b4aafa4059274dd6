def inspect_onnx(*a, **k): raise NotImplementedError
