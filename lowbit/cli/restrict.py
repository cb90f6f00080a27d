"""Apply a pass to only some layers: the common handle ``debug bisect`` and ``debug sensitivity`` use.

Passes declare their scope through one common option, so restriction is done by rewriting it, and the
restricted pass prints as ordinary pipeline text (the reproduce command is just a pipeline):

* ``modules`` (``lowbit.passes.base.ScopedOptions``: a regex searched in module paths; the quantizers, the
  pruning passes, ``fold-norms`` and the fusions: docs/design.md "Scope" lists them) is set to the units' regex,
  combined with any regex it already had;
* a pass without a scope but with a ``keep`` option (module globs kept float) gets every *other* unit added;
* a pass with neither cannot be restricted, and the tools say so.

``keep_float`` (``lowbit compile --overrides``) still writes a ``QuantConfig`` for ``quantize``: an override
file's decision is "keep these float", which is the config's ``keep_float``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lowbit.ir.graph import Graph, blocks
from lowbit.passes.manager import build_pass


CONFIG_REPLACES = ("w", "group", "sym", "w_obs", "a", "a_gran", "a_group", "a_sym", "a_obs", "kv", "k_gran",
                   "v_gran", "kv_group", "kv_sym", "kv_window", "keep", "config")
"""quantize options a QuantConfig file carries; dropped from the spec when a restricted config replaces them."""


@dataclass(frozen=True)
class Unit:
    """A set of nodes a pass can be restricted to: a block (``model.layers.3``) or one linear's module path."""

    name: str
    regex: str
    glob: str


def block_units(graph: Graph) -> list[Unit]:
    return [Unit(r.prefix, rf"^{re.escape(r.prefix)}\b", f"{r.prefix}.*") for r in blocks(graph)]


def linear_units(graph: Graph) -> list[Unit]:
    """Every linear inside a block, by module path (lm_head and embeddings stay out: they are kept float)."""
    inside = {id(n) for r in blocks(graph) for n in r.nodes}
    seen: dict[str, Unit] = {}
    for n in graph.nodes:
        if n.op == "linear" and id(n) in inside and n.module and n.module not in seen:
            seen[n.module] = Unit(n.module, rf"^{re.escape(n.module)}$", n.module)
    return list(seen.values())


def _config_from_options(p: Any) -> Any | None:
    """The pass module's ``config_from_options`` (quantize's annotation), if it has one."""
    import sys

    return getattr(sys.modules.get(type(p).__module__), "config_from_options", None)


def how_restricted(p: Any) -> str | None:
    """``modules`` (the common scope, ``ScopedOptions``) or ``keep``: the option through which ``p`` can be
    restricted, or None."""
    fields = type(p).Options.model_fields
    if "modules" in fields:
        return "modules"
    if "keep" in fields:
        return "keep"
    return None


def _write_config(data: dict[str, Any]) -> str:
    """Validate and store a QuantConfig content-addressed in the user cache; returns its path."""
    import hashlib
    import json

    from lowbit.cache import atomic_file, cache_dir
    from lowbit.ir.qscheme import QuantConfig

    QuantConfig.model_validate(data)  # fail here, not inside the pass
    text = json.dumps(data, indent=1, sort_keys=True)
    path = cache_dir("restrict") / f"quantize-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not path.is_file():
        with atomic_file(path) as tmp:
            tmp.write_text(text + "\n")
    return str(path)


def keep_float(p: Any, globs: list[str], graph: Graph) -> Any | None:
    """A copy of ``p`` that also keeps the linears matching ``globs`` float (an override file's decision).

    Through ``config`` (only patterns that match a linear in ``graph`` are written, since quantize rejects a
    user pattern that matches nothing) or by extending ``keep``; None if ``p`` has neither.
    """
    from lowbit.ir.qscheme import module_matches

    opts = p.options.model_dump(exclude_unset=True)  # a copy keeps what was given as given (batch_size_for reads it)
    if "config" in type(p).Options.model_fields and _config_from_options(p):
        cfg = _config_from_options(p)(p.options)
        linears = {n.module for n in graph.nodes if n.op == "linear"}
        wanted = list(dict.fromkeys(list(cfg.keep_float) + list(globs)))
        data = cfg.model_dump(mode="json", exclude_none=True)
        data["keep_float"] = [g for g in wanted if any(module_matches(m, g) for m in linears)]
        opts = {k: v for k, v in opts.items() if k not in CONFIG_REPLACES}
        opts["config"] = _write_config(data)
    elif "keep" in type(p).Options.model_fields:
        opts["keep"] = list(dict.fromkeys(list(opts.get("keep") or []) + list(globs)))
    else:
        return None
    return build_pass(type(p), opts)


def units_in_scope(p: Any, units: list[Unit], graph: Graph) -> list[Unit]:
    """The units ``p``'s own ``modules`` scope reaches. Restricted to another one (block 0 of a pass given
    ``modules=layers\\.1\\.``) its scope matches no module, which the PassManager refuses: sensitivity and bisect
    stopped there with exit 4."""
    own = getattr(p.options, "modules", "") if how_restricted(p) == "modules" else ""
    if not own:
        return units
    modules = {n.module for n in graph.nodes if n.module}
    return [u for u in units if any(re.search(u.regex, m) and re.search(own, m) for m in modules)]


def restrict(p: Any, chosen: list[Unit], all_units: list[Unit]) -> Any | None:
    """A copy of pass ``p`` that applies only to ``chosen``; None if ``p`` has no option to restrict it with."""
    how = how_restricted(p)
    if how is None:
        return None
    opts = p.options.model_dump(exclude_unset=True)  # a copy keeps what was given as given (batch_size_for reads it)
    if how == "modules":
        names = "|".join(u.regex.lstrip("^") for u in chosen) or r"(?!)"
        rx = f"^({names})" if chosen else r"(?!)"
        old = opts.get("modules") or ""
        # the old scope in a group of its own: 'down_proj|up_proj' unwrapped made 'up_proj' a branch of the
        # lookahead anchored at the start of the path, so restricted up_projs silently stayed unquantized
        opts["modules"] = f"(?=.*(?:{old})){rx}" if old else rx
    else:
        chosen_names = {u.name for u in chosen}
        keep = list(opts.get("keep") or [])
        keep += [u.glob for u in all_units if u.name not in chosen_names and u.glob not in keep]
        opts["keep"] = keep
    return build_pass(type(p), opts)
