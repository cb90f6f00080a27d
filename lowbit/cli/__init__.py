"""The ``lowbit`` command line (``lowbit.cli.main:app``): compile, and debug what each pass costs.

Modules: ``main`` (the typer app and the compile/inspect/graph/replay commands), ``common`` (exit codes, model
loading with ``NAME:N`` slices, pipelines, atomic outputs), ``probes`` (real inputs, per-block outputs, end metric),
``compare``/``report_html`` (``debug compare``), ``bisect`` (``debug bisect``), ``sensitivity`` (``debug
sensitivity``), ``restrict`` (apply a pass to some layers only), ``reuse`` (bisect's and sensitivity's runs share
the reference's block boundaries and dequantized weights), ``reproducer`` (``--reproducer``, ``replay``),
``inspect`` (``inspect``, ``graph``), ``artifacts`` (the model.lowbit + params.safetensors form).
"""
