"""LangChain's own standard integration suites (langchain-tests), with ChatOpenAI and OpenAIEmbeddings
pointed at the site. Tool calling, structured output, JSON mode and non-text inputs are declared
unsupported (the site serves none of them); answers are capped short so the suites stay quick.
"""

import pytest
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

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

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
