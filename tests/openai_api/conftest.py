import pytest
from openai import OpenAI


@pytest.fixture
def client(stack, token):
    """The official client pointed at the site, with no retries (a retry would hide a 429 or 5xx)."""
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=180)


# LangChain's standard tests that fail here, and why (the README lists them too). The default
# model's chat template has no tool format, so a request that binds tools without a tool_choice
# (`auto`) gets the site's 400 saying so: those fail every time (strict). SmolLM2-135M makes a
# valid, schema-constrained call in `test_tool_calling` but fills in the wrong value, which a
# seedless sample could in principle get right (not strict); likewise the Japanese name that
# `test_unicode_tool_call_integration` asks it to copy into its call.
_TOOLS_AUTO = "tools bound without tool_choice ('auto'): SmolLM2's chat template has no tool format, so the site answers 400"
LANGCHAIN_KNOWN_FAILURES = {
    "test_tool_message_histories_string_content": (_TOOLS_AUTO, True),
    "test_tool_message_histories_list_content": (_TOOLS_AUTO, True),
    "test_tool_message_error_status": (_TOOLS_AUTO, True),
    "test_agent_loop": (_TOOLS_AUTO, True),
    "test_tool_calling": ("a 135M model's call is valid against the schema but its argument value is wrong", False),
    "test_tool_calling_async": ("a 135M model's call is valid against the schema but its argument value is wrong", False),
    "test_bind_runnables_as_tools": (
        "the call to the runnable-made tool is valid against its schema, but the 135M model once left "
        "answer_style empty ('' in the clean-clone run of 2026-12-05; greedy, it filled it in every run before)",
        False,
    ),
    "test_unicode_tool_call_integration": (
        "a 135M model copies the Chinese name into its (schema-valid) call, but not always the Japanese one: "
        "it wrote 'アマティッカー' for 'こんにちは株式会社' here and in CI, and copied it in another run",
        False,
    ),
}


def pytest_collection_modifyitems(items):
    for item in items:
        known = LANGCHAIN_KNOWN_FAILURES.get(getattr(item, "originalname", ""))
        if known and item.cls is not None and item.cls.__name__ == "TestChatOpenAIOnTheSite":
            reason, strict = known
            item.add_marker(pytest.mark.xfail(reason=reason, strict=strict))
