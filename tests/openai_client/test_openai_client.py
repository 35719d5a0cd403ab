"""The official `openai` Python client against `duet serve`, as users call it.

Run by scripts/test.sh in a venv with `openai` installed; DUET_BIN names the binary. Two servers:
the embedded default model, and the echo engine (`--engine echo`, a test tool that replays the
rendered prompt's tokens), which makes tool calls and reasoning deterministic.
"""

import json
import os
import subprocess
import unittest
from typing import Annotated, Literal

import openai
import pydantic

DUET = os.environ.get("DUET_BIN", "target/debug/duet")

CALL = (
    "Let me check.</think>I will look it up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
    "<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

# Tools whose calls the tests force through `tool_choice` (random weights never call a tool on
# their own): bounded strings and enums, so every constrained call finishes within max_tokens.
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["utc", "cet"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
# The tiny model's template (R1's) opens `<think>`; the grammar applies after `</think>`, which
# this closes in the prompt.
NO_THINKING = {"chat_template_kwargs": {"thinking": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(test, name, arguments):
    """The call names a declared function and its arguments validate against its schema."""
    args = json.loads(arguments)
    if name == "get_weather":
        test.assertEqual(set(args), {"city", "unit"})
        test.assertLessEqual(len(args["city"]), 12)
        test.assertIn(args["unit"], ["celsius", "fahrenheit"])
    else:
        test.assertEqual(name, "get_time")
        test.assertEqual(set(args), {"zone"})
        test.assertIn(args["zone"], ["utc", "cet"])


class Reply(pydantic.BaseModel):
    """What `parse()` asks for: the openai helper sends its strict JSON schema."""

    answer: Annotated[str, pydantic.Field(max_length=16)]
    sure: bool
    mood: Literal["calm", "stormy"]


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [DUET, "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
            # A key in the developer's environment would lock the tests out.
            env={k: v for k, v in os.environ.items() if k != "DUET_API_KEY"},
        )
        self.url = None
        # The server prints its URL once every worker has registered: no polling needed.
        for line in self.proc.stdout:
            if line.startswith("duet serving"):
                self.url = line.split(" at ")[1].strip()
                break
        if self.url is None:
            raise RuntimeError("duet serve exited without printing its URL")

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class ModelServerCase(unittest.TestCase):
    """A server on the embedded default model for the class's tests (no tests of its own)."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()


class ModelServerTest(ModelServerCase):
    def test_chat(self):
        r = self.client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
            max_tokens=8,
            temperature=0,
        )
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
        self.assertLessEqual(r.usage.completion_tokens, 8)
        self.assertGreater(r.usage.prompt_tokens, 0)

    def test_streamed_chat_with_usage(self):
        chunks = list(
            self.client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "Count to three."}],
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 10)
        self.assertIsNotNone(chunks[-1].usage.prompt_tokens_details)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, ["length"])

    def test_completions(self):
        r = self.client.completions.create(
            model="default", prompt="The capital of France is", max_tokens=5, temperature=0,
            extra_body={"ignore_eos": True},
        )
        self.assertEqual(r.object, "text_completion")
        self.assertIsInstance(r.choices[0].text, str)
        self.assertEqual(r.usage.completion_tokens, 5)
        again = self.client.completions.create(
            model="default", prompt="The capital of France is", max_tokens=5, temperature=0,
            extra_body={"ignore_eos": True},
        )
        self.assertEqual(again.choices[0].text, r.choices[0].text)

    def test_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertEqual(len(ids), 1)
        m = self.client.models.retrieve(ids[0])
        self.assertEqual((m.id, m.object), (ids[0], "model"))
        with self.assertRaises(openai.NotFoundError):
            self.client.models.retrieve("no-such-model")

    def test_n_counts_the_prompt_once(self):
        msgs = [{"role": "user", "content": "Count me once."}]
        one = self.client.chat.completions.create(model="default", messages=msgs, max_tokens=2)
        three = self.client.chat.completions.create(
            model="default", messages=msgs, max_tokens=2, n=3
        )
        self.assertEqual(len(three.choices), 3)
        self.assertEqual(three.usage.prompt_tokens, one.usage.prompt_tokens)

    def test_errors_are_4xx(self):
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=0
            )
        self.assertIn("max_tokens", str(e.exception))
        with self.assertRaises(openai.NotFoundError):
            self.client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        with self.assertRaises(openai.BadRequestError):
            self.client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}], temperature=5
            )
        with self.assertRaises(openai.BadRequestError):
            self.client.completions.create(model="default", prompt=[5] * 200_000, max_tokens=1)


class GrammarTest(ModelServerCase):
    """Forced tool calls and structured outputs on the tiny model, through the client's helpers."""

    def forced(self, tool_choice, **kw):
        args = {"max_tokens": 160, "temperature": 0, "extra_body": NO_THINKING, **kw}
        return self.client.chat.completions.create(
            model="default", messages=ASK, tools=WEATHER_TOOLS, tool_choice=tool_choice, **args
        )

    def test_tool_choice_variants(self):
        named = {"type": "function", "function": {"name": "get_time"}}
        r = self.forced(named, parallel_tool_calls=False)
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertEqual(len(choice.message.tool_calls), 1)
        call = choice.message.tool_calls[0]
        self.assertEqual(call.function.name, "get_time")
        check_call(self, call.function.name, call.function.arguments)
        # "required": one or more calls, each to a declared function with valid arguments.
        r = self.forced("required")
        calls = r.choices[0].message.tool_calls
        self.assertGreaterEqual(len(calls), 1)
        for c in calls:
            check_call(self, c.function.name, c.function.arguments)
        # "none": the tools are not offered and nothing is constrained.
        r = self.forced("none", max_tokens=8)
        self.assertIsNone(r.choices[0].message.tool_calls)
        # An undeclared function is refused by name.
        with self.assertRaises(openai.BadRequestError) as e:
            self.forced({"type": "function", "function": {"name": "nope"}})
        self.assertEqual(e.exception.body["param"], "tool_choice.function.name")

    def test_streamed_forced_tool_call_deltas(self):
        stream = self.forced(
            {"type": "function", "function": {"name": "get_weather"}},
            stream=True,
            parallel_tool_calls=False,
        )
        names, args, finish, pieces = {}, {}, None, 0
        for chunk in stream:
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.function.name:
                    names[d.index] = d.function.name
                if d.function.arguments:
                    args[d.index] = args.get(d.index, "") + d.function.arguments
                    pieces += 1
            finish = chunk.choices[0].finish_reason or finish
        self.assertEqual(names, {0: "get_weather"})
        self.assertGreater(pieces, 1, "arguments arrive in fragments")
        check_call(self, "get_weather", args[0])
        self.assertEqual(finish, "tool_calls")

    def test_response_format_json_schema_through_parse(self):
        for seed in range(3):
            r = self.client.chat.completions.parse(
                model="default",
                messages=ASK,
                response_format=Reply,
                max_tokens=120,
                temperature=1.0,
                seed=seed,
                extra_body=NO_THINKING,
            )
            parsed = r.choices[0].message.parsed
            self.assertIsInstance(parsed, Reply)
            self.assertLessEqual(len(parsed.answer), 16)

    def test_json_object_mode(self):
        # A JSON object's strings are unbounded and random weights would fill them to max_tokens;
        # favouring `"` and `}` lets the grammar close the object within a few tokens (and without
        # the grammar those two would just repeat).
        bias = {}
        for ch in ['"', "}"]:
            tok = self.client.post(
                "/../tokenize", body={"prompt": ch, "add_special_tokens": False}, cast_to=object
            )
            bias[str(tok["tokens"][0])] = 30
        r = self.client.chat.completions.create(
            model="default",
            messages=ASK,
            response_format={"type": "json_object"},
            logit_bias=bias,
            max_tokens=60,
            temperature=0,
            extra_body=NO_THINKING,
        )
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertIsInstance(json.loads(r.choices[0].message.content), dict)


class ApiKeyTest(unittest.TestCase):
    """`--api-key`: the client without the key gets AuthenticationError (401); with it, answers."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("--engine", "echo", "--api-key", "sk-duet-test")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def client(self, key):
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=key, max_retries=0)

    def test_401_without_the_key_and_answers_with_it(self):
        for key in ("none", "sk-duet-tes", "sk-duet-test2"):
            with self.assertRaises(openai.AuthenticationError) as e:
                self.client(key).chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
            self.assertEqual(e.exception.status_code, 401)
            self.assertEqual(e.exception.code, "invalid_api_key")
        with self.assertRaises(openai.AuthenticationError):
            self.client("none").models.list()
        ok = self.client("sk-duet-test")
        r = ok.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(len(ok.models.list().data), 1)


class EchoServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server("--engine", "echo")
        cls.client = cls.server.client()
        tok = cls.client.post(
            "/../tokenize",
            body={"prompt": "<｜Assistant｜>", "add_special_tokens": False},
            cast_to=object,
        )
        cls.stop_id = tok["tokens"][0]

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_tool_call_round_trip(self):
        r = self.client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": CALL}],
            tools=TOOLS,
            max_tokens=200,
            extra_body={"stop_token_ids": [self.stop_id]},
        )
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        call = choice.message.tool_calls[0]
        self.assertEqual(call.function.name, "get_weather")
        self.assertEqual(json.loads(call.function.arguments), {"city": "Paris"})
        # The call and the tool's result go back for the next turn.
        r2 = self.client.chat.completions.create(
            model="default",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"},
            ],
            tools=TOOLS,
            max_tokens=4,
        )
        self.assertEqual(r2.choices[0].message.role, "assistant")

    def test_streamed_tool_call_arguments(self):
        stream = self.client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": CALL}],
            tools=TOOLS,
            max_tokens=200,
            stream=True,
            extra_body={"stop_token_ids": [self.stop_id]},
        )
        name, args, finish = None, "", None
        for chunk in stream:
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.function.name:
                    name = d.function.name
                args += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        self.assertEqual(name, "get_weather")
        self.assertEqual(json.loads(args), {"city": "Paris"})
        self.assertEqual(finish, "tool_calls")

    def test_reasoning_content_in_a_stream(self):
        stream = self.client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Think first.</think>The answer is 4."}],
            max_tokens=200,
            stream=True,
            extra_body={"stop_token_ids": [self.stop_id]},
        )
        reasoning, content = "", ""
        for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
        self.assertTrue(reasoning.endswith("Think first."), reasoning)
        self.assertEqual(content, "The answer is 4.")


if __name__ == "__main__":
    unittest.main()
