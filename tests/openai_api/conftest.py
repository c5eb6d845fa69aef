import pytest
from openai import OpenAI


@pytest.fixture
def client(stack, token):
    """The official client pointed at the site, with no retries (a retry would hide a 429 or 5xx)."""
    return OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=180)
