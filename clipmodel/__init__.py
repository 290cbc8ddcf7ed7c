"""CLIP trained from scratch: the model, its data path, zero-shot evaluation, ONNX export and runtime.

Importing the package turns off onnxruntime's usage telemetry before any of its modules imports
onnxruntime. From 1.29, on Linux and macOS, onnxruntime uploads usage events to Microsoft and keeps
a device id and an event cache under ``$XDG_CACHE_HOME/Microsoft`` unless ``ORT_DISABLE_TELEMETRY``
is set when it is first imported (microsoft/onnxruntime#27379); setting it later changes nothing.
A value already in the environment wins, and a program that imports onnxruntime before clipmodel
has made that choice itself.
"""
import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
