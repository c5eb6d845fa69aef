import os

# llama.cpp's (and torch's) OpenMP threads keep spinning after each parallel region, about
# 300,000 spins by default: some 20 ms of a core after every decode step, taken from the web tier,
# Redis and the worker's own token publishing on a small machine. 10,000 keeps the spin across
# llama.cpp's barriers inside a step (fewer slowed a step down, measured) and sleeps between steps.
# Read once, when the OpenMP runtime loads: so here, before any model code is imported.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
