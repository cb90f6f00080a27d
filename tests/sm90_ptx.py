"""Ahead-of-time sm_90 builds of the Triton kernels a lowbit op launches, through Triton's bundled ptxas, no GPU.

Why: the interpreter runs constructs the GPU compiler refuses (session 49: a constexpr if/else with a ``return`` in
each arm), and whether a PDL launch waits (``griddepcontrol.wait``) before it reads another kernel's output is
only visible in the built code. A test writes a script that patches the kernel modules' ``launcher`` with
``record_launches``, calls the op as the decode step calls it (``pdl_on`` as on Hopper) and prints ``ptx_ops`` of
each recorded launch as one JSON line; ``run`` runs it in a subprocess without TRITON_INTERPRET (which replaces the
jit) and returns the parsed line. The script imports ``lowbit.kernels`` before ``conftest`` (whose
TRITON_INTERPRET=1, set at import, would make the kernels interpreted functions): the ops then route CPU tensors to
the kernels as under the interpreter, and a config that reads ``interpreting()`` (``float_gemv_config``,
``a8_gemv_config``, the tensor-core kernels' ``UPCAST``) builds its interpreter tile - the same kernel code and PDL
placement at other constexprs; ``words_config`` (the int4 GEMVs) reads none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PTX_OPS = ("griddepcontrol.launch_dependents", "griddepcontrol.wait", "ld.global", "st.global")
"""The PTX instructions ``ptx_ops`` lists, in program order."""


def record_launches(modules: list[Any]) -> list[tuple[Any, tuple, dict]]:
    """Replace each module's ``launcher`` so that its launches are recorded ``(kernel, args, kwargs)``, not run;
    and let ``pdl_on`` answer as on a GPU (``pdl_launches`` decides)."""
    from lowbit.kernels import _common

    seen: list[tuple[Any, tuple, dict]] = []

    def launcher(_t, kernel):
        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: seen.append((kernel, args, kwargs))

        return Launch()

    for mod in modules:
        mod.launcher = launcher
    _common.interpreting = lambda: False
    return seen


def _build(kernel: Any, args: tuple, kwargs: dict, specialize: bool = False) -> tuple[Any, dict[str, Any]]:
    """One recorded launch built for sm_90: ``(Triton's compiled kernel, the launch's argument values)``.
    ``specialize``: also the launch's ``num_stages`` and, as a GPU launch specializes them, 16-byte divisibility on
    each tensor (a fresh allocation's alignment) and each integer argument divisible by 16; without them the
    pipeliner cannot copy loads asynchronously, so a build made for its loop structure needs them."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
           torch.int32: "*i32", torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8"}
    kwargs = dict(kwargs)
    kwargs.pop("launch_pdl", None)  # a launch option (``ptx_ops`` reports it), not a kernel argument
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    stages = kwargs.pop("num_stages", None)
    if specialize and stages is not None:
        options["num_stages"] = stages
    values = dict(zip(kernel.arg_names, args)) | kwargs
    sig, const, attrs = {}, {}, {}
    for p in kernel.params:
        v = values[p.name] if p.name in values else p.default
        if p.is_constexpr:
            sig[p.name], const[(p.num,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = ptr[v.dtype]
            attrs[(p.num,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32" if isinstance(v, float) else "i32"
            if isinstance(v, int) and v % 16 == 0:
                attrs[(p.num,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, sig, constexprs=const, attrs=attrs if specialize else None)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options), values


def ptx_ops(kernel: Any, args: tuple, kwargs: dict, listed: tuple[str, ...] = PTX_OPS) -> dict[str, Any]:
    """``{"kernel", "launch_pdl", "PDL", "ops"}`` of one recorded launch: its sm_90 PTX's ``listed`` instructions
    (``PTX_OPS``; a prefix names each) in order."""
    pdl = kwargs.get("launch_pdl", False)
    built, values = _build(kernel, args, kwargs)
    ptx = built.asm["ptx"]
    ops = [op for line in ptx.splitlines() for op in listed if op in line]
    return {"kernel": kernel.fn.__name__, "launch_pdl": pdl, "PDL": values.get("PDL"), "ops": ops}


def dot_waits(kernel: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{"kernel", "waits", "async_copies"}`` of one recorded launch built as the GPU specializes it: the
    ``pendings`` of each ``warp_group_dot_wait`` in its sm_90 TTGIR, in order (1 in the main loop: the next step's
    wgmma issued before the last one's result is read; 0 right after each dot: the tensor cores idle while the
    loop's other work runs), and how many loads it copies asynchronously."""
    import re

    built, _ = _build(kernel, args, kwargs, specialize=True)
    ttgir = built.asm["ttgir"]
    return {"kernel": kernel.fn.__name__, "waits": [int(w) for w in re.findall(r"warp_group_dot_wait .*?pendings = "
                                                                                 r"(\d+)", ttgir)],
            "async_copies": ttgir.count("async_copy_global_to_local")}


def run(script: str) -> Any:
    """``script``'s last printed line, parsed as JSON, from a subprocess without TRITON_INTERPRET (the repository
    and tests/ on its path); skips where this Triton has no NVIDIA backend or no ptxas."""
    import pytest

    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                       cwd=root, timeout=600)
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("no ptxas in this Triton install")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
