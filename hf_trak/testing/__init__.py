"""What the tests and benchmarks share, by purpose: tiny random-init models (``models``), small splits made here or
shipped by packages (``datasets``), the environment of launched processes (``processes``), the digits LDS harness
(``lds``) and the float64 TRAK reference with its parity cases (``reference``).

Needs the ``dev`` extra (scikit-learn); ``import hf_trak`` does not load this package.
"""
