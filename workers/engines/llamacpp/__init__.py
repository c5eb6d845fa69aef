"""The llama.cpp engine: GGUF models on CPUs, at llama.cpp's own speed, with continuous batching.

One scheduler thread owns a llama.cpp context with room for up to `max_batch_size` sequences (one
sequence id per request, each with its own stream of the KV cache, LLAMACPP_SEQ_TOKENS or the
deployment's context_length long, within LLAMACPP_KV_MIB). Each step sends ONE batch to `llama_decode`: the next
token of every running request plus a chunk of the prompts that are joining, so requests join and
leave between steps and a long prompt never stalls the running streams for long. Sampling, stop
tokens and the token/text stream are the same as the transformers engine's (`QueuedEngine`), and
so is the tokenizer (transformers' tokenizer read from the same GGUF file), so prompts, token
counts and chat templates do not depend on the engine.

The prefill context keeps the KV rows of the prompt prefix that consecutive prompts shared (the
chat template's header and a system prompt, or the earlier turns of one conversation) under a
sequence id of its own: a prompt that starts with it gets those rows by reference
(`llama_memory_seq_cp`, no arithmetic) and prefills only the rest (LLAMACPP_PREFIX_CACHE=0: off).
Finished requests' KV rows (prompt and answer) are also kept in memory, up to
LLAMACPP_PROMPT_CACHE_MIB (`SavedPrompts`): the next turn of a conversation starts with the whole
of the turn before, and gets those rows back by a copy instead of prefilling the conversation again.

The engine in modules: `engine` (LlamaCppEngine: tokenizer, contexts and scheduler sized from the
deployment; the mixed precision of prefill and decoding), `scheduler` (LlamaCppScheduler, a
`workers.engines.scheduling.Scheduler`: admission, the decode and prefill calls), `prefix` (the
kept prefix and saved prompts in the prefill context), `saved` (SavedPrompts), `model`
(LlamaCppModel, llama-cpp-python's C API) and `config` (constants and the LLAMACPP_* settings).
No module here imports torch: the sampling of a request that is not greedy does, when it runs.
"""
