"""Audits: of a model ufm did not train (ONNX), and the one-run privacy audit."""
