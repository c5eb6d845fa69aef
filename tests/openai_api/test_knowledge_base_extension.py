"""The `knowledge_base` extension of chat completions answers from documents, with sources."""

from openai import OpenAI

from tests.knowledge.test_grounded_answers import FACTS, library  # noqa: F401  (module fixture)


def test_chat_completion_with_knowledge_base_answers_from_it_with_sources(stack, library):  # noqa: F811
    token, kb = library
    name, _, question, answer = FACTS[0]
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=token)
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=32,
        extra_body={"knowledge_base": kb.name},
    )
    assert answer in completion.choices[0].message.content
    sources = completion.model_extra["sources"]
    assert sources[0]["document"] == name
