"""The TensorRT backend: engines of the exported Pi0.5 stages (launch/build_engines.py) run with torch tensors
as their I/O buffers, behind the routing of `backends.ExportedStagesBackend`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policies.pi05.backends import BackendError, BackendOptions, CompiledBackend, ExportedStagesBackend, Pi05Backend
from policies.pi05.modeling import Pi05Model

TENSORRT_EXTRA_HINT = 'pip install -e ".[tensorrt]"'
ENGINE_MANIFEST = "engines.json"  # written by launch/build_engines.py next to the engines


def import_tensorrt():
    """The tensorrt module, or an ImportError that names the extra to install."""
    try:
        import tensorrt  # optional extra (GPU machines only): imported when a TensorRT backend is built
    except ImportError as exc:
        raise ImportError(f"backend 'tensorrt' needs the TensorRT Python package, which is not installed "
                          f"({exc}): install the `tensorrt` extra ({TENSORRT_EXTRA_HINT}) on a machine with an "
                          "NVIDIA GPU, then build engines with `python -m launch.build_engines`") from exc
    return tensorrt


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class TensorRTStage:
    """One deserialized engine with its execution context; torch tensors are bound as its I/O buffers."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: torch.device) -> None:
        self.path = path
        self.device = device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {path} (built with another TensorRT version or "
                               "for another GPU? rebuild it with launch/build_engines.py on this machine)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run on torch's current stream (stream-ordered with the surrounding torch work, capturable)."""
        bound = {}
        for name in self.inputs:
            tensor = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            bound[name] = tensor  # kept alive until the enqueue below; the caching allocator is stream-ordered
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise BackendError(f"{self.path.name}: input {name} of shape {tuple(tensor.shape)} is outside the "
                                   "engine's optimization profile (rebuild with a larger --max-batch)")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise BackendError(f"TensorRT execution of {self.path.name} failed")
        return outputs


class TensorRTBackend(ExportedStagesBackend):
    """Engines of the exported stages (ONNX -> TensorRT, launch/build_engines.py), torch tensors bound as
    their I/O buffers. UNVERIFIED: TensorRT wheels cannot be installed on the development machines."""

    def __init__(self, model: Pi05Model, options: BackendOptions | None = None) -> None:
        options = options or BackendOptions(backend="tensorrt")
        trt = import_tensorrt()
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise BackendError(f"backend 'tensorrt' needs the model on a CUDA device, got {device}")
        directory = Path(options.engine_dir)
        manifest_path = directory / ENGINE_MANIFEST
        if not manifest_path.is_file():
            raise BackendError(f"{manifest_path} not found: build engines with `python -m launch.build_engines "
                               f"--out {directory}`")
        self.manifest = json.loads(manifest_path.read_text())
        built_for = self.manifest.get("config", {})
        if built_for != model.config.to_dict():
            raise BackendError(f"engines in {directory} were built for config {built_for.get('name')!r}, which "
                               f"differs from the model's ({model.config.name!r}): rebuild them")
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        start = time.perf_counter()
        entries = self.manifest["stages"]
        stages = {name: TensorRTStage(trt, runtime, directory / entry["engine"], device)
                  for name, entry in entries.items()}
        super().__init__(model, options, stages,
                         {name: entry.get("attention_layers", ()) for name, entry in entries.items()})
        self.setup_s += time.perf_counter() - start


def make_backend(model: Pi05Model, options: BackendOptions | None = None) -> Pi05Backend:
    """The backend `options.backend` names, over `model` (which stays the eager fallback). It lives here, the
    one module that knows every backend (TensorRTBackend builds on backends.ExportedStagesBackend)."""
    options = options or BackendOptions()
    backends = {"eager": Pi05Backend, "compile": CompiledBackend, "tensorrt": TensorRTBackend}
    return backends[options.backend](model, options)
