"""Tests of the accountant package: cross-checks, published figures and its laws."""
