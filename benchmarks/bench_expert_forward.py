"""K soft-prompt experts on one frozen causal LM: batched vs sequential vs shared input.

    python -m benchmarks.bench_expert_forward [--quick] [--device cpu|cuda] [--pass fwd|fwd_bwd|both]

Paths (same model, same K prompts, same B inputs; logits only where they are read):

* ``batched``    prompts prepended, one forward of K*B rows ``[P_k; x; y]`` (the PEFT layout);
* ``sequential`` prompts prepended, K forwards of B rows;
* ``shared``     prompt after x, :func:`kdengine.experts.shared_input.shared_input_forward`
  (x once, then the K segments ``[P_k; y]``), layout "auto", plus "packed" and "batched" rows to
  show what the auto rule picks.

Modes: ``full`` (a response y as long as x, logits at x's and y's positions) and ``last``
(no response, only the final position read: scoring / classification). ``fwd`` runs under
no_grad; ``fwd_bwd`` backpropagates a random projection of the logits to the prompts.
``ratio_vs_batched`` = time of ``batched`` / time of the row, per interleaved round (one run, same
process), median over rounds: > 1 is faster than prepended prompts. ``tokens/s`` counts the K*B*(P + Lx + Ly) tokens every path answers for.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from benchmarks._harness import ResultRows, parse_threaded_args, print_table, time_ms, write_results
from kdengine.experts.shared_input import choose_layout, project, shared_input_forward

# CPU: small models (4 layers, H=256); GPU: a mid-size model that keeps the H200 busy.
SIZES = {
    "cpu": dict(layers=4, hidden=256, heads=4, vocab=8192, batch=2, x_len=64, prompt_len=8, dtype=torch.float32),
    "cpu-quick": dict(layers=2, hidden=64, heads=2, vocab=512, batch=2, x_len=16, prompt_len=4, dtype=torch.float32),
    "cuda": dict(layers=8, hidden=1024, heads=16, vocab=32000, batch=8, x_len=512, prompt_len=16,
                 dtype=torch.bfloat16),
}


def build_model(arch: str, size: dict, device: str):
    h, n, v = size["hidden"], size["layers"], size["vocab"]
    if arch == "gpt2":
        config = GPT2Config(n_layer=n, n_embd=h, n_head=size["heads"], vocab_size=v, n_positions=4096,
                            bos_token_id=v - 1, eos_token_id=v - 1)
    else:
        config = LlamaConfig(hidden_size=h, intermediate_size=int(h * 8 / 3) // 64 * 64, num_hidden_layers=n,
                             num_attention_heads=size["heads"], num_key_value_heads=max(1, size["heads"] // 4),
                             vocab_size=v, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=size["dtype"]).eval().requires_grad_(False)


def prepended_logits(model, prompts, x, y, last_only):
    """Logits of [P_k; x; y] for the experts in ``prompts`` ([k, P, H]): [k*B, Lx+Ly, V] or [k*B, V]."""
    k, plen, _ = prompts.shape
    batch = x.shape[0]
    embed = model.get_input_embeddings()
    text = embed(x if y is None else torch.cat([x, y], dim=1))                 # [B, L, H]
    rows = torch.cat([prompts[:, None].expand(k, batch, plen, -1).reshape(k * batch, plen, -1),
                      text.repeat(k, 1, 1)], dim=1)
    hidden = model.base_model(inputs_embeds=rows).last_hidden_state
    head = model.get_output_embeddings()
    return project(head, hidden[:, -1] if last_only else hidden[:, plen:])


def make_paths(model, prompts, x, y, last_only):
    k = prompts.shape[0]
    return {
        "batched": lambda p: prepended_logits(model, p, x, y, last_only),
        "sequential": lambda p: [prepended_logits(model, p[e:e + 1], x, y, last_only) for e in range(k)],
        "shared": lambda p: shared_input_forward(model, p, x, None, response_ids=y, last_only=last_only),
        "shared/packed": lambda p: shared_input_forward(model, p, x, None, response_ids=y, last_only=last_only,
                                                        layout="packed"),
        "shared/batched": lambda p: shared_input_forward(model, p, x, None, response_ids=y, last_only=last_only,
                                                         layout="batched"),
    }


def runner(path, prompts, grad: bool):
    """A zero-argument callable timing one forward (no_grad) or forward + backward to the prompts."""
    if not grad:
        def fwd():
            with torch.no_grad():
                path(prompts)
        return fwd
    trainable = prompts.detach().clone().requires_grad_(True)

    def fwd_bwd():
        out = path(trainable)
        outs = out if isinstance(out, list) else [out]
        # sum of logits · fixed pseudo-random weights: backward touches every logit once.
        loss = sum((o.float() * torch.cos(torch.arange(o.shape[-1], device=o.device))).sum() for o in outs)
        loss.backward()
        trainable.grad = None
    return fwd_bwd


def processed_tokens(path: str, k: int, b: int, plen: int, x_len: int, y_len: int) -> int:
    """Tokens that go through the transformer layers on each path."""
    if path in ("batched", "sequential"):
        return k * b * (plen + x_len + y_len)
    return b * x_len + k * b * (plen + y_len)


def run(device: str, quick: bool, passes: list[str]) -> list[dict]:
    """Time every path of every (arch, mode, pass).

    CPU: interleaved rounds, each timing each path once (``time_ms`` with one call), so load from
    other processes hits all paths alike; ms_p20/p50/p80 are over rounds and ``ratio_vs_batched``
    is the median of per-round ratios. CUDA: one ``time_ms`` (do_bench) per path, ratio of p50s.
    """
    size = SIZES[device + ("-quick" if quick and device == "cpu" else "")]
    k = 8
    rounds = (2 if quick else 4) if device == "cpu" else 1
    timing = dict(warmup=0, rep=1) if device == "cpu" else {}
    rows = ResultRows("expert_forward")
    for arch in ("gpt2", "llama"):
        model = build_model(arch, size, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        b, x_len, plen = size["batch"], size["x_len"], size["prompt_len"]
        prompts = (torch.randn(k, plen, size["hidden"], generator=gen) * 0.02).to(device, size["dtype"])
        x = torch.randint(0, size["vocab"], (b, x_len), generator=gen).to(device)
        for mode in ("full", "last"):
            y = torch.randint(0, size["vocab"], (b, x_len), generator=gen).to(device) if mode == "full" else None
            y_len = 0 if y is None else x_len
            paths = make_paths(model, prompts, x, y, last_only=mode == "last")
            for pass_name in passes:
                fns = {name: runner(path, prompts, pass_name == "fwd_bwd") for name, path in paths.items()}
                for fn in fns.values():
                    fn()
                times = {name: [] for name in fns}
                for _ in range(rounds):
                    for name, fn in fns.items():
                        times[name].append(time_ms(fn, device=device, **timing)["p50"])
                for name, ms in times.items():
                    q = torch.tensor(ms, dtype=torch.float64)
                    ratio = torch.tensor(times["batched"], dtype=torch.float64) / q
                    logical = k * b * (plen + x_len + y_len)
                    rows.append(dict(
                        device=device, arch=arch, mode=mode, pass_=pass_name, path=name, K=k, B=b, P=plen,
                        Lx=x_len, Ly=y_len, layers=size["layers"], H=size["hidden"], V=size["vocab"],
                        dtype=str(size["dtype"]).replace("torch.", ""), threads=torch.get_num_threads(),
                        rounds=rounds,
                        auto_layout=choose_layout(k, plen + y_len, x_len) if name == "shared" else "",
                        processed_tokens=processed_tokens(name, k, b, plen, x_len, y_len),
                        ms_p20=round(q.quantile(0.2).item(), 2), ms_p50=round(q.median().item(), 2),
                        ms_p80=round(q.quantile(0.8).item(), 2),
                        tokens_per_s=round(logical / (q.median().item() / 1e3)),
                        ratio_vs_batched=round(ratio.median().item(), 3),
                    ))
        del model
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CPU: a tiny model; a smoke run)")
    parser.add_argument("--pass", dest="passes", choices=("fwd", "fwd_bwd", "both"), default="both")
    args = parse_threaded_args(parser, argv)
    passes = ["fwd", "fwd_bwd"] if args.passes == "both" else [args.passes]
    rows = run(args.device, args.quick, passes)
    print_table(rows, ["arch", "mode", "pass_", "path", "auto_layout", "processed_tokens", "ms_p50",
                       "tokens_per_s", "ratio_vs_batched"])
    csv_path, json_path = write_results("expert_forward" + ("_quick" if args.quick else ""), rows, args.out_dir,
                                        device=args.device)
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
