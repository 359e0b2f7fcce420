"""The static GPU check (benchmarks/static_check.py): compile-only driver, launch runner, analysis, report."""
