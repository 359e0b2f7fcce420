"""Tooling around the library, not used by it: the command line (``python -m fusedres``, ``cli``), the
CPU verification (``verify``), timing cases (``measure``, ``layers``), model shapes (``shapes``) and
host launch counts (``counts``). The benchmark suite in ``benchmarks/`` and the tests import these;
nothing in the core ``fusedres`` package does. Importing this package imports nothing else.
"""
