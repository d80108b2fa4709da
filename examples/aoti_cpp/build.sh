#!/usr/bin/env bash
# Builds run_package against the libtorch of a Python environment's torch (the version the
# package was compiled with) and libpython (needed by dk_detectron2's operator library).
#   [PYTHON=/path/to/python] bash examples/aoti_cpp/build.sh [output binary]
# The Python is $PYTHON if set, else the repository's .venv/bin/python if there is one, else
# `python` from PATH; the script says which on stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$here/run_package}"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  PY="$repo/.venv/bin/python"
else
  PY="python"
fi
echo "using Python: $PY" >&2
torch_dir=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
py_lib=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
py_ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
abi=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
g++ -O1 -std=c++20 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/run_package.cpp" -o "$out" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 \
  -L"$py_lib" -Wl,-rpath,"$py_lib" -Wl,--no-as-needed -lpython"$py_ver" -Wl,--as-needed -ldl
echo "$out"
