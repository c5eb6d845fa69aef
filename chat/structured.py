"""Structured outputs: an OpenAI `response_format` compiled to the grammar the workers enforce.

The web tier compiles and checks the grammar with llguidance (torch-free) before anything is
queued, so a schema it cannot compile is the client's 400 naming the problem, and the workers get
a grammar (contract SamplingParams.grammar) they can build a token mask from at every step.
"""

import json

import llguidance

from llmsite.errors import InvalidRequest

PARAM = "response_format"

# The JSON is written compactly with a space after ',' and ':' (no free whitespace): a small
# model given free whitespace can write newlines until its tokens run out, never closing the JSON.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

ANY_OBJECT = {"type": "object"}


def grammar_for(kind: str, schema: dict | None = None) -> str:
    """The llguidance grammar for a response format (`text`: "", none), checked; raises
    InvalidRequest (param `response_format`) naming what llguidance could not compile."""
    if kind == "text":
        return ""
    if kind == "json_object":
        return compile_schema(ANY_OBJECT)
    if kind == "json_schema":
        return compile_schema(True if schema is None else schema, where="json_schema.schema")
    raise InvalidRequest(f"{PARAM}.type: unknown type '{kind}'", param=PARAM)


def compile_schema(schema, where: str = "schema") -> str:
    """A JSON schema as a checked llguidance grammar (JSON_OPTIONS unless the schema's own
    `x-guidance` says otherwise)."""
    if schema is True:
        schema = {}  # any JSON
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{PARAM}.{where}: must be a JSON schema object (`false` matches nothing)", param=PARAM)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"{PARAM}.{where}: {exc}", param=PARAM) from None
    check(grammar, where)
    return grammar


def check(grammar: str, where: str = "schema") -> None:
    """Raise InvalidRequest where llguidance cannot build a matcher from `grammar`."""
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidRequest(f"{PARAM}.{where}: the schema cannot be compiled: {problem}", param=PARAM)
