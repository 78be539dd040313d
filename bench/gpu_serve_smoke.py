"""GPU smoke test of `hybridpar serve`: one server (bf16, TP 1, CUDA graphs), the openai client, /server_info."""
import json
import time

import httpx
import openai

from hybridpar.serving import start_server
t = time.time()
with start_server(dtype="bf16") as s:
    print("server up in %.1f s" % (time.time() - t), flush=True)
    c = openai.OpenAI(base_url=s.base_url, api_key="x")
    r = c.completions.create(model="hybridpar/qwen2-tiny", prompt="The radix cache", max_tokens=12, temperature=0)
    print("completion:", repr(r.choices[0].text), r.usage.completion_tokens)
    st = c.chat.completions.create(model="hybridpar/qwen2-tiny", messages=[{"role": "user", "content": "What is a radix tree?"}], max_tokens=16, temperature=0, stream=True)
    print("chat stream:", repr("".join(ch.choices[0].delta.content or "" for ch in st)))
    info = httpx.get(s.url + "/server_info").json()
    print("info:", json.dumps(info))
    print("log tail:", s.log()[-600:])
