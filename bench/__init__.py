"""facekd benchmarks: each module measures ratios side by side in one run and writes its
table to ``bench/results/``. ``python -m bench`` lists them; ``python -m bench NAME`` runs one."""
