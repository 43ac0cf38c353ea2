"""Which images a run reads: discovery of dataset layouts, duplicates, subjects, the
manifest and the subject-level splits.

May import: numpy, pandas, `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.ops`.
"""
