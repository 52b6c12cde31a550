"""Drives :class:`serve.vllm_backend.VLLMBackend` once and prints what it produced as JSON.

Run by tests/serve/test_vllm_backend.py with an interpreter that has vLLM (this one, or the one
``$AGENTTUNING_VLLM_PYTHON`` names), because vLLM's releases cannot be installed next to the
project's pinned transformers (docs/vllm.md). vLLM spawns its engine process, hence the
``__main__`` guard. Usage: ``python tests/serve/vllm_probe.py MODEL_DIR PROMPT_IDS_JSON``.
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _tl(t):
    return {"id": t.token_id, "logprob": t.logprob, "top": [list(x) for x in t.top]}


async def probe(backend, prompt):
    from serve.openai_core import OpenAIChat, PromptLogprobs, SamplingParams, TokenLogprob
    from serve.openai_schema import ChatCompletionRequest, CompletionRequest

    async def run(params):
        return [x async for x in backend.generate(prompt, params)]

    out = {}
    out["greedy"] = await run(SamplingParams(max_tokens=8, temperature=0.0))
    lp = await run(SamplingParams(max_tokens=8, temperature=0.0, logprobs=2))
    out["greedy_logprobs"] = [_tl(t) for t in lp if isinstance(t, TokenLogprob)]
    out["greedy_logprobs_types"] = sorted({type(t).__name__ for t in lp})
    scored = await run(SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=1))
    out["prompt_only"] = [type(x).__name__ for x in scored]
    if scored and isinstance(scored[0], PromptLogprobs):
        out["prompt_logprobs"] = [None if e is None else _tl(e) for e in scored[0].entries]
    sampled = [await run(SamplingParams(max_tokens=8, temperature=1.0, seed=7)) for _ in range(2)]
    out["seeded_equal"] = sampled[0] == sampled[1]
    out["concurrent"] = await asyncio.gather(*(run(SamplingParams(max_tokens=8, temperature=0.0)) for _ in range(4)))

    # Early close (a stop string matched / the client left): the engine must drop the sequence.
    gen = backend.generate(prompt, SamplingParams(max_tokens=500, temperature=0.0))
    first = [await gen.__anext__() for _ in range(3)]
    await gen.aclose()
    await asyncio.sleep(0.5)
    out["early_close"] = {"got": len(first), "unfinished": backend.engine.output_processor.get_num_unfinished_requests()}

    # The project's OpenAI layer over this backend (chat with logprobs; legacy echo scoring).
    chat = OpenAIChat(backend)
    r = await chat.complete(ChatCompletionRequest(model=backend.model_id, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0, logprobs=True, top_logprobs=2))
    out["chat"] = r.model_dump()
    c = await chat.completion(CompletionRequest(model=backend.model_id, prompt=prompt, max_tokens=0, echo=True,
                                                logprobs=1))
    out["echo"] = c.model_dump()
    out["max_model_tokens"] = backend.max_model_tokens
    return out


def main() -> None:
    from serve.vllm_backend import VLLMBackend

    model, prompt_file = sys.argv[1], sys.argv[2]
    with open(prompt_file) as f:
        prompt = json.load(f)
    # Eager mode: torch.compile of the model takes minutes on a small CPU, and is not under test.
    backend = VLLMBackend(model, model_id="probe", chat_template="llama2", dtype="float32", enforce_eager=True,
                          max_model_len=512)
    try:
        result = asyncio.run(probe(backend, prompt))
    finally:
        backend.close()
    print("PROBE " + json.dumps(result, default=lambda o: o.__dict__), flush=True)


if __name__ == "__main__":
    main()
