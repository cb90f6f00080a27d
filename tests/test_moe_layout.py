"""A mixture-of-experts family lowbit covers, from a transformers whose experts module is not the fused layout
``lowbit.models.DenseExperts`` slices: refused by name. Not gated on that layout (``tests/test_moe.py`` and the
other MoE modules skip where it is missing: ``conftest.needs_fused_experts``): this is the test that runs there."""

from __future__ import annotations

import re

import pytest

import lowbit
from lowbit.ir.capture import CaptureError

transformers = pytest.importorskip("transformers")
from test_moe import _tiny  # noqa: E402


def test_a_covered_family_whose_transformers_experts_layout_differs_is_refused_naming_it(monkeypatch):
    """Mixtral from a transformers whose experts module is not the fused layout ``DenseExperts`` slices (the GPU
    machine's transformers 5.17, session 52: every MoE test failed at capture there): refused before tracing,
    naming the module, this transformers' version and the one that writes the layout - not the generic "densely for
    Mixtral, ... only", which named Mixtral among the covered families while refusing it."""
    import lowbit.models as models

    monkeypatch.setattr(models, "_fused_experts", lambda module: False)  # the experts as another transformers has them
    model = _tiny("mixtral")
    with pytest.raises(CaptureError, match=rf"MixtralForCausalLM is a mixture-of-experts model .*transformers "
                       rf"{re.escape(transformers.__version__)} gives model\.layers\.0\.mlp\.experts as "
                       r"\w+ of another layout.*install transformers 5\.25"):
        lowbit.compile_model(model)
