"""Fluoroscopy simulator for vertebral cement injection (numpy + OpenCV + SciPy, no torch).

`python -m models.sim OUTDIR --count N --seed S` writes loops exactly as
../shared/spec/recorded-loops.md describes, with masks and leak onsets computed from the
masks by the spec's definition.
"""

from models.sim.loop import LoopConfig, SimulatedLoop, simulate, write_loop

__all__ = ["LoopConfig", "SimulatedLoop", "simulate", "write_loop"]
