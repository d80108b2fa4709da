"""Turns csrc/cuda/*.cu(h) into host C++ run by prelude.h's emulator, ops in torch.ops.dk_emu.

    python scripts/cuda_emulation/make_emu.py [WORK_DIR]   # writes WORK_DIR/src ($DK_EMU_DIR)

The rewrite is mechanical: each ``kernel<T><<<grid, block, shared, stream>>>(args)`` becomes an
emulated launch, ``is_cuda()`` checks accept CPU tensors, the CUDA registrations become
``dk_emu::*`` definitions, and the grid cap of cuda_utils.cuh shrinks to KMAX_BLOCKS so that every
grid-stride loop runs more than one round. Anything the emulator cannot honour fails the rewrite.
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# DK_EMU_CSRC: another csrc/ to emulate (e.g. a deliberately broken copy, to see a case fail)
SRC = os.environ.get("DK_EMU_CSRC", os.path.join(REPO, "csrc"))
DEFAULT_WORK = os.environ.get("DK_EMU_DIR", "/tmp/dk_cuda_emulation")
KMAX_BLOCKS = 3

# (pattern, replacement)
REWRITES = [
    (r"#include <c10/cuda/[^>]*>\n", ""),
    (r"extern __shared__ __align__\(16\) unsigned char dk_shared_bytes\[\];", ""),
    (r"([\w:]+<[^;{}()]*?>)\s*<<<(.*?)>>>\(", r"emu::Launcher(\2)(\1, "),
    (r"is_cuda\(\)", "is_cpu()"),
    (r"TORCH_LIBRARY_IMPL\(dk_detectron2, CUDA, m\)", "TORCH_LIBRARY_FRAGMENT(dk_emu, m)"),
    (r"m\.impl\(", "m.def("),
    (r"constexpr int64_t kMaxBlocks = int64_t\(1\) << 20;",
     f"constexpr int64_t kMaxBlocks = {KMAX_BLOCKS};"),
    # mm.dtype (half operands, float32 result) exists only for CUDA tensors; the same arithmetic
    # on the CPU: float32 products of the half values, summed and returned in float32.
    (r"return at::mm\(a, b, acc\);", "return at::mm(a.to(acc), b.to(acc));"),
]
REQUIRED = {  # file -> patterns the emulator relies on, which must be in the source
    "cuda_utils.cuh": [r"constexpr int64_t kMaxBlocks = int64_t\(1\) << 20;"],
    "scope_space_cuda.cu": [r"return at::mm\(a, b, acc\);"],
}


def rewrite(name: str, text: str) -> str:
    for needle in REQUIRED.get(name, []):
        if not re.search(needle, text):
            raise RuntimeError(f"{name}: {needle!r} not found; update make_emu.py's rewrites")
    for pattern, repl in REWRITES:
        text = re.sub(pattern, repl, text, flags=re.S)
    if "<<<" in text or "__shared__" in text.replace("dk_shared_bytes", ""):
        raise RuntimeError(f"{name}: a launch or a static __shared__ array the emulator cannot run")
    return text


def _write_if_changed(path: str, text: str) -> None:
    # unchanged files keep their time stamps, so ninja does not recompile them
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def generate(work: str = DEFAULT_WORK) -> str:
    """Writes the rewritten sources to WORK/src; returns that folder."""
    out = os.path.join(work, "src")
    os.makedirs(os.path.join(out, "cuda"), exist_ok=True)
    for header in ("bilinear.h", "geometry.h"):
        with open(os.path.join(SRC, header)) as f:
            _write_if_changed(os.path.join(out, header), f.read())
    prelude = os.path.join(HERE, "prelude.h")
    wanted = set()
    for name in sorted(os.listdir(os.path.join(SRC, "cuda"))):
        with open(os.path.join(SRC, "cuda", name)) as f:
            text = rewrite(name, f.read())
        target = name[:-3] + ".cpp" if name.endswith(".cu") else name
        wanted.add(target)
        _write_if_changed(os.path.join(out, "cuda", target),
                          f'#include "{prelude}"\n#line 1 "csrc/cuda/{name}"\n' + text)
    for stale in set(os.listdir(os.path.join(out, "cuda"))) - wanted:
        os.remove(os.path.join(out, "cuda", stale))
    return out


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_WORK))
