"""Every request parameter OpenAI documents is honoured or refused, never ignored.

OpenAI's request schemas are read from the ``openai`` SDK's own parameter types (they
are generated from OpenAI's OpenAPI document). The table below says, per endpoint,
where each parameter is honoured (the test that shows its behaviour), which ones have
no effect on the output by definition (bookkeeping fields), and which are refused (a
value asking for anything is a 400 ``unsupported_parameter`` naming it). A parameter the
SDK gains and this table lacks fails the first test, so nothing new slips by silently.
"""

from __future__ import annotations

import importlib
import typing
from typing import Any

import httpx
import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.responses import response_create_params

from market.api import parameters
from tests.support.market import Buyer, Nodes, unique_model

MARKET = "tests/market/"
STRICT = MARKET + "test_openai_strict.py::"
SHAPED = MARKET + "test_structured_outputs.py::"
EMBED = MARKET + "test_embeddings.py::"
RESPONSES = MARKET + "test_responses.py::"
API = MARKET + "test_openai_api.py::"

_SHARED = {
    "model": API + "test_unknown_model_is_404",
    "max_tokens": STRICT + "test_more_than_the_context_holds_is_400_before_dispatch",
    "temperature": "tests/node/test_sampler.py::"
                   "test_token_frequencies_follow_the_tempered_truncated_distribution",
    "top_p": "tests/node/test_sampler.py::"
             "test_token_frequencies_follow_the_tempered_truncated_distribution",
    "seed": API + "test_every_job_carries_a_sampling_seed",
    "stop": "tests/adversarial/test_hostile_nodes.py::test_ids_after_a_stop_string_are_refused",
    "stream_options": STRICT + "test_stream_usage_comes_once_on_its_own_chunk",
    "n": MARKET + "test_choices.py::test_n_choices_are_jobs_billed_each",
    "presence_penalty": SHAPED + "test_logit_bias_and_penalties_reach_the_node",
    "frequency_penalty": SHAPED + "test_logit_bias_and_penalties_reach_the_node",
    "logit_bias": SHAPED + "test_logit_bias_and_penalties_reach_the_node",
    "logprobs": SHAPED + "test_logprobs_in_openai_shape_full_and_streamed",
}
HONOURED: dict[str, dict[str, str]] = {
    "chat": {
        **_SHARED,
        "messages": API + "test_chat_non_stream",
        "max_completion_tokens": STRICT + "test_more_than_the_context_holds_is_400_before_dispatch",
        "top_logprobs": SHAPED + "test_logprobs_in_openai_shape_full_and_streamed",
        "response_format": SHAPED + "test_response_format_json_schema_parses_with_the_sdk",
        "tools": SHAPED + "test_required_tool_call_is_a_valid_call_full_and_streamed",
        "tool_choice": MARKET + "test_client_libraries.py::test_langchain_bind_tools_gets_a_tool_call",
        # at most one call per answer is rendered: false is served exactly, true allows it
        "parallel_tool_calls": "tests/protocol/test_tools.py::test_output_is_parsed_into_calls",
    },
    "completion": {**_SHARED, "prompt": API + "test_completions_stream_and_not",
                   "echo": API + "test_completions_echo_prepends_the_prompt"},
    "embedding": {
        "model": EMBED + "test_models_serve_their_own_endpoint",
        "input": EMBED + "test_vectors_come_back_as_the_model_computes_them",
        "encoding_format": EMBED + "test_raw_base64_is_float32_little_endian",
        # the model's own width is served; any other is a 400 (test_bad_input_is_a_400…)
        "dimensions": EMBED + "test_bad_input_is_a_400_naming_it",
    },
    "responses": {
        "model": RESPONSES + "test_a_failed_job_is_a_failed_response",
        "input": RESPONSES + "test_text_in_and_out",
        "instructions": RESPONSES + "test_text_in_and_out",
        "max_output_tokens": RESPONSES + "test_text_in_and_out",
        "temperature": _SHARED["temperature"],
        "top_p": _SHARED["top_p"],
        "tools": RESPONSES + "test_function_calls_and_their_outputs",
        "tool_choice": RESPONSES + "test_function_calls_and_their_outputs",
        "parallel_tool_calls": "tests/protocol/test_tools.py::test_output_is_parsed_into_calls",
        "text": RESPONSES + "test_structured_text_parses",
    },
}
NO_EFFECT: dict[str, set[str]] = {
    "chat": {"user", "metadata", "store", "service_tier", "safety_identifier",
             "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"},
    "completion": {"user"},
    "embedding": {"user"},
    "responses": {"user", "metadata", "store", "service_tier", "safety_identifier",
                  "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"},
}
# a value that asks for something the market does not serve
REFUSED: dict[str, dict[str, Any]] = {
    "chat": {
        "audio": {"voice": "alloy", "format": "wav"},
        "functions": [{"name": "f", "parameters": {}}],
        "function_call": {"name": "f"},
        "modalities": ["text", "audio"],
        "moderation": {"enabled": True},
        "prediction": {"type": "content", "content": "hello"},
        "reasoning_effort": "low",
        "verbosity": "low",
        "web_search_options": {},
    },
    "completion": {"best_of": 2, "suffix": "!"},
    "embedding": {},
    "responses": {
        "previous_response_id": "resp_123", "conversation": "conv_123",
        "prompt": {"id": "pmpt_123"}, "background": True, "background_options": {},
        "include": ["reasoning.encrypted_content"], "truncation": "auto",
        "reasoning": {"effort": "low"}, "top_logprobs": 3, "max_tool_calls": 2,
        "stream_options": {"include_obfuscation": False}, "context_management": [{}],
        "moderation": {"enabled": True}, "access_programs": ["x"], "image": {"x": 1},
    },
}
SDK_PARAMS = {
    "chat": chat_create_params.CompletionCreateParamsBase,
    "completion": completion_create_params.CompletionCreateParamsBase,
    "embedding": embedding_create_params.EmbeddingCreateParams,
    "responses": response_create_params.ResponseCreateParamsBase,
}
ENDPOINT = {"chat": "/v1/chat/completions", "completion": "/v1/completions",
            "embedding": "/v1/embeddings", "responses": "/v1/responses"}
PROMPT: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "completion": {"prompt": "hi", "max_tokens": 4},
    "responses": {"input": "hi", "max_output_tokens": 4},
}


@pytest.mark.parametrize("kind", list(SDK_PARAMS))
def test_the_table_covers_every_documented_parameter_once(kind: str) -> None:
    documented = set(typing.get_type_hints(SDK_PARAMS[kind]))
    honoured, no_effect, refused = set(HONOURED[kind]), NO_EFFECT[kind], set(REFUSED[kind])
    assert honoured | no_effect | refused == documented
    assert not (honoured & no_effect or honoured & refused or no_effect & refused)
    # and the market's own tables agree: served is honoured or without effect
    assert documented & parameters.SERVED[kind] == honoured | no_effect
    assert refused <= set(parameters.OFF_VALUES[kind])


@pytest.mark.parametrize("kind", list(SDK_PARAMS))
def test_every_honoured_parameter_names_a_test_that_exists(kind: str) -> None:
    for parameter, reference in HONOURED[kind].items():
        path, _, name = reference.partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), (parameter, reference)


@pytest.mark.parametrize("kind,parameter", [(k, p) for k in REFUSED for p in REFUSED[k]])
async def test_a_refused_parameter_is_400_naming_it(buyer: Buyer, nodes: Nodes, kind: str,
                                                    parameter: str) -> None:
    model = unique_model()
    await nodes.start(model)
    body: dict[str, Any] = {"model": model, **PROMPT[kind], parameter: REFUSED[kind][parameter]}
    async with httpx.AsyncClient(base_url=buyer.market.url, timeout=30,
                                 headers={"Authorization": f"Bearer {buyer.key}"}) as client:
        response = await client.post(ENDPOINT[kind], json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", parameter)


@pytest.mark.parametrize("kind", ["chat", "completion", "responses"])
async def test_bookkeeping_parameters_change_nothing(buyer: Buyer, nodes: Nodes,
                                                     kind: str) -> None:
    model = unique_model()
    await nodes.start(model)
    values = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
              "safety_identifier": "s", "prompt_cache_key": "c",
              "prompt_cache_retention": "in_memory", "prompt_cache_options": {}}
    base: dict[str, Any] = {"model": model, **PROMPT[kind], "temperature": 0}
    async with httpx.AsyncClient(base_url=buyer.market.url, timeout=30,
                                 headers={"Authorization": f"Bearer {buyer.key}"}) as client:
        plain = await client.post(ENDPOINT[kind], json=base)
        extra = {name: values[name] for name in NO_EFFECT[kind]}
        tagged = await client.post(ENDPOINT[kind], json={**base, **extra})
    assert plain.status_code == tagged.status_code == 200, tagged.text

    def text(response: httpx.Response) -> str:
        if kind == "responses":
            return str(response.json()["output"][0]["content"][0]["text"])
        choice = response.json()["choices"][0]
        return choice["message"]["content"] if kind == "chat" else choice["text"]

    assert text(plain) == text(tagged)
