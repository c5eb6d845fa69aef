"""LangChain's own standard integration suites (langchain-tests), with ChatOpenAI and OpenAIEmbeddings
pointed at the site. Tool calling and tool_choice are on, and structured output through function
calling (a named tool_choice: constrained); JSON mode and non-text inputs are declared unsupported.
Answers are capped short so the suites stay quick; tool and structured-output answers get room for
their JSON. The default model's chat template has no tool format, so the tests that bind tools
without a tool_choice (`auto`) get the site's 400 for that (the README lists them).
"""

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests

SITE: dict = {}


@pytest.fixture(autouse=True)
def _site(stack, token):
    """Runs before the suites' `model` fixture: where the site is, and a token for it."""
    SITE.update(base_url=f"{stack.url}/v1", api_key=token)


class TestChatOpenAIOnTheSite(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict:
        return {"model": "default", "max_tokens": 6, "max_retries": 0, "timeout": 300, "stream_usage": True, **SITE}

    @pytest.fixture
    def model(self, request) -> BaseChatModel:
        """The suite's model, with room for a call's or a structured answer's JSON where the test makes one."""
        params = {**self.standard_chat_model_params, **self.chat_model_params, **(getattr(request, "param", None) or {})}
        if any(word in request.node.name for word in ("tool", "structured", "agent")):
            params["max_tokens"] = 400
        return self.chat_model_class(**params)

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict:
        return {"method": "function_calling"}  # a named tool_choice: constrained to the schema

    @property
    def supports_json_mode(self) -> bool:
        return False


class TestOpenAIEmbeddingsOnTheSite(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self):
        return OpenAIEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        # The site takes text, not tiktoken ids: no client-side chunking by OpenAI's tokenizer.
        return {"model": "default", "check_embedding_ctx_length": False, "max_retries": 0, **SITE}
