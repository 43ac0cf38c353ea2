"""Tools beside the pipeline: the benchmark (`python -m leukray.bench`) and the synthetic
C-NMC-style data generator (`leukray synth`).

May import: anything below `leukray.stages`.
"""
