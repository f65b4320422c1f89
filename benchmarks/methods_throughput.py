"""Training-step time and peak memory of every PEFT method, as ratios to full fine-tuning measured in the same run.

    python -m benchmarks.methods_throughput [--backbone vit_small_patch16_224] [--size 64] [--batch 32] [--steps 10]
                                             [--device cpu|cuda] [--bf16] [--clock wall|cpu] [--write]

`--size` is the input side in pixels: the backbone is built at that size (64: 4 × 4 patches, a quick CPU proxy;
224: the backbone's own 14 × 14 grid, e.g. `--size 224 --batch 8 --rounds 3 --steps 4` on CPU). `--write` names the
result file by backbone, size and device: benchmarks/results/methods_throughput_<backbone>_<size>_<device>.json.

Each configuration runs in its own subprocess so that peak memory (max RSS on CPU, max allocated on CUDA) belongs
to that configuration alone; the configurations run interleaved in rounds, and the reported time is the median over
rounds, so a background load slows every configuration alike and the ratios stay comparable. HF peft's LoRA is
measured on the same model and the same target modules.

`--clock cpu` (CPU only) times each step by the process's CPU time instead of the wall clock, its OpenMP threads
told to sleep rather than spin while they wait (OMP_WAIT_POLICY=PASSIVE): on a machine whose cores other work shares,
wall-clock steps of the same configuration swing several-fold with that work's load, while the CPU time a step
needs stays within a few percent when that work is light and drifts by some 10-20 % when it competes for caches and
memory bandwidth. It is the work a step costs, not its latency: a part that keeps one of the threads idle counts once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Any

from benchmarks import write_result

CONFIGS: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("linear", "linear", {}),
    ("bitfit", "bitfit", {}),
    ("ln_tune", "ln_tune", {}),
    ("partial k=2", "partial", {"k": 2}),
    ("lora r=8 q,v", "lora", {"rank": 8}),
    ("ssf", "ssf", {}),
    ("fact_tt r=8", "fact_tt", {"rank": 8}),
    # LoRA on FacT-TT's six matrices at its smallest rank: the nearest LoRA comes to FacT's parameter count
    ("lora r=1 q,k,v,proj,fc1,fc2", "lora", {"rank": 1, "targets": "q,k,v,proj,fc1,fc2"}),
    ("adapter d=8", "adapter", {"dim": 8}),
    ("adaptformer d=8", "adaptformer", {"dim": 8}),
    ("convpass d=8", "convpass", {"dim": 8}),
    ("vpt_shallow n=10", "vpt_shallow", {"length": 10}),
    ("vpt_deep n=10", "vpt_deep", {"length": 10}),
    ("prefix n=10", "prefix", {"length": 10}),
    # ours against HF peft on identical modules: proj, fc1, fc2 are plain Linears in both
    ("lora r=8 proj,fc1,fc2", "lora", {"rank": 8, "targets": "proj,fc1,fc2"}),
    ("peft lora r=8 proj,fc1,fc2", "peft_lora", {"rank": 8, "targets": ["proj", "fc1", "fc2"]}),
    # on the fused qkv: ours updates the q, k, v slices separately, peft the whole Linear
    ("lora r=8 q,k,v", "lora", {"rank": 8, "targets": "q,k,v"}),
    ("peft lora r=8 qkv", "peft_lora", {"rank": 8, "targets": ["qkv"]}),
]


def _build(backbone: str, size: int, method: str, options: dict, device: str) -> Any:
    import timm
    import torch

    from autopeft.backbones import backbone_spec, create_backbone
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan

    torch.manual_seed(0)
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = timm.create_model(backbone, pretrained=False, num_classes=100, img_size=size)
        cfg = LoraConfig(r=options["rank"], lora_alpha=options["rank"], target_modules=options["targets"],
                         modules_to_save=["head"])
        return get_peft_model(model, cfg).to(device)
    model = create_backbone(backbone, num_classes=100, img_size=size)
    spec = backbone_spec(backbone)
    # the spec of the backbone's own size differs from a model built at another size only in the token grid
    import dataclasses

    patch_embed: Any = model.patch_embed
    grid = tuple(patch_embed.grid_size)
    spec = dataclasses.replace(spec, grid=grid, num_patches=grid[0] * grid[1])
    plan = PeftPlan.single(make_spec(method, {k: v for k, v in options.items()}), range(spec.num_blocks))
    return plan.apply(model, spec).to(device)


def child(args: argparse.Namespace) -> None:
    """Measure one configuration and print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    label, method, options = CONFIGS[args.child]
    device = args.device
    model = _build(args.backbone, args.size, method, options, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = []
    for _ in range(args.steps):
        t0 = clock()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
    print(json.dumps({"label": label, "step_s": statistics.median(times), "steps_s": times, "peak_mb": peak_mb,
                      "params": trainable}))


def run(args: argparse.Namespace) -> list[dict]:
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for i, (label, _, _) in enumerate(CONFIGS):
            cmd = [sys.executable, "-m", "benchmarks.methods_throughput", "--child", str(i)] + _forward(args)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ,
                                                                                      **_child_env(args)})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            entry = results.setdefault(label, {"label": label, "times": [], "steps": [], "peak_mb": 0.0,
                                               "params": row["params"]})
            entry["times"].append(row["step_s"])
            entry["steps"].extend(row["steps_s"])
            entry["peak_mb"] = max(entry["peak_mb"], row["peak_mb"])
            print(f"round {r + 1}/{args.rounds} {label:28s} {row['step_s'] * 1000:8.1f} ms  {row['peak_mb']:8.0f} MB",
                  file=sys.stderr)
    rows = []
    full = statistics.median(results["full"]["times"])
    full_best = min(results["full"]["steps"])
    full_mem = results["full"]["peak_mb"]
    for label, entry in results.items():
        t, best = statistics.median(entry["times"]), min(entry["steps"])
        rows.append({"label": label, "params": entry["params"], "step_ms": 1000 * t, "time_vs_full": t / full,
                     "best_ms": 1000 * best, "best_vs_full": best / full_best, "round_ms": [1000 * x for x in
                                                                                            entry["times"]],
                     "peak_mb": entry["peak_mb"], "mem_vs_full": entry["peak_mb"] / full_mem})
    return rows


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1"}
    if args.clock == "cpu":
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # waiting threads sleep: CPU time counts work, not spinning
    return env


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--backbone", args.backbone, "--size", str(args.size), "--batch", str(args.batch), "--steps",
           str(args.steps), "--device", args.device, "--threads", str(args.threads), "--clock", args.clock]
    return out + (["--bf16"] if args.bf16 else [])


def _targets(rows: list[dict], key: str) -> list[str]:
    """The targets judged on one statistic: `time_vs_full` (medians) or `best_vs_full` (fastest steps)."""
    by = {r["label"]: r for r in rows}
    frozen = [r for r in rows if r["label"] not in ("full", "partial k=2") and not r["label"].startswith("peft")]
    over = [r for r in frozen if r[key] > 0.75]
    fact, lora6 = by["fact_tt r=8"], by["lora r=1 q,k,v,proj,fc1,fc2"]
    return [
        "frozen-backbone methods ≤ 0.75× full fine-tuning: "
        + ("met by all" if not over else "missed by " + ", ".join(f"{r['label']} ({r[key]:.3f}×)" for r in over))
        + f"; slowest {max(frozen, key=lambda r: r[key])['label']}",
        f"FacT-TT ({fact['params']:,} parameters) vs LoRA on the same six matrices ({lora6['params']:,}): "
        f"{fact[key]:.3f}× vs {lora6[key]:.3f}× full (target ≤ LoRA + 0.05: "
        f"{'met' if fact[key] <= lora6[key] + 0.05 else 'missed'})",
    ]


def table(rows: list[dict], args: argparse.Namespace) -> str:
    by = {r["label"]: r for r in rows}
    lines = [
        f"Command: `python -m benchmarks.methods_throughput {' '.join(sys.argv[1:])}`  ",
        f"Date: {date.today()}, machine: {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds × {args.steps} steps, "
        f"{'process CPU time' if args.clock == 'cpu' else 'wall clock'}: step ms is the median of the rounds' "
        "medians, best ms the fastest single step.",
        "",
        "| method | trainable params (no head) | step ms | time / full | best ms | best / full | peak MB | "
        "memory / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['params']:,} | {r['step_ms']:.1f} | {r['time_vs_full']:.2f} | "
                     f"{r['best_ms']:.1f} | {r['best_vs_full']:.2f} | {r['peak_mb']:.0f} | {r['mem_vs_full']:.2f} |")
    ours, theirs = by["lora r=8 proj,fc1,fc2"], by["peft lora r=8 proj,fc1,fc2"]
    lines += [""]
    for key, name in (("time_vs_full", "medians"), ("best_vs_full", "fastest steps")):
        lines += [f"- By {name}: {line}." for line in _targets(rows, key)]
    lines += [
        f"- Our LoRA vs HF peft's LoRA on the same modules (proj, fc1, fc2), medians: "
        f"{ours['step_ms'] / theirs['step_ms']:.2f}× (target ≤ 1.0×: "
        f"{'met' if ours['step_ms'] <= theirs['step_ms'] else 'missed'}); on qkv: "
        f"{by['lora r=8 q,k,v']['step_ms'] / by['peft lora r=8 qkv']['step_ms']:.2f}× "
        "(ours keeps separate q, k, v updates, peft one update of the fused Linear).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=64, help="input side in pixels; the backbone is built at it")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by the wall clock or by the process's CPU time (cpu: CPU only; see above)")
    p.add_argument("--write", action="store_true", help="write the table to benchmarks/results and BENCHMARKS.md")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; a CUDA step's time is on the GPU")
    if args.child is not None:
        child(args)
        return
    rows = run(args)
    text = table(rows, args)
    print(text)
    if args.write:
        path = write_result(f"methods_throughput_{args.backbone}_{args.size}_{args.device}.json",
                            {"args": vars(args), "rows": rows})
        print(f"wrote {path}; paste the table into BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
