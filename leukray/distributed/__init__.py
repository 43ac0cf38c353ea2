"""The only folder that imports Ray: where work runs (resources and actor pools), the Ray
Data actors and batch functions, the streaming passes, Ray Train and Ray Tune drivers.

Everything here wraps pure code from lower folders (`leukray.ops`, `leukray.models`,
`leukray.data`, `leukray.io`) and is called by `leukray.stages`; nothing here imports a stage.
"""
