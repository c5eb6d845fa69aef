"""Engines behind one small interface (`Engine` in base.py). Imported only by workers."""

from workers.engines.base import Engine, GenerationResult, LoadError

ENGINES = {
    "transformers": "workers.engines.transformers_engine.TransformersEngine",
    "vllm": "workers.engines.vllm_engine.VLLMEngine",
    "llamacpp": "workers.engines.llamacpp.engine.LlamaCppEngine",
}


def engine_class(name: str) -> type[Engine]:
    from importlib import import_module

    try:
        path = ENGINES[name]
    except KeyError:
        raise LoadError(f"unknown engine '{name}' (known: {', '.join(ENGINES)})") from None
    module, _, cls = path.rpartition(".")
    return getattr(import_module(module), cls)


__all__ = ["Engine", "GenerationResult", "LoadError", "engine_class"]
