"""Test package (unique module names for same-named test files, e.g. tests/tasks/test_dna.py)."""
