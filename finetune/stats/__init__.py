"""Numbers about predictions: per-class metrics and reports, intervals and paired tests."""
