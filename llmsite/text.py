"""Client text as PostgreSQL can store it, for the web tier and the workers alike."""


def storable(value):
    """PostgreSQL text and jsonb refuse NUL characters: the stored copy shows them as U+FFFD (in
    strings, and in the lists and dicts, keys too, that hold them)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    return value
