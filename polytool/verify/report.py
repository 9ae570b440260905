"""The human report of a verify run: a header, one PASS/FAIL line per check, a summary line."""
from __future__ import annotations

from ..core.units import human_size


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2e}"


def _inputs(inputs: dict) -> str:
    tensors = inputs.get("tensors") or {"input_ids": None}
    if inputs["source"] == "random" and list(tensors) == ["input_ids"]:
        return f"{inputs['sequences']} x {inputs['seq_len']} random token ids (seed {inputs['seed']})"
    if inputs["source"] == "random":  # images, audio: "random pixel_values (4, 3, 224, 224) (seed 0)"
        shapes = ", ".join(f"{name} ({', '.join(map(str, shape))})" for name, shape in tensors.items())
        return f"random {shapes} (seed {inputs['seed']})"
    extra = [name for name in tensors if not name.endswith("input_ids")]
    seeded = f", with seeded {', '.join(extra)} (seed {inputs['seed']})" if extra else ""
    return f"{inputs['sequences']} prompts from {inputs['file']}{seeded}"


def _rules(report: dict) -> list[str]:
    """How each check was judged, with the numbers used."""
    lines = []
    for dtype, (atol, rtol) in report["tolerances"].items():
        floor = report["floor_multiple"] if dtype in report["floor_dtypes"] else None
        rule = f"max|a-b| <= {atol:g} + {rtol:g} * max|b|"
        if floor:
            rule += f", or <= {floor:g} x the error of the ideal rounding to {dtype} (dense)"
        lines.append(f"  {dtype:<9} {rule}")
    if report["max_kl"] is not None:
        lines.append(f"  and the largest KL divergence per position <= {report['max_kl']:g} (--max-kl)")
    return lines


def _truncation_lines(truncation: dict | None) -> list[str]:
    """A truncated merge: per module its rank, its error from the exact merge and the Eckart-Young optimum."""
    if not truncation:
        return []
    lines = ["      rank optimality (relative Frobenius error from the exact merge | the optimum for that rank):"]
    for row in truncation["modules"]:
        flag = "" if row["passed"] else "  <- beyond rounding"
        flag += "  (s_k = s_k+1: the optimum is not unique)" if row["degenerate"] else ""
        flag += f"  ({row['ambiguous']} entries ambiguous within rounding)" if row.get("ambiguous") else ""
        lines.append(f"        {row['module']:<40} rank {row['rank']:<3} error {row['error']:.6e} | optimum "
                     f"{row['optimum']:.6e}  excess {row['excess']:+.1e} (slack {row['slack']:.1e}){flag}")
    return lines


def render_report(report: dict) -> str:
    checks = report["checks"]
    used = {c["dtype"] for c in checks}
    report = {**report, "tolerances": {k: v for k, v in report["tolerances"].items() if k in used}}
    lines = [f"adapter   {report['adapter']} (sha256 {report['adapter_sha256'][:12]})",
             f"base      {report['base']} ({report['model_class']}; computed in float32 on {report['device']}"
             + (f"; run in {human_size(report['max_memory'])} of memory, the rest of the model offloaded"
                if report["offloaded"] else "") + ")",
             f"reference {report['reference']}",
             f"inputs    {_inputs(report['inputs'])}",
             f"compared  {', '.join(report['outputs'])} and the outputs of {report['modules']} adapted modules; "
             "each passes if", *_rules(report), ""]
    if report.get("covers"):
        lines[-1:-1] = [f"covers    {report['covers']}"]
    width = max((len(str(c["artifact"])) for c in checks), default=0)
    for c in checks:
        task = f"task {c['task']}" if isinstance(c["task"], int) else c["task"]
        kl = f"  kl {_fmt(c['kl_max'])}" if c["kl_max"] is not None else ""
        floor = f"  floor {_fmt(c['rounding_floor_rel'])}" if c["rounding_floor_rel"] is not None else ""
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {task:<8} {c['kind']:<5}  {c['artifact']:<{width}}  "
                     f"{c['dtype']:<8}  abs {_fmt(c['max_abs_err'])}  rel {_fmt(c['max_rel_err'])}  "
                     f"modules {_fmt(c['module_max_rel_err'])}  top1 {_fmt(c['top1_agreement'], pct=True):>6}{kl}  "
                     f"effect {_fmt(c['adapter_effect_rel'])}{floor}")
        if c.get("proof"):
            lines.append(f"      proof: {c['proof']}")
        if c["weights"]:
            w = c["weights"]
            ambiguous = f"; {w['ambiguous']} entries ambiguous within rounding" if w.get("ambiguous") else ""
            lines.append(f"      weights: {w['merged']} merged, {w['replaced']} trained heads, {w['identical']} as the "
                         f"base's; max {w['max_ulps']:.3g} ulp from the exact rounding{ambiguous}")
        lines += _truncation_lines(c.get("truncation"))
        lines += [f"      {text}" for text in ([c["reason"]] if c["reason"] else []) + c["notes"]]
    s = report["summary"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines += ["", f"summary: {verdict}: {s['passed']} of {s['checks']} checks passed, {s['failed']} failed"]
    return "\n".join(lines)
