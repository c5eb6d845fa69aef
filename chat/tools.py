"""Tool calling on /v1/chat/completions: checking `tools`, `tool_choice` and the tool turns of a
conversation, the grammar that constrains `required` and named calls, and how a model family
writes its calls (the chat template's own tool format) for `auto`.

`plan_tools` decides everything before anything is queued (a 400 naming the field otherwise);
`chat.tool_calls` turns the answer's text back into OpenAI's `tool_calls`.
"""

import json
from dataclasses import dataclass, field

from llmsite.errors import InvalidRequest

# Under `required` with parallel calls allowed, one answer holds at most this many calls (a small
# model may otherwise keep adding calls until its tokens run out).
MAX_PARALLEL_CALLS = 4

# A string the schema leaves unbounded is cut at this many characters (the call stays valid against
# the schema): a small model can otherwise go on inside a string until its tokens run out.
MAX_STRING_CHARS = 256

# Compact JSON: whitespace a model could add without end is not allowed between tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass
class ToolPlan:
    """How one request uses its tools.

    mode: "none" (no tools, or tool_choice none: a plain answer), "auto" (the model may call them,
    in its family's format: `syntax`), "required" (one or more calls, constrained), or "named"
    (one call of `named`, constrained: the answer is its arguments)."""

    mode: str = "none"
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, for the template
    named: str = ""
    parallel: bool = True
    grammar: str = ""
    syntax: str = ""  # auto: "hermes" (Qwen2/2.5), "llama3" (Llama-3.1 JSON), "mistral" ([TOOL_CALLS])

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]


def tool_syntax(template: str | None) -> str:
    """The tool-call format a chat template writes and reads ("" for a template with none)."""
    if not template or not _uses_tools(template):
        return ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return ""


def _uses_tools(template: str) -> bool:
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except TemplateSyntaxError:
        return False


def plan_tools(*, tools: list[dict], tool_choice, parallel: bool | None, template: str | None, model: str) -> ToolPlan:
    """Check the request's tools and tool_choice and decide how they are used; InvalidRequest
    naming the field where they cannot be. `template`: the Jinja chat template the deployment
    renders with (None where the web tier cannot tell yet)."""
    _check_names(tools)
    if tool_choice is not None and not tools:
        raise InvalidRequest("tool_choice: only allowed when tools are given.", param="tool_choice")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return ToolPlan()
    # Constrained calls come one at a time unless the client asks for parallel ones: a small model
    # would otherwise repeat its call (auto reads as many calls as the family's format holds).
    plan = ToolPlan(tools=tools, parallel=parallel is True)
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in plan.names:
            known = ", ".join(plan.names)
            raise InvalidRequest(f"tool_choice: no tool named '{name}' in tools (there are: {known}).", param="tool_choice")
        plan.mode, plan.named = "named", name
        plan.grammar = compile_grammar(_parameters_schema(tools, name), param=f"tools[{plan.names.index(name)}].function.parameters")
    elif choice == "required":
        plan.mode = "required"
        plan.grammar = compile_grammar(calls_schema(tools, parallel=plan.parallel), param="tools")
    else:
        plan.mode, plan.syntax = "auto", tool_syntax(template)
        if not plan.syntax:
            raise InvalidRequest(
                f"tool_choice: the model '{model}' has no tool-call format in its chat template, so it cannot "
                "choose tools itself ('auto'); use tool_choice 'required' or a named function (constrained).",
                param="tool_choice",
            )
    return plan


def _check_names(tools: list[dict]) -> None:
    seen = set()
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise InvalidRequest(f"tools[{i}].function.name: '{name}' is given twice.", param=f"tools[{i}].function.name")
        seen.add(name)
        if not isinstance(tool["function"].get("parameters") or {}, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters: must be a JSON schema object.", param=f"tools[{i}].function.parameters")
        # Each schema on its own, so that a bad one is named by its place.
        if tool["function"].get("parameters"):
            compile_grammar(_parameters_schema(tools, name), param=f"tools[{i}].function.parameters")


def _parameters_schema(tools: list[dict], name: str) -> dict:
    tool = next(t for t in tools if t["function"]["name"] == name)
    return closed(tool["function"].get("parameters") or {"type": "object", "properties": {}})


def calls_schema(tools: list[dict], *, parallel: bool) -> dict:
    """One or more calls (at most one without parallel calls): [{"name": ..., "arguments": {...}}]."""
    call_kinds = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": _parameters_schema(tools, name)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in (t["function"]["name"] for t in tools)
    ]
    return {"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1, "items": {"anyOf": call_kinds}}


def closed(schema):
    """The schema with `additionalProperties: false` on objects that list their properties and
    say nothing of others, and unbounded strings bounded: every answer it allows is valid against
    the original, and a small model cannot wander off into properties nobody asked for or ramble
    inside a string until its tokens run out."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("const", "enum", "default", "examples") else closed(v)) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if schema.get("type") == "string" and not {"maxLength", "enum", "const", "pattern", "format"} & set(schema):
        out["maxLength"] = MAX_STRING_CHARS
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: closed(s) for name, s in schema["properties"].items()}
    return out


def compile_grammar(schema: dict, *, param: str) -> str:
    """The llguidance grammar for JSON valid against `schema` (checked here, without a tokenizer:
    a schema the library cannot compile is a 400 naming `param`)."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as exc:  # the compiler's own refusal of what a client sent, whatever its kind
        raise InvalidRequest(f"{param}: not a JSON schema the server can enforce: {exc}", param=param) from None
    if is_error:
        raise InvalidRequest(f"{param}: not a JSON schema the server can enforce: {messages[0]}", param=param)
    return grammar


# --- the conversation's tool turns -------------------------------------------------------------


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as chat templates take them (HF's convention: an assistant turn's calls with
    their arguments as objects; a tool turn with its `tool_call_id`), checked: every tool turn
    answers a call made earlier, and every call's arguments are JSON. Messages are OpenAI's
    (dicts of the request's fields)."""
    called: set[str] = set()
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(message["tool_calls"])]
            called.update(call["id"] for call in message["tool_calls"])
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            if not call_id or call_id not in called:
                raise InvalidRequest(
                    f"messages[{i}].tool_call_id: {call_id!r} answers no tool call of an earlier assistant message.",
                    param=f"messages[{i}].tool_call_id",
                )
        out.append(message)
    return out


def _template_call(call: dict, where: str) -> dict:
    arguments = call["function"].get("arguments") or "{}"
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise InvalidRequest(f"{where}.function.arguments: not valid JSON.", param=f"{where}.function.arguments") from None
    return {"id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": parsed}}


def plain_messages(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """The messages for a chat template with no tool format: calls written into the assistant's
    text as JSON, tool results as turns of role "tool" (ChatML-style templates render any role),
    and the tools (only constrained modes get here with tools) listed in the system prompt."""
    out = [{"role": "system", "content": _tools_hint(tools)}] if tools else []
    for message in messages:
        content = message.get("content") or ""
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]
            content = (content + "\n" if content else "") + json.dumps(calls, ensure_ascii=False)
        if out and out[-1]["role"] == "system" and message["role"] == "system" and len(out) == 1 and tools:
            out[0]["content"] = content + "\n\n" + out[0]["content"]  # the client's system prompt first
            continue
        out.append({"role": message["role"], "content": content})
    return out


def _tools_hint(tools: list[dict]) -> str:
    lines = [json.dumps(tool["function"], ensure_ascii=False) for tool in tools]
    return "You call functions. They are, as JSON schemas:\n" + "\n".join(lines) + "\nAnswer with the call's arguments as JSON."


def plan_request(*, deployment, body) -> ToolPlan | None:
    """Plan a chat request's tools against the template its deployment renders with (None for a
    request without tools)."""
    if not body.tools and body.tool_choice is None:
        return None
    return body.plan_tools(template=deployment_template(deployment))


def deployment_template(deployment) -> str | None:
    """The Jinja chat template a deployment renders with (None while no worker published its tokenizer)."""
    from chat.chat_formats import template_for
    from chat.prompting import deployment_tokenizer

    template = template_for(deployment.model_type, deployment.chat_template)
    if template:
        return template
    tokenizer = deployment_tokenizer(deployment)
    return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
