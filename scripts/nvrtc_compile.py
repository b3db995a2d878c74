#!/usr/bin/env python3
"""Compile one CUDA C++ file to PTX with NVRTC (the pip wheel's libnvrtc.so.12).

Used by check-cuda-kernels.sh: the CUDA 12.x nvcc wheel ships only ptxas, so NVRTC makes the
PTX and ptxas makes the cubin and reports register, shared-memory and spill use. NVRTC is also
what herd uses at run time, so this checks the exact compiler path the binary takes.
"""
import argparse
import ctypes
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, help="path of libnvrtc.so.12")
    ap.add_argument("--arch", default="compute_90a")
    ap.add_argument("--include", action="append", default=[])
    ap.add_argument("src")
    ap.add_argument("out")
    a = ap.parse_args()

    nvrtc = ctypes.CDLL(a.lib)
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    src = open(a.src, "rb").read()

    def check(rc, what):
        if rc != 0:
            raise SystemExit(f"{a.src}: {what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, a.src.encode(), 0, None, None), "create")
    opts = [f"--gpu-architecture={a.arch}", "--std=c++17", "-default-device"]
    opts += [f"--include-path={d}" for d in a.include]
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if text:
        print(text, file=sys.stderr)
    check(rc, "compile")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "get PTX")
    with open(a.out, "wb") as f:
        f.write(ptx.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
