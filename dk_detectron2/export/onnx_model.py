"""ONNX export of a module with DK operators (``torch.onnx.export(..., dynamo=True)``) and an
ONNX Runtime runner that takes and returns torch tensors.

The DK operators are written as standard ONNX ops by
:mod:`dk_detectron2.export.onnx_translations`, so the ``.onnx`` file runs in any ONNX runtime
with no custom operator library. Needs ``onnx``, ``onnxscript`` and (to run) ``onnxruntime``.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .onnx_translations import dk_onnx_translation_table

__all__ = ["export_onnx", "OnnxRuntimeRunner"]


def export_onnx(
    module: nn.Module,
    args: Tuple,
    path: str,
    dynamic_shapes=None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    extra_translations: Optional[Dict] = None,
):
    """Exports ``module`` to the ONNX file ``path`` with the DK translations; returns the
    ``ONNXProgram``. ``extra_translations`` are merged into the translation table."""
    table = dk_onnx_translation_table()
    table.update(extra_translations or {})
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=table,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
        )
    program.save(path)
    return program


class OnnxRuntimeRunner:
    """Runs an ``.onnx`` file in ONNX Runtime: ``runner(*tensors) -> tuple of tensors``.

    Args:
        path: the ONNX file.
        providers: ONNX Runtime execution providers (default: the CPU one).
        threads: intra-op threads (0: ONNX Runtime's default).
        spinning: whether ONNX Runtime's idle intra-op threads busy-wait for the next call
            (its default: lower latency when the session has the cores to itself). Turn it off
            when other work shares the process's cores between calls, as when the exported
            model is timed in turns with eager PyTorch: spinning threads would slow that work.
    """

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, spinning: bool = True):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(path, options, providers=list(providers))
        self.input_names = [value.name for value in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"the ONNX model takes {len(self.input_names)} inputs {self.input_names}, "
                f"got {len(inputs)}"
            )
        feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(self.input_names, inputs)}
        return tuple(torch.from_numpy(array) for array in self.session.run(None, feed))
