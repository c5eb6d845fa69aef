"""The llama.cpp engine's constants, and its settings (LLAMACPP_*, read in llmsite/settings.py)."""

import os

DEFAULT_SEQ_TOKENS = 2048  # each request's room in the KV cache (prompt + answer), unless the deployment sets context_length
DEFAULT_KV_MIB = 4096  # at most this much KV cache: fewer sequences run at once where it would take more
# TWO_ROWS: a llama_decode call of one row takes llama.cpp's matrix-vector path, which rounds
# differently from the matrix-matrix path of longer calls (any rows: chunks of a prompt, other
# prompts'): the prompt's last KV row comes out different at f16 rounding, and decoding on Q8_0
# weights turns that into 0.2-0.3 nats on the next tokens (measured), enough to flip an answer's
# near tie. So no prompt ends with a call of one row, and a prompt's answer does not depend on how
# it was chunked (in calls of fewer than TILED_ROWS rows) or what it shared with a kept prefix: the
# same bit for bit (tested).
# TILED_ROWS: llama.cpp's CPU flash attention computes a call of 64 query rows or more (all
# sequences' rows together; GGML_FA_TILE_Q) in a tiled way (f32, 64-cell KV tiles), a smaller call
# row by row (f16): the same row rounds differently in a large call and a small one, by 0.02-0.05
# nats on a prompt's last row (measured). A prompt asked again gets all but its last two rows back
# from the kept or saved rows and computes those two in a small call, so every prompt's last rows
# go in a call of fewer than TILED_ROWS rows (its last FINAL_ROWS at least, where it is longer), and
# a greedy answer asked twice (Regenerate) stays the same however long its prompt, while its rows
# are kept or saved.
TILED_ROWS = 64
FINAL_ROWS = 16
PREFIX_MIN_TOKENS = 8  # a shorter shared prompt prefix is not worth keeping
FILL_GAP_MAX = 3  # free sequence ids between running ones given throwaway rows (LlamaCppScheduler._decode_rows)
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ; the prefill context takes two more than the requests
BATCH_TOKENS = 512  # tokens sent to one llama_decode call (running rows first, then prompt chunks)
DEFAULT_PROMPT_CACHE_MIB = 256  # finished requests' KV rows kept in memory (SavedPrompts)

# The LLAMACPP_* settings where no Django settings are configured (a script without the site).
DEFAULTS = {
    "LLAMACPP_THREADS": None,  # every core this process may use (default_threads)
    "LLAMACPP_SEQ_TOKENS": DEFAULT_SEQ_TOKENS,
    "LLAMACPP_KV_MIB": DEFAULT_KV_MIB,
    "LLAMACPP_PREFILL": "f16",
    "LLAMACPP_DECODE": "q8_0",
    "LLAMACPP_PREFIX_CACHE": True,
    "LLAMACPP_PROMPT_CACHE_MIB": DEFAULT_PROMPT_CACHE_MIB,
}


def setting(name: str):
    """django.conf.settings' value of an LLAMACPP_* setting, or its default (DEFAULTS) where Django
    has no settings module or that one does not set it."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        return getattr(settings, name)
    except (ImproperlyConfigured, AttributeError):
        return DEFAULTS[name]


def count_setting(name: str) -> int:
    """A size or count setting: at least 1."""
    return max(1, setting(name))


def default_threads() -> int:
    """LLAMACPP_THREADS, else every core this process may use. Measured with `make bench` on an
    otherwise idle 2-core machine (the web tier, Redis and the worker sharing it): 2 threads give
    60 tok/s through the predict API for one stream and 119 for 32, 1 thread 44 and 56. llama.cpp's
    threads spin at every barrier, so on a machine crowded with other work 1 thread can be faster
    (seen under a load average of 9: 21.6 tok/s with 1 thread, 2.7 with 2)."""
    threads = setting("LLAMACPP_THREADS")
    return max(1, threads) if threads is not None else len(os.sched_getaffinity(0))
