"""Calibration: data (``data``), observers (``observers``), the block-by-block engine (``engine``), static
activation scales (``static``), and the weight algorithms built on the engine (GPTQ, AWQ, SmoothQuant)."""
