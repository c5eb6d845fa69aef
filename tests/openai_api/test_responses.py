"""The Responses API (/v1/responses) with the official `openai` client: create, stream, retrieve,
delete, previous_response_id chains (also across a restart of the web and worker processes),
store: false, another user's ids, and bad input."""

import json
import uuid
from urllib.parse import quote

import pytest
import requests
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from chat.models import RequestLog, StoredResponse
from chat.protocols.openai import ChatCompletionRequest
from chat.tokens import token_create
from llmsite.launcher import worker_command
from tests.chat.test_stream_failures import deployment_on_queue
from tests.conftest import Process, start_web, wait_ready

ASK = {"model": "default", "temperature": 0, "max_output_tokens": 24}
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def generation_of(response_id: str) -> RequestLog:
    return RequestLog.objects.get(pk=uuid.UUID(response_id.removeprefix("resp_")))


def test_create_answers_stores_and_retrieves_the_response(client, user):
    raw = client.responses.with_raw_response.create(input="What is the capital of France?", instructions="Answer in one sentence.", **ASK)
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "default"
    assert response.status in ("completed", "incomplete")
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and "Paris" in response.output_text
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.instructions == "Answer in one sentence." and response.previous_response_id is None

    row = StoredResponse.objects.get(pk=response.id)
    assert row.user_id == user.pk and row.input == [{"role": "user", "content": "What is the capital of France?"}]
    assert generation_of(response.id).response == response.output_text
    assert str(generation_of(response.id).pk) == raw.headers["X-Request-Id"]  # what a client resumes

    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    Response.model_validate(again.to_dict())  # every field the client's own types require, typed as they say


def test_stream_sends_the_events_in_the_reference_order_and_stores_the_answer(client):
    events = list(client.responses.create(input="What is the capital of France?", stream=True, **ASK))
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1, "not streamed"
    collapsed = [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]
    final = events[-1].response
    assert collapsed == [*STREAM_ORDER, f"response.{final.status}"] and final.status in ("completed", "incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event.to_dict())

    text = "".join(deltas)
    done = next(event for event in events if event.type == "response.output_text.done")
    assert done.text == text == final.output_text and "Paris" in text
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    assert client.responses.retrieve(final.id).output_text == text


def test_delete_removes_the_response(client):
    response = client.responses.create(input="Say hello.", **ASK)
    deleted = client.responses.delete(response.id)
    # the client returns None for DELETE; the body is OpenAI's deleted object
    assert deleted is None
    assert not StoredResponse.objects.filter(pk=response.id).exists()
    with pytest.raises(NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(NotFoundError):
        client.responses.delete(response.id)


def test_delete_body_names_the_deleted_response(stack, client, token):
    response = client.responses.create(input="Say hello.", **ASK)
    answer = requests.delete(f"{stack.url}/v1/responses/{response.id}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"id": response.id, "object": "response", "deleted": True}


def chain(client: OpenAI, model: str = "default") -> list:
    first = client.responses.create(input="My name is Ada.", model=model, temperature=0, max_output_tokens=16)
    second = client.responses.create(input="I live in Paris.", previous_response_id=first.id, model=model, temperature=0, max_output_tokens=16)
    third = client.responses.create(input="What is my name?", previous_response_id=second.id, model=model, temperature=0, max_output_tokens=16)
    return [first, second, third]


def assert_chained(responses: list) -> None:
    first, second, third = responses
    expected = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "I live in Paris."},
        {"role": "assistant", "content": second.output_text},
    ]
    assert StoredResponse.objects.get(pk=third.id).history == expected
    assert third.previous_response_id == second.id
    # what the model was asked: the whole chain, then the new input
    assert generation_of(third.id).history == expected
    assert generation_of(third.id).prompt == "What is my name?"


def test_previous_response_id_continues_a_chain_twice(client):
    assert_chained(chain(client))


def test_a_chain_survives_a_restart_of_the_web_and_worker_processes(stack, token):
    queue = f"responses-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)

    def start():
        worker = Process(f"worker-{queue}", worker_command([queue], hostname=f"{queue}-{uuid.uuid4().hex[:4]}@%h")).start()
        web, url = start_web()
        wait_ready(deployment.name, worker)
        return worker, web, OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=180)

    worker, web, client = start()
    try:
        responses = chain(client, deployment.name)
    finally:
        web.stop()
        worker.stop()
    worker, web, client = start()
    try:
        assert [client.responses.retrieve(r.id).output_text for r in responses] == [r.output_text for r in responses]
        more = client.responses.create(input="Thanks.", previous_response_id=responses[-1].id, model=deployment.name, max_output_tokens=8)
        assert StoredResponse.objects.get(pk=more.id).history[-2:] == [
            {"role": "user", "content": "What is my name?"},
            {"role": "assistant", "content": responses[-1].output_text},
        ]
    finally:
        web.stop()
        worker.stop()
    assert_chained(responses)


def test_store_false_keeps_nothing_and_cannot_be_continued(client):
    response = client.responses.create(input="Say hello.", store=False, text={"format": {"type": "text"}}, **ASK)
    assert response.output_text and response.text.format.type == "text"
    assert not StoredResponse.objects.filter(pk=response.id).exists()
    with pytest.raises(NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(NotFoundError) as caught:
        client.responses.create(input="And again.", previous_response_id=response.id, **ASK)
    assert caught.value.body["param"] == "previous_response_id"


def test_another_users_response_is_not_found(stack, client, db_user_factory):
    response = client.responses.create(input="Say hello.", **ASK)
    stranger = OpenAI(base_url=f"{stack.url}/v1", api_key=token_create(user=db_user_factory())[1], max_retries=0)
    with pytest.raises(NotFoundError) as caught:
        stranger.responses.retrieve(response.id)
    assert caught.value.body["type"] == "invalid_request_error" and response.id in caught.value.body["message"]
    with pytest.raises(NotFoundError):
        stranger.responses.delete(response.id)
    with pytest.raises(NotFoundError):
        stranger.responses.create(input="Go on.", previous_response_id=response.id, **ASK)
    assert StoredResponse.objects.filter(pk=response.id).exists()


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input": 42}, "input"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
        ({"input": []}, "input"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "temperature": 3}, "temperature"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_reaches_no_worker(client, user, fields, param):
    with pytest.raises(BadRequestError) as caught:
        client.responses.create(model="default", **fields)
    assert caught.value.body["param"] == param, caught.value.body
    assert caught.value.body["message"].startswith(param)
    assert not RequestLog.objects.filter(user=user).exists()


@pytest.mark.parametrize("response_id", ["resp_nosuchthing", "resp_\u0000"], ids=["unknown", "nul"])
def test_unknown_previous_response_id_is_a_404_naming_the_field(client, user, response_id):
    """An id with a NUL character (which PostgreSQL text refuses: a 503 before) is unknown too."""
    with pytest.raises(NotFoundError) as caught:
        client.responses.create(input="hi", previous_response_id=response_id, **ASK)
    assert caught.value.body["param"] == "previous_response_id" and caught.value.body["code"] is None
    assert not RequestLog.objects.filter(user=user).exists()
    for method in ("get", "delete"):
        response = requests.request(method, f"{client.base_url}responses/{quote(response_id)}", headers={"Authorization": f"Bearer {client.api_key}"}, timeout=30)
        assert response.status_code == 404, (method, response.text)


def test_schema_describes_the_responses_endpoints(stack):
    paths = requests.get(f"{stack.url}/api/schema/", timeout=30).json()["paths"]
    assert {"post"} <= set(paths["/v1/responses"]) and {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])


def test_the_admin_lists_and_shows_stored_responses_read_only(client, db_user_factory):
    from django.contrib.admin.utils import quote
    from django.test import Client

    response = client.responses.create(input="Say hello.", **ASK)
    admin = Client()
    admin.force_login(db_user_factory(is_staff=True, is_superuser=True))
    listing = admin.get("/admin/chat/storedresponse/")
    assert listing.status_code == 200 and response.id in listing.content.decode()
    # The admin's own links quote the key: an id with "_22" in it (1 in 43) is not itself there
    page = admin.get(f"/admin/chat/storedresponse/{quote(response.id)}/change/")
    assert page.status_code == 200 and response.id in page.content.decode() and b'name="_save"' not in page.content


# --- after the "structured" and "tools" branches merge: text.format and tools, through chat completions

needs_structured = pytest.mark.skipif(
    "response_format" not in ChatCompletionRequest.model_fields, reason="chat completions has no response_format yet"
)
needs_tools = pytest.mark.skipif("tools" not in ChatCompletionRequest.model_fields, reason="chat completions has no tools yet")
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False}
WEATHER = [{"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": CITY, "strict": True}]


@needs_structured
def test_text_format_json_schema_gives_json_valid_against_the_schema(client):
    answer = client.responses.create(
        model="default", input="Which city is the capital of France? Answer in JSON.", temperature=0, max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "answer", "schema": CITY, "strict": True}},
    )  # fmt: skip
    assert answer.status == "completed"
    assert set(json.loads(answer.output_text)) == {"city"} and isinstance(json.loads(answer.output_text)["city"], str)


@needs_tools
def test_a_named_tool_choice_gives_a_function_call_item_streamed_and_not(client):
    ask = {"model": "default", "input": "What is the weather in Paris?", "tools": WEATHER, "temperature": 0, "max_output_tokens": 64}
    answer = client.responses.create(tool_choice={"type": "function", "name": "get_weather"}, **ask)
    calls = [item for item in answer.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"} for call in calls)

    events = list(client.responses.create(tool_choice={"type": "function", "name": "get_weather"}, stream=True, **ask))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    start = kinds.index("response.function_call_arguments.delta") - 1
    assert kinds[start] == "response.output_item.added" and "response.function_call_arguments.done" in kinds[start:]
    streamed = [item for item in events[-1].response.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event.to_dict())


@needs_tools
def test_a_function_call_output_continues_the_stored_response(client):
    ask = {"model": "default", "tools": WEATHER, "temperature": 0, "max_output_tokens": 32}
    called = client.responses.create(input="What is the weather in Paris?", tool_choice="required", **ask)
    call = next(item for item in called.output if item.type == "function_call")
    output = [{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees."}]
    answer = client.responses.create(input=output, previous_response_id=called.id, tool_choice="none", **ask)
    assert answer.output_text and StoredResponse.objects.get(pk=answer.id).input[0]["role"] == "tool"


def test_nul_characters_in_the_input_are_stored_as_replacement_characters(stack, token, user):
    """PostgreSQL's text and jsonb refuse NUL: an input that holds one (found by the schema fuzz:
    a 503 "database unavailable") is answered, and its stored copy shows U+FFFD."""
    body = {
        "input": [{"role": "user", "content": "Say hi.\u0000"}, {"role": "assistant", "content": "Hi\u0000"}, {"role": "user", "content": "Again."}],
        "instructions": "Be brief.\u0000",
        "metadata": {"k\u0000": "v\u0000"},
        **ASK,
    }
    answered = requests.post(f"{stack.url}/v1/responses", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=180)
    assert answered.status_code == 200, answered.text
    row = StoredResponse.objects.get(pk=answered.json()["id"])
    assert row.input[0] == {"role": "user", "content": "Say hi.\ufffd"} and row.instructions == "Be brief.\ufffd"


def test_a_whole_response_the_database_refuses_to_store_is_a_503_naming_its_request(stack, token, user):
    from django.db import connection

    table = StoredResponse._meta.db_table
    with connection.cursor() as cursor:  # the database itself refuses the row, as a full disk would
        cursor.execute(
            "CREATE OR REPLACE FUNCTION refuse_responses() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no room for responses'; END $$"
        )
        cursor.execute(f"DROP TRIGGER IF EXISTS refuse_responses ON {table}")  # a killed run's
        cursor.execute(f"CREATE TRIGGER refuse_responses BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse_responses()")
    try:
        answered = requests.post(
            f"{stack.url}/v1/responses", headers={"Authorization": f"Bearer {token}"}, json={"input": "Hello?", **ASK}, timeout=180
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER IF EXISTS refuse_responses ON {table}")
            cursor.execute("DROP FUNCTION IF EXISTS refuse_responses()")
    message = answered.json()["error"]["message"]
    assert answered.status_code == 503 and "database" in message, answered.text
    assert "no room for responses" not in message, "the database's own text stays in the site's log"
    row = RequestLog.objects.get(user=user)
    assert answered.headers["X-Request-Id"] == str(row.pk) and row.response, "the answer is kept with the request that made it"
    assert not StoredResponse.objects.filter(user=user).exists()
