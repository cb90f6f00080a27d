"""``lowbit inspect`` and ``lowbit graph``: look at a compiled artefact without running it.

``inspect`` answers "what did compile produce": op counts, which weights are quantized (qdtype, granularity,
packed bytes), parameter dtypes and sizes, for lowbit IR dumps and ONNX files alike. ``graph`` draws the IR
grouped by module path, as Graphviz clusters or a JavaScript-free HTML page of nested ``<details>``.
"""

from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table

from lowbit.cli.common import Exit, atomic_write_text, console, fail

MiB = 2**20


def _read_lowbit(path: Path) -> tuple[Any, bool]:
    from lowbit.cli.artifacts import load_graph
    from lowbit.cli.common import artifact_errors

    with artifact_errors(path):
        return load_graph(path)


def _read_graph(path: Path, kind: str) -> tuple[Any, bool]:
    """The graph of a ``_resolve``d lowbit file, the one ``lowbit.load`` rebuilds from an HF checkpoint directory
    (its codes installed), or a float HF directory's capture, and whether it holds weights."""
    if kind != "checkpoint":
        return _read_lowbit(path)
    from lowbit.checkpoint import CheckpointError, load
    from lowbit.errors import LowbitError
    from lowbit.models import config_json, quantization_config

    float_model = config_json(path) is not None and quantization_config(path) is None
    if float_model and not (path / "quantize_config.json").is_file() and _float_per_manifest(path):
        # a float HF model (`lowbit compile -f hf`'s pruned output among them): its IR as compile captures it. It was
        # refused as 'no quantization_config (... load it with lowbit.compile_model instead)'
        from lowbit.cli.common import capture_model, load as load_model

        return capture_model(load_model(str(path))), True

    try:
        # keep_packed: the graph is read, never run; the default lowering dequantized every weight into a float copy
        # (SmolLM2's: ~20 s and ~0.5 GB more; a model of half the memory left could not be inspected)
        return load(path, backend_options={"keep_packed": True}).graph, True
    except (CheckpointError, LowbitError, OSError) as exc:
        fail(f"{str(path)!r}: cannot be loaded as a checkpoint: {exc}", Exit.NOT_FOUND)


def _float_per_manifest(path: Path) -> bool:
    """Whether a float HF directory is one to capture: its manifest (when it has one) checks out and says ``hf``.
    Captured unchecked, a lowbit.save directory with an edited config.json, or a manifest naming another format,
    was shown (exit 0) while lowbit.load refused it; False hands such a directory to ``load``, which says why."""
    from lowbit.checkpoint.files import CheckpointError, verify_manifest

    try:
        manifest = verify_manifest(path)
    except CheckpointError as exc:
        fail(f"{str(path)!r}: cannot be loaded as a checkpoint: {exc}", Exit.NOT_FOUND)
    return manifest is None or manifest.get("format") == "hf"


def _resolve(file: Path) -> tuple[Path, str]:
    from lowbit.checkpoint.files import unreadable_file

    why = unreadable_file(file) if not file.is_dir() else None
    if why is not None:
        fail(f"{str(file)!r} cannot be read: {why}", Exit.NOT_FOUND)
    if not file.exists():
        fail(f"{str(file)!r}: no such file or directory", Exit.NOT_FOUND)
    if file.is_dir():
        # config.json: lowbit.save's compressed-tensors/GPTQ output (or another tool's)
        for name, kind in (("model.lowbit", "lowbit"), ("model.onnx", "onnx"), ("config.json", "checkpoint")):
            why = unreadable_file(file / name)
            if why is not None:
                fail(f"{str(file / name)!r} cannot be read: {why}", Exit.NOT_FOUND)
            if (file / name).is_file():
                return (file, kind) if kind == "checkpoint" else (file / name, kind)
        fail(f"directory {str(file)!r} has no model.lowbit, model.onnx or config.json (a compressed-tensors/GPTQ "
             "checkpoint)", Exit.NOT_FOUND)
    from lowbit.export import looks_like_onnx

    if file.suffix.lower() == ".onnx" or looks_like_onnx(file):  # model.ONNX or no suffix, as export.load reads it
        return file, "onnx"
    if file.suffix in (".lowbit", ".ir", ".txt"):
        return file, "lowbit"
    if file.suffix.lower() in ENGINE_SUFFIXES or _has_engine_magic(file):
        return file, "engine"
    fail(f"{str(file)!r}: expected a .lowbit IR dump, a compile output directory, an .onnx file or a TensorRT "
         ".engine", Exit.USAGE)


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
"""TensorRT engine files: lowbit's (``lowbit compile -b tensorrt -o DIR`` writes ``DIR/model.engine``) or raw plans."""


def _has_engine_magic(file: Path) -> bool:
    from lowbit.backends.tensorrt.engine_file import MAGIC

    with open(file, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _inspect_engine(path: Path) -> None:
    """A TensorRT engine's header, integrity-checked (no TensorRT needed): what it was built by and takes, and its
    optimization profile, the calls it accepts."""
    from lowbit.backends.tensorrt.engine_file import EngineFileError, read_engine

    try:
        plan, header = read_engine(path)
    except EngineFileError as exc:  # truncated or corrupted: a damaged file, exit 3 as a damaged .onnx
        fail(str(exc), Exit.NOT_FOUND)
    if header is None:
        console.print(f"{path}: a raw TensorRT plan ({len(plan)} bytes) without lowbit's header (trtexec "
                      "--saveEngine or another tool's): only TensorRT can read what it takes", markup=False,
                      soft_wrap=True)
        return
    size = f"{len(plan) / MiB:.1f} MiB" if len(plan) >= MiB else f"{len(plan)} bytes"
    console.print(f"{path}: TensorRT engine built by TensorRT {header.tensorrt_version}"
                  + (f" (lowbit {header.lowbit_version})" if header.lowbit_version else "")
                  + f", {'strongly' if header.strongly_typed else 'weakly'} typed, plan {size} (SHA-256 verified), "
                  f"inputs {header.inputs}, outputs {header.outputs}"
                  + (f", built from {header.source}" if header.source else "") + _engine_generation_text(header),
                  markup=False, soft_wrap=True)
    profile = Table(title="optimization profile (the input shapes the engine accepts)")
    for col in ("input", "min", "opt", "max"):
        profile.add_column(col)
    for name, shapes in header.profile.items():
        profile.add_row(name, *("x".join(map(str, s)) for s in shapes))
    console.print(profile)


def _engine_generation_text(header: Any) -> str:
    """What an exported step graph's engine says of its generation limits (its header's ``lowbit.generation``):
    the engine inspected as any other, with no word that ``lowbit.export.load`` gives it ``generate()``."""
    meta = header.extra.get("lowbit.generation") if isinstance(header.extra, dict) else None
    if not isinstance(meta, dict):
        return ""
    return (f"; a generation step graph (max_length {meta.get('max_length')}, max_batch {meta.get('max_batch')}): "
            "lowbit.export.load gives it generate()")


_FUSED_WEIGHT = {"qlinear": 1, "qlinear_q": 2}
"""Fused quantized linears: the position of their weight codes (the scale follows)."""


def _bytes(v: Any) -> int:
    if v.data is not None:
        return v.data.numel() * v.data.element_size()
    t = v.type
    try:
        return t.numel() * (t.dtype.itemsize if hasattr(t.dtype, "itemsize") else 4)
    except (ValueError, AttributeError):
        return 0


def _verifier_errors(graph: Any, kind: str, has_weights: bool) -> str | None:
    """The verifier's refusal of a lowbit IR file, or None (a checkpoint was verified by ``lowbit.load``)."""
    from lowbit.ir.verifier import VerificationError, verify

    if kind == "checkpoint":
        return None
    try:
        verify(graph, require_data=has_weights)
    except VerificationError as exc:
        return str(exc)
    return None


def _refuse_unverified(path: Path, errors: str | None, shown: str) -> None:
    """Exit 3 with the verifier's problems after showing the file: the IR is readable but not valid, and
    lowbit.load, replay and compile would refuse it."""
    if errors is not None:
        fail(f"{str(path)!r}: the IR does not verify ({shown} as written): {errors}", Exit.NOT_FOUND)


def inspect_file(file: Path, top: int = 20) -> None:
    path, kind = _resolve(file)
    if kind == "onnx":
        return _inspect_onnx(path, top)
    if kind == "engine":
        return _inspect_engine(path)
    graph, has_weights = _read_graph(path, kind)
    errors = _verifier_errors(graph, kind, has_weights)
    total = sum(_bytes(v) for v in graph.params.values())
    console.print(f"{path}: graph {graph.name}, {len(graph.inputs)} inputs "
                  f"({', '.join(f'{v.name}: {v.type}' for v in graph.inputs)}), {len(graph.nodes)} nodes, "
                  f"{len(graph.params)} params, {total / MiB:.1f} MiB"
                  + ("" if has_weights else " (types only: no params.safetensors beside it)")
                  + ("" if errors is None else "; INVALID: the verifier refuses it (its errors follow the tables)"),
                  markup=False, soft_wrap=True)
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    counts = graph.op_counts()
    for op, n in list(counts.items())[:top]:
        ops.add_row(op, str(n))
    if len(counts) > top:
        ops.add_row(f"... {len(counts) - top} more", "")
    console.print(ops)

    q = Table(title="quantized tensors (dequantize and fused qlinear nodes)")
    for col in ("tensor", "qdtype", "granularity", "shape", "bytes"):
        q.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    qcount: Counter[str] = Counter()
    packed_kv: Counter[str] = Counter()
    shown = 0
    from lowbit.checkpoint.graph_view import quantizes_kv

    users = graph.users()
    for n in graph.nodes:
        if n.op == "cache_attention":  # the kv-cache pass's packed cache: no dequantize node, so it was not counted
            k = n.kwargs
            packed_kv[f"{k.get('bits')}-bit codes, keys per channel over {k.get('k_block')}-token blocks, values in "
                      f"groups of {k.get('v_group')}; the first {k.get('sink')} (sink) and last {k.get('window')} "
                      "tokens kept float"] += 1
            continue
        # a fused qlinear (fuse-qlinear, and the onnxruntime/triton backends' passes) holds its weight's codes
        # itself: counted only dequantize nodes, such a graph read "no quantized weights"
        fused = _FUSED_WEIGHT.get(n.op)
        if n.op != "dequantize" and fused is None:
            continue
        if fused is not None:
            src, scale = n.args[fused], n.args[fused + 1]
            qd, axis, block = n.kwargs.get("w_qdtype", "?"), n.kwargs.get("w_axis"), n.kwargs.get("w_block_size")
            if n.kwargs.get("a_qdtype"):
                qcount[f"{n.kwargs['a_qdtype']} activation"] += 1
            # the float weight it stands for, as a dequantize prints it: codes of 4 bits or fewer hold two a byte
            from lowbit.ir.quant import QDTYPES

            packed = qd in QDTYPES and QDTYPES[qd].packed
            rows, cols = src.type.shape[0], src.type.shape[-1] * (2 if packed else 1)
            shape = f"{str(n.output.type).split('[')[0]}[{rows},{cols}] ({n.op})"
        else:
            src, scale = n.args[0], (n.args[1] if len(n.args) > 1 else None)
            qd, axis, block = n.kwargs.get("qdtype", "?"), n.kwargs.get("axis"), n.kwargs.get("block_size")
            shape = str(n.output.type)
        # a KV cache's QDQ read as 'activation': kv=int8 on top of a=int8 showed no KV quantization at all
        role = "weight" if src.is_param else "kv" if n.op == "dequantize" and quantizes_kv(n, users) else "activation"
        qcount[f"{qd} {role}"] += 1
        if not src.is_param:
            continue
        gran = (f"block {block} along axis {axis}" if block else
                "per-tensor" if scale is not None and getattr(scale.type, "rank", 1) == 0 else f"per-axis {axis}")
        if shown < top:
            q.add_row(src.name, str(qd), gran, shape, f"{_bytes(src):,}")
        shown += 1
    if shown > top:
        q.add_row(f"... {shown - top} more", "", "", "", "")
    console.print(q if shown else "no quantized weights")
    if qcount:
        console.print("quantize/dequantize pairs: " + ", ".join(f"{k} ×{v}" for k, v in sorted(qcount.items())),
                      markup=False, soft_wrap=True)
    for layout, layers in sorted(packed_kv.items()):
        console.print(f"packed KV cache (kv-cache pass) in {layers} layer(s): {layout}", markup=False, soft_wrap=True)

    dt = Table(title="parameters by dtype")
    for col in ("dtype", "tensors", "MiB"):
        dt.add_column(col, justify="left" if col == "dtype" else "right")
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for v in graph.params.values():
        key = str(v.type).split("[")[0]
        by[key][0] += 1
        by[key][1] += _bytes(v)
    for key, (n, b) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        dt.add_row(key, str(n), f"{b / MiB:.2f}")
    console.print(dt)
    _refuse_unverified(path, errors, "the tables above show it")


def _inspect_onnx(path: Path, top: int) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a damaged file, like a truncated .lowbit: exit 3, not a usage error
        fail(f"{str(path)!r} is not a readable ONNX file (truncated or corrupt?): {exc}", Exit.NOT_FOUND)
    if model.ir_version == 0 or not model.HasField("graph"):  # protobuf parses 0 bytes as an empty message
        fail(f"{str(path)!r} holds no ONNX model ({path.stat().st_size} bytes, no ir_version or graph): "
             "truncated or not ONNX", Exit.NOT_FOUND)
    from lowbit.backends.onnx.io import OnnxFileError, check_external_data

    try:  # the summary reads no tensor bytes, but a model whose .data side file is gone or cut cannot run
        check_external_data(model, path)
    except OnnxFileError as exc:
        fail(str(exc), Exit.NOT_FOUND)
    g = model.graph
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    console.print(f"{path}: ONNX opsets {opsets}, "
                  f"{len(g.node)} nodes, {len(g.initializer)} initializers, inputs "
                  f"{[i.name for i in g.input]}, outputs {[o.name for o in g.output]}", markup=False, soft_wrap=True)
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    counts = Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in g.node)
    for op, c in counts.most_common(top):
        ops.add_row(op, str(c))
    if len(counts) > top:  # as the IR's tables say it: the rest were dropped without a word
        ops.add_row(f"... {len(counts) - top} more", "")
    console.print(ops)
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    low: list[tuple[str, str, list[int], int]] = []
    for init in g.initializer:
        dtype = onnx.TensorProto.DataType.Name(init.data_type)
        n = 1
        for d in init.dims:
            n *= d
        bits = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "FLOAT16": 16, "BFLOAT16": 16, "FLOAT": 32,
                "INT64": 64, "DOUBLE": 64, "INT32": 32, "FLOAT8E4M3FN": 8, "FLOAT8E5M2": 8, "BOOL": 8}.get(dtype, 32)
        size = (n * bits + 7) // 8
        by[dtype][0] += 1
        by[dtype][1] += size
        if dtype in ("INT4", "UINT4", "INT8", "UINT8", "FLOAT8E4M3FN", "FLOAT8E5M2") and n > 1024:
            low.append((init.name, dtype, list(init.dims), size))
    dt = Table(title="initializers by dtype")
    for col in ("dtype", "tensors", "MiB"):
        dt.add_column(col, justify="left" if col == "dtype" else "right")
    for key, (n, b) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        dt.add_row(key, str(n), f"{b / MiB:.2f}")
    console.print(dt)
    if low:
        q = Table(title="quantized initializers")
        for col in ("name", "dtype", "dims", "bytes"):
            q.add_column(col)
        for name, dtype, dims, size in low[:top]:
            q.add_row(name, dtype, str(dims), f"{size:,}")
        if len(low) > top:
            q.add_row(f"... {len(low) - top} more", "", "", "")
        console.print(q)
    dims = _dynamic_dims(model)
    if dims is not None:
        console.print(dims)


def _dynamic_dims(model: Any) -> Table | None:
    """The dynamic dims of a lowbit ONNX file's inputs: their recorded range and the optimization profile
    ``-b tensorrt`` builds from them by default. A deployment engineer read the profile only from the engine, after
    the build had sized it (SmolLM2's batch max was the capture's 1024). None for another producer's file."""
    import json

    from lowbit.backends.tensorrt.engine import default_dim_profile, profile_range

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        symbols = json.loads(meta.get("lowbit.symbols", "{}"))
        generation = json.loads(meta.get("lowbit.step_limits", "null"))
    except ValueError:
        return None
    used = dict.fromkeys(d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param)
    rows = []
    for name in used:
        sym = symbols.get(name) if isinstance(symbols, dict) else None
        if not isinstance(sym, dict) or not all(isinstance(sym.get(k), (int, type(None))) for k in ("min", "max",
                                                                                                    "hint")):
            continue
        try:
            profile = default_dim_profile(name, sym["min"], sym["max"], sym["hint"],
                                          generation if isinstance(generation, dict) else None)
        except (TypeError, ValueError):  # a hand-edited generation record: the range is still worth showing
            profile = ("?", "?", "?")  # type: ignore[assignment]
        # the least size as the graph runs it: torch.export records 2 for a dim declared from 1
        least, most = profile_range(sym["min"], sym["max"], 2**62)
        rows.append((name, str(sym.get("symbol", "")), f"[{least}, {most}]", *map(str, profile)))
    if not rows:
        return None
    gen = f"; generation max_batch={generation.get('max_batch')}, max_length={generation.get('max_length')}" \
        if isinstance(generation, dict) else ""
    table = Table(title=f"dynamic dims: the sizes the graph takes, and the TensorRT optimization profile -b tensorrt "
                        f"builds by default (max_dim=4096{gen}; --backend-option opt=, max_batch=, shapes= change it)")
    for col in ("dim", "symbol", "graph range", "trt min", "trt opt", "trt max"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


# ---- graph drawing ------------------------------------------------------------------------------

MAX_NESTING = 32
"""Module levels ``lowbit graph`` nests; the rest of a deeper path is one level (HF models nest under 10)."""


def _tree(graph: Any) -> dict[str, Any]:
    """Nested dict of module path segments; nodes sit under ``""`` at their module's level.

    At most ``MAX_NESTING`` levels: the drawers recurse once per level, and a file whose module comment had
    thousands of segments ended ``lowbit graph`` in a RecursionError traceback."""
    root: dict[str, Any] = {"": []}
    for n in graph.nodes:
        cur = root
        segs = [s for s in n.module.split(".") if s] if n.module else []
        if len(segs) > MAX_NESTING:
            segs = segs[:MAX_NESTING - 1] + [".".join(segs[MAX_NESTING - 1:])]
        for seg in segs:
            cur = cur.setdefault(seg, {"": []})
        cur[""].append(n)
    return root


def _count(tree: dict[str, Any]) -> int:
    return len(tree[""]) + sum(_count(v) for k, v in tree.items() if k)


def to_html(graph: Any, title: str) -> str:
    from lowbit.ir.printer import format_node

    def render(tree: dict[str, Any], path: str, depth: int) -> str:
        parts = []
        if tree[""]:
            parts.append("<pre>" + "\n".join(html.escape(format_node(n)) for n in tree[""]) + "</pre>")
        for key, sub in tree.items():
            if not key:
                continue
            full = f"{path}.{key}" if path else key
            ops = Counter(n.op for n in _walk(sub))
            summary = ", ".join(f"{op}×{c}" for op, c in ops.most_common(4))
            parts.append(f"<details{' open' if depth < 1 else ''}><summary><b>{html.escape(full)}</b> "
                         f"<span class=c>({_count(sub)} nodes: {html.escape(summary)})</span></summary>"
                         f"{render(sub, full, depth + 1)}</details>")
        return "\n".join(parts)

    body = render(_tree(graph), "", 0)
    ins = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:20px} details{margin-left:18px;border-left:1px solid #ddd;"
            "padding-left:6px} summary{cursor:pointer} pre{font-size:12px;margin:4px 0 4px 18px} .c{color:#666}"
            f"</style></head><body><h1>{html.escape(title)}</h1><p>graph {html.escape(graph.name)}({html.escape(ins)})"
            f" · {len(graph.nodes)} nodes · {len(graph.params)} params · grouped by module (click to expand)</p>"
            f"{body}<p>return {html.escape(', '.join(repr(v) for v in graph.outputs))}</p></body></html>\n")


def _walk(tree: dict[str, Any]) -> list[Any]:
    out = list(tree[""])
    for k, v in tree.items():
        if k:
            out += _walk(v)
    return out


def to_dot(graph: Any, title: str) -> str:
    """Graphviz: one cluster per module path level, nodes labelled by op, edges along values."""
    ids: dict[int, str] = {}

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(title)} {{", "  rankdir=TB; node [shape=box, fontsize=10, style=rounded];"]

    for i, v in enumerate(graph.inputs):
        ids[id(v)] = f"in{i}"
        lines.append(f"  in{i} [label={q(f'%{v.name}: {v.type}')}, shape=ellipse];")
    counter = [0]

    def emit(tree: dict[str, Any], path: str, indent: str) -> None:
        for n in tree[""]:
            nid = f"n{counter[0]}"
            counter[0] += 1
            for v in n.outputs:
                ids[id(v)] = nid
            lines.append(f"{indent}{nid} [label={q(n.op)[:-1]}\\n%{q(n.name)[1:]}];")
        for key, sub in tree.items():
            if not key:
                continue
            full = f"{path}.{key}" if path else key
            lines.append(f"{indent}subgraph {q('cluster_' + full)} {{ label={q(full)}; style=rounded; color=gray;")
            emit(sub, full, indent + "  ")
            lines.append(f"{indent}}}")

    emit(_tree(graph), "", "  ")
    for n in graph.nodes:
        for v in n.inputs():
            if id(v) in ids and ids[id(v)] != ids.get(id(n.outputs[0])):
                lines.append(f"  {ids[id(v)]} -> {ids[id(n.outputs[0])]};")
    lines.append("  out [label=return, shape=ellipse];")
    for v in graph.outputs:
        if id(v) in ids:
            lines.append(f"  {ids[id(v)]} -> out;")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_graph(file: Path, fmt: str, out: Path | None) -> None:
    from lowbit.passes.base import closest

    if fmt not in ("dot", "html"):
        fail(f"--format {fmt!r}{closest(fmt, ['dot', 'html'])}; give dot or html", Exit.USAGE)
    path, kind = _resolve(file)
    if kind == "onnx":
        fail("lowbit graph draws lowbit IR (.lowbit, a compile output or checkpoint directory); use Netron for ONNX",
             Exit.USAGE)
    graph, has_weights = _read_graph(path, kind)
    title = re.sub(r"\s+", " ", str(path))
    text = to_dot(graph, title) if fmt == "dot" else to_html(graph, title)
    # beside a directory, not inside it: out/model.html made `lowbit compile -o out` refuse to replace out/ (a file
    # lowbit did not write there), breaking README's compile / inspect / graph / compile-again loop
    default = file.expanduser().resolve() if file.is_dir() else path
    target = out or (default.parent / f"{default.name}.{fmt}" if file.is_dir() else path.with_suffix(f".{fmt}"))
    atomic_write_text(target, text)
    console.print(f"wrote {target} ({len(graph.nodes)} nodes, format {fmt})", markup=False, soft_wrap=True)
    _refuse_unverified(path, _verifier_errors(graph, kind, has_weights), f"{target} draws it")
