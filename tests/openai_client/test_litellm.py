"""litellm's OpenAI-compatible provider (`openai/<model>` with `api_base`) against `duet serve`:
forced tool calls, streamed tool-call deltas, a JSON-schema response format from a pydantic
model, `n` usage and 401 without the key.

Run by scripts/test.sh in its own venv (target/venv-litellm); DUET_BIN names the binary.
"""

import json
import os
import unittest

# litellm fetches its model price list from the network on import unless told to use its copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402

from test_openai_client import ASK, NO_THINKING, WEATHER_TOOLS, Reply, Server, check_call  # noqa: E402


class LitellmTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server("--api-key", "sk-duet-litellm")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def call(self, api_key="sk-duet-litellm", **kw):
        args = {
            "model": "openai/default",
            "api_base": self.server.url + "/v1",
            "api_key": api_key,
            "messages": ASK,
            "max_tokens": 160,
            "temperature": 0,
            "num_retries": 0,
            "extra_body": NO_THINKING,
            **kw,
        }
        return litellm.completion(**args)

    def test_forced_tool_calls(self):
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = self.call(tools=WEATHER_TOOLS, tool_choice=named, parallel_tool_calls=False)
        self.assertEqual(r.choices[0].finish_reason, "tool_calls")
        calls = r.choices[0].message.tool_calls
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].function.name, "get_weather")
        check_call(self, "get_weather", calls[0].function.arguments)
        r = self.call(tools=WEATHER_TOOLS, tool_choice="required")
        for c in r.choices[0].message.tool_calls:
            check_call(self, c.function.name, c.function.arguments)

    def test_streamed_tool_call_deltas(self):
        named = {"type": "function", "function": {"name": "get_time"}}
        stream = self.call(
            tools=WEATHER_TOOLS, tool_choice=named, parallel_tool_calls=False, stream=True
        )
        name, args = None, ""
        for chunk in stream:
            for d in chunk.choices[0].delta.tool_calls or []:
                name = d.function.name or name
                args += d.function.arguments or ""
        self.assertEqual(name, "get_time")
        check_call(self, "get_time", args)

    def test_response_format_from_a_pydantic_model(self):
        r = self.call(response_format=Reply, max_tokens=120)
        reply = Reply.model_validate(json.loads(r.choices[0].message.content))
        self.assertLessEqual(len(reply.answer), 16)

    def test_n_counts_the_prompt_once(self):
        one = self.call(max_tokens=2)
        three = self.call(max_tokens=2, n=3, temperature=1.0)
        self.assertEqual(len(three.choices), 3)
        self.assertEqual(three.usage.prompt_tokens, one.usage.prompt_tokens)

    def test_401_without_the_key(self):
        with self.assertRaises(litellm.AuthenticationError):
            self.call(api_key="wrong", max_tokens=2)


if __name__ == "__main__":
    unittest.main()
