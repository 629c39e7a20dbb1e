"""bench/summary.md: each target of the benchmark with its measured figure and whether it was met."""

from __future__ import annotations

LOSS_TOLERANCE = (0.1, 0.10)  # |ours - reference| <= abs + rel * reference
# What the footprint section (and its `--check`) holds a process to (MiB): a 135M-parameter model's
# process must fit a small machine, and memory must not grow with the number of users it has served.
# Here, not in footprint.py: the driver imports this module in every section's process, and
# footprint.py loads torch, which a section imports only when it runs (costcoeffs times that).
FOOTPRINT_LIMITS_MB = {"peak": 3072.0, "growth": 48.0, "idle": 400.0}


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def render(r: dict) -> str:
    m = r["machine"]
    failed = sorted(k for k, j in r["jobs"].items() if "error" in j)
    jobs = {k: j for k, j in r["jobs"].items() if "error" not in j}
    dev = m["device"] + (f" ({m['gpu']})" if "gpu" in m else "")
    lines = [
        "# oppu benchmarks", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd']) or 'no AVX'}), {m['memory_gib']} GiB, "
        f"torch {m['torch']} with {m['torch_threads']} threads, device **{dev}**.",
        f"Measured {r['date']}, {r.get('wall_seconds', 0) / 60:.1f} min; every section in its own process. "
        "Figures are ratios within this run; absolute times hold for this machine only.",
        f"Dense matmul: fp32 {r['fp32_matmul_flops_per_second'] / 1e9:.1f} GFLOP/s at the start"
        + _job_matmul(jobs) + ", "
        f"bf16 {r['bf16_matmul_flops_per_second'] / 1e9:.1f} GFLOP/s. "
        + ("bf16 is computed in hardware here, so bf16 configurations compute in bf16." if m["bf16_compute"] else
           "This device has no bf16 hardware (no AVX512-BF16/AMX), so bf16 configurations store a 16-bit "
           "base but compute in fp32, which is faster here than emulated bf16."), "",
    ]
    targets: list[tuple[str, str, str, bool | None]] = []
    lines += _training(jobs, targets)
    lines += _serving(jobs, targets)
    lines += _memory(jobs, targets)
    lines += _footprint(jobs, targets)
    lines += _scaling(jobs, targets)
    lines += _comms(jobs)
    lines += _costmodel(jobs)
    wall = r.get("wall_seconds")
    if wall is not None and not failed and r.get("complete", True):
        targets.append(("whole benchmark wall time (`make bench`, model already prepared)", f"{wall / 60:.1f} min",
                        "< 30 min on a 2-core CPU", wall < 1800 if m["cores"] <= 2 and m["device"] == "cpu" else None))
    head = ["## Targets", "", "| target | measured | goal | |", "|---|---|---|---|"]
    head += [f"| {a} | {b} | {c} | {_met(d)} |" for a, b, c, d in targets]
    if failed:
        head += ["", f"**Failed jobs** (see the run's output): {', '.join(failed)}."]
    return "\n".join(lines[:6] + head + [""] + lines[6:]) + "\n"


def _job_matmul(jobs: dict) -> str:
    """The matmul rate each training job measured before and after itself: utilization is
    against these (a single figure at the start can catch the CPU still busy or ramping up)."""
    samples = [x for j in jobs.values() for x in j.get("matmul_samples", [])]
    if not samples:
        return ""
    return f" ({min(samples) / 1e9:.1f}-{max(samples) / 1e9:.1f} GFLOP/s before and after each training job)"


def _training(jobs: dict, targets: list) -> list[str]:
    configs = sorted({k.split(":")[1] for k in jobs if k.startswith("training:")})
    if not configs:
        return []
    first = next(j for k, j in sorted(jobs.items()) if k.startswith("training:"))
    sizes = "/".join(str(u["examples"]) for u in first["users"])
    lines = ["## Personal-adapter training cost per user", "",
             f"{len(first['users'])} users ({sizes} history items of {first['task']}), {first['epochs']:g} epochs, "
             "LoRA r=8 on q_proj/v_proj, batch 4, lr 1e-4, same users, examples and epochs for both procedures. "
             "*ours*: one engine, personal adapter reset in place, tokenized once per user, length-bucketed "
             "batches, LM head at answer positions only. *group*: the same, all users' adapters trained in one "
             "pass, each step's rows drawn from every user (s / user: the pass's time shared by examples). "
             "*reference*: the published OPPU procedure (base "
             "adapter merged into the base, fresh `get_peft_model` and fresh `transformers.Trainer` per user, "
             "padding to the batch's longest, full-sequence LM loss masked by labels=-100). Useful tokens "
             "exclude padding. Final loss: the trained adapter's answer-token loss on the user's examples.", "",
             "| base | procedure | compute | s / user | useful tokens/s | FLOP/s (useful) | of matmul | peak RSS | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    ceilings: list[str] = []
    for c in configs:
        ours, ref = jobs.get(f"training:{c}:ours"), jobs.get(f"training:{c}:reference")
        group = jobs.get(f"training:{c}:group")
        for j in (ours, group, ref):
            if j is None:
                continue
            util = j["flops_per_second"] / j["matmul_flops_per_second"]
            lines.append(f"| {c} ({j['quantization']}) | {j['procedure']}{_batching(j)} | {j['dtype']} on {j['device']} | "
                         f"{j['mean_seconds_per_user']:.1f} | {j['tokens_per_second']:.0f} | "
                         f"{j['flops_per_second'] / 1e9:.1f} G | {util:.0%} | {_mib(j['peak_rss_bytes'])} | "
                         f"{j['final_loss']:.3f} |")
        if ours and ref:
            ref_util = ref["flops_per_second"] / ref["matmul_flops_per_second"]
            ceilings.append(f"{c}: the reference already runs at {ref_util:.0%} of the dense matmul rate, so 2x its "
                            f"useful tokens/s would need {2 * ref_util:.0%} of it (ours: "
                            f"{ours['flops_per_second'] / ours['matmul_flops_per_second']:.0%})")
            speed = ours["tokens_per_second"] / ref["tokens_per_second"]
            targets.append((f"training speed-up vs reference, {c} base", f"{speed:.2f}x useful tokens/s", ">= 2x",
                            speed >= 2))
            tol = LOSS_TOLERANCE[0] + LOSS_TOLERANCE[1] * ref["final_loss"]
            diff = abs(ours["final_loss"] - ref["final_loss"])
            targets.append((f"same final loss as reference, {c} base", f"{ours['final_loss']:.3f} vs {ref['final_loss']:.3f}",
                            f"within {tol:.3f}", diff <= tol))
        if group and ref:
            speed = group["tokens_per_second"] / ref["tokens_per_second"]
            targets.append((f"training speed-up vs reference, {c} base, {len(group['users'])} users in one pass",
                            f"{speed:.2f}x useful tokens/s", ">= 2x", speed >= 2))
        if group and ours:
            targets.append((f"one pass vs one user at a time, {c} base",
                            f"{group['tokens_per_second'] / ours['tokens_per_second']:.2f}x useful tokens/s",
                            "reported", None))
        if ours:
            util = ours["flops_per_second"] / ours["matmul_flops_per_second"]
            goal = ">= 60% (CPU)" if ours["device"] == "cpu" else "reported"
            targets.append((f"hardware utilization, {c} base", f"{util:.0%} of dense {ours['dtype']} matmul "
                            f"({ours['flops_per_second'] / 1e9:.1f} of {ours['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s)",
                            goal, util >= 0.6 if ours["device"] == "cpu" else None))
    if ceilings:
        lines += ["", "The same FLOP count (forward, and backward for activations only: the base is frozen) over "
                  "useful tokens for both procedures: " + "; ".join(ceilings) + "."]
    nf4, b16 = jobs.get("training:nf4:ours"), jobs.get("training:bf16:ours")
    if nf4 and b16:
        how = ("on a CPU the 4-bit base is dequantized once per training run, so both compute the same "
               f"{nf4['dtype']} matmuls" if nf4["device"] == "cpu" else
               "bitsandbytes' CUDA kernels dequantize the 4-bit base in every forward and backward")
        lines += ["", f"nf4 base {nf4['tokens_per_second']:.0f} vs 16-bit base ({b16['dtype']} compute) "
                  f"{b16['tokens_per_second']:.0f} useful tokens/s: {how}."]
    return lines + [""]


def _batching(j: dict) -> str:
    """How ours formed its steps, when not the default batch of examples."""
    how = ([f"{j['batch_tokens']} tokens per step"] if j.get("batch_tokens") else []) + (["packed"] if j.get("packing") else [])
    return f" ({', '.join(how)})" if how and j["procedure"] != "reference" else ""


def _serving(jobs: dict, targets: list) -> list[str]:
    s = jobs.get("serving")
    if not s:
        return []
    lines = ["## Serving many users", "",
             f"{s['users']} users, one request each, each user with their own personal adapter over the shared "
             f"base adapter ({s['quantization']} base, {s['dtype']} on {s['device']}, up to {s['max_new_tokens']} "
             f"new tokens, best of {s['repeats']}). Mixed-batch answers equal one-at-a-time answers for "
             f"{s['mixed_equals_swap']} requests" + _batching_note(s) + ".", "",
             "| mode | answers/s | s for all |", "|---|---|---|"]
    for k, label in (("mixed_batch", "mixed batch (one forward pass, per-row adapters)"),
                     ("swap_per_request", "swap adapter per request"),
                     ("single_adapter", f"single adapter, batch {s['users']}")):
        lines.append(f"| {label} | {s[k]['answers_per_second']:.2f} | {s[k]['seconds']:.1f} |")
    if s["device"] == "cpu":
        lines += ["", "On a CPU one request's prefill already keeps the matmul units busy, so one batch saves "
                  "only the per-request overhead and the batched decode steps: mixed batch and single adapter are "
                  "compute-bound alike."]
    targets.append((f"serving M={s['users']}: mixed batch vs swap per request", f"{s['mixed_vs_swap']:.1f}x", ">= 4x",
                    s["mixed_vs_swap"] >= 4))
    targets.append((f"serving M={s['users']}: mixed batch vs single adapter", f"{s['mixed_vs_single']:.0%}", ">= 70%",
                    s["mixed_vs_single"] >= 0.7))
    return lines + [""]


def _batching_note(s: dict) -> str:
    """What batching alone does to the answers: a row of a mixed batch computes what its user's
    adapter computes on that batch, but bf16 matmuls round differently for other batch sizes."""
    if "batched_equals_alone" not in s:  # results from before it was measured
        return ""
    return (f"; one adapter's answers in a batch of {s['users']} equal its one-at-a-time answers for "
            f"{s['batched_equals_alone']} (in {s['dtype']} the matmuls' rounding depends on the batch size: "
            "what batching changes, not mixing users)")


def _memory(jobs: dict, targets: list) -> list[str]:
    mem = jobs.get("memory")
    if not mem:
        return []
    targets.append(("base model resident size, nf4 vs bf16",
                    f"{_mib(mem['nf4']['resident_bytes'])} vs {_mib(mem['bf16']['resident_bytes'])} = {mem['nf4_vs_bf16']:.0%}",
                    "<= 35%", mem["nf4_vs_bf16"] <= 0.35))
    rows = ["## Memory", "", "| base | resident |", "|---|---|",
            f"| nf4 (embedding and tied LM head in nf4 too, the default) | {_mib(mem['nf4']['resident_bytes'])} |"]
    if "nf4_embeddings_unquantized" in mem:
        rows.append(f"| nf4, embedding kept in {mem['nf4_embeddings_unquantized']['dtype']} "
                    f"(base_model.quantize_embeddings = false) | {_mib(mem['nf4_embeddings_unquantized']['resident_bytes'])} |")
    return rows + [f"| bf16 | {_mib(mem['bf16']['resident_bytes'])} |", ""]


def _footprint(jobs: dict, targets: list) -> list[str]:
    f = jobs.get("footprint")
    if not f:
        return []
    rss, limits = f["rss_mb"], FOOTPRINT_LIMITS_MB
    targets.append(("one process serving users in turn (`oppu experiment`, the daemon): peak resident",
                    f"{f['peak_mb']:.0f} MiB", f"<= {limits['peak']:.0f} MiB", f["peak_mb"] <= limits["peak"]))
    targets.append(("... resident growth from the first user to the last", f"{f['growth_mb']:+.0f} MiB",
                    f"<= {limits['growth']:.0f} MiB (flat in users)", f["growth_mb"] <= limits["growth"]))
    return ["## Footprint of a process serving users in turn", "",
            f"{f['users']} users of {f['task']} ({f['dtype'].replace('torch.', '')}), each: Chroma store, answers, personal "
            f"training, answers; prompts up to {f['prompt_tokens']['max']} tokens (mean {f['prompt_tokens']['mean']}). "
            "`python -m simulations.bench.footprint` runs it alone.", "",
            "| when | resident |", "|---|---|",
            f"| base model loaded | {rss['loaded']:.0f} MiB |", f"| base adapter trained | {rss['base_trained']:.0f} MiB |",
            *[f"| after user {i + 1} | {v:.0f} MiB |" for i, v in enumerate(rss["after_user"])],
            f"| peak | {f['peak_mb']:.0f} MiB |", ""]


def _scaling(jobs: dict, targets: list) -> list[str]:
    rows = sorted((j for k, j in jobs.items() if k.startswith("scaling:")), key=lambda j: j["users"])
    if not rows:
        return []
    lines = ["## Simulation scaling", "", rows[0]["note"], "",
             "| virtual users | wall time | peak memory (all processes) | worker processes | base-model loads in workers | in coordinator |",
             "|---|---|---|---|---|---|"]
    for j in rows:
        lines.append(f"| {j['users']} | {j['seconds']:.0f} s | {_mib(j['peak_rss_bytes'])} | {j['workers']} | {j['loads']} | {j['coordinator_loads']} |")
    once = all(j["loads_per_worker_max"] == 1 for j in rows)
    targets.append(("base model loaded once per worker process", "max "
                    f"{max(j['loads_per_worker_max'] for j in rows)} load(s) per process over N={','.join(str(j['users']) for j in rows)}",
                    "1", once))
    return lines + [""]


def _comms(jobs: dict) -> list[str]:
    c = jobs.get("comms")
    if not c:
        return []
    return ["## Communication", "",
            f"Base adapter LoRA r={c['adapter']['r']} on {', '.join(c['adapter']['targets'])}; bytes of the Flower "
            "ArrayRecord payload, sent down with the train message and back up as the update.", "",
            "| what | bytes | |", "|---|---|---|",
            f"| base adapter per round, LoRA (A and B) | {c['lora_round_trip_bytes']:,} | {_mib(c['lora_round_trip_bytes'])} round trip |",
            f"| base adapter per round, FFA-LoRA (B only) | {c['ffa_lora_round_trip_bytes']:,} | {_mib(c['ffa_lora_round_trip_bytes'])} round trip |",
            f"| base model, once per client (nf4 artifact) | {c['base_model_nf4_artifact_bytes']:,} | {_mib(c['base_model_nf4_artifact_bytes'])} |",
            f"| base model source checkpoint (for comparison) | {c['base_model_source_checkpoint_bytes']:,} | {_mib(c['base_model_source_checkpoint_bytes'])} |",
            ""]


def _costmodel(jobs: dict) -> list[str]:
    c = jobs.get("costmodel")
    if not c:
        return []
    w, d = c["worker"], c["driver"]

    def row(name: str, p: dict, key: str, unit: str) -> str:
        f = p[key]
        return (f"| {name} | {p['threads']} | {f['call_s']:.3f} | {f.get('step_s', f.get('row_s', 0.0)):.3f} | "
                f"{f['token_s'] * 1e3:.2f} | {unit} |")

    lines = ["## Cost model of `oppu simulate`", "",
             f"Coefficients measured with the data and prompts of {c['config']}: the coordinator's process, then "
             f"{c['concurrent_workers']} worker processes at once (as the simulation runs them); load average "
             f"{', '.join(str(x) for x in c['machine'].get('load_average', []))} (1/5/15 min, before and after). "
             "`python -m simulations.bench.costmodel --coefficients RESULTS_JSON --users N --rounds R` predicts a "
             "run's wall time from them (docs/simulations.md, \"Cost model\").", "",
             "| cost | threads | per call s | per step / row s | per token ms | counted over |", "|---|---|---|---|---|---|",
             row("training, worker", w, "train", "steps, padded tokens"),
             row("training, coordinator", d, "train", "steps, padded tokens"),
             row("answering, worker", w, "answer", "prompts, prompt tokens"),
             row("answering, coordinator", d, "answer", "prompts, prompt tokens"),
             row("validation scoring, worker", w, "score", "chunks of 4, items, prompt tokens"), "",
             f"Fixed: model load {w['load_s']:.1f} s per worker, {d['load_s']:.1f} s in the coordinator; Ray start "
             f"{c['ray_start_s']:.1f} s; data directory {c['prepare_user_s']:.2f} s per user; store and adapter "
             f"files {w['user_task_s']:.2f} s per user and message; 4-bit base dequantized once per selection "
             f"{w['selection_s']:.2f} s."]
    p = c.get("prediction")
    if p:
        lines += ["", f"Predicted for {c['config']} ({p['users']} users, {p['rounds']} rounds): "
                  f"{p['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in p["phases"].items()) + ")."]
    return lines + [""]
