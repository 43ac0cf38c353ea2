"""leukray: acute lymphoblastic leukaemia screening of blood-cell microscopy on Ray.

The library imports and runs without a cluster; `jobs/` holds thin `ray job submit` entry
points and `leukray.cli` the `leukray` command.
"""

__version__ = "0.1.0"
