"""Forward + backward cost of the unitary RNNs against torch.nn.LSTM on the copy task, and the Cayley step.

    .venv/bin/python benchmarks/bench_unitary_rnn.py              # T = 1000 (length 1020), batch 20
    .venv/bin/python benchmarks/bench_unitary_rnn.py --quick      # a smoke run (T = 50)

One training step's forward + backward (loss: per-step cross-entropy of the copy task, a linear head on
every state) for the full-capacity uRNN (N = 128), the restricted uRNN (N = 128), nn.LSTM with
hidden 128 and with hidden 68, all in the same process; for reference, the same uRNN maths as plain
autograd loops over complex tensors (dense W; restricted W applied with FFTs every step). The models are timed round-robin, ``--repeats``
rounds, and each one's best round is reported, so a load spike on a shared machine hits every model
alike. Ratios are against LSTM-128. The CPU time of the process is reported beside the wall-clock
time: with ``--threads 1`` it is the compute time without the waits of a shared machine (with more
threads it sums over them). If ``unitary_rnn.training.optim.cayley_step`` is importable, one Cayley step
is also timed for N = 128 ... 2048 (complex64). Writes ``benchmarks/results/bench_unitary_rnn.json`` and
``.png``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import pyplot, write_results
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForTokenClassification  # noqa: E402
from unitary_rnn.cells import RESTRICTED_PARAMETERS  # noqa: E402
from unitary_rnn.parametrizations import modrelu, restricted_unitary_apply  # noqa: E402
from unitary_rnn.training.tasks import CopyMemoryTask  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class LSTMTagger(nn.Module):
    """nn.LSTM on one-hot symbols with a linear head on every step: the copy-task baseline."""

    def __init__(self, vocab_size: int, hidden: int, num_labels: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.lstm = nn.LSTM(vocab_size, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, labels):
        x = nn.functional.one_hot(input_ids, self.vocab_size).float()
        out, _ = self.lstm(x)
        logits = self.head(out)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class URNNTagger(nn.Module):
    def __init__(self, task: CopyMemoryTask, hidden: int, parametrization: str):
        super().__init__()
        config = UnitaryRNNConfig(
            vocab_size=task.vocab_size, hidden_size=hidden, num_labels=task.num_labels, parametrization=parametrization
        )
        self.model = UnitaryRNNForTokenClassification(config)

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


class NaiveLoop(nn.Module):
    """The same uRNN maths as a plain autograd loop over complex tensors (no fusion), sharing the
    parameters of ``tagger``: ``mode="dense"`` multiplies by the materialised W every step,
    ``mode="fft"`` applies the restricted product with FFTs every step (O(N log N) per step)."""

    def __init__(self, tagger: URNNTagger, mode: str):
        super().__init__()
        self.tagger, self.mode = tagger, mode

    def forward(self, input_ids, labels):
        model = self.tagger.model
        cell = model.model.cell
        N = cell.hidden_size
        x = model.model.embeddings(input_ids)
        V = torch.complex(cell.input_weight[:N], cell.input_weight[N:])
        u = x.to(V.dtype) @ V.T
        h = torch.complex(cell.initial_state[:N], cell.initial_state[N:]).expand(x.shape[0], N)
        if self.mode == "dense":
            Wt = cell.recurrent_matrix().T
            step = lambda h: h @ Wt  # noqa: E731
        else:
            params = [getattr(cell, n) for n in RESTRICTED_PARAMETERS]
            step = lambda h: restricted_unitary_apply(h, *params, cell.permutation)  # noqa: E731
        states = []
        for t in range(u.shape[1]):
            h = modrelu(step(h) + u[:, t], cell.hidden_bias, cell.eps)
            states.append(torch.cat([h.real, h.imag], dim=-1))
        logits = model.classifier(torch.stack(states, dim=1))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def fwd_bwd(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    c0, t0 = time.process_time(), time.perf_counter()
    loss = model(**batch)
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_models(args) -> list[dict]:
    task = CopyMemoryTask(delay=args.steps)
    batch = task.generate(args.batch, seed=0)
    torch.manual_seed(0)
    full, restricted = URNNTagger(task, 128, "full"), URNNTagger(task, 128, "restricted")
    models = {
        "uRNN full N=128": full,
        "uRNN restricted N=128": restricted,
        "LSTM H=128": LSTMTagger(task.vocab_size, 128, task.num_labels),
        "LSTM H=68": LSTMTagger(task.vocab_size, 68, task.num_labels),
    }
    if not args.no_reference_loops:
        models["uRNN full N=128, naive loop"] = NaiveLoop(full, "dense")
        models["uRNN restricted N=128, FFT loop"] = NaiveLoop(restricted, "fft")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        fwd_bwd(model, batch)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(fwd_bwd(model, batch))
    ref = min(w for w, _ in times["LSTM H=128"])
    ref_cpu = min(c for _, c in times["LSTM H=128"])
    rows = []
    for name, model in models.items():
        wall = [w for w, _ in times[name]]
        cpu = [c for _, c in times[name]]
        rows.append({
            "model": name,
            "params": sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters()),
            "best_ms": 1000 * min(wall),
            "median_ms": 1000 * statistics.median(wall),
            "ratio_vs_lstm128": min(wall) / ref,
            "best_cpu_ms": 1000 * min(cpu),
            "cpu_ratio_vs_lstm128": min(cpu) / ref_cpu,
        })
    return rows


def bench_cayley(args) -> list[dict] | str:
    try:
        from unitary_rnn.training.optim import cayley_step
    except ImportError as err:  # optim is built separately; the model benchmark does not need it
        return f"skipped: unitary_rnn.training.optim.cayley_step not importable ({err})"
    from unitary_rnn.parametrizations import random_unitary

    rows = []
    for n in args.cayley_sizes:
        g = torch.Generator().manual_seed(n)
        W = random_unitary(n, generator=g)
        G = torch.complex(torch.randn(n, n, generator=g), torch.randn(n, n, generator=g))
        cayley_step(W, G, 1e-4)  # warm-up
        reps = max(1, min(args.repeats, int(2e9 // n**3)))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            cayley_step(W, G, 1e-4)
            ts.append(time.perf_counter() - t0)
        rows.append({"N": n, "best_ms": 1000 * min(ts), "repeats": reps})
    return rows


def plot(result: dict):
    """Forward + backward time per model, and the Cayley step against N (a matplotlib figure)."""
    plt = pyplot()
    cayley = result["cayley"] if isinstance(result["cayley"], list) else None
    fig, axes = plt.subplots(1, 2 if cayley else 1, figsize=(14 if cayley else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    rows = result["models"]
    ax.bar([r["model"].replace(", ", "\n") for r in rows], [r["best_ms"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    for i, r in enumerate(rows):
        ax.text(i, r["best_ms"], f"{r['best_ms']:.0f} ms\n{r['ratio_vs_lstm128']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"copy task T={result['steps']} (length {result['sequence_length']}), batch {result['batch']}")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    if cayley:
        ax2 = axes[0][1]
        ax2.loglog([r["N"] for r in cayley], [r["best_ms"] for r in cayley], "o-")
        ax2.set_xlabel("N")
        ax2.set_ylabel("one Cayley step (ms)")
        ax2.set_title("Cayley step, complex64")
        ax2.grid(True, which="both", alpha=0.3)
    return fig


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="copy-task delay T (sequence length T + 20)")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="round-robin rounds; each model's best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cayley-sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--quick", action="store_true", help="T = 50, 2 rounds, Cayley N = 128, 256")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-reference-loops", action="store_true",
                        help="skip the unfused complex loops (dense W and restricted FFT apply per step)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.cayley_sizes = 50, 2, [128, 256]
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "steps": args.steps,
        "sequence_length": args.steps + 20,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": "cpu",
        "models": bench_models(args),
        "cayley": bench_cayley(args),
    }
    print(f"copy task T={args.steps} (length {args.steps + 20}), batch {args.batch}, forward + backward, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'model':32s} {'params':>9s} {'best ms':>9s} {'median ms':>10s} {'vs LSTM-128':>12s} {'CPU ms':>9s} {'CPU vs LSTM-128':>16s}")
    for r in result["models"]:
        print(f"{r['model']:32s} {r['params']:9d} {r['best_ms']:9.1f} {r['median_ms']:10.1f} {r['ratio_vs_lstm128']:11.2f}x"
              f" {r['best_cpu_ms']:9.1f} {r['cpu_ratio_vs_lstm128']:15.2f}x")
    if isinstance(result["cayley"], list):
        print("Cayley step (complex64): " + ", ".join(f"N={r['N']}: {r['best_ms']:.1f} ms" for r in result["cayley"]))
    else:
        print("Cayley step: " + result["cayley"])
    stem = "bench_unitary_rnn" + ("_quick" if args.quick else "") + (f"_threads{args.threads}" if args.threads else "")
    write_results(args.out / stem, result, None if args.no_plot else plot(result))
    return result


if __name__ == "__main__":
    main()
