"""The protocol's tool-call convention: rendering into the prompt (covered by the
request digest), the schema of a required call, and parsing output into calls."""

from __future__ import annotations

import json

import pytest

from protocol.job import InvalidJobRequest, JobRequest
from protocol.tools import call_schema, parse_calls, parse_tools

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
TIME = [{"type": "function", "function": {"name": "get_time"}}]
ASK = [{"role": "user", "content": "weather in Paris?"}]


def _job(**body) -> JobRequest:
    return JobRequest.from_openai("chat", {"model": "m", "messages": ASK, **body}, 16)


def test_tools_are_rendered_into_the_system_turn_and_signed() -> None:
    plain, offered = _job(), _job(tools=WEATHER)
    assert offered.messages[0].role == "system" and "get_weather" in offered.messages[0].content
    assert offered.constraint is None  # auto: the model is free
    assert offered.digest() != plain.digest() != _job(tools=TIME).digest()
    assert _job(tools=WEATHER, tool_choice="none").digest() == plain.digest()
    with_system = _job(messages=[{"role": "system", "content": "be brief"}, *ASK], tools=WEATHER)
    assert with_system.messages[0].content.startswith("be brief\n\n")
    assert len(with_system.messages) == 2


def test_a_required_call_is_a_constraint_over_the_allowed_functions() -> None:
    job = _job(tools=WEATHER + TIME, tool_choice="required")
    assert job.constraint is not None and job.constraint.type == "json_schema"
    assert {v["properties"]["name"]["const"] for v in job.constraint.json_schema["anyOf"]} == {
        "get_weather", "get_time"}
    named = _job(tools=WEATHER + TIME,
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.constraint.json_schema == call_schema(parse_tools(TIME))
    for body, param in (({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [{"type": "function", "function": {"name": "a b"}}]},
                         "tools[0].function.name"),
                        ({"tools": WEATHER + WEATHER}, "tools")):
        with pytest.raises(InvalidJobRequest) as info:
            _job(**body)
        assert info.value.param == param


def test_earlier_calls_and_tool_results_are_rendered() -> None:
    job = _job(tools=WEATHER, messages=[
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert job.messages[2].content == (
        '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>')
    assert (job.messages[3].role, job.messages[3].content) == ("tool", "sunny")


def test_output_is_parsed_into_calls() -> None:
    tools = parse_tools(WEATHER + TIME)
    content, calls = parse_calls(
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
        '</tool_call><tool_call>{"name": "get_time"}</tool_call>'
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', "auto", tools, "job_1")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2
    assert parse_calls("no call here", "auto", tools, "j") == ("no call here", [])
    content, calls = parse_calls('{"name":"get_time","arguments":{}}', "required", tools, "j")
    assert content is None and calls[0].name == "get_time"
    assert parse_calls('{"name":"get_time"', "required", tools, "j")[1] == []  # cut short


def test_response_format_errors_name_the_field() -> None:
    for response_format in ({"type": "xml"}, {"type": "json_schema"}, "json",
                            {"type": "json_schema", "json_schema": {
                                "name": "big", "schema": {"enum": ["x" * 1000] * 70}}}):
        with pytest.raises(InvalidJobRequest) as info:
            _job(response_format=response_format)
        assert info.value.param == "response_format", response_format
