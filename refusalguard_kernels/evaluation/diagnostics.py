"""Drift diagnostics: how fine-tuning moved a model's refusal geometry, layer by layer.

For a base model and a tuned model (or the same model with and without an adapter) on a
harmful and a harmless prompt set, per decoder layer:

* ``principal_angles_deg``: the principal angles between the base and the tuned refusal
  cones (each extracted with ``extract_refusal_basis``, k columns); 0 = same subspace.
* ``coord_shift``: the mean shift of the harmful prompts' coordinates in the *base* cone,
  tuned minus base, per cone direction, in units of the base model's pooled within-class
  standard deviation of that coordinate (harmful and harmless pooled). Negative on the
  first direction = harmful prompts moved toward where harmless prompts sit.
  ``coord_shift_norm`` is its Euclidean norm over the k directions; ``coord_drift_rms``
  the root-mean-square per-prompt change (not just the mean), in the same units.
* ``separation_base`` / ``separation_tuned``: harmful minus harmless mean projection on
  the base refusal direction, in the base model's pooled std (how well each model's
  activations still separate the two sets along the base direction).
* ``coupling_base`` / ``coupling_tuned``: the harmfulness-refusal coupling of each model,
  the cosine between the harmfulness direction (difference of means, harmful minus
  harmless, at the last token of the user message) and the refusal direction (the same
  difference at the post-instruction positions: the template tokens after the user
  message), after Zhao et al. (2025), "LLMs encode harmfulness and refusal separately".
  Needs a chat template (None without one).

``model_geometry`` measures one model (so a base model can be measured, then wrapped with
an adapter and measured again); ``compare_geometry`` turns two measurements into the
report; ``diagnose`` does both for two models. ``format_table``, ``save_report`` and
``plot_report`` write the table, the JSON and the PNG.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..integration.model_utils import (
    find_decoder_layers,
    format_prompts,
    has_chat_template,
    input_device,
    layer_hidden,
    right_padded_batch,
)

__all__ = [
    "principal_angles",
    "ModelGeometry",
    "model_geometry",
    "compare_geometry",
    "diagnose",
    "format_table",
    "save_report",
    "plot_report",
]


def principal_angles(basis_a: Tensor, basis_b: Tensor) -> Tensor:
    """Principal angles in degrees (ascending, float64) between the column spans of two
    orthonormal (d, k_a) and (d, k_b) bases; min(k_a, k_b) of them."""
    if basis_a.dim() != 2 or basis_b.dim() != 2 or basis_a.shape[0] != basis_b.shape[0]:
        raise ValueError(
            f"principal_angles needs two (d, k) bases with the same d; got {tuple(basis_a.shape)} "
            f"and {tuple(basis_b.shape)}"
        )
    # Re-orthonormalise in float64 so float32 storage error cannot push a cosine past 1.
    qa = torch.linalg.qr(basis_a.detach().to(torch.float64).cpu())[0]
    qb = torch.linalg.qr(basis_b.detach().to(torch.float64).cpu())[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).sort().values


@dataclass
class ModelGeometry:
    """Activations of one model at the positions the diagnostics need, plus its refusal cone.

    ``post``/``last``/``user_last``: layer -> {"harmful": (n_h, d), "harmless": (n_l, d)} float64
    (mean over the post-instruction tokens; the final prompt token; the last user-message token).
    ``cones``: layer -> (d, k) float32 orthonormal basis (positions as in ``positions``).
    """

    layers: list[int]
    positions: str
    k: int
    post: dict[int, dict[str, Tensor]] | None
    last: dict[int, dict[str, Tensor]]
    user_last: dict[int, dict[str, Tensor]] | None
    cones: dict[int, Tensor]
    model_name: str

    def coords_acts(self, layer: int, kind: str) -> Tensor:
        """The activations the cone coordinates are taken at (same positions as the cone)."""
        source = self.post if self.positions == "post-instruction" else self.last
        return source[layer][kind]


def _encode(tokenizer, prompts: Sequence[str]) -> list[tuple[list[int], int]]:
    """(ids, number of template tokens after the user message) per prompt; 0 without a chat template."""
    out = []
    if has_chat_template(tokenizer):
        for prompt, text in zip(prompts, format_prompts(tokenizer, list(prompts))):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            cut = text.rfind(prompt)
            if cut < 0:
                raise ValueError(f"cannot find the user message inside the chat-templated prompt {text[:80]!r}")
            head = list(tokenizer(text[: cut + len(prompt)], add_special_tokens=False)["input_ids"])
            common = 0
            for a, b in zip(ids, head):
                if a != b:
                    break
                common += 1
            n_post = len(ids) - common
            if n_post < 1 or n_post >= len(ids):
                raise ValueError(
                    "the chat template adds no tokens after the user message; the diagnostics need "
                    "post-instruction tokens (use a tokenizer with a chat template)"
                )
            out.append((ids, n_post))
    else:
        for prompt in prompts:
            ids = list(tokenizer(prompt)["input_ids"])
            if not ids:
                raise ValueError(f"the tokenizer produced no tokens for prompt {prompt[:60]!r}")
            out.append((ids, 0))
    return out


@torch.no_grad()
def _collect(model, tokenizer, prompts, layers, batch_size, layers_path, progress) -> dict[str, dict[int, Tensor]]:
    """{"last"|"post"|"user_last": {layer: (n, d) float64}} in one pass (right padding)."""
    encoded = _encode(tokenizer, prompts)
    layer_modules = find_decoder_layers(model, layers_path)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = input_device(model)
    with_post = all(n > 0 for _, n in encoded)
    rows: dict[str, dict[int, list[Tensor]]] = {key: {i: [] for i in layers} for key in ("last", "post", "user_last")}
    state: dict[str, Tensor] = {}

    def make_hook(layer):
        def hook(module, args, output):
            hidden = layer_hidden(output).to(torch.float64)
            lengths, n_post = state["lengths"], state["n_post"]
            batch = torch.arange(hidden.shape[0], device=hidden.device)
            rows["last"][layer].append(hidden[batch, lengths - 1].cpu())
            if with_post:
                offsets = torch.arange(hidden.shape[1], device=hidden.device)
                mask = (offsets[None] < lengths[:, None]) & (offsets[None] >= (lengths - n_post)[:, None])
                rows["post"][layer].append(((hidden * mask[..., None]).sum(1) / n_post[:, None]).cpu())
                rows["user_last"][layer].append(hidden[batch, lengths - n_post - 1].cpu())

        return hook

    handles = [layer_modules[i].register_forward_hook(make_hook(i)) for i in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            input_ids, attention_mask = right_padded_batch([ids for ids, _ in chunk], pad_id)
            state["lengths"] = torch.as_tensor([len(ids) for ids, _ in chunk], device=device)
            state["n_post"] = torch.as_tensor([n for _, n in chunk], device=device)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            progress.update(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = {"last": {i: torch.cat(rows["last"][i]) for i in layers}}
    if with_post:
        out["post"] = {i: torch.cat(rows["post"][i]) for i in layers}
        out["user_last"] = {i: torch.cat(rows["user_last"][i]) for i in layers}
    return out


def model_geometry(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    k: int = 1,
    positions: str = "post-instruction",
    batch_size: int = 8,
    layers_path: str | None = None,
    show_progress: bool = True,
    desc: str = "measuring",
) -> ModelGeometry:
    """Measure one model: activations at the needed positions and its refusal cone
    (``extract_refusal_basis`` with ``method="dim"`` for k=1, ``"svd"`` otherwise)."""
    from tqdm.auto import tqdm

    from ..integration.basis import extract_refusal_basis

    harmful, harmless = list(harmful), list(harmless)
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError("the diagnostics need at least 2 harmful and 2 harmless prompts (for standard deviations)")
    if positions == "post-instruction" and not has_chat_template(tokenizer):
        raise ValueError("positions='post-instruction' needs a tokenizer with a chat template; use positions='last'")
    n_layers = len(find_decoder_layers(model, layers_path))
    if layers is not None:
        bad = [i for i in layers if not -n_layers <= i < n_layers]
        if bad or not layers:
            raise ValueError(
                f"layers {list(layers)} out of range (or empty) for a model with {n_layers} decoder "
                f"layers (0..{n_layers - 1}; negative counts from the end)"
            )
    layers = list(range(n_layers)) if layers is None else sorted({i % n_layers for i in layers})
    basis = extract_refusal_basis(
        model,
        tokenizer,
        harmful,
        harmless,
        layers=layers,
        k=k,
        method="dim" if k == 1 else "svd",
        positions=positions,
        batch_size=batch_size,
        show_progress=False,
        layers_path=layers_path,
        adapters="on",  # the tuned model's own cone, adapter included
    )
    with tqdm(
        total=len(harmful) + len(harmless), desc=desc, unit="prompt", disable=not show_progress, leave=False
    ) as progress:
        acts_h = _collect(model, tokenizer, harmful, layers, batch_size, layers_path, progress)
        acts_l = _collect(model, tokenizer, harmless, layers, batch_size, layers_path, progress)

    def pair(key):
        if key not in acts_h:
            return None
        return {i: {"harmful": acts_h[key][i], "harmless": acts_l[key][i]} for i in layers}

    return ModelGeometry(
        layers=layers,
        positions=positions,
        k=k,
        post=pair("post"),
        last=pair("last"),
        user_last=pair("user_last"),
        cones=dict(basis.bases),
        model_name=str(basis.metadata.get("model_name")),
    )


def _pooled_std(a: Tensor, b: Tensor) -> Tensor:
    """Pooled within-class std per column of two (n, k) samples."""
    dof = a.shape[0] + b.shape[0] - 2
    ss = ((a - a.mean(0)) ** 2).sum(0) + ((b - b.mean(0)) ** 2).sum(0)
    return (ss / max(dof, 1)).sqrt()


def _direction(acts: dict[str, Tensor]) -> Tensor:
    diff = acts["harmful"].mean(0) - acts["harmless"].mean(0)
    return diff / diff.norm().clamp_min(1e-30)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def compare_geometry(base: ModelGeometry, tuned: ModelGeometry) -> dict:
    """The per-layer report (see the module docstring) of ``tuned`` against ``base``."""
    if base.layers != tuned.layers or base.positions != tuned.positions or base.k != tuned.k:
        raise ValueError(
            "base and tuned geometries were measured with different layers, positions or k; "
            "measure both with the same settings"
        )
    rows = []
    for layer in base.layers:
        cone = base.cones[layer].to(torch.float64)
        z_bh = base.coords_acts(layer, "harmful") @ cone
        z_bl = base.coords_acts(layer, "harmless") @ cone
        z_th = tuned.coords_acts(layer, "harmful") @ cone
        z_tl = tuned.coords_acts(layer, "harmless") @ cone
        if z_th.shape != z_bh.shape:
            raise ValueError("base and tuned geometries were measured on different prompt sets")
        std = _pooled_std(z_bh, z_bl).clamp_min(1e-12)
        shift = (z_th - z_bh).mean(0) / std
        drift_rms = (((z_th - z_bh) / std) ** 2).sum(1).mean().sqrt()
        sep_base = (z_bh[:, 0].mean() - z_bl[:, 0].mean()) / std[0]
        sep_tuned = (z_th[:, 0].mean() - z_tl[:, 0].mean()) / std[0]
        angles = principal_angles(base.cones[layer], tuned.cones[layer])
        row = {
            "layer": layer,
            "principal_angles_deg": [float(a) for a in angles],
            "max_angle_deg": float(angles.max()),
            "coord_shift": [float(s) for s in shift],
            "coord_shift_norm": float(shift.norm()),
            "coord_drift_rms": float(drift_rms),
            "separation_base": _finite(float(sep_base)),
            "separation_tuned": _finite(float(sep_tuned)),
            "coupling_base": None,
            "coupling_tuned": None,
        }
        if base.user_last is not None and tuned.user_last is not None:
            for name, geom in (("base", base), ("tuned", tuned)):
                row[f"coupling_{name}"] = float(_direction(geom.user_last[layer]) @ _direction(geom.post[layer]))
        rows.append(row)
    return {
        "base_model": base.model_name,
        "tuned_model": tuned.model_name,
        "positions": base.positions,
        "k": base.k,
        "layers": list(base.layers),
        "n_harmful": int(base.last[base.layers[0]]["harmful"].shape[0]),
        "n_harmless": int(base.last[base.layers[0]]["harmless"].shape[0]),
        "per_layer": rows,
    }


def diagnose(
    base_model: nn.Module,
    tuned_model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    tuned_tokenizer=None,
    layers: Sequence[int] | None = None,
    k: int = 1,
    positions: str = "post-instruction",
    batch_size: int = 8,
    layers_path: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Measure both models on the same prompts and compare them (see the module docstring)."""
    kw = dict(
        layers=layers,
        k=k,
        positions=positions,
        batch_size=batch_size,
        layers_path=layers_path,
        show_progress=show_progress,
    )
    base = model_geometry(base_model, tokenizer, harmful, harmless, desc="base model", **kw)
    tuned = model_geometry(tuned_model, tuned_tokenizer or tokenizer, harmful, harmless, desc="tuned model", **kw)
    return compare_geometry(base, tuned)


def _fmt(x, spec: str = "+.2f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    """A plain-text per-layer table of ``report``."""
    head = (
        "layer",
        "max angle",
        "shift[0]",
        "|shift|",
        "drift rms",
        "sep base",
        "sep tuned",
        "coupl base",
        "coupl tuned",
    )
    lines = []
    for r in report["per_layer"]:
        lines.append(
            (
                str(r["layer"]),
                f"{r['max_angle_deg']:.1f} deg",
                _fmt(r["coord_shift"][0]),
                _fmt(r["coord_shift_norm"], ".2f"),
                _fmt(r["coord_drift_rms"], ".2f"),
                _fmt(r["separation_base"]),
                _fmt(r["separation_tuned"]),
                _fmt(r["coupling_base"], ".3f"),
                _fmt(r["coupling_tuned"], ".3f"),
            )
        )
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines]
    out.append(
        f"(shift, drift and separation in base pooled std; k={report['k']}, positions={report['positions']}, "
        f"{report['n_harmful']} harmful / {report['n_harmless']} harmless prompts)"
    )
    return "\n".join(out)


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_report(report: dict, path: str | os.PathLike) -> str:
    """Write ``report`` as JSON (atomically)."""
    path = os.fspath(path)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)

    _atomic_write(path, write)
    return path


def plot_report(report: dict, path: str | os.PathLike) -> str:
    """A PNG with three panels per layer: max principal angle, coordinate shift, coupling."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    rows = report["per_layer"]
    layers = [r["layer"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(layers, [r["max_angle_deg"] for r in rows], "o-")
    axes[0].set_title("largest principal angle, base vs tuned cone")
    axes[0].set_ylabel("degrees")
    axes[1].plot(layers, [r["coord_shift"][0] for r in rows], "o-", label="mean shift (direction 0)")
    axes[1].plot(layers, [r["coord_drift_rms"] for r in rows], "s--", label="per-prompt RMS drift")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set_title("harmful prompts' cone coordinates")
    axes[1].set_ylabel("base pooled std")
    axes[1].legend(fontsize=8)
    for name, marker in (("base", "o-"), ("tuned", "s--")):
        values = [r[f"coupling_{name}"] for r in rows]
        if all(v is not None for v in values):
            axes[2].plot(layers, values, marker, label=name)
    axes[2].set_title("harmfulness-refusal coupling (cosine)")
    axes[2].legend(fontsize=8)
    # One tick per layer overlaps beyond ~12 layers in a panel this wide (30 on SmolLM2): every n-th layer then.
    step = max(1, math.ceil(len(layers) / 12))
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(layers[::step])
    fig.tight_layout()
    path = os.fspath(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path
