"""One module per verb: `extract`, `train`, `tune`, `run` (the three in one job), `predict`,
`screen`; `trunktrain` is `train` when the trunk itself is trained on the cells. A stage
returns a typed result; `run` hands them over in memory, and separate stage jobs rebuild
them from the run folder through `load_extracted` / `load_trained` (`load_trained_trunk`).

May import: every lower folder (`distributed`, `models`, `ops`, `data`, `io`) and `report`.
"""
