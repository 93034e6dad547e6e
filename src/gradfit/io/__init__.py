"""Tables in (CSV/TSV/text/Parquet/npz) and files out (written atomically)."""
