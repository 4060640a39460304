"""Data plumbing shared by every task: grain pipelines and the offline corpora they read."""
