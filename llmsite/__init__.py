import os

# llama.cpp's (and torch's) OpenMP threads keep spinning after each parallel region, about
# 300,000 spins by default: some 20 ms of a core after every decode step, taken from the web tier,
# Redis and the worker's own token publishing on a small machine. 10,000 keeps the spin across
# llama.cpp's barriers inside a step (fewer slowed a step down, measured) and sleeps between steps.
# Read once, when the OpenMP runtime loads: so here, before any model code is imported.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# Where a process holds more OpenMP threads than CPUs (two llama.cpp engines in one worker: a thread
# team each), libgomp spins only 100 times, or 1,000 under OMP_WAIT_POLICY=ACTIVE, before it sleeps,
# and waking at every barrier ran an engine at a third of its speed: 68 tok/s alone, 26 once a
# second engine was loaded, idle; with ACTIVE 72-89 (measured in-process). GOMP_SPINCOUNT above
# still bounds the spin otherwise (an idle worker: 0% CPU, measured).
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
