"""The VirNucPro method in the order data flows: FASTA reading, sequences, merge, classifier, outputs.

Also the weight table and weighted placement (gpu_weights) and the static
file assignment (base_worker), which the broker and the clients share.
"""
