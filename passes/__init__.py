"""onnxopt's passes, one technique per module; each is an onnx_ir pass registered by name.

Modules are discovered by :mod:`onnxopt.registry`; importing a module registers its passes.
"""
