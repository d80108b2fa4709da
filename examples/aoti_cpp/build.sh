#!/usr/bin/env bash
# Builds run_package against the libtorch of the current Python environment's torch (the version
# the package was compiled with) and libpython (needed by dk_detectron2's operator library).
#   bash examples/aoti_cpp/build.sh [output binary]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/run_package}"
PY="${PYTHON:-python}"
torch_dir=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
py_lib=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
py_ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
abi=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
g++ -O1 -std=c++20 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/run_package.cpp" -o "$out" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 \
  -L"$py_lib" -Wl,-rpath,"$py_lib" -Wl,--no-as-needed -lpython"$py_ver" -Wl,--as-needed -ldl
echo "$out"
