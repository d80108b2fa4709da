"""``torch.export`` programs and AOTInductor packages of a module with DK operators.

The DK operators have fake (meta) kernels, so ``torch.export`` traces them with symbolic batch
and image sizes; in the ExportedProgram they are ``torch.ops.dk_detectron2.*`` calls. An
AOTInductor package (``.pt2``) compiles the program ahead of time to a shared library; the DK
operators stay calls into the operator library, so the package runs wherever that library is
loaded:

* Python, without importing ``dk_detectron2``'s modules::

      torch.ops.load_library("dk_detectron2/_C.cpython-311-x86_64-linux-gnu.so")
      runner = torch._inductor.aoti_load_package("trunk_aoti.pt2")
      outputs = runner(images)

* C++ (libtorch of the same version): load the library, whose static initialisers register the
  operators (it is also a CPython extension, so the process needs libpython's symbols: link the
  program with ``-lpython3.11`` or ``dlopen`` libpython with ``RTLD_GLOBAL`` first), then run the
  package::

      dlopen("libpython3.11.so.1.0", RTLD_NOW | RTLD_GLOBAL);
      dlopen(".../dk_detectron2/_C.cpython-311-x86_64-linux-gnu.so", RTLD_NOW | RTLD_GLOBAL);
      torch::inductor::AOTIModelPackageLoader loader("trunk_aoti.pt2");
      std::vector<at::Tensor> outputs = loader.run({images});

  with torch's ``lib`` folder on ``LD_LIBRARY_PATH`` (the package's model opens libtorch by
  name). ``examples/aoti_cpp`` holds such a program and its build script.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import nn

__all__ = ["export_program", "load_program", "package_aoti", "load_aoti"]


def export_program(
    module: nn.Module, args: Tuple, path: Optional[str] = None, dynamic_shapes=None
) -> torch.export.ExportedProgram:
    """``torch.export.export(module, args, dynamic_shapes)`` in inference mode, saved to ``path``
    (``.pt2``) when given."""
    with torch.no_grad():
        program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes)
    if path:
        torch.export.save(program, path)
    return program


def load_program(path: str) -> Callable:
    """The module of a saved ExportedProgram (needs the DK operators and their fake kernels:
    ``import dk_detectron2``)."""
    return torch.export.load(path).module()


def package_aoti(program: torch.export.ExportedProgram, path: str) -> str:
    """Compiles ``program`` with AOTInductor into the package ``path`` (``.pt2``); returns it.

    Compilation runs a C++ compiler (minutes on a few CPU cores for a detector's trunk).
    """
    return torch._inductor.aoti_compile_and_package(program, package_path=path)


def load_aoti(path: str) -> Callable:
    """A callable running the AOTInductor package ``path`` (the DK operator library must be
    loaded: ``import dk_detectron2`` or ``torch.ops.load_library``)."""
    return torch._inductor.aoti_load_package(path)
