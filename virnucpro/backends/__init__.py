"""Stage backends: DNABERT-S on nucleotide files, ESM-2 on protein files, the synthetic stand-in, the tiny models.

Importing this package imports no torch; each model backend module does when
it is imported, so the broker and the synthetic worker never pay for it.
"""
