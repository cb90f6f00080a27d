"""Compile and save a model larger than the memory it is given: a random bf16 Llama, quantized to W4A16 and written
as a compressed-tensors checkpoint inside a memory cgroup smaller than the model, then loaded in transformers.

    python tools/bench_memory.py                       # 1.1 GB model, 900 MiB limit -> bench/results/memory.json
    python tools/bench_memory.py --layers 4 --limit-mib 700 --out /tmp/memory.json --workdir /var/tmp
    python tools/bench_memory.py --layers 4 --runs auto --pipeline "gptq(w=int4,group=128,sym=false,calib_n=16)"

Each run is a fresh process. Rows:

* ``limit``: the run inside a cgroup (v1 or v2; needs root) whose limit counts everything the process holds,
  page cache included (the kernel evicts clean file pages of the memory-mapped weights under pressure). ``ok``
  says whether it finished; ``cgroup_peak_mib`` is the cgroup's own high-water mark.
* ``unlimited``: the same run with no limit, and the same command as lowbit ran it before models larger than RAM
  were handled (float32 weights, quantized weights dequantized at lowering): peak resident and anonymous memory.

``--runs`` picks rows (``limit``, ``auto``: unlimited in the stored dtype, ``float32``: unlimited as before);
``--pipeline`` another pipeline (GPTQ's peak is its largest linear's float64 Hessian work, not the model).

The model (bf16, its full size) and the checkpoints are written into a temporary directory under ``--workdir``
(default: the system's temporary directory, often a tmpfs, where files are memory: give a directory on disk).

The checkpoint is then loaded by ``transformers`` (CPU) and by ``lowbit.load``; ``max_logit_diff`` is the largest
difference of their logits on one prompt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from results_io import machine, merge_rows, versions  # noqa: E402

PIPELINE = "quantize(w=int4,group=128,sym=false)"

CHILD = r"""
import sys, time
t0 = time.time()
from lowbit.cli.common import limit_heap_retention
limit_heap_retention()
import torch, lowbit
from lowbit.models import load_model
src, out, dtype, keep_packed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
model, tokenizer, _ = load_model(src, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
compiled = lowbit.compile_model(model, tokenizer=tokenizer, pipeline=sys.argv[5], verify=False,
                                backend_options={"keep_packed": keep_packed}, offload_dir=sys.argv[6] or None)
lowbit.save(compiled, out, format="compressed-tensors")
print(f"done {time.time() - t0:.1f}")
"""


def make_model(directory: Path, layers: int, hidden: int, intermediate: int) -> int:
    """A random bf16 Llama with SmolLM2's tokenizer (49152 tokens); returns its weight bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.data.model_files import load_smollm2_tokenizer

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                      vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.save_pretrained(directory)
    load_smollm2_tokenizer().save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Cgroup:
    """A memory cgroup (v2 ``memory.max``, else v1 ``memory.limit_in_bytes``) the child process joins."""

    def __init__(self, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.is_file() and "memory" in v2.read_text():
            self.dir = Path(f"/sys/fs/cgroup/lowbit-bench-{os.getpid()}")
            self.dir.mkdir()
            (self.dir / "memory.max").write_text(str(limit))
            (self.dir / "memory.swap.max").write_text("0")
            self.peak_file, self.events = self.dir / "memory.peak", self.dir / "memory.events"
        else:
            self.dir = Path(f"/sys/fs/cgroup/memory/lowbit-bench-{os.getpid()}")
            self.dir.mkdir()
            (self.dir / "memory.limit_in_bytes").write_text(str(limit))
            self.peak_file, self.events = self.dir / "memory.max_usage_in_bytes", self.dir / "memory.oom_control"

    def join(self) -> None:  # preexec_fn of the child
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mib(self) -> float | None:
        return int(self.peak_file.read_text()) / 2**20 if self.peak_file.is_file() else None

    def remove(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


def run_child(src: Path, out: Path, dtype: str, keep_packed: bool, cgroup: Cgroup | None,
              pipeline: str = PIPELINE, offload: bool = False) -> dict:
    """One compile + save in a fresh process; peak resident and anonymous memory sampled from /proc. ``offload``:
    the packed weights go to ``out``'s parent directory (``compile_model(offload_dir=...)``) until the save."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), dtype, "1" if keep_packed else "0",
                             pipeline, str(out.parent) if offload else ""], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=cgroup.join if cgroup else None)
    peak = {"VmRSS": 0.0, "RssAnon": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) / 1024)
            except OSError:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    row = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_mib": round(peak["VmRSS"], 1), "peak_anon_mib": round(peak["RssAnon"], 1)}
    if proc.returncode != 0:
        row["error"] = ("killed by the memory limit (SIGKILL)" if proc.returncode == -9
                        else stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit {proc.returncode}")
    return row


def check_checkpoint(directory: Path) -> float:
    """Largest |logit| difference between transformers' load of the checkpoint and lowbit's (transformers through
    its dequantize-at-load route: its default one does not take asymmetric pack-quantized checkpoints with
    compressed-tensors 0.20, whoever wrote them; ``lowbit.checkpoint.hf_check``)."""
    import lowbit
    from lowbit.checkpoint.hf_check import transformers_logits

    ids = torch.tensor([[1, 504, 3458, 282, 1029, 314, 253, 1645]])
    with torch.no_grad():
        theirs = transformers_logits(directory, ids).float()
        ours = lowbit.load(directory)(ids).float()
    return float((theirs - ours).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--limit-mib", type=int, default=900)
    ap.add_argument("--runs", default="limit,auto,float32",
                    help="rows to run, comma-separated: limit (inside the cgroup), auto, float32 (unlimited)")
    ap.add_argument("--pipeline", default=PIPELINE, help=f"the compile pipeline (default {PIPELINE})")
    ap.add_argument("--offload", action="store_true", help="compile_model(offload_dir=...): packed weights wait for "
                    "the save in a file on disk, not in memory (as `lowbit compile -o` does)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the model, its checkpoints and (--offload) the offloaded weights are written, in a "
                    "temporary directory removed at the end (default: the system's temporary directory, "
                    f"{tempfile.gettempdir()}); give one on disk: on a tmpfs the weights are memory the kernel cannot "
                    "evict, so neither the memory limit nor the offload measures what it should")
    args = ap.parse_args()
    if args.hidden < 128 or args.hidden % 128:
        ap.error(f"--hidden {args.hidden}: the model has hidden/128 attention heads of 128; give a multiple of 128")
    if args.workdir is not None and not args.workdir.is_dir():
        ap.error(f"--workdir {args.workdir}: no such directory")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-memory-", dir=args.workdir) as tmp:
        from lowbit.ir.offload import ram_backed

        fs = ram_backed(tmp)
        print(f"files (the model, its checkpoints{', the offloaded weights' if args.offload else ''}) go to {tmp}, "
              "removed at the end" + (f"; it is on a {fs}, held in memory: give --workdir on disk to measure what "
                                      "the memory limit and the offload are for" if fs else ""), flush=True)
        src = Path(tmp) / "model"
        model_bytes = make_model(src, args.layers, args.hidden, args.intermediate)
        base = {"area": "memory", "model": f"llama-random-{args.layers}x{args.hidden}-bf16",
                "model_mib": round(model_bytes / 2**20, 1), "pipeline": args.pipeline, "format": "compressed-tensors",
                **({"offload": True} if args.offload else {})}  # rows from before --offload have no such key
        runs = set(args.runs.split(","))
        if runs - {"limit", "auto", "float32"}:
            ap.error(f"--runs: unknown row(s) {sorted(runs - {'limit', 'auto', 'float32'})}; known: limit, auto, float32")
        print(f"model: {base['model']}, {base['model_mib']} MiB of bf16 weights", flush=True)
        cgroup = None
        try:
            cgroup = Cgroup(args.limit_mib * 2**20) if "limit" in runs else None
        except OSError as exc:
            print(f"no memory cgroup here ({exc}); the limited row is skipped", flush=True)
        if cgroup is not None:
            try:
                row = run_child(src, Path(tmp) / "ct", "auto", True, cgroup, args.pipeline, args.offload)
                row.update(cgroup_peak_mib=cgroup.peak_mib())
            finally:
                cgroup.remove()
            row.update(base, run="limit", limit_mib=args.limit_mib, dtype="auto (bf16)", lowering="keep_packed")
            print(json.dumps(row), flush=True)
            if row["ok"]:
                row["max_logit_diff"] = round(check_checkpoint(Path(tmp) / "ct"), 5)
            rows.append(row)
            print(json.dumps(row), flush=True)
        for dtype, keep in (("auto", True), ("float32", False)):
            if dtype in runs:
                row = run_child(src, Path(tmp) / f"ct-{dtype}", dtype, keep, None, args.pipeline, args.offload)
                row.update(base, run="unlimited", limit_mib=None,
                           dtype="auto (bf16)" if dtype == "auto" else dtype,
                           lowering="keep_packed" if keep else "dequantized (float)")
                rows.append(row)
                print(json.dumps(row), flush=True)
    if not rows:  # --runs limit where no cgroup could be made: nothing was measured, so nothing is written
        print(f"no row ran; {args.out} is left as it was", file=sys.stderr)
        return 1
    date = datetime.date.today().isoformat()
    header = {"command": "python " + shlex.join([Path(sys.argv[0]).as_posix().split(str(ROOT) + "/")[-1],
                                                  *sys.argv[1:]]),
              "date": date, "device": machine(), "versions": versions()}
    for r in rows:
        r.update(device=header["device"], date=date, command=header["command"])
    merge_rows(args.out, header, rows, key=("area", "model", "pipeline", "run", "dtype", "lowering", "limit_mib",
                                                      "offload", "device"),
               append_command=True)
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
