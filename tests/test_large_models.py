"""Models larger than the memory left: weights stay memory-mapped from the checkpoint, a compile holds the quantized
model and one weight's float temporaries, and saving streams tensors to disk.

The end-to-end proof (a 1.1 GB bf16 model compiled and saved to compressed-tensors inside a 900 MiB memory cgroup)
is ``tools/bench_memory.py``; CI cannot make cgroups, so here a child process's anonymous resident memory is
sampled while it compiles and saves a bf16 model, with glibc's mmap threshold fixed so freed tensors leave the
resident set (what ``lowbit``'s CLI sets for itself, ``limit_heap_retention``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.checkpoint.files import CheckpointError, write_safetensors

ROOT = Path(__file__).resolve().parents[1]


def test_streamed_safetensors_is_the_file_save_file_writes(tmp_path: Path) -> None:
    """Same bytes as safetensors' own writer for plain tensors (so every reader takes it), and views, shared
    storage, 0-d and empty tensors read back equal (save_file refuses shared storage; they were cloned first)."""
    g = torch.Generator().manual_seed(0)
    plain = {"w": torch.randn(6, 8, generator=g), "h": torch.randn(3, 5, generator=g).to(torch.bfloat16),
             "codes": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
             "z": torch.arange(5, dtype=torch.int32), "s": torch.tensor(2.5, dtype=torch.float64),
             "e": torch.zeros(0, 4), "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
             "mask": torch.tensor([True, False, True])}
    write_safetensors(plain, tmp_path / "ours.safetensors", {"format": "pt"})
    save_file(plain, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()

    base = torch.randn(64, 48, generator=g)
    views = {"base": base, "t": base.t(), "rows": base[3:9], "strided": base[:, ::3], "again": base}
    write_safetensors(views, tmp_path / "views.safetensors")
    back = load_file(str(tmp_path / "views.safetensors"))
    assert set(back) == set(views)
    for name, t in views.items():
        assert torch.equal(back[name], t), name


def test_streamed_safetensors_chunks_large_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor larger than one write is written chunk by chunk (a non-contiguous one copies a chunk, not itself)."""
    import lowbit.checkpoint.files as files

    monkeypatch.setattr(files, "_WRITE_CHUNK", 1000)
    t = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    write_safetensors({"t": t.t(), "u": t.to(torch.bfloat16)}, tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["t"], t.t()) and torch.equal(back["u"], t.to(torch.bfloat16))


def test_streamed_safetensors_refuses_what_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tensor 'c' has dtype torch.complex64, which safetensors cannot store"):
        write_safetensors({"ok": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.st")


_STRIDED_CHILD = r"""
import resource, sys
import torch
import lowbit.checkpoint.files as files
files._WRITE_CHUNK = 1 << 20
base = torch.randint(0, 256, (4096, 4096), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))  # 16 MiB
wide = torch.zeros(8, 1, dtype=torch.int16).expand(8, 1 << 20)  # 16 MiB written, 16 bytes stored
tensors = {"t": base.t(), "cols": base[:, ::2], "wide": wide}
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (6 << 20), resource.RLIM_INFINITY))
files.write_safetensors(tensors, files.Path(sys.argv[1]))
print("ok")
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux /proc for the address space")
def test_streamed_safetensors_copies_a_chunk_of_a_strided_tensor_not_all_of_it(tmp_path: Path) -> None:
    """A tensor that is not contiguous (a transposed weight, every other column, an expanded row) is written a block
    of rows at a time, each copied contiguous: inside an address-space limit of 6 MiB above what the process holds,
    with 1 MiB chunks. ``reshape(-1)`` copied the whole tensor first (16 MiB each here), which the docstring and
    the chunking already claimed not to; the file reads back equal."""
    out = tmp_path / "x.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _STRIDED_CHILD, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
    back = load_file(str(out))
    base = torch.randint(0, 256, (4096, 4096), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(back["t"], base.t()) and torch.equal(back["cols"], base[:, ::2])
    assert torch.equal(back["wide"], torch.zeros(8, 1 << 20, dtype=torch.int16))


_SAMPLER = r"""
import json, sys, threading, time
from pathlib import Path

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

class Peak:  # the highest anonymous resident memory from construction to stop(), sampled every 5 ms
    def __init__(self):
        self.before = self.peak = anon_mib()
        self.done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, anon_mib())
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.peak = max(self.peak, anon_mib())
"""

_CHILD = _SAMPLER + r"""
import torch
import lowbit
from lowbit.models import load_model

src, out = Path(sys.argv[1]), Path(sys.argv[2])
mem = Peak()
model, tokenizer, _ = load_model(src, dtype="auto")
loaded = anon_mib()
dtype = str(next(model.parameters()).dtype)
compiled = lowbit.compile_model(model, tokenizer=tokenizer, pipeline="quantize(w=int4,group=128,sym=false)",
                                verify=False, backend_options={"keep_packed": True})
lowbit.save(compiled, out, format="compressed-tensors")
mem.stop()
ids = torch.tensor([[1, 20, 300, 4000, 50]])
with torch.no_grad():
    logits = compiled(ids)
print(json.dumps({"before": mem.before, "loaded": loaded, "peak": mem.peak, "dtype": dtype,
                  "logits": logits[0, -1, :8].tolist()}))
"""


_LOAD_CHILD = _SAMPLER + r"""
import torch
import lowbit
import compressed_tensors.quantization, transformers  # what any load imports: not the checkpoint's memory
from transformers import LlamaForCausalLM

mem = Peak()
compiled = lowbit.load(sys.argv[1], backend_options={"keep_packed": True})
with torch.no_grad():
    logits = compiled(torch.tensor([[1, 20, 300, 4000, 50]]))
mem.stop()
print(json.dumps({"before": mem.before, "peak": mem.peak, "logits": logits[0, -1, :8].float().tolist()}))
"""


def _bf16_llama_dir(directory: Path) -> int:
    """A random bf16 Llama (~113 MB of weights, mostly the 49152-token embedding and head) with SmolLM2's tokenizer,
    built as ``tools/bench_memory.py`` builds its 1 GB one; returns the weights' bytes. Two blocks: each is captured
    twice (compile, the keep_packed load), and four (eight before) took ~25% more CPU to the same verdicts: the
    blocks hold a tenth of the bytes, which are what the test measures."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_memory import make_model

    return make_model(directory, layers=2, hidden=512, intermediate=1536)


def _tiny_bf16_llama_dir(directory: Path) -> str:
    """A one-block random Llama stored in bf16 with SmolLM2's tokenizer (its 49152-token vocabulary), written to
    ``directory``; returns it as a model spec: the 16-bit checkpoint the dtype notes and ``--dtype auto`` are about."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.data.model_files import load_smollm2_tokenizer

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=49152, max_position_embeddings=64)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory)
    load_smollm2_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux /proc for resident memory")
def test_compile_and_save_hold_far_less_than_the_model(tmp_path: Path) -> None:
    """Loading in the checkpoint's dtype keeps the weights memory-mapped; RTN int4 replaces each linear by its
    codes; saving unpacks one linear at a time and streams to disk. Loading, and then compiling and saving, each
    grow the child's anonymous memory by under half the model's bytes (~0.3x each here, mostly sizes that do
    not grow with the model; before, loading alone took 2x (a float32 copy), and saving held every linear's codes
    unpacked and the whole file in memory), and the checkpoint it wrote runs in lowbit as the compiled model did."""
    model_bytes = _bf16_llama_dir(tmp_path / "src")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "src"), str(tmp_path / "ct")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16"
    # what loading adds (transformers' modules, the tokenizer) is the same for any size; the weights are not in it
    load_grew, grew = (got["loaded"] - got["before"]) * 2**20, (got["peak"] - got["loaded"]) * 2**20
    assert load_grew < 0.5 * model_bytes, \
        f"loading a {model_bytes / 2**20:.0f} MiB model took {load_grew / 2**20:.0f} MiB"
    assert grew < 0.5 * model_bytes, (f"anonymous memory grew {grew / 2**20:.0f} MiB compiling and saving a "
                                      f"{model_bytes / 2**20:.0f} MiB model")

    # and lowbit.load of that checkpoint (keep_packed) holds its codes, not the model: the float tensors stay
    # memory-mapped and the quantized weights are never built in float. Here 66 MiB for a 108 MiB model (72 MiB of
    # 119 MiB with 4 blocks), most of it the tokenizer and capture, which do not grow with the model; before, 2.3x
    # (the skeleton allocated in float, float32 placeholders for the quantized weights, every tensor of the file read
    # into memory)
    res = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(tmp_path / "ct")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    load_grew = (loaded["peak"] - loaded["before"]) * 2**20
    assert load_grew < model_bytes, (f"lowbit.load of the {model_bytes / 2**20:.0f} MiB model's checkpoint "
                                           f"took {load_grew / 2**20:.0f} MiB")
    # and its logits are the compiled model's. (A plain reload here, a third capture, checked keep_packed against it:
    # test_checkpoint's test_a_reload_reports_what_its_lowering_decided asserts that equality on its own.)
    torch.testing.assert_close(torch.tensor(loaded["logits"]), torch.tensor(got["logits"]), rtol=0, atol=1e-5)


def test_cli_dtype_auto_loads_an_hf_directory_in_its_stored_dtype(tmp_path: Path) -> None:
    """``--dtype auto`` is the checkpoint's own dtype (bf16 here, so its weights stay memory-mapped), where float32,
    the default, converts them; an unknown dtype is refused before anything loads."""
    from lowbit.cli.common import load

    spec = _tiny_bf16_llama_dir(tmp_path / "m")
    from lowbit.cli.common import _MODELS, check_eval_flags_fit

    check_eval_flags_fit(spec, {"--windows"}, "auto")  # the debug commands' flag check loads what they then run
    assert f"{spec}@auto" in _MODELS and spec not in _MODELS
    assert next(load(spec, "auto").module.parameters()).dtype == torch.bfloat16
    assert next(load(spec).module.parameters()).dtype == torch.float32
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    res = CliRunner().invoke(app, ["compile", spec, "--dtype", "int8", "-p", "dce"])
    assert res.exit_code == 2 and "--dtype 'int8': give one of float32, bfloat16, float16, auto" in res.output


GPTQ_CHILD = r"""
import resource, sys
import torch
from lowbit.calibration.gptq import HessianAccumulator, gptq_quantize
k, n, budget = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
acc = HessianAccumulator(k)
acc.add(torch.randn(2048, k, generator=g))
w = torch.randn(n, k, generator=g) * 0.02
gptq_quantize(w[:8, :128], acc.hessian[:128, :128].clone(), 4, 64)  # load LAPACK and friends before the limit
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
h = acc.take_hessian()
del acc
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + budget, resource.RLIM_INFINITY))
res = gptq_quantize(w, h, 4, 128, consume_h=True, unrounded=False)
print("ok", res.stats["loss"], h.numel())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux /proc for the address space")
def test_gptq_holds_its_hessian_and_half_another_beside_its_weight_rows() -> None:
    """GPTQ on a ``K = 2048`` input (a 32 MiB float64 Hessian) runs inside an address-space limit of one more
    Hessian plus four float32 copies of its ``[N, K]`` weight on top of what the process holds, the Hessian it is
    handed included: it permutes, factors and inverts that Hessian in place (``consume_h``), beside a float32 copy
    kept for a damping retry and the float32 result — 1.5 Hessians in all. Session 31's code held two (a gather
    into a new matrix, Cholesky into another, L⁻¹ solved into an identity) and needed 2 here; before that, about
    seven: 230 MiB at this size, 6.5 GiB at a 7B model's down_proj (K = 11008)."""
    k, n = 2048, 512
    budget = int(1.0 * k * k * 8 + 4 * n * k * 4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", GPTQ_CHILD, str(k), str(n), str(budget)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
    assert proc.stdout.split()[2] == "0"  # the Hessian was spent, not copied


def test_bench_memory_writes_nothing_when_no_row_ran(tmp_path: Path, monkeypatch, capsys) -> None:
    """``tools/bench_memory.py --runs limit`` where no memory cgroup can be made (not root, no memory controller)
    exited 0 and merged a header with no rows into ``--out`` (by default ``bench/results/memory.json``), and
    ``--hidden`` below 128 built a model of 0 attention heads. It now exits non-zero and leaves the file alone;
    ``--hidden`` must be a multiple of 128."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_memory

    def no_cgroup(limit: int) -> None:
        raise OSError("no memory controller here")

    monkeypatch.setattr(bench_memory, "make_model", lambda *a, **k: 1 << 20)
    monkeypatch.setattr(bench_memory, "Cgroup", no_cgroup)
    out = tmp_path / "memory.json"
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--runs", "limit", "--out", str(out)])
    assert bench_memory.main() == 1 and not out.exists()
    assert "no row ran" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--hidden", "64", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        bench_memory.main()
    assert exc.value.code == 2 and "--hidden 64" in capsys.readouterr().err and not out.exists()


def test_bench_memory_writes_its_files_under_workdir_and_says_where(tmp_path: Path, monkeypatch, capsys) -> None:
    """``tools/bench_memory.py`` wrote its 1.1 GB model and checkpoints under the system's temporary directory, often a
    tmpfs (memory: the limit run's mapped weights could not be evicted, the offload saved nothing), with no way to
    choose and no word of where. ``--workdir`` picks the directory, the output says where files go (and that a tmpfs
    is memory), and a missing one is a usage error."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_memory

    made: list[Path] = []

    def no_cgroup(limit: int) -> None:
        raise OSError("no memory controller here")

    monkeypatch.setattr(bench_memory, "make_model", lambda directory, *a: made.append(directory) or 1 << 20)
    monkeypatch.setattr(bench_memory, "Cgroup", no_cgroup)
    work = tmp_path / "work"
    work.mkdir()
    args = ["bench_memory.py", "--runs", "limit", "--out", str(tmp_path / "memory.json")]
    monkeypatch.setattr(sys, "argv", [*args, "--workdir", str(work)])
    assert bench_memory.main() == 1
    assert len(made) == 1 and made[0].parent.parent == work and made[0].parent.name.startswith("lowbit-memory-")
    assert f"go to {made[0].parent}, removed at the end" in capsys.readouterr().out
    assert list(work.iterdir()) == []
    monkeypatch.setattr(sys, "argv", [*args, "--workdir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exc:
        bench_memory.main()
    assert exc.value.code == 2 and "--workdir" in capsys.readouterr().err and len(made) == 1


def test_cli_advises_dtype_auto_for_a_16_bit_checkpoint_loaded_in_float32(tmp_path: Path) -> None:
    """``lowbit compile`` and ``generate`` of a bf16 HF directory without ``--dtype`` load it in float32: a float32
    copy of every weight in memory (twice the checkpoint) and, for compile, the weights it leaves unquantized written
    in float32, so an int4 checkpoint of a bf16 model could be larger than the model. They ran without a word; they
    now say so and name ``--dtype auto`` (which writes bf16), and say nothing when ``--dtype`` is given."""
    from safetensors import safe_open
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    spec, runner = _tiny_bf16_llama_dir(tmp_path / "m"), CliRunner()
    compile_args = ["compile", spec, "-p", "quantize(w=int4,group=16)", "-f", "compressed-tensors", "-q", "-o"]

    def embedding_dtype(out: Path) -> str:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return f.get_slice("model.embed_tokens.weight").get_dtype()

    res = runner.invoke(app, [*compile_args, str(tmp_path / "f32")])
    assert res.exit_code == 0, res.output
    assert "stores its weights in bfloat16" in res.output and "--dtype auto" in res.output
    assert embedding_dtype(tmp_path / "f32") == "F32"  # what the note warns of
    res = runner.invoke(app, [*compile_args, str(tmp_path / "auto"), "--dtype", "auto"])
    assert res.exit_code == 0 and "stores its weights" not in res.output, res.output
    assert embedding_dtype(tmp_path / "auto") == "BF16"
    res = runner.invoke(app, [*compile_args, str(tmp_path / "f32b"), "--dtype", "float32"])
    assert res.exit_code == 0 and "stores its weights" not in res.output, res.output
    res = runner.invoke(app, ["generate", spec, "--prompt", "Hi", "-n", "1", "-q"])
    assert res.exit_code == 0 and "stores its weights in bfloat16" in res.output, res.output


@pytest.mark.parametrize(("command", "runner"), [("compare", "lowbit.cli.compare.run_compare"),
                                                 ("bisect", "lowbit.cli.bisect.run_bisect"),
                                                 ("sensitivity", "lowbit.cli.sensitivity.run_sensitivity")])
def test_debug_commands_say_they_load_a_16_bit_checkpoint_in_float32(tmp_path: Path, monkeypatch, command: str,
                                                                      runner: str) -> None:
    """debug compare / bisect / sensitivity loaded a bf16 HF directory in float32 (``--dtype`` defaulted to it)
    without a word, where compile and generate print a note naming the float32 copy and ``--dtype auto``. They print
    the same note now and load float32 as before, and say nothing when ``--dtype`` is given (the command's run itself
    is replaced: what is checked is the note and the dtype handed to it)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    seen: list[str] = []
    monkeypatch.setattr(runner, lambda *a, dtype, **kw: seen.append(dtype))
    args = ["debug", command, str(tmp_path / "m"), "-q", *(["-p", "dce"] if command != "sensitivity" else [])]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "stores its weights in bfloat16, and without --dtype they are loaded in float32" in res.output, res.output
    res = CliRunner().invoke(app, [*args, "--dtype", "bfloat16"])
    assert res.exit_code == 0 and "stores its weights" not in res.output, res.output
    assert seen == ["float32", "bfloat16"]


def test_compile_model_of_a_16_bit_directory_path_warns_of_its_float32_copy(tmp_path: Path) -> None:
    """``compile_model(DIR)`` loads DIR in float32; of a bf16 checkpoint that is a float32 copy of every weight, twice
    the checkpoint in memory, which is what kept a model larger than RAM from compiling, and nothing said so. It now
    warns, naming the extra MiB and ``load_model(DIR, dtype='auto')``; the module that call returns compiles without
    the warning, in bf16."""
    import warnings

    import lowbit

    spec = _tiny_bf16_llama_dir(tmp_path / "m")
    with pytest.warns(UserWarning, match=r"stores its weights in bfloat16: a float32 copy of every weight in memory "
                                         r"\(about \d+ MiB\).*load_model\(.*, dtype='auto'\)"):
        floats = lowbit.compile_model(spec, pipeline="quantize(w=int4,group=16)")
    assert floats.graph.params["lm_head.weight"].data.dtype == torch.float32
    from lowbit.models import load_model

    module, tokenizer, _ = load_model(spec, dtype="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kept = lowbit.compile_model(module, tokenizer=tokenizer, pipeline="quantize(w=int4,group=16)")
    assert kept.graph.params["lm_head.weight"].data.dtype == torch.bfloat16
