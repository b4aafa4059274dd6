"""FP16 execution backends (emulate, onnxruntime, torch, tensorrt): filled in by the bisect issue."""
