"""EFT up-scaling with speculative decoding against without: tokens/s, same prompts, greedy, CPU.

Baseline: plain EFT decoding (each token: one KV-cached forward pass of the large base, the small
base and the small fine-tuned model). Ours: the small fine-tuned model drafts k tokens, one pass
of each base model verifies them (serve.eft_decoding). Both produce the EFT argmax; the script
checks that the sequences are identical token for token.

How the three models are derived (no hub access, so no real pretrained trio): speculative decoding
only pays when the drafter agrees with the target often, as a real fine-tuned small model agrees
with the up-scaled one most of the time. So:
- small base: a random Llama (hidden 256, 2 layers, vocab 2048; init std 0.1 so that next-token
  distributions are peaked like a trained LM's);
- small fine-tuned: small base + a "fine-tuning delta" (Gaussian noise, std ``ft_noise`` × each
  weight's std), so the EFT delta log p_ft − log p_base is substantial;
- large base: the small base *depth-expanded* (Net2Net-style): its embeddings, 2 layers, norm and
  head, plus ``extra_layers`` new random decoder layers whose residual-branch output projections
  (o_proj, down_proj) are scaled by ``large_eps``. The large model then has ≥ 8× the small one's
  parameters and costs ≈ its depth in compute, while computing almost the small base's function.
  Hence EFT = log p_L + (log p_ft − log p_sb) ≈ log p_ft: high, but not perfect, acceptance
  (``large_eps`` tunes it: 0.01 → 1.0 greedy acceptance, 0.02 → ≈ 0.8, 0.05 → ≈ 0.5).

    python bench/eft_speculative.py [--k 4] [--prompts 8] [--new-tokens 64] [--extra-layers 24]

Last line: RESULT speedup=<x> acceptance=<a> greedy_identical=<true|false>
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from serve.eft_decoding import CausalLM, DecodeParams, DecodeStats, EFTDecoder, EFTModels  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def small_config(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=2048, initializer_range=0.1, tie_word_embeddings=False,
    )


def derive_models(args) -> tuple:
    """(large_base, small_base, small_ft) as described in the module docstring."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = small_config(args.vocab, args.hidden, args.layers)
    base = LlamaForCausalLM(cfg).eval()
    ft = LlamaForCausalLM(cfg).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(args.ft_noise * p.std() * torch.randn_like(p))
    big_cfg = small_config(args.vocab, args.hidden, args.layers + args.extra_layers)
    large = LlamaForCausalLM(big_cfg).eval()
    state = large.state_dict()
    state.update({k: v for k, v in base.state_dict().items()})  # same names for the shared layers
    large.load_state_dict(state)
    with torch.no_grad():
        for layer in large.model.layers[args.layers:]:  # new layers: near-identity residual branches
            layer.self_attn.o_proj.weight.mul_(args.large_eps)
            layer.mlp.down_proj.weight.mul_(args.large_eps)
    return large, base, ft


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def run(dec: EFTDecoder, prompts, new_tokens: int, k: int) -> tuple:
    """Greedy outputs, total tokens, seconds and acceptance over all prompts."""
    outs, tokens, seconds, drafted, accepted = [], 0, 0.0, 0, 0
    for p in prompts:
        st = DecodeStats()
        out = list(dec.generate(p, DecodeParams(max_new_tokens=new_tokens, temperature=0.0, speculative_k=k), st))
        outs.append(out)
        tokens, seconds = tokens + len(out), seconds + st.seconds
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
    return outs, tokens, seconds, (accepted / drafted if drafted else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="draft length")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--extra-layers", type=int, default=24)
    ap.add_argument("--large-eps", type=float, default=0.02)
    ap.add_argument("--ft-noise", type=float, default=0.3)
    ap.add_argument("--beta", type=float, default=1.0)
    # One thread: on a shared 2-core box, torch's spinning worker threads make timings erratic.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(RESULTS, "eft_speculative.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    large, base, ft = derive_models(args)
    ratio = n_params(large) / n_params(base)
    print(f"params: large base {n_params(large) / 1e6:.1f}M, small {n_params(base) / 1e6:.1f}M ({ratio:.1f}x)")
    dec = EFTDecoder(EFTModels(CausalLM(large, "large_base"), CausalLM(base, "small_base"), CausalLM(ft, "small_ft")),
                     beta=args.beta)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    run(dec, prompts[:1], 8, args.k)  # warm-up (allocator, lazy inits)

    # Interleave the two modes prompt by prompt so load on the shared machine hits both alike.
    base_out, spec_out = [], []
    base_tok = spec_tok = 0
    base_s = spec_s = 0.0
    acc_num = acc_den = 0.0
    for p in prompts:
        o, n, s, _ = run(dec, [p], args.new_tokens, 0)
        base_out += o
        base_tok, base_s = base_tok + n, base_s + s
        o, n, s, a = run(dec, [p], args.new_tokens, args.k)
        spec_out += o
        spec_tok, spec_s = spec_tok + n, spec_s + s
        acc_num, acc_den = acc_num + a, acc_den + 1
    base_tps, spec_tps = base_tok / base_s, spec_tok / spec_s
    speedup = spec_tps / base_tps
    acceptance = acc_num / acc_den
    identical = base_out == spec_out
    mismatched = sum(a != b for a, b in zip(base_out, spec_out))
    print(f"baseline (no speculation): {base_tps:.1f} tokens/s over {base_tok} tokens")
    print(f"speculative (k={args.k}):      {spec_tps:.1f} tokens/s over {spec_tok} tokens")
    print(f"speedup {speedup:.2f}x, acceptance {acceptance:.3f}, greedy identical: {identical} "
          f"({mismatched}/{len(prompts)} prompts differ)")
    result = {
        "k": args.k, "prompts": args.prompts, "new_tokens": args.new_tokens, "params_large": n_params(large),
        "params_small": n_params(base), "param_ratio": round(ratio, 2), "baseline_tokens_per_s": round(base_tps, 2),
        "speculative_tokens_per_s": round(spec_tps, 2), "speedup": round(speedup, 3),
        "acceptance": round(acceptance, 4), "greedy_identical": identical, "threads": torch.get_num_threads(),
        "args": vars(args),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    print(f"RESULT speedup={speedup:.2f} acceptance={acceptance:.3f} greedy_identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
