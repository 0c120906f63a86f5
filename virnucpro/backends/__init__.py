"""Embedding backends: DNABERT-S on nucleotide files, ESM-2 on protein files, and the tiny test models.

Importing this package imports no torch; each backend module does when it is
imported, so the broker and the synthetic worker never pay for it.
"""
