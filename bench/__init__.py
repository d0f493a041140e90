"""coleta's benchmark suite: ``make bench`` or ``python -m bench [--quick] [SCENARIO…]``.

Not part of the test suite (pytest only collects ``tests/``). See ``bench/README.md``.
"""
