"""Compile every variant of the softmax kernels ahead of time, for a GPU this machine need not have.

    python -m megatron_lite.kernels.compile_check [--arch 90] [--max-block 4096]

Triton's CPU interpreter runs kernels as numpy and accepts code the real compiler rejects
(loop-carried type changes, pointer/int width mix-ups). This lowers each (dtype, mask, causal,
single/looped block) variant through TTIR -> PTX -> cubin with triton's bundled ptxas and prints
each kernel's registers and local-memory spill bytes. No GPU or driver is needed.
Exit 0: all compiled; 1: a variant failed; 3: triton's NVIDIA backend or ptxas is unavailable here.
Must run without TRITON_INTERPRET=1 (the kernels must be JIT functions, not interpreted ones).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def _resource_usage(cuobjdump: str, cubin: bytes) -> str:
    """'REG:32 ... LOCAL:0' from cuobjdump, or '' when it cannot tell."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return f"regs={regs.group(1)} local_bytes={local.group(1)}" if regs and local else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (80, 90, ...)")
    p.add_argument("--max-block", type=int, default=None, help="looped-path block (default: the kernel's)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the JIT functions this compiles")
        return 1
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:  # triton absent or built without the compiler front end
        print(f"triton compiler unavailable: {e}")
        return 3
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isfile(os.path.join(bindir, "ptxas")):
        print(f"no ptxas under {bindir}: cannot compile CUDA kernels here")
        return 3
    from megatron_lite.kernels import triton_softmax as ts

    max_block = args.max_block or ts.DEFAULT_MAX_BLOCK
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype in ("fp32", "bf16", "fp16"):
        for block, single in ((min(1024, max_block), True), (max_block, True), (max_block, False)):
            _, _, num_warps = ts._launch_params(block, max_block)
            variants = []
            for has_mask in (False, True):
                for causal in (False, True):
                    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "mask_ptr": "*u8", "scale": "fp32",
                           "sq": "i32", "sk": "i32", "n_heads": "i32", "m_sb": "i32", "m_sh": "i32",
                           "m_sq": "i32", "m_sk": "i32", "HAS_MASK": "constexpr", "CAUSAL": "constexpr",
                           "BLOCK": "constexpr", "SINGLE": "constexpr"}
                    consts = {"HAS_MASK": has_mask, "CAUSAL": causal, "BLOCK": block, "SINGLE": single}
                    variants.append((f"fwd mask={int(has_mask)} causal={int(causal)}", ts._softmax_fwd_kernel,
                                     sig, consts))
            for causal in (False, True):
                sig = {"dy_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "scale": "fp32",
                       "sq": "i32", "sk": "i32", "n_heads": "i32",
                       "CAUSAL": "constexpr", "BLOCK": "constexpr", "SINGLE": "constexpr"}
                variants.append((f"bwd causal={int(causal)}", ts._softmax_bwd_kernel, sig,
                                 {"CAUSAL": causal, "BLOCK": block, "SINGLE": single}))
            for name, fn, sig, consts in variants:
                label = f"sm_{args.arch} {dtype} block={block} {'single' if single else 'looped'} {name}"
                try:
                    k = triton.compile(ASTSource(fn, sig, consts), target=target,
                                       options={"num_warps": num_warps})
                except Exception as e:
                    failures += 1
                    print(f"FAIL {label}: {type(e).__name__}: {str(e)[:500]}")
                    continue
                usage = _resource_usage(os.path.join(bindir, "cuobjdump"), k.asm["cubin"])
                print(f"ok   {label} warps={num_warps} {usage}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
