"""The last stages of the DAG: the paper's tables and figures regenerated from
the metrics files of the runs, beside the published numbers, and REPORT.md."""
