"""Reading and writing: storage (local paths and URIs), tables (JSON/CSV/Parquet and the
log line), feature files and the run folder's records.

May import: the standard library, numpy, pandas, pyarrow, yaml, and `leukray.config`,
`leukray.errors`. Never Ray, torch or any higher leukray folder.
"""
