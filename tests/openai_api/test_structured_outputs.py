"""Structured outputs (issue 21): `response_format` on /v1/chat/completions and /v1/completions,
through the official client, on the default model (llama.cpp). The constraint, not the prompt,
makes the JSON valid: the prompts here do not even ask for JSON."""

import enum
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import pytest
import requests
from pydantic import BaseModel, Field

from chat.models import Deployment, RequestLog


class Difficulty(str, enum.Enum):
    easy = "easy"
    medium = "medium"
    hard = "hard"


class Ingredient(BaseModel):
    name: str = Field(max_length=20)
    grams: int = Field(ge=0, le=1000)


class Recipe(BaseModel):
    """Nested objects, arrays, enums, all fields required; strings and arrays bounded so that any
    valid answer fits in 400 tokens."""

    title: str = Field(max_length=40)
    cuisine: Literal["italian", "french", "japanese", "other"]
    difficulty: Difficulty
    vegetarian: bool
    ingredients: list[Ingredient] = Field(min_length=1, max_length=3)
    steps: list[Annotated[str, Field(max_length=40)]] = Field(max_length=2)


DISHES = [
    "pancakes", "ramen", "ratatouille", "pizza", "sushi", "omelette", "lasagna", "miso soup", "crepes",
    "risotto", "tempura", "quiche", "gnocchi", "onigiri", "bouillabaisse", "pesto pasta", "udon",
    "croissants", "tiramisu", "a green salad",
]


def recipe_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "Recipe", "schema": Recipe.model_json_schema(), "strict": True}}


def post(stack, token, body: dict, path="/v1/chat/completions") -> requests.Response:
    return requests.post(f"{stack.url}{path}", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=180)


@pytest.fixture(params=["llamacpp", "transformers"])
def engine_model(request, stack):
    """The default model on each engine: `default` itself (llama.cpp), or a copy of it on the
    transformers engine, served by the same worker (it loads the copy on first use)."""
    default = Deployment.objects.get(name="default")
    if default.engine == request.param:
        yield default.name
        return
    copy = Deployment.objects.get(name="default")
    copy.pk, copy.name, copy.engine = None, f"{request.param}-{uuid.uuid4().hex[:8]}", request.param
    copy.save()
    yield copy.name
    Deployment.objects.filter(pk=copy.pk).update(enabled=False)


def test_twenty_sampled_recipes_all_parse_against_the_schema(client, engine_model):
    """Sixteen at a time (a user's most waiting requests, `max_waiting_per_user`): the engine
    decodes them in one batch, each row under its own grammar."""

    def ask(seed: int, dish: str):
        return client.chat.completions.parse(
            model=engine_model,
            messages=[{"role": "user", "content": f"How do I make {dish}?"}],
            response_format=Recipe,
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        completions = list(pool.map(ask, range(len(DISHES)), DISHES))
    for dish, completion in zip(DISHES, completions):
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", f"{dish}: {choice.finish_reason}: {choice.message.content!r}"
        assert isinstance(choice.message.parsed, Recipe), choice.message.content
        assert len(choice.message.parsed.ingredients) in (1, 2, 3)


def test_json_object_is_any_json_object_on_both_endpoints(stack, token):
    body = {"model": "default", "temperature": 1.0, "seed": 3, "max_tokens": 200, "response_format": {"type": "json_object"}}
    chat = post(stack, token, {**body, "messages": [{"role": "user", "content": "Tell me about cats."}]})
    assert chat.status_code == 200, chat.text
    assert isinstance(json.loads(chat.json()["choices"][0]["message"]["content"]), dict)
    text = post(stack, token, {**body, "prompt": "Tell me about dogs."}, path="/v1/completions")
    assert text.status_code == 200, text.text
    assert isinstance(json.loads(text.json()["choices"][0]["text"]), dict)


def test_a_streamed_structured_answer_streams_in_pieces_that_parse_whole(client):
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "How do I make soup?"}],
        response_format=recipe_format(),
        temperature=1.0,
        seed=7,
        max_tokens=400,
        stream=True,
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    assert len([p for p in pieces if p]) > 3  # it streamed, not one piece at the end
    Recipe.model_validate_json("".join(pieces))


@pytest.mark.parametrize(
    "response_format, problem",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "strin"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}, "regex"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": False}}, "false"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
        ({"type": "xml"}, "response_format"),
    ],
)
def test_a_schema_that_cannot_compile_is_400_and_nothing_is_queued(stack, token, user, response_format, problem):
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "response_format": response_format}
    response = post(stack, token, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format", error
    assert problem in error["message"], error
    assert not RequestLog.objects.filter(user=user).exists()  # refused before anything was stored or queued
