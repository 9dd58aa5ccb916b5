"""Batch prediction jobs: MC dropout predictions over a dataset or an uploaded CSV, run by the
workers in chunks (a job row of kind ``predict`` in ``runs``), results as CSV or Parquet."""
