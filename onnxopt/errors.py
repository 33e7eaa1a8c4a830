"""Typed exceptions raised by onnxopt's API. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base class of every error onnxopt raises on purpose (bad input, not a bug)."""


class ModelLoadError(OnnxoptError):
    """The model file is missing, unreadable, truncated, or of an unsupported version."""


class ModelSaveError(OnnxoptError):
    """The output could not be written; nothing was left at the output path."""


class PassOptionError(OnnxoptError):
    """Unknown pass, unknown option, or an option value of the wrong type."""


class DataError(OnnxoptError):
    """Input/calibration data is missing, empty, or does not match the model's inputs."""


class PassFailedError(OnnxoptError):
    """A pass produced an invalid model or changed outputs beyond tolerance."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class RuntimeLibraryError(OnnxoptError):
    """onnxopt's custom-op library is needed but not available."""


class NativeRunError(OnnxoptError):
    """The C++ latency tool (onnxopt_latency) could not run or measure the models."""
