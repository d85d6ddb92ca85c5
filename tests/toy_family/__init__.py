"""A test-only model family ("toy"): one model file and one runtime family module, registered at run time, to
show that adding a family touches nothing else (tests/test_families.py)."""
