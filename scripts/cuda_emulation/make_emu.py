"""Turns csrc/cuda/*.cu(h) into host C++ run by prelude.h's emulator, ops in torch.ops.dk_emu."""
import re, shutil, sys
import os
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORK = os.environ.get("DK_EMU_DIR", "/tmp/dk_cuda_emulation")
SRC = os.path.join(REPO, "csrc")
OUT = os.path.join(WORK, "src")
MAX_BLOCKS = sys.argv[1] if len(sys.argv) > 1 else "3"
shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT + "/cuda")
for h in ("bilinear.h", "geometry.h"):
    shutil.copy(os.path.join(SRC, h), os.path.join(OUT, h))
for name in os.listdir(SRC + "/cuda"):
    s = open(os.path.join(SRC, "cuda", name)).read()
    s = re.sub(r"#include <c10/cuda/[^>]*>\n", "", s)
    s = s.replace("extern __shared__ __align__(16) unsigned char dk_shared_bytes[];", "")
    s = re.sub(r"([\w:]+<[^;{}()]*?>)\s*<<<(.*?)>>>\(", r"emu::Launcher(\2)(\1, ", s, flags=re.S)
    s = s.replace("is_cuda()", "is_cpu()")
    s = s.replace("TORCH_LIBRARY_IMPL(dk_detectron2, CUDA, m)", "TORCH_LIBRARY_FRAGMENT(dk_emu, m)")
    s = s.replace("m.impl(", "m.def(")
    s = s.replace("constexpr int64_t kMaxBlocks = int64_t(1) << 20;", f"constexpr int64_t kMaxBlocks = {MAX_BLOCKS};")
    s = s.replace("constexpr int64_t kForwardTargetThreads = 64 * 1024;", "constexpr int64_t kForwardTargetThreads = 16;")
    assert "<<<" not in s, name
    out = name.replace(".cu", ".cpp") if name.endswith(".cu") else name
    open(os.path.join(OUT, "cuda", out), "w").write(f'#include "{os.path.join(HERE, "prelude.h")}"\n' + s)
print("ok")
