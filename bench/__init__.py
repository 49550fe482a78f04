"""graft's benchmark harness: load generator, peers, reports -> BENCHMARKS.md.

`python -m bench [--quick] [--only SECTION,...]`; see bench/README.md.
"""

from service.tfenv import quiet_tensorflow

quiet_tensorflow()  # every bench process that imports TensorFlow gets graft's quiet start-up
