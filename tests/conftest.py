"""Shared fixtures (the real models, loaded once per session) and marker-based skips."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _cuda_device_count() -> int:
    """CUDA devices seen by the driver, asked without importing torch (which would import Triton)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except OSError:
        return 0


# Without a GPU, lowbit's Triton kernels run through Triton's interpreter on CPU tensors. Triton reads this when
# it decorates its own library functions, so it is set before anything imports torch or triton.
if _cuda_device_count() == 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

if TYPE_CHECKING:
    from lowbit.models import SentenceEmbedder

def round_interpreted_bf16_casts() -> None:
    """Make Triton's interpreter convert to and from bfloat16 as the GPU and torch do, so CPU tests see GPU numerics.

    Triton 3.8's interpreter (``InterpreterBuilder.cast_impl``) converts fp32 -> bf16 by truncation, not
    round-to-nearest-even: about half of every interpreted kernel's bf16 stores were 1 ulp short of the GPU's, and
    tests had to allow for it. Its other bf16 casts (fp64 and integers to bf16, bf16 to fp64 and integers) convert
    the stored uint16 bits as numbers. fp16 casts go through numpy, which rounds to nearest even already. This wraps
    ``cast_impl`` (which ``create_fp_trunc``, ``create_fp_ext`` and the int/float casts call) so that a cast with a
    bf16 side goes through fp32: to bf16 rounded to nearest even on its bits as torch (c10) rounds, NaN to torch's
    0x7FC0, from bf16 exactly by its bits (numpy, no torch call: faster than the original on every size). Applied
    once per process (the wrapper is marked); a Triton that renames what it wraps fails here instead of skipping."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    original = getattr(builder, "cast_impl", None)
    routed = [name for name in ("create_fp_trunc", "create_fp_ext", "create_si_to_fp", "create_fp_to_si")
              if hasattr(builder, name)]
    if handle is None or original is None or len(routed) < 4:
        raise RuntimeError(f"{interpreter.__file__}: InterpreterBuilder.cast_impl, TensorHandle or the casts that call "
                           f"cast_impl are missing (found {routed}); update tests/conftest.py's "
                           "round_interpreted_bf16_casts for this Triton")
    if getattr(original, "rounds_bf16_to_nearest_even", False):
        return

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty != tl.bfloat16:  # exact: bf16 is fp32's top 16 bits
            wide = (np.asarray(src.data).astype(np.uint32) << 16).view(np.float32)
            return original(self, handle(wide, tl.float32), dst_type)
        if dst_ty == tl.bfloat16 and src_ty != tl.bfloat16:  # through fp32 (numpy rounds to nearest even), as torch
            bits = np.asarray(src.data).astype(np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16  # c10's round_to_nearest_even
            is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            return handle(np.where(is_nan, np.uint32(0x7FC0), rounded).astype(np.uint16), dst_ty)
        return original(self, src, dst_type)

    cast_impl.rounds_bf16_to_nearest_even = True  # type: ignore[attr-defined]
    builder.cast_impl = cast_impl


def e4m3_bits(x: Any) -> Any:
    """float32 numpy ``x`` -> float8_e4m3fn bits (uint8) as the GPU's ``cvt.rn.satfinite.e4m3x2`` converts:
    round to nearest even (c10's ``fp8e4m3fn_from_fp32_value`` on the bits, so torch's ``.to`` wherever torch's is
    finite), a magnitude past 448 (inf included) saturated to 448 where torch's cast gives NaN, NaN to NaN (0x7F,
    with its sign as torch keeps it)."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    mag = np.minimum(bits & np.uint32(0x7FFFFFFF), np.uint32(0x43E00000))  # satfinite: |x| > 448 (or inf) -> 448
    denorm = np.uint32(141 << 23)  # 2**14: adding it rounds |x| < 2**-6 to the subnormals' 2**-9 grid (fp32 RNE)
    sub = ((mag.view(np.float32) + denorm.view(np.float32)).view(np.uint32) - denorm).astype(np.uint8)
    odd = (mag >> 20) & 1  # the kept mantissa's last bit: ties go to even
    normal = ((mag + np.uint32(((7 - 127) << 23) % (1 << 32) + 0x7FFFF) + odd) >> 20).astype(np.uint8)
    code = np.where(mag < np.uint32(121 << 23), sub, normal)
    code = np.where((bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint8(0x7F), code)
    return (code | sign).reshape(np.shape(x))


def round_interpreted_fp8_casts() -> None:
    """Make Triton's interpreter convert to and from float8_e4m3fn (``tl.float8e4nv``) as the GPU does.

    Triton 3.8's interpreter (``InterpreterBuilder.create_fp_to_fp``, ``_convert_float`` on the bits) rounds a
    downcast up whenever its first dropped bit is set (ties away from even), truncates subnormals, ORs a carry out
    of the mantissa into the exponent's bits (half the right value where that exponent is odd) and wraps magnitudes
    past 448 (and NaN) onto finite codes from 256 up: of the 63,490 finite fp16 values, 20,456 fp16 -> fp8 casts
    (7,526 within +-448), 18,544 fp32 -> fp8 and 19,432 bf16 -> fp8 were off the GPU's cast (``e4m3_bits``);
    fp8 -> wider read the NaN codes as +-480.
    This wraps ``create_fp_to_fp`` (what ``x.to(tl.float8e4nv)`` and back call): fp32 / fp16 / bf16 -> e4m3 with
    round-to-nearest-even (the default and only rounding the GPU's cast takes, others left to the original)
    through fp32 (exact from fp16 and bf16) by ``e4m3_bits``, and e4m3 -> fp32 / fp16 / bf16 exactly by a
    256-entry table (NaN codes to NaN). Numpy, no torch call. Applied once per process (the wrapper is marked); a
    Triton that renames what it wraps fails here instead of skipping."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    original = getattr(builder, "create_fp_to_fp", None)
    if handle is None or original is None or not hasattr(tl, "float8e4nv"):
        raise RuntimeError(f"{interpreter.__file__}: InterpreterBuilder.create_fp_to_fp, TensorHandle or "
                           "tl.float8e4nv are missing; update tests/conftest.py's round_interpreted_fp8_casts for "
                           "this Triton")
    if getattr(original, "rounds_fp8_to_nearest_even", False):
        return
    codes = np.arange(256, dtype=np.uint32)
    exp, man = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    table = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    table = np.where(codes & 0x80, -table, table)
    table = np.where((codes & 0x7F) == 0x7F, np.nan, table).astype(np.float32)  # e4m3fn has no inf, two NaNs
    wide = (tl.float32, tl.float16, tl.bfloat16)

    def as_float32(src: Any) -> Any:
        if src.dtype.scalar == tl.bfloat16:  # exact: bf16 is fp32's top 16 bits
            return (np.asarray(src.data).astype(np.uint32) << 16).view(np.float32)
        return np.asarray(src.data).astype(np.float32)  # exact from fp16

    def create_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.float8e4nv and src_ty in wide and rounding_mode in (None, ir.ROUNDING_MODE.RTNE):
            return handle(e4m3_bits(as_float32(src)), dst_ty)
        if src_ty == tl.float8e4nv and dst_ty in wide:  # through fp32, exact in all three
            return self.cast_impl(handle(table[np.asarray(src.data)], tl.float32), dst_type)
        return original(self, src, dst_type, rounding_mode)

    create_fp_to_fp.rounds_fp8_to_nearest_even = True  # type: ignore[attr-defined]
    create_fp_to_fp.original = original  # type: ignore[attr-defined]  (tests show what it fixes)
    builder.create_fp_to_fp = create_fp_to_fp


def patch_interpreted_helpers_once() -> None:
    """Let Triton's interpreter call a ``@triton.jit`` device function (``tl.sum``, ``tl.max``, ``tl.sigmoid`` and
    lowbit's helpers: ``round_like``, ``_normed``) without patching ``triton.language`` again where the running launch
    has patched it already.

    Triton 3.8's ``InterpretedFunction.__call__`` (a device function call) runs ``_patch_lang`` on every call:
    ``inspect.getmembers`` over ``tl`` or ``tl.core``, ``tl.tensor`` and ``tl.math``, wrapping each builtin again in an
    equivalent lambda (already-wrapped ones are not builtins and are skipped), into a scope it never restores. A
    launch (``GridExecutor.__call__``) patches its kernel's language modules before its first program and restores
    them after its last; what a device call patched stays patched. So within one launch, once the launch or a device
    call has patched the modules a device function sees, patching them again changes nothing: this skips it, and
    patches as Triton does everywhere else. Applied once per process (the wrapper is marked); a Triton that renames
    what it wraps fails here instead of running unpatched."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    function, launcher = getattr(interpreter, "InterpretedFunction", None), getattr(interpreter, "GridExecutor", None)
    original_call, original_launch = getattr(function, "__call__", None), getattr(launcher, "__call__", None)
    if original_call is None or original_launch is None or not hasattr(function, "rewrite") or \
            not hasattr(interpreter, "_patch_lang"):
        raise RuntimeError(f"{interpreter.__file__}: InterpretedFunction.__call__ / .rewrite, GridExecutor.__call__ "
                           "or _patch_lang are missing; update tests/conftest.py's patch_interpreted_helpers_once "
                           "for this Triton")
    if getattr(original_call, "skips_repatching_in_a_launch", False):
        return
    patched_now: list[set[int]] = []  # per running launch: the language modules patched since it began

    seen: dict[Any, frozenset[int]] = {}

    def language_modules(fn: Any) -> frozenset[int]:  # (a module's imports of tl and tl.core: looked up once)
        if fn not in seen:
            seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[fn]

    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        patched_now.append(set(language_modules(self.fn)))  # (Triton patches them before the first program)
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            patched_now.pop()

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:  # a device function call, as Triton's but the re-patch
        langs = language_modules(self.fn)
        if not (patched_now and langs <= patched_now[-1]):
            interpreter._patch_lang(self.fn)  # as Triton does: a scope never restored
            if patched_now:
                patched_now[-1] |= langs
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    call.skips_repatching_in_a_launch = True  # type: ignore[attr-defined]
    call.original = original_call  # type: ignore[attr-defined]  (the test compares the two)
    launcher.__call__ = launch
    function.__call__ = call


def skip_discarded_overflow_checks() -> None:
    """Let Triton's interpreter skip the int32 overflow check of an integer ``+``, ``-`` or ``*`` that it throws away.

    ``binary_op_sanitize_overflow_impl`` (Triton 3.8, ``sanitize_overflow`` on in ``InterpreterOptions``) computes
    the operands again in int64, the op, both bounds and their ``and``, then hands the condition to ``device_assert``,
    which returns at once without ``options.debug`` (the interpreter's options never set it). Those five ops per
    integer op (every offset and mask computation) were ~a quarter of an interpreted decode step's time. Skipped where
    ``debug`` is off (nothing is checked there either way), run as Triton's where it is on. Applied once per process
    (the wrapper is marked); a Triton without the method runs unpatched (slower, the same results) with a warning:
    a speed patch must not stop a suite."""
    from triton.language import semantic

    owner = getattr(semantic, "TritonSemantic", None)
    original = getattr(owner, "binary_op_sanitize_overflow_impl", None)
    if original is None:
        warnings.warn(f"{semantic.__file__}: no TritonSemantic.binary_op_sanitize_overflow_impl in this Triton; "
                      "the interpreter keeps its discarded overflow checks (conftest's skip_discarded_overflow_checks)",
                      stacklevel=1)
        return
    if getattr(original, "skips_without_debug", False):
        return

    def sanitize(self: Any, lhs: Any, rhs: Any, binary_op: Any) -> Any:
        if not self.builder.options.debug:  # device_assert would drop the check: nothing to compute it for
            return None
        return original(self, lhs, rhs, binary_op)

    sanitize.skips_without_debug = True  # type: ignore[attr-defined]
    sanitize.original = original  # type: ignore[attr-defined]  (the test compares the two)
    owner.binary_op_sanitize_overflow_impl = sanitize


def _type_key(ty: Any) -> tuple[Any, ...]:
    """A hashable key equal for Triton dtypes that compare equal (``pointer_type`` has ``__eq__`` but no hash)."""
    import triton.language as tl

    if isinstance(ty, tl.pointer_type):
        return (tl.pointer_type, _type_key(ty.element_ty), ty.address_space, ty.const)
    return (type(ty), ty.name)


def reuse_interpreted_types() -> None:
    """Let Triton's interpreter build each block type, its tensors' shape and its numpy dtype once, not once per op.

    Triton 3.8's interpreter runs the frontend for every op of every program: ``InterpreterBuilder.get_block_ty``
    and ``block_type.with_element_ty`` (every splat, broadcast, load and arithmetic result) build a new
    ``block_type`` (unwrapping and validating its shape, formatting its name), ``tensor.__init__`` wraps the shape's
    ints in new ``constexpr`` s, and ``_get_np_dtype`` rebuilds an 18-entry dict of dtypes on each call. Those were
    ~half of an interpreted decode step's Python time (cProfile of test_triton_backend's W4 fold test: the kernels
    32 s -> 15 s profiled; 15.5 -> 11.5 s unprofiled). Block types are values (``__eq__`` on element type and shape,
    never assigned after ``__init__``): this hands out one per (element type, shape), caches a type's tensor shape
    and numel on the type, and looks numpy dtypes up by the element type's name. Kernels compute the same bits
    (test_kernels.py's test_interpreted_types_are_reused_and_kernels_compute_the_same). Applied once per process
    (the wrappers are marked); a Triton without these functions runs unpatched (slower, the same results) with a
    warning: a speed patch must not stop a suite."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder, np_dtype = getattr(interpreter, "InterpreterBuilder", None), getattr(interpreter, "_get_np_dtype", None)
    if builder is None or np_dtype is None or not hasattr(builder, "get_block_ty") or \
            not hasattr(tl.block_type, "with_element_ty"):
        warnings.warn(f"{interpreter.__file__}: no InterpreterBuilder.get_block_ty, _get_np_dtype or "
                      "block_type.with_element_ty in this Triton; the interpreter builds its types per op "
                      "(conftest's reuse_interpreted_types)", stacklevel=1)
        return
    if getattr(np_dtype, "reuses_types", False):
        return
    blocks: dict[tuple[Any, ...], Any] = {}
    np_dtypes: dict[str, Any] = {}
    tensor_init = tl.tensor.__init__

    def block(element_ty: Any, shape: Any) -> Any:
        key = (_type_key(element_ty), tuple(s.value if isinstance(s, tl.constexpr) else s for s in shape))
        found = blocks.get(key)
        if found is None:
            found = blocks[key] = tl.block_type(element_ty, shape)
        return found

    def get_np_dtype(tt_dtype: Any) -> Any:
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # (as Triton's: every pointer is stored as uint64)
            return np.dtype(np.uint64)
        found = np_dtypes.get(element.name)
        if found is None:
            found = np_dtypes[element.name] = np_dtype(element)
        return found

    def init(self: Any, handle: Any, type: Any) -> None:  # noqa: A002  (Triton's parameter name)
        known = getattr(type, "__dict__", {}).get("_shape_and_numel")
        if known is None:
            tensor_init(self, handle, type)
            type._shape_and_numel = (self.shape, self.numel)
            return
        self.handle, self.type, self.dtype = handle, type, type.scalar
        self.shape, self.numel = known

    def get_block_ty(self: Any, dtype: Any, shape: Any) -> Any:
        return block(dtype, shape)

    def with_element_ty(self: Any, scalar_ty: Any) -> Any:
        return block(scalar_ty, self.shape)

    get_np_dtype.reuses_types = True  # type: ignore[attr-defined]
    # (the originals, for the test that runs a kernel both ways)
    for wrapper, original in ((get_block_ty, builder.get_block_ty), (with_element_ty, tl.block_type.with_element_ty),
                              (get_np_dtype, np_dtype), (init, tensor_init)):
        wrapper.original = original  # type: ignore[attr-defined]
    builder.get_block_ty = get_block_ty
    tl.block_type.with_element_ty = with_element_ty
    interpreter._get_np_dtype = get_np_dtype
    tl.tensor.__init__ = init


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    round_interpreted_bf16_casts()
    round_interpreted_fp8_casts()
    patch_interpreted_helpers_once()
    skip_discarded_overflow_checks()
    reuse_interpreted_types()


ROOT = Path(__file__).resolve().parents[1]
CALIB_TEXT = "wikitext2-valid-calib"
"""The calibration text the package ships (``lowbit/data``: WikiText-2 validation, first ~250 KB, ~60k SmolLM2
tokens), by name: every test runs on a fresh clone, with nothing beside the repository."""


def needs_fused_experts() -> pytest.MarkDecorator:
    """The MoE test modules' mark: skip where the installed transformers has no fused experts module of the layout
    ``lowbit.models.DenseExperts`` slices (``lowbit.models.fused_experts_gate``: 5.25 has it). There (the GPU
    machine's 5.17) lowbit refuses a MoE capture by design, naming the layout (``tests/test_moe_layout.py``, which
    fakes it), so those modules skip instead of failing at capture. A function, so that only they import
    transformers for it (not every test process and ``run_interpreted`` subprocess at this file's import)."""
    from lowbit.models import fused_experts_gate

    return pytest.mark.skipif(fused_experts_gate() is None, reason="this transformers has no fused experts module "
                              "(transformers.integrations.moe's default gate): lowbit refuses its MoE")


def moe_triton_marks() -> list[pytest.MarkDecorator]:
    """The Triton MoE test modules' ``pytestmark``: ``needs_fused_experts`` and a kernel device (CUDA, or the
    interpreter)."""
    return [needs_fused_experts(), pytest.mark.skipif(
        not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
        reason="needs CUDA or the Triton interpreter")]


def run_interpreted(code: str, timeout: int = 600) -> None:
    """Run ``code`` in a fresh Python under TRITON_INTERPRET=1 with the repository and ``tests/`` on its path; it
    must print ``ok`` last. A fresh process because Triton reads the variable when it decorates its own functions, at
    import, and torch may have imported Triton already in this one. It imports this conftest first, so its
    interpreter casts bf16 and fp8 as the GPU does (``round_interpreted_bf16_casts``, ``round_interpreted_fp8_casts``)
    whatever ``code`` imports."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", "import conftest\n" + code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N (the README's test command runs two workers on CI's two cores): each worker gets its share of the
    # cores for torch's intra-op threads, not all of them (oversubscribed matmuls run slower than serial ones)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    # and xdist hands its workers the controller's COLUMNS (80 when piped), which would narrow the CLI's tables
    # below the 160 columns a piped `lowbit` prints (what the CLI tests read)
    os.environ.pop("COLUMNS", None)


# CI must not fail on a draw it never saw before: property tests replay the same examples on every run unless
# HYPOTHESIS_PROFILE=explore asks for fresh ones (run that locally when changing an invariant).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _frame_with_room(slots: int) -> Callable[..., Any]:
    """``run(fn, *args)``: ``fn(*args)`` called from a frame of ``slots`` local variables (never assigned).

    CPython (3.11+) keeps frames on a per-thread stack of 16 KiB chunks, mmapped when a call does not fit in the
    current one and unmapped when its first frame returns. A hot call that sits at a chunk boundary maps and unmaps a
    chunk on every call. Under pytest's and xdist's frames Triton's interpreter and torch.export's tracing landed
    there: 1.2 million mmap/munmap pairs in one triton-backend test (82 s, 22 s with this frame below it); with
    ``-n 2``, tests/test_triton_backend.py took 109 s (59 s of it system time) against 65 s (4 s), and
    tests/test_architectures.py 98 s against 77 s. A frame this large gets a chunk of its own with ~250 KB to spare
    (33,000 slots: 264 KB, in a 512 KiB chunk), so everything a test runs above it stays in one chunk; the frame
    costs ~0.2 ms a test. Python 3.10 (heap frames) only allocates and frees it."""
    names = [f"_slot{i}" for i in range(slots)]
    src = f"def run(fn, *args):\n    if fn is None:\n        {' = '.join(names)} = None\n    return fn(*args)\n"
    namespace: dict[str, Any] = {}
    exec(compile(src, "<conftest: frame with room>", "exec"), namespace)
    return namespace["run"]


_with_room = _frame_with_room(33_000)


def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    """pytest's own protocol (setup, call, teardown, reports) for ``item``, run above ``_frame_with_room``'s frame;
    pytest's and the plugins' hook wrappers still wrap it."""
    from _pytest.runner import pytest_runtest_protocol as protocol

    return _with_room(protocol, item, nextitem)


@pytest.fixture(scope="module", autouse=True)
def _release_cli_models() -> Any:
    """After each test file, drop the models and captured graphs the in-process CLI caches (``lowbit.cli.common``:
    loaded once per process, as a command loads them): test_cli.py's ``smollm2:2`` keeps a second full float32
    SmolLM2 beside the ``smollm2`` fixture's, and MiniLM and the captured graphs with it, for the rest of the
    session. A file reloads what it uses (a few seconds), so the tests within one still share them."""
    yield
    common = sys.modules.get("lowbit.cli.common")  # not imported here: a file that never ran a command
    if common is not None and (common._MODELS or common._GRAPHS):
        import gc

        common._MODELS.clear()
        common._GRAPHS.clear()
        gc.collect()


GPU_TEST_LIMIT_S = float(os.environ.get("LOWBIT_GPU_TEST_LIMIT_S", "300"))
"""How long one ``gpu``-marked test may run before ``_gpu_hang_guard`` dumps every thread's stack and ends it."""


@pytest.fixture(autouse=True)
def _gpu_hang_guard(request: pytest.FixtureRequest) -> Any:
    """A GPU test that blocks inside one C call (a sync on a kernel that never ends, a library lock) is beyond
    pytest-timeout's signal (it waits for the next bytecode): sessions 44 and 45's GPU rounds (``-m gpu -n 4``) sat
    at ~150 of ~157 tests past their whole limit, naming nothing, on
    test_kurtosis_learning_runs_its_steps_on_the_device_option[cuda], which passes alone. Past
    ``GPU_TEST_LIMIT_S`` the worker writes every thread's Python stack to ``/tmp/lowbit-hang-<pid>.txt`` (headed
    by the test's id) and exits, so xdist names the test as crashed and the round goes on
    (``tools/gpu_round.sh`` prints the file)."""
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        yield
        return
    import faulthandler

    with open(f"/tmp/lowbit-hang-{os.getpid()}.txt", "w") as dump:
        dump.write(f"{request.node.nodeid}: still running after {GPU_TEST_LIMIT_S:.0f} s\n")
        dump.flush()
        faulthandler.dump_traceback_later(GPU_TEST_LIMIT_S, exit=True, file=dump)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
    os.unlink(dump.name)  # it ended: nothing to report


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Every test starts from the same torch RNG state, so a random input that fails once fails every time."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `slow` tests unless LOWBIT_SLOW=1, and `gpu` tests where CUDA is absent.

    The default suite must finish in minutes on a 2-core CPU; full-split perplexity and
    benchmarks run only on request.
    """
    run_slow = os.environ.get("LOWBIT_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: set LOWBIT_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    """(SmolLM2-135M-Instruct float32 HF model in eval mode, tokenizer); builds the cache once (~30 s)."""
    from lowbit.models import load_smollm2  # here, not at the top: xdist's controller imports this file too

    return load_smollm2()


@pytest.fixture(scope="session")
def minilm() -> tuple[SentenceEmbedder, object]:
    """(all-MiniLM-L6-v2 as a SentenceEmbedder in eval mode, tokenizer)."""
    from lowbit.models import load_minilm

    return load_minilm()


# ---- captured IR of the real models (shared by the IR, pass, CLI and backend tests) --------------

SEQ = torch.export.Dim.DYNAMIC(min=2, max=8192)


def forbid_device_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nonzero``, ``Tensor.tolist`` and ``Tensor.item`` raise: what a CUDA-graph capture forbids (a wait for the
    device), for a test that simulates one on the CPU (``RoutedExperts.runs_dense`` patched)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a device wait under a (simulated) capture")

    for name in ("nonzero", "tolist", "item"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


def quantized_weight(n: int, k: int, qdtype: str, group: int, symmetric: bool, device: str = "cpu"):
    """A random weight quantized by lowbit's own ops (min-max ``weight_qparams``, then ``quantize``): (stored
    codes, scale, zero point)."""
    from lowbit.calibration.gptq import weight_qparams
    from lowbit.ir.quant import get_qdtype, quantize

    w = torch.randn(n, k)
    scale, zp = weight_qparams(w, get_qdtype(qdtype), symmetric, group or None)
    q = quantize(w, scale, zp, qdtype=qdtype, axis=1 if group else 0, block_size=group or None)
    return q.to(device), scale.to(device), None if zp is None else zp.to(device)


def rehash_manifest(d: Path) -> None:
    """As an attacker (or a careless editor) would: the lowbit-manifest.json hashes and sizes of the files it lists
    made to match those files as they are now (hashed here, not by the code under test)."""
    import hashlib
    import json

    m = json.loads((d / "lowbit-manifest.json").read_text())
    for rel in m["files"]:
        data = (d / rel).read_bytes()
        m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "lowbit-manifest.json").write_text(json.dumps(m))


def tiny_llama_config(hidden: int = 32, inter: int = 64, heads: int = 2, kv_heads: int = 1, layers: int = 1,
                      vocab: int = 61, max_positions: int = 32, **kw: Any):
    """A randomly initialised Llama's config, small enough for a CLI or API test (no download)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=max_positions, **kw)


def tiny_llama(**kw: Any) -> torch.nn.Module:
    """``LlamaForCausalLM(tiny_llama_config(**kw))`` in eval mode, initialised from torch's current seed."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


def tiny_phi3_longrope(max_positions: int = 64, original: int = 16) -> torch.nn.Module:
    """A random one-layer Phi-3 with longrope scaling (the 128k models' rotary: long frequencies from position
    ``original`` on), seeded, in eval mode."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.Phi3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       pad_token_id=0, num_hidden_layers=1, vocab_size=256, max_position_embeddings=max_positions,
                       original_max_position_embeddings=original,
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [3.0] * 4})
    return t.AutoModelForCausalLM.from_config(cfg).eval()


def written_out_attention_graph() -> Any:
    """The captured graph (``CausalLMLogits``) of a random one-layer Gemma 2, whose soft-capped attention logits
    keep its attention written out (matmul/tanh/softmax), never raised to an attention op."""
    import transformers as tf

    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=1, vocab_size=128, max_position_embeddings=64, pad_token_id=0, eos_token_id=0)).eval()
    return capture(CausalLMLogits(model).eval(), (torch.ones(1, 8, dtype=torch.long),))


def tiny_outside_family(family: str, layers: int = 2) -> torch.nn.Module:
    """A random tiny Bloom (ALiBi), GPT-J or Cohere (interleaved rotary), GPT-2 (Conv1D linears, ``addmm``) or
    Falcon (new decoder architecture, 2 KV heads of 4 in a grouped query_key_value; ``falcon-alibi``: Falcon-RW's
    ALiBi, 4 KV heads interleaved, attention then mlp in sequence): families outside the
    architecture matrix whose capture, quantization and ONNX lowering are checked on their own (vocabulary 128).
    GPT-NeoX and Phi (partial rotary: 4 and 8 of 16 channels per head, their configs' defaults) and SmolLM3 (every
    other layer NoPE: no rotary) in the same small shape, for the decode-step kernels' tests."""
    import transformers as t

    small = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = {"bloom": lambda: t.BloomConfig(hidden_size=64, n_head=4, n_layer=layers, **small),
           "gptj": lambda: t.GPTJConfig(n_embd=64, n_head=4, n_layer=layers, rotary_dim=8, n_positions=64, **small),
           "gpt2": lambda: t.GPT2Config(n_embd=64, n_head=4, n_layer=layers, n_positions=64, **small),
           "falcon": lambda: t.FalconConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                                            new_decoder_architecture=True, num_hidden_layers=layers,
                                            max_position_embeddings=64, **small),
           "falcon-alibi": lambda: t.FalconConfig(hidden_size=64, num_attention_heads=4, alibi=True,
                                                  new_decoder_architecture=False, multi_query=False,
                                                  parallel_attn=False, bias=True, num_hidden_layers=layers,
                                                  max_position_embeddings=64, **small),
           "cohere": lambda: t.CohereConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=layers,
                                            max_position_embeddings=64, **small),
           "gpt-neox": lambda: t.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                               num_hidden_layers=layers, max_position_embeddings=64, **small),
           "phi": lambda: t.PhiConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_hidden_layers=layers, max_position_embeddings=64, **small),
           # a rotary layer, then a NoPE one (no_rope_layers: 1 rotary, 0 none), GQA 2 of 4
           "smollm3": lambda: t.SmolLM3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, num_hidden_layers=layers,
                                              max_position_embeddings=64, no_rope_layers=([1, 0] * layers)[:layers],
                                              **small)}[family]()
    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(cfg).eval()


def smollm2_slice(model: torch.nn.Module, n_layers: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A real SmolLM2 cut to its first ``n_layers`` blocks (final norm and lm_head kept), as CausalLMLogits, with its
    own copy of their weights. Only the kept blocks are copied: a deepcopy of the whole model (30 blocks, 540 MB)
    before the cut took 3-10 s a call."""
    from lowbit.models import CausalLMLogits

    # the blocks cut off are never copied (the memo hands deepcopy the originals, dropped before the cast, which
    # would cast them in place): copying all 30 blocks to keep two copied ~400 MB, seconds on a loaded 2-core
    # machine, for every slice a test asks for
    dropped = {id(block): block for block in model.model.layers[n_layers:]}
    m = copy.deepcopy(model, dropped)
    m.model.layers = m.model.layers[:n_layers]
    m.config.num_hidden_layers = n_layers
    m = m.to(dtype)
    return CausalLMLogits(m).eval()


_CAPTURED: dict[tuple, tuple[torch.nn.Module, Any]] = {}
_TEST_IDS: dict[int, torch.Tensor] = {}


def captured_slice(smollm2: tuple, n_layers: int, dtype: torch.dtype = torch.float32,
                   batch: bool = True) -> tuple[torch.nn.Module, Any]:
    """(``smollm2_slice(smollm2[0], n_layers, dtype)``, its captured graph). ``batch``: dynamic batch 1-1024 and
    sequence 2-4096 from a [2, 16] example (the calibration passes' form); else one sequence of 2-8192 from [1, 16].

    Captured once per process and form (torch.export takes ~2.5 s a slice, and a dozen modules' fixtures ask for
    the same few); every call gets its own ``clone`` with its own copy of the parameter tensors and graph meta, so a
    test can change its graph however it likes: what it gets is what a fresh capture gives. The slice module is
    shared: read it, do not change it."""
    from lowbit.ir.capture import capture

    key = (id(smollm2[0]), n_layers, dtype, batch)
    if key not in _CAPTURED:
        wrapper = smollm2_slice(smollm2[0], n_layers, dtype)
        if batch:
            example = torch.ones(2, 16, dtype=torch.long)
            dyn = {0: torch.export.Dim.DYNAMIC(min=1, max=1024), 1: torch.export.Dim.DYNAMIC(min=2, max=4096)}
        else:
            example, dyn = torch.ones(1, 16, dtype=torch.long), {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}
        _CAPTURED[key] = wrapper, capture(wrapper, (example,), {"input_ids": dyn})
    wrapper, graph = _CAPTURED[key]
    return wrapper, private_copy(graph)


def sequence_slice(smollm2: tuple, n_layers: int, n_tokens: int,
                   dtype: torch.dtype = torch.float32) -> tuple[Any, torch.Tensor]:
    """(``captured_slice``'s one-sequence graph, the first ``n_tokens`` ids of an English sentence said six times,
    61 tokens in all): the real-model input of the fusion, merging and norm + quantize tests."""
    _, g = captured_slice(smollm2, n_layers, dtype, batch=False)
    ids = smollm2[1]("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    return g, ids[:, :n_tokens]


def saveable_slice(smollm2: tuple, n_layers: int = 2) -> tuple[Any, torch.Tensor]:
    """(``captured_slice``'s float graph with its HF source and tokenizer recorded, as ``compile_model`` leaves
    them for a save, 2 WikiText-2 test windows of 128): what the checkpoint tests save and load."""
    from lowbit.api import describe_source
    from lowbit.eval.perplexity import token_ids, windows

    wrapper, graph = captured_slice(smollm2, n_layers)
    graph.meta["source"] = describe_source(wrapper)
    graph.meta["tokenizer"] = smollm2[1]
    return graph, windows(token_ids("wikitext2-test", smollm2[1]), 128, 2)


def held_out_slice(smollm2: tuple, n_layers: int, n_windows: int) -> tuple:
    """(captured real SmolLM2 cut to ``n_layers`` blocks — float32, dynamic batch and sequence —, ``n_windows``
    256-token WikiText-2 test windows, their float logits): the pass tests' real model and held-out data
    (``captured_slice``: the capture is shared, the graph each caller gets is its own)."""
    from lowbit.eval.perplexity import token_ids, windows

    wrapper, graph = captured_slice(smollm2, n_layers)
    if id(smollm2[1]) not in _TEST_IDS:
        _TEST_IDS[id(smollm2[1])] = token_ids("wikitext2-test", smollm2[1])
    ids = windows(_TEST_IDS[id(smollm2[1])], 256, n_windows).clone()
    with torch.inference_mode():
        ref = wrapper(ids)
    return graph, ids, ref


def held_out_kl(graph, ids: torch.Tensor, ref: torch.Tensor) -> float:
    """KL of ``graph``'s logits on ``ids`` to the float logits ``ref`` (``held_out_slice``'s windows)."""
    from lowbit.backends.torch_backend import TorchCompiled
    from lowbit.calibration.distill import logit_kl

    with torch.no_grad():
        return float(logit_kl(TorchCompiled(graph)(ids), ref))


@pytest.fixture(scope="session")
def wikitext_ids(smollm2) -> torch.Tensor:
    """The WikiText-2 test split tokenized with SmolLM2's tokenizer (shape [1, N])."""
    from lowbit.eval.perplexity import token_ids

    return token_ids("wikitext2-test", smollm2[1]).reshape(1, -1)


@pytest.fixture(scope="session")
def smollm2_graph(smollm2):
    """The full SmolLM2 captured with a dynamic sequence length (~10 s)."""
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    wrapper = CausalLMLogits(smollm2[0]).eval()
    return capture(wrapper, (torch.ones(1, 32, dtype=torch.long),), {"input_ids": {1: SEQ}})


@pytest.fixture(scope="session")
def smollm2_slice_f64(smollm2):
    """(2-layer float64 SmolLM2 slice, its captured graph): for exactness tests."""
    from lowbit.ir.capture import capture

    wrapper = smollm2_slice(smollm2[0], 2, torch.float64)
    return wrapper, capture(wrapper, (torch.ones(1, 16, dtype=torch.long),), {"input_ids": {1: SEQ}})


@pytest.fixture(scope="session")
def minilm_graph(minilm):
    """MiniLM (SentenceEmbedder) captured with dynamic batch and sequence."""
    from lowbit.ir.capture import capture

    embedder, tok = minilm
    enc = tok(["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim.DYNAMIC(min=1, max=256), torch.export.Dim.DYNAMIC(min=2, max=512)
    return capture(embedder, (enc["input_ids"], enc["attention_mask"]),
                   {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})


def float64_norm_stats(g):
    """HF's RMSNorm computes its statistics in float32 even in a float64 model (1e-7 rounding of a rotated
    stream); float64 exactness checks of a pass that rotates the stream run with float64 statistics."""
    for n in g.find("rms_norm"):
        n.kwargs["compute_dtype"] = None
    return g


TINY_IR = """\
graph tiny(%x: f32[2,s0,8]) {
  symbol s0 in [1, 64] hint 4
  param @norm.weight: f32[8]
  param @proj.weight: f32[16,8]
  %n: f32[2,s0,8] = rms_norm(%x, @norm.weight, eps=1e-06, compute_dtype=f32)  # norm
  %y: f32[2,s0,16] = linear(%n, @proj.weight)  # proj
  %s: sym(s0) = aten.sym_size.int(%x, 1)
  %r: f32[2,s0,4,4] = reshape(%y, [2, %s, 4, -1])  # proj
  return %r
}
"""
"""A small IR text (norm, linear, symbolic reshape) the text-format and untrusted-text tests start from."""


class CountedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """How many times each ATen op ran while active (``ops``: op name -> count), e.g. the launches a step costs on a
    GPU, or ``aten._local_scalar_dense.default`` for its host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class LargestFloat64(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the largest float64 tensor any op makes while active (the working copies of passes that rewrite
    weights in float64: rotate, fold-norms)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel() * 8)
        return out


def pieces_match_whole(monkeypatch, graph, pipeline: str) -> int:  # type: ignore[no-untyped-def]
    """Run ``pipeline`` on a clone of ``graph`` with every weight rewritten whole in float64, and on ``graph`` in
    1 MiB pieces (``lowbit.ir.rewrite.FLOAT64_PIECE_BYTES``); assert both end with the same bits in every param
    and return the bytes of the largest float64 tensor the pieces' run made."""
    from lowbit.ir import rewrite
    from lowbit.passes.manager import PassManager

    whole = graph.clone()
    monkeypatch.setattr(rewrite, "FLOAT64_PIECE_BYTES", 2**60)  # never in pieces
    PassManager(pipeline).run(whole)
    monkeypatch.setattr(rewrite, "FLOAT64_PIECE_BYTES", 2**20)
    largest = LargestFloat64()
    with largest:
        PassManager(pipeline).run(graph)
    assert whole.params.keys() == graph.params.keys()
    for name, v in whole.params.items():
        assert torch.equal(v.data, graph.params[name].data), name
    return largest.largest


# ---- one torch.export per small model and inputs, shared by the session ------------------------------------------

_SMALL_MODEL_ELEMENTS = 40_000_000
"""Models up to this many distinct parameter and buffer elements are captured once: the random test models and
SmolLM2 slices of up to three blocks (28M of the elements its embedding), whose ~0.1 s of hashing saves a 3-5 s
export each time a test compiles the same slice again (the CLI's ``smollm2:2``, a fixture's slice under another
recipe). The whole SmolLM2 (135M) is hashed too slowly to gain, and kept copies of it would hold its memory."""
_KEPT_BYTES = 1024 * 2**20
"""The parameter bytes of the captures the session keeps, the least recently used dropped first: a tiny model's
graph is a few MB at most, one with SmolLM2's vocabulary ~12 MB, a two-block SmolLM2 slice 142 MB; each xdist
worker keeps its own. At 512 MB (three such slices) a worker exported a slice it had dropped again (session 57,
logged in part-runs of test_checkpoint, test_cli, test_generate, test_pruning, test_architectures and test_moe: 5 of
211 exports, 3-5 s each); 1 GB a worker is under a tenth of the 2-core, 24 GiB test machine's memory for both."""


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as a hashable key part when what a forward reads off it is plain data (numbers, strings, dtypes,
    tensors by content, and lists, tuples, dicts and sets of them); a function or class by identity (a monkeypatched
    forward or hook is another key); anything else by its type only."""
    import enum
    import hashlib

    if isinstance(value, (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)):
        return type(value).__name__, repr(value)
    if isinstance(value, torch.Tensor):
        if value.is_meta or value.numel() > _SMALL_MODEL_ELEMENTS:
            raise _NotKeyable
        data = value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()  # 0-d too; hashed in place
        return "tensor", str(value.dtype), tuple(value.shape), hashlib.sha1(data).hexdigest()
    if depth > 4:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((repr(k), _plain(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return "set", tuple(sorted(repr(v) for v in value))
    if callable(value) and hasattr(value, "__qualname__"):
        try:
            return "callable", value, hash(value)  # functions and classes hash by identity, kept alive by the key
        except TypeError:
            return type(value).__qualname__
    if hasattr(value, "to_dict") and hasattr(value, "to_json_string"):  # an HF config, private fields too
        return type(value).__qualname__, _plain({k: v for k, v in vars(value).items()}, depth + 1)
    return type(value).__qualname__


class _NotKeyable(Exception):
    """The capture's inputs cannot be keyed by content (a large or meta tensor): capture afresh."""


def capture_key(model: Any, example_inputs: Any, dynamic_shapes: Any, options: dict[str, Any]) -> tuple | None:
    """What a capture depends on, by content: every module's class and forward (by identity, so a monkeypatched one
    differs), its plain attributes (a norm's epsilon, a generation step's windows, an HF config) and hooks, every
    parameter's and buffer's name, dtype, shape and bytes, the example inputs' shapes and dtypes, the dynamic
    shapes and the capture options. None: not a small ``nn.Module`` (captured as usual)."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        distinct = {id(t): t for _, t in tensors}  # a tied head is its embedding: counted and hashed once
        if sum(t.numel() for t in distinct.values()) > _SMALL_MODEL_ELEMENTS:
            return None
        modules = tuple((name, type(m), type(m).forward, _plain({k: v for k, v in vars(m).items()
                                                                 if k not in ("_parameters", "_buffers", "_modules")}))
                        for name, m in model.named_modules(remove_duplicate=False))
        digests = {key: _plain(t) for key, t in distinct.items()}
        weights = tuple((n, digests[id(t)]) for n, t in tensors)
        leaves = torch.utils._pytree.tree_leaves(example_inputs)
        examples = tuple((tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else _plain(x)
                         for x in leaves)
        return modules, weights, examples, repr(dynamic_shapes), _plain(options)
    except _NotKeyable:
        return None


def private_copy(graph: Any) -> Any:
    """A clone of ``graph`` with its own meta and parameter tensors: what a fresh capture of an unchanged model gives,
    which the test may change however it likes."""
    g = graph.clone()
    g.meta = copy.deepcopy(graph.meta)
    params = list(g.params.values())
    for v, data in zip(params, copy.deepcopy([v.data for v in params])):  # one deepcopy: shared storage stays shared
        v.data = data
    return g


def _param_bytes(graph: Any) -> int:
    """The bytes of ``graph``'s parameter tensors, a tensor two parameters share (a tied head) once."""
    distinct = {v.data.data_ptr() or id(v.data): v.data for v in graph.params.values() if v.data is not None}
    return sum(t.numel() * t.element_size() for t in distinct.values())


class CaptureCache:
    """``capture`` (``lowbit.ir.capture.capture``) that exports a small model once per content: a later capture
    of a model with the same weights, buffers, configs, module attributes and forwards, on inputs of the same shapes
    and dtypes with the same dynamic shapes and options, gets a private copy of the first graph, and the warnings
    the first capture gave, again. Capture errors are raised each time (nothing is kept)."""

    def __init__(self) -> None:
        from collections import OrderedDict

        self.kept: OrderedDict[tuple, tuple[Any, list]] = OrderedDict()
        self.exports = 0
        self.reused = 0

    def capture(self, fresh: Callable[..., Any], patches: Callable[[], Any], model: Any, example_inputs: Any,
                dynamic_shapes: Any = None, **options: Any) -> Any:
        """``fresh(model, example_inputs, dynamic_shapes, **options)``, or a private copy of what it gave before
        under the same ``patches()`` (what the test has monkeypatched: a capture may read it)."""
        import warnings

        key = capture_key(model, example_inputs, dynamic_shapes, options)
        if key is not None:
            try:
                key = (*key, patches())
            except _NotKeyable:
                key = None
        if key is not None and key in self.kept:
            self.kept.move_to_end(key)
            graph, caught = self.kept[key]
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self.reused += 1
            return private_copy(graph)
        self.exports += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = fresh(model, example_inputs, dynamic_shapes, **options)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if key is not None:
            # kept as a copy: the graph's parameters are the model's own tensors, which the test may change in place
            self.kept[key] = private_copy(graph), list(caught)
            while sum(_param_bytes(g) for g, _ in self.kept.values()) > _KEPT_BYTES and len(self.kept) > 1:
                self.kept.popitem(last=False)
        return graph


_UNREAD_BY_CAPTURE = ("lowbit.kernels", "lowbit.backends", "triton")
"""Modules whose attributes no capture reads: ``lowbit.ir`` (capture) and ``lowbit.models`` import neither the
kernels nor the backends (tests/test_layering.py), and torch.export of a model on the CPU runs no Triton. A test's
patch of them (a launch config, a kernel's support check, the interpreter's launch counter) leaves the capture of
an unpatched model to reuse."""

_UNSET = object()
"""What ``_unchanged`` reads for an attribute or item that is not there."""


def _unchanged(now: Any, before: Any) -> bool:
    """Whether a monkeypatched attribute or item holds what it held before the patch (``before``: monkeypatch's
    record, its ``notset`` where there was none): the same object, or an equal number or string."""
    from _pytest.monkeypatch import notset

    if before is notset:
        return now is _UNSET
    plain = (int, float, str, bool, bytes)
    return now is before or (type(now) is type(before) and isinstance(now, plain) and now == before)


@pytest.fixture(scope="session")
def capture_cache() -> CaptureCache:
    """The session's ``CaptureCache`` (``reuse_captures`` patches it in)."""
    return CaptureCache()


@pytest.fixture
def reuse_captures(request: pytest.FixtureRequest, capture_cache: CaptureCache) -> CaptureCache:
    """For this test, every ``capture`` lowbit runs (``compile_model``, the CLI, checkpoint loading, and a test's
    own ``from lowbit.ir.capture import capture`` inside its body) goes through the session's ``capture_cache``:
    a small model captured before, unchanged, is not exported again (torch.export takes seconds even on a tiny
    model, and many tests compile the same tiny models). What the test has monkeypatched when it captures (a
    transformers or lowbit function, an environment variable) is part of the key: a capture under other patches is
    exported afresh. LOWBIT_FRESH_CAPTURES=1 exports every capture (to check the cache hides nothing). Returns the
    cache."""
    if os.environ.get("LOWBIT_FRESH_CAPTURES") == "1":
        return capture_cache
    import functools
    import inspect

    import lowbit.api
    import lowbit.ir

    # the test's own monkeypatch: its undo, after the test's patches are undone, puts lowbit's capture back
    patcher = request.getfixturevalue("monkeypatch")
    module = sys.modules["lowbit.ir.capture"]
    ours = [(module, "capture"), (lowbit.ir, "capture"), (lowbit.api, "capture")]

    def patches() -> tuple:
        """What the test has monkeypatched so far and not set back, by value (functions by identity, kept alive with
        the key). An attribute or item that holds what it held before the test's first patch of it (a test that
        patches a function around one call and puts it back) is left out: a capture then is the unpatched one; so
        is one of a kernel, backend or Triton module or class (``_UNREAD_BY_CAPTURE``)."""
        firsts: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}
        for owner, name, old in patcher._setattr:
            where = owner.__name__ if inspect.ismodule(owner) else getattr(owner, "__module__", None) \
                if isinstance(owner, type) else None
            if isinstance(where, str) and where.startswith(_UNREAD_BY_CAPTURE):
                continue
            if not any(owner is o and name == n for o, n in ours):
                firsts.setdefault((id(owner), name), (owner, name, old))
        attributes = tuple((owner if isinstance(owner, type) or inspect.ismodule(owner) else _plain(owner), name,
                            _plain(getattr(owner, name, None))) for owner, name, old in firsts.values()
                           if not _unchanged(getattr(owner, name, _UNSET), old))
        first_items: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}
        for mapping, k, old in patcher._setitem:
            first_items.setdefault((id(mapping), k), (mapping, k, old))
        items = tuple((type(mapping).__qualname__, repr(k), _plain(mapping.get(k)))
                      for mapping, k, old in first_items.values() if not _unchanged(mapping.get(k, _UNSET), old))
        return attributes, items

    reusing = functools.partial(capture_cache.capture, module.capture, patches)
    for owner, name in ours:
        patcher.setattr(owner, name, reusing)
    return capture_cache


@pytest.fixture(autouse=True)
def _fresh_load_captures() -> None:
    """Each test's ``lowbit.load`` captures the architectures it loads afresh (``lowbit.checkpoint.reuse`` keeps one
    graph per architecture for the process): a test that patches what capture runs sees its patch, whichever test
    loaded the same model before it."""
    reuse = sys.modules.get("lowbit.checkpoint.reuse")  # not imported here: a file that never loaded a checkpoint
    if reuse is not None:
        reuse.clear()


@pytest.fixture
def a8_quantizes_in_gemv(monkeypatch: pytest.MonkeyPatch) -> int:
    """``A8_GEMV_QUANTIZE_MAX_K`` raised to 2048 (it is 0 by measurement, session 50: the separate quantize launch is
    faster on an H100): the A8 GEMV quantizes (and, split around it, norms) rows up to that wide itself, and the
    triton backend splits an A8 block's RMSNorm into its GEMVs (``_fuse_norm_quant_a8``), so the tests keep that
    path working for a kernel whose prologue gets cheaper."""
    import importlib

    # the module (the package re-exports no op of its name); a8_linear reads the constant there per call
    monkeypatch.setattr(importlib.import_module("lowbit.kernels.a8_gemv"), "A8_GEMV_QUANTIZE_MAX_K", 2048)
    return 2048


WIDE_FOLD_COLUMNS = 64
"""``wide_interpreted_folds``' columns a ``FOLD_ONE_STEP`` program: the N-major ``_gemv_t`` fold of an M = 1 W4
step then runs 8x fewer interpreted programs (a 2-block SmolLM2-head step: 389 of 8 columns, ~11 s of the ~23 s
``count_step_launches`` took on the 2-core CI)."""


@pytest.fixture
def wide_interpreted_folds() -> Any:
    """``weight_only.FOLD_ONE_STEP``'s columns raised to ``WIDE_FOLD_COLUMNS`` and ``FOLD_ONE_STEP_WORDS`` by the same
    factor, so a fold still takes the same chunks in its one step (the same ``U``, the same kernel, launches and
    reduce order per column) in fewer, wider programs: for tests that count a step's launches or compare its
    tokens, not the 8-column tile's (test_kernels.py checks that one against the reference). The interpreter's
    cost is per program; the GPU's choice (measured: ``FOLD_ONE_STEP``) stays the default. Set and restored here,
    not through ``monkeypatch``: ``reuse_captures`` keys a capture by the test's monkeypatches, and capture never
    reads a launch's tile, so the step's model is not exported again for it. Yields the columns."""
    from lowbit.kernels import weight_only as wo

    saved = wo.FOLD_ONE_STEP, wo.FOLD_ONE_STEP_WORDS
    wo.FOLD_ONE_STEP = dict(saved[0], BLOCK_N=WIDE_FOLD_COLUMNS)
    wo.FOLD_ONE_STEP_WORDS = saved[1] * WIDE_FOLD_COLUMNS // saved[0]["BLOCK_N"]
    try:
        yield WIDE_FOLD_COLUMNS
    finally:
        wo.FOLD_ONE_STEP, wo.FOLD_ONE_STEP_WORDS = saved
