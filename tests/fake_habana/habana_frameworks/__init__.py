"""Fake ``habana_frameworks`` for the CPU test-suite (see tests/fake_habana/README.md). Never shipped."""

__fake__ = True
