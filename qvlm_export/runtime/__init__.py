"""Runtime: the backend-neutral runner contract, bundle.json, greedy generation and ONNX Runtime sessions."""
