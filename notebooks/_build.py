"""Write (and optionally execute) the notebooks in this folder from the cells below.

The notebooks are plain ``.ipynb`` files committed with their outputs, so they read on a code host;
this script is their source. Edit a cell here, then regenerate:

    python notebooks/_build.py                      # write every notebook, without outputs
    python notebooks/_build.py 01 02 03 --execute   # write and execute those (nbclient), outputs kept

Each notebook runs in the environment that has what it imports: 01-03 in the main ``.venv``,
04 in ``.venv-openmmlab`` (``.ci/openmmlab-env``), 05 in ``notebooks/.venv-hrnet`` (torch 2.14.1,
torchvision, timm; docs/testing.md, "Notebooks", says how to make it). ``--execute`` uses the interpreter running this
script as the kernel (``python3``, the native kernel of that environment), so run it with that
environment's python. Cells run with the notebook's folder as working directory. After executing,
stderr streams are dropped from the outputs (echoed on this script's stderr) and local paths made
relative, so the committed outputs hold no machine's paths or third-party noise; the rich console of
the first cell is 112 columns wide and wraps table cells that do not fit.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, *, setup: bool = False):
    body = textwrap.dedent(text).strip("\n")
    return new_code_cell(SETUP + "\n\n" + body if setup else body)


# Shared first lines: figures inline, rich tables as plain text (readable on a code host and in CI logs),
# 112 columns wide, with a cell too long for its column wrapped onto the next line instead of cut with "…".
SETUP = """\
%matplotlib inline
from rich.console import Console


class TextConsole(Console):
    \"\"\"Plain-text rich output; a table cell too long for its column wraps instead of being cut.\"\"\"

    def print(self, *objects, **kwargs):
        for table in objects:
            for column in getattr(table, "columns", ()):
                column.overflow = "fold"
        super().print(*objects, **kwargs)


console = TextConsole(width=112, force_jupyter=False, force_terminal=False)"""

# ---------------------------------------------------------------------------------------------------
NB01 = [
    md("""
    # 1. Inspect a real model: PP-OCRv4's text detector

    `fp16guard inspect` runs a model in FP32 and measures every activation against what FP16 can hold
    (finite magnitudes up to 65504; below 2^-24 a value flushes to zero), and checks every weight,
    buffer and constant the same way. Here it does that, through the Python API, for the PP-OCRv4 text
    detector that ships in rapidocr-onnxruntime 1.4.4 (an ONNX file with its real weights) on three
    photos from scikit-image. The command line does the same:

    ```bash
    fp16guard inspect --example ppocr-det --json ppocr-det.json --plot ppocr-det.png
    ```

    The photos are scaled to a short side of 480 px instead of RapidOCR's 736 so that this notebook
    runs in well under a minute on 2 CPU cores; the numbers differ a little from the README's.
    Next: [02_bisect_fix.ipynb](02_bisect_fix.ipynb) names the layer that breaks FP16 and fixes it.
    """),
    code(setup=True, text="""
    from fp16guard import inspect_onnx
    from fp16guard.examples import get_example, ppocr
    from fp16guard.inspect.plot import report_figure
    from fp16guard.inspect.render import print_report

    example = get_example("ppocr-det")
    model = example.load()  # the .onnx file, fetched once from PyPI by `fp16guard fetch-examples`
    example.description"""),
    md("""
    The inputs are preprocessed as RapidOCR does: short side scaled up (here to 480), sides rounded to
    multiples of 32, BGR, `(x/255 - 0.5)/0.5`.
    """),
    code("""
    photos = ppocr.photos(("page", "coffee", "text"))
    inputs = {name: ppocr.preprocess(rgb, limit_side_len=480) for name, rgb in photos.items()}
    {name: x.shape for name, x in inputs.items()}"""),
    md("""
    ## The report

    `inspect_onnx` runs the model once per input in FP32 ONNX Runtime with every intermediate value
    exposed (in chunks that fit a memory budget), reduces each to a few statistics (amax, inf/NaN
    count, the share of values FP16 would flush), and adds the static check of the constants.
    `print_report` is the terminal report of `fp16guard inspect`.
    """),
    code("""
    report = inspect_onnx(model, list(inputs.values()), labels=list(inputs), source="ppocr-det")
    print_report(report, console, top=8)"""),
    md("""
    How to read it, top to bottom:

    1. **The header line** names the peak activation and how close it is to 65504. Here it is the DB
       head's convolution `p2o.Conv.61`: no activation crosses the limit, but with about one to two
       bits of headroom (`headroom = log2(65504 / amax)`) a larger or brighter page, or pixels fed
       as 0..255 instead of normalized, pushes it over.
    2. **Worst offenders** lists layers by output amax. The rows after the peak are the neck's `Add`,
       `Resize` and `Concat` that feed it: the large values build up through the neck.
    3. **Warnings**: `near_limit` for that conv; `underflow` where a share of the outputs is below
       2^-24 and would read as 0 in FP16 (harmless here: those values are negligible beside their
       neighbours).
    4. **Static findings** hold the one `error`: the BatchNorm right after that conv keeps its running
       variance (`batch_norm_0.w_2`, 24 channels, about 9.8e7) in a `Constant` node. Cast to FP16 it
       becomes inf, and the BatchNorm's output collapses. The `info` row below it says the cure: the
       folded scale and shift fit FP16, so fold the BatchNorm in FP32 before casting. That error
       alone is why `fp16guard inspect` exits with status 1 although no activation overflows.

    The same facts, as data:
    """),
    code("""
    peak = report.peak
    print(f"peak: {peak.name} ({peak.kind}) output amax {peak.outputs.amax:.4g} "
          f"= {peak.outputs.amax / 65504:.2f}x the FP16 limit, on {report.inputs[peak.call]}")
    print("activation overflows (from/to transitions):", report.transitions() or "none")
    for f in report.static:
        if f.severity == "error":
            print(f"static error: {f.tensor} ({f.rule}, read by {f.layer}): amax {f.stats.amax:.3g}")"""),
    md("""
    ## The plot

    `report_figure` draws what `--plot` writes: every layer's output amax in execution order on a log
    scale, against the 65504 line (red, dashed) and the 2^-24 flush-to-zero line (purple, dotted). The
    peak is labelled; static findings are diamonds at the layer that reads the tensor, at the tensor's
    own amax: red for the error (the variance, far above the limit), orange for weights with values
    FP16 flushes to zero (drawn on the 2^-24 line).
    """),
    code("""
    report_figure(report, title="ppocr-det: every layer's output amax, FP32, three photos at 480 px")"""),
    md("""
    What the plot shows: activations stay one to four binades under the limit throughout the backbone,
    climb through the neck and peak in the head; the only thing above the line is a constant. So the
    detector does not overflow by its activations: it overflows the moment its weights are cast to
    FP16 with the BatchNorm unfolded, which is exactly what a naive FP16 conversion does.

    ## What to do next

    * `report.save_json("ppocr-det.json")` writes the same data (schema in `docs/report-schema.md`).
    * To find out which layer actually breaks an FP16 run, and to fix it, go on with
      [02_bisect_fix.ipynb](02_bisect_fix.ipynb) (`fp16guard bisect`, then `fp16guard fix`).
    * For a PyTorch model, `fp16guard.FInspect(model)` gives the same report from forward hooks
      ([03_transformer.ipynb](03_transformer.ipynb) uses it).
    """),
]

# ---------------------------------------------------------------------------------------------------
NB02 = [
    md("""
    # 2. Bisect, then fix: PP-OCRv4's text detector

    [01_inspect.ipynb](01_inspect.ipynb) found a BatchNorm variance of 9.8e7 in the PP-OCRv4 detector
    and a head convolution one to two bits under the FP16 limit. Here:

    1. `fp16guard.bisect` runs a growing FP16 prefix of the model (the rest in FP32) and binary-searches
       for the first node whose FP16 execution breaks the output;
    2. `fp16guard.fix` rewrites the model so it runs **entirely in FP16**, exact in real arithmetic
       (BatchNorms folded in float64, power-of-two scales folded into the weights), and verifies it
       against FP32 on inputs calibration never saw;
    3. an inspection of the model before and after shows what the FP16 engine will store.

    The command line: `fp16guard bisect --example ppocr-det`, then
    `fp16guard fix --example ppocr-det -o fixed.onnx --save-plan plan.json`. The photos are at a short
    side of 480 px (RapidOCR: 736) so this runs in about two minutes on 2 CPU cores. Every FP16 run
    uses the `emulate` backend: ONNX Runtime on the CPU with every tensor rounded through IEEE FP16,
    which needs no GPU; on a GPU machine pass `backend="tensorrt"` or `"onnxruntime"` (CUDA).
    """),
    code(setup=True, text="""
    import tempfile
    from pathlib import Path

    from fp16guard.bisection import bisect, print_bisect
    from fp16guard.bisection.plot import bisect_figure
    from fp16guard.examples import get_example, ppocr
    from fp16guard.inputs import NamedInput

    example = get_example("ppocr-det")
    model = example.load()  # path of the .onnx file
    photos = ppocr.photos(("page", "text", "coffee"))
    page, text, coffee = (NamedInput(name, (ppocr.preprocess(photos[name], limit_side_len=480),))
                          for name in ("page", "text", "coffee"))"""),
    md("""
    ## Bisect

    A cut `c` runs the first `c` nodes (in topological order) as a typed FP16 ONNX on the backend, and
    the rest in FP32. A cut is bad when the output goes non-finite or its relative L2 error exceeds the
    tolerance, which is set from the model's own FP16 rounding noise (so precision is not blamed as
    overflow). One photo is enough: the problem is in the weights.
    """),
    code("""
    result = bisect(model, [page], backend="emulate", source="ppocr-det")
    print_bisect(result, console)"""),
    md("""
    Reading the table: round 0 first measures the noise at the longest prefix whose FP32 values all fit
    FP16 (cut 321, error 0.005: FP16 rounding, so the tolerance stays at its floor 0.07), then tries
    the all-FP16 cut (330: error 1, the output is destroyed) and halves the interval until a good and
    a bad cut are adjacent. Cut 322 adds `p2o.BatchNormalization.1` to the FP16 prefix and the error
    jumps from 0.005 to 1: that BatchNorm is the offender. The line "does not fit FP16" says why: its
    variance `batch_norm_0.w_2` becomes inf. Nine builds instead of 330.

    The plot: every tried cut's error (log scale) against its position; the vertical line is the offender.
    """),
    code("""
    bisect_figure(result)"""),
    md("""
    The offender, as data, and the constant it reads (the fourth and fifth BatchNorm inputs are the
    running mean and variance):
    """),
    code("""
    import onnx
    from fp16guard.onnx_graph import graph_constants

    offender = result.offenders[0]
    print(offender.name, offender.kind, "first bad cut", offender.cut, "error", offender.error)
    proto = onnx.load(model)
    bn = next(n for n in proto.graph.node if n.name == offender.name)
    variance = graph_constants(proto)[bn.input[4]]
    print(f"{bn.input[4]}: {variance.size} channels, running variance {variance.min():.3g} .. {variance.max():.3g}")"""),
    md("""
    ## Fix

    `fix_model` calibrates on `page`, rewrites, converts to typed FP16 and verifies on `page` and on
    `text` and `coffee`, which calibration never sees. `metrics=example.task_metrics` adds the task's
    own measure, the IoU of the binarized text mask (threshold 0.3) against FP32's.
    """),
    code("""
    from fp16guard.fixing.pipeline import fix_model
    from fp16guard.fixing.render import print_fix

    fixed = fix_model(model, [page], validation=[text, coffee], metrics=example.task_metrics, source="ppocr-det")
    print_fix(fixed, console)"""),
    md("""
    What the plan says, and why:

    * **Rewrites.** The two BatchNorms that follow a convolution with room for it are folded into the
      conv's weights in float64 (`fold_batchnorm`). The offender, `p2o.BatchNormalization.1`, becomes a
      per-channel `Mul` + `Add` computed in float64 (`batchnorm_to_affine`): folding its scale
      (1/sqrt(9.8e7), about 1e-4) into the conv would push the conv's FP16 weights into the subnormal
      range. No tensor holds a running variance afterwards. Two bias `Add`s are folded into the
      `ConvTranspose` before them (`fold_affine`), and the graph's `Constant` nodes become initializers.
    * **One scale region, `k = 2`.** Calibration measures the head conv `p2o.Conv.61` at about 2.4e4,
      above the headroom target 2^13 = 8192. The conv stores its output divided by 2^2 (its weights
      and bias absorb the factor) and the BatchNorm's new `Mul` multiplies it back: the region opens
      and closes with no added op (`scale x2`).
    * **0 nodes left in FP32**: the whole model runs in FP16.
    * **Verification** (`emulate` against FP32): `fixed` is the rewritten model; `naive` the plain FP16
      conversion (every pixel of the mask wrong: IoU 0); `fallback` what other tools do, the offending
      nodes in FP32 (`fallback_bf16` the same islands in BF16). The fixed model is about as close to
      FP32 as the fallback (relative L2 0.006-0.04 against 0.005-0.035), in pure FP16. The mask IoU
      below 1 is FP16 *precision* (11-bit rounding through about 300 ops moves pixels next to the 0.3
      threshold; coffee has little text, so a few pixels weigh more), not range: the fallback has it
      too.

    The fixed model and the plan save as files; the plan is JSON you can edit and apply with
    `fix_model(model, plan=...)` or `fp16guard fix --plan`.
    """),
    code("""
    out = Path(tempfile.mkdtemp())
    onnx.save(fixed.fixed, out / "ppocr-det-fixed.onnx")  # typed FP16, FP32 graph inputs and outputs
    fixed.plan.save(out / "plan.json")
    region = fixed.plan.regions[0]
    print(f"region k={region.exponent}: opened by {region.opened_by}, closed by {region.closed_by}, "
          f"amax {region.amax:.4g} -> {region.amax_after:.4g}")
    print(sorted(p.name for p in out.iterdir()))"""),
    md("""
    ## Before and after

    What does the FP16 engine store? `fixed.rewritten_fp32` is the rewritten graph in FP32, before the
    cast to FP16: its values are the stored ones (true / 2^k inside a region). Inspecting it next to the
    original, on the same photo, shows the head's peak brought down by 2^2 and the variance gone.
    """),
    code("""
    from fp16guard import inspect_onnx
    from fp16guard.inspect.plot import report_figure

    before = inspect_onnx(model, [page.arrays], labels=["page"], source="ppocr-det (original)")
    after = inspect_onnx(fixed.rewritten_fp32, [page.arrays], labels=["page"], source="ppocr-det (fixed, stored values)")
    for r in (before, after):
        errors = [f.tensor for f in r.static if f.severity == "error"]
        print(f"{r.source}: peak {r.peak.name} {r.peak.outputs.amax:.4g}; static errors: {errors or 'none'}")"""),
    code("""
    report_figure(before, title="before: the original model (FP32), page at 480 px")"""),
    code("""
    report_figure(after, title="after: the rewritten model's stored values, page at 480 px")"""),
    md("""
    Before, the variance diamond sits far above the 65504 line and the head conv peaks at about a third
    of the limit; after, no static error remains and the head's peak is a quarter of what it was (3.4
    bits of headroom instead of 1.4). The curve is otherwise the same: the fix changes only what had
    to change.

    ## What to do next

    * Deploy the typed FP16 ONNX: TensorRT 10/11 strongly typed (`trtexec --onnx=fixed.onnx
      --stronglyTyped`), or ONNX Runtime's CUDA EP. For a weakly typed TensorRT 10 build of a model
      with FP32 islands, `fp16guard fix --layer-precisions` writes the flags that pin them.
    * Verify on real FP16 kernels: `fix_model(..., backend="onnxruntime")` or `"tensorrt"` on a GPU.
    * A PyTorch model stays in PyTorch: `fix_model(module, ...)` returns an FP16 program
      (`.pt2` with `fp16guard fix -o fixed.pt2`); [05_hrnet.ipynb](05_hrnet.ipynb) does that.
    """),
]

# ---------------------------------------------------------------------------------------------------
NB03 = [
    md("""
    # 3. A transformer: BERT with an attention output past FP16

    Transformers break FP16 in two ways at once. A residual stream that grows past 65504 (here one
    attention output projection is 1e6x too large, as after a bad fine-tune or an unscaled merge), and
    the decomposed LayerNorm that follows it squares `x - mean`: `Pow(x - mean, 2)` is inf in FP16 as
    soon as `|x - mean|` passes 256. And the attention mask: transformers 5 writes padding as
    `finfo(float32).min`, which is -inf in FP16, and `0 * -inf` is NaN.

    The model is a 2-layer BERT built by `transformers` from a config with random weights (no download;
    the same case as `tests/transformer_cases.py` and the walk-through in `docs/fix.md`), exported to ONNX at
    opset 14, where LayerNorm is decomposed (`ReduceMean, Sub, Pow 2, ReduceMean, Add 1e-12, Sqrt,
    Div`). Runs in under a minute on 2 CPU cores.
    """),
    code(setup=True, text="""
    import tempfile
    import warnings
    from pathlib import Path

    import numpy as np
    import torch

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformers
    from transformers import BertConfig, BertModel

    from fp16guard.inputs import NamedInput


    class LastHidden(torch.nn.Module):
        \"\"\"`model(input_ids, attention_mask).last_hidden_state` as a function of two tensors.\"\"\"

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, attn_implementation="eager")
    bert = BertModel(config).eval()
    with torch.no_grad():  # the injected overflow: layer 0's attention output projection, 1e6x
        dense = bert.encoder.layer[0].attention.output.dense
        dense.weight *= 1e6
        dense.bias *= 1e6
    model = LastHidden(bert).eval()"""),
    md("""
    Token batches as a tokenizer pads them: three rows of 16 random tokens; row 1 is padded after 10
    tokens and row 2 is padding only (a fully masked row, the hard case for a saturated mask). Seeds
    0-3 calibrate, 10-12 validate.
    """),
    code("""
    def token_batch(seed, batch=3, seq=16):
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), np.int64)
        mask[1, 10:] = 0
        mask[2, :] = 0
        return NamedInput(f"seed {seed}", (ids, mask))


    calibration = [token_batch(s) for s in range(4)]
    validation = [token_batch(s) for s in range(10, 13)]"""),
    md("""
    ## Inspect the PyTorch model

    `FInspect` is the inspector for `nn.Module`s: forward hooks that record every module's input and
    output range, removed on exit. The transitions table shows where values leave FP16's range
    (`from`) and where they come back (`to`).
    """),
    code("""
    from fp16guard import FInspect
    from fp16guard.inspect.render import print_report

    ids, mask = (torch.from_numpy(a) for a in calibration[0].arrays)
    with torch.no_grad(), FInspect(model) as probe:
        model(ids, mask)
    report = probe.report()
    print_report(report, console, top=5)"""),
    md("""
    Two things show up:

    * The overflow starts at `encoder.layer.0.attention.output.dense` (1.03e5, `from`; the static
      check also flags 16 of its weights beyond 65504) and is absorbed by the LayerNorm after the
      residual `Add` (`to`): its output is normalized again. In FP16 nothing would survive to that
      LayerNorm: the dense output is inf already, and a decomposed LayerNorm would square it.
    * The other `to` rows, and the `input_overflow` line, are the attention mask: transformers passes
      the extended mask, `finfo(float32).min` = -3.4e38 at padded positions, into every attention
      module, so their inputs reach 3.4e38. The inspector reports it as an input beyond FP16; it is
      the mask, and the fix below handles it without touching the model's real inputs.

    ## Export and fix

    The exporter writes the mask as `(1 - mask) * finfo(float32).min`. `fix_model` calibrates on the
    four batches, verifies on all seven, and compares with the plain FP16 conversion and the FP32
    fallback.
    """),
    code("""
    from fp16guard.fixing.pipeline import fix_model
    from fp16guard.fixing.render import print_fix

    onnx_path = Path(tempfile.mkdtemp()) / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, tuple(torch.from_numpy(a) for a in calibration[0].arrays), str(onnx_path),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          opset_version=14, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")})

    fixed = fix_model(str(onnx_path), calibration, validation=validation, source="bert.onnx", keep_outputs=True)
    print_fix(fixed, console)"""),
    md("""
    What the plan says, and why (a value in a region of exponent `k` is stored as `true / 2^k`):

    * **`k = 4` over the residual stream** (1.2e5 -> 7545, 7 values): opened by the embedding
      LayerNorm's affine `Mul` and by layer 0's output projection, which absorb `2^-4` in their
      weights; layer 0's query/key/value matmuls read the stream and absorb `2^4` back, and the
      LayerNorm's `Pow` and `Div` read `x - mean` from it (below).
    * **LayerNorm's variance**: `Pow 2` doubles the exponent, so the variance (1.5e10) is stored at
      `k = 22` (3475; its `1e-12` epsilon scaled by `2^-22` with it), and `Sqrt` halves it to
      `k = 11` for the standard deviation (3.7e4 -> 18). A square of values stored at `2^-4` would
      still overflow, so `x - mean` is read by the `Pow` at `2^-11`: the one op the fix inserts, a
      `Mul` by `2^-7` (the explicit rescale). The `Div` reads `x - mean` at `2^-4` and the standard
      deviation at `2^-11`, so the normalized value comes out at `k = -7` (stored `2^7` larger, 426),
      and the LayerNorm's `gamma` `Mul` absorbs that. No pattern matching of LayerNorm is involved,
      only each op's scaling law.
    * **The mask** (`saturate_constant`): the `finfo.min` constant is saturated to `-2^15`, and each
      sum of scores and mask is read through `Where(mask < -2^14, -2^15, scores + mask)`, so a fully
      padded row stays uniform as in FP32. This happens only where a proof holds: every use of the
      constant is scaled by a 0/1 indicator, added to scores, and ends in a Softmax.
    * `tight`: layer 0's masked scores reach 3.3e4, above the 2^13 target but within 65504: left as
      they are, since scaling them would add ops. `underflow`: the LayerNorms' `1e-12` epsilons flush
      to zero in FP16, harmless beside variances of about 1.
    * **0 nodes in FP32**, and the verification table: the fixed model's relative L2 error is 8e-4 to
      9e-4 on all seven batches, like the FP32 fallback's (7.5e-4 to 8.8e-4); the plain FP16
      conversion gives inf everywhere. (`fallback_bf16`, the fallback's islands in BF16, is not finite
      on 2048 of each batch's 6144 values.)

    The rewrites, by kind, with what each did:
    """),
    code("""
    for note in fixed.notes:
        if note.kind != "scale":  # the per-op exponent changes are many; the rest are few
            print(f"{note.kind:24} {note.target}: {note.detail}")
    print(sum(n.kind == "scale" for n in fixed.notes), "ops absorb a power of two (kind 'scale')")
    for r in fixed.plan.regions:
        print(f"region k={r.exponent:2}: {len(r.tensors)} values, amax {r.amax:.3g} -> {r.amax_after:.3g}, "
              f"opened by {r.opened_by}, closed by {r.closed_by}")"""),
    md("""
    ## The fully padded row

    `keep_outputs=True` kept the arrays the verification compared. Row 2 of every batch is padding only:
    in FP32 its attention is uniform over the 16 keys (the mask's `finfo.min` absorbs every score). The
    fixed FP16 model must give the same, not NaN and not a different average:
    """),
    code("""
    kept = fixed.outputs
    for label, ref, out in zip(kept.labels, kept.fp32, kept.fixed):
        rows = []
        for row in range(3):
            a, b = ref[0][row].ravel(), out[0][row].ravel().astype(np.float64)
            rows.append(f"{np.linalg.norm(b - a) / np.linalg.norm(a):.1e}")
        print(f"{label:8} relative L2 per row (full, padded after 10, all padding): {', '.join(rows)}")"""),
    md("""
    ## What to do next

    * The same model through `torch.export` instead of ONNX: `fix_model(model, calibration, ...)` on
      the module returns an FP16 program (`torch.fx.GraphModule`, saved as `.pt2`); an SDPA mask is
      handled there too.
    * At opset 17 the exporter writes `LayerNormalization`, which absorbs its input's scale in its
      epsilon; T5 (RMSNorm, relative position bias masked with `finfo.min`) and seven other
      architectures are covered by `tests/test_transformers.py` and `benchmarks/transformers_sweep.py`.
    """),
]

# ---------------------------------------------------------------------------------------------------
NB04 = [
    md("""
    # 4. mmdeploy: apply a plan while converting an OpenMMLab model

    OpenMMLab models reach TensorRT through mmdeploy, which exports the PyTorch model inside its own
    rewriter context. fp16guard plugs into that flow: it **calibrates** the PyTorch model into a plan,
    and its mmdeploy function rewriters **apply the plan during the export** (BatchNorms folded, powers
    of two folded into the weights), so the ONNX that mmdeploy writes is already safe in FP16.

    This notebook needs the OpenMMLab environment (torch 2.14.1, mmcv 2.0.1, mmdet 3.1.0, mmocr 1.0.1,
    mmdeploy 1.3.1), a virtualenv of its own:

    ```bash
    .ci/openmmlab-env .venv-openmmlab
    .venv-openmmlab/bin/python -m pip install nbmake && .venv-openmmlab/bin/python -m pytest --nbmake notebooks/04_mmdeploy.ipynb
    ```

    The model is mmocr's real PANet (ResNet-18 + FPEM_FFM, the CTW1500 config) with random weights,
    since pretrained weights cannot be downloaded here and random ones do not overflow. The overflow is
    made explicit, as in `tests/openmmlab/`: the gamma of `backbone.layer4[-1].norm2` is doubled until
    the block writes 1.5e5, and the neck's first BatchNorm is given the running statistics of its
    input, as training would. Images are 320x320; it runs in about a minute on 2 CPU cores.
    """),
    code(setup=True, text="""
    import logging
    import tempfile
    from pathlib import Path

    import mmocr
    import mmocr.models  # noqa: F401 - registers mmocr's models
    import numpy as np
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmocr.registry import MODELS
    from skimage import data, transform

    import fp16guard.rewriters  # noqa: F401 - registers fp16guard's mmdeploy rewriters


    def image(name, size=320):
        \"\"\"A scikit-image photo as PANet's input: float32 [1, 3, size, size], ImageNet-normalized.\"\"\"
        img = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True).astype(np.float32)
        x = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


    calibration = [image("astronaut"), image("coffee")]
    MODEL_CFG = Path(mmocr.__file__).parent / ".mim/configs/textdet/panet/panet_resnet18_fpem-ffm_600e_ctw1500.py"
    init_default_scope("mmocr")
    torch.manual_seed(0)
    panet = MODELS.build(Config.fromfile(str(MODEL_CFG)).model).eval()"""),
    md("""
    The explicit overflow (see above), then a look at the backbone's last output:
    """),
    code("""
    x = torch.from_numpy(calibration[0])
    with torch.no_grad():
        gamma = panet.backbone.layer4[-1].norm2.weight
        while float(panet.backbone(x)[-1].abs().max()) < 1.5e5:
            gamma.mul_(2.0)
        conv, bn = panet.neck.reduce_conv_c5[0], panet.neck.reduce_conv_c5[1]
        y = conv(panet.backbone(x)[-1])
        bn.running_mean.copy_(y.mean((0, 2, 3)))
        bn.running_var.copy_(y.var((0, 2, 3)))
        print(f"layer4 output amax {float(panet.backbone(x)[-1].abs().max()):.3g} (FP16 holds 65504); "
              f"neck BatchNorm running variance up to {float(bn.running_var.max()):.3g}")"""),
    md("""
    ## 1. Calibrate

    `fp16guard.calibrate` takes any `nn.Module` that `torch.export` captures. mmdeploy exports the
    detector's tensor-mode forward (backbone, neck, head); calibrating the backbone and neck, where the
    overflow is, is enough here. The plan's `modules` field lists, per module, the exponent its input
    arrives with and its output leaves with, and a fingerprint of its weights: mmdeploy's rewriters
    see `self`, not a name, and find their entry by that fingerprint (printed below for the modules
    whose exponents are not 0).

    The CLI does the same from mmdeploy's own arguments:
    `fp16guard calibrate --deploy-cfg deploy.py --model-cfg panet_....py panet.pth --img a.jpg -o plan.json`.
    """),
    code("""
    from fp16guard.fixing import calibrate
    from fp16guard.fixing.render import print_plan


    class Features(torch.nn.Module):
        \"\"\"PANet's backbone and neck: image -> the four FPEM_FFM feature maps.\"\"\"

        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, x):
            return self.detector.neck(self.detector.backbone(x))


    plan = calibrate(Features(panet), calibration)
    work = Path(tempfile.mkdtemp())
    plan.save(work / "plan.json")
    print_plan(plan, console)
    for m in plan.modules:
        if m["input_exponent"] or m["output_exponent"]:
            print(f"{m['module']:40} {m['type']:12} in 2^{m['input_exponent']:<3} out 2^{m['output_exponent']:<3} "
                  f"fingerprint {m['fingerprint']}")"""),
    md("""
    One `k = 6` region over layer4's residual stream, opened by the convs that write it and closed by
    `layer4.1.conv1` and the neck's `reduce_conv_c5`, and one `k = 5` region inside `reduce_conv_c5`,
    whose BatchNorm (variance up to 6e8) closes it. No explicit rescale, nothing left in FP32. In the
    module list, a residual block reads and writes `2^6` (the identity carries the factor once), and
    `reduce_conv_c5` takes its input at `2^6` and returns true values.

    ## 2. Convert with mmdeploy

    A static 320x320 TensorRT FP16 deploy config, written as mmdeploy's configs are. To apply the plan
    in your own deploy config, add two lines:

    ```python
    custom_imports = dict(imports=["fp16guard.rewriters"], allow_failed_imports=False)
    fp16guard = dict(plan="plan.json")
    ```

    `fp16guard.openmmlab.torch2onnx` is `mmdeploy.apis.torch2onnx` (same arguments, in
    `tools/deploy.py`'s order) with the rewriters registered; `plan=` overrides the config's
    `fp16guard.plan`. It lets a TensorRT config export on the CPU (mmdeploy refuses that because it
    builds the engine next; build it on the GPU machine from the ONNX). mmdeploy builds the model from
    the config, loads the checkpoint, runs mmocr's test pipeline on the image and exports. The image is
    `chelsea`, which calibration never saw.
    """),
    code("""
    from PIL import Image

    from fp16guard.openmmlab import load_model, model_inputs, torch2onnx, verify_export

    deploy_cfg = work / "text-detection_tensorrt-fp16_static-320x320.py"
    deploy_cfg.write_text(\"\"\"\\
    codebase_config = dict(type='mmocr', task='TextDetection')
    backend_config = dict(type='tensorrt', common_config=dict(fp16_mode=True, max_workspace_size=1 << 30),
                          model_inputs=[dict(input_shapes=dict(input=dict(min_shape=[1, 3, 320, 320],
                                                                          opt_shape=[1, 3, 320, 320],
                                                                          max_shape=[1, 3, 320, 320])))])
    onnx_config = dict(type='onnx', export_params=True, keep_initializers_as_inputs=False, opset_version=13,
                       save_file='end2end.onnx', input_names=['input'], output_names=['output'],
                       input_shape=[320, 320], optimize=False)
    \"\"\")
    checkpoint = work / "panet.pth"
    torch.save({"state_dict": panet.state_dict()}, checkpoint)
    img = work / "chelsea.png"
    Image.fromarray(data.chelsea()).save(img)

    logging.disable(logging.WARNING)  # mmengine's registry and deprecation notices during the exports
    try:
        plain = torch2onnx(img, work / "plain", "end2end.onnx", str(deploy_cfg), MODEL_CFG, checkpoint)
        with_plan = torch2onnx(img, work / "fixed", "end2end.onnx", str(deploy_cfg), MODEL_CFG, checkpoint,
                               plan=work / "plan.json")
    finally:
        logging.disable(logging.NOTSET)
    print(plain.relative_to(work), with_plan.relative_to(work))"""),
    md("""
    ## 3. Verify

    `verify_export` converts an exported ONNX to typed FP16 and runs it under the strict FP16 emulation
    against the same ONNX in FP32, on the image as mmdeploy's pipeline prepares it (`fp16guard export`
    does this after its export, unless `--no-verify`).
    """),
    code("""
    from dataclasses import replace

    from fp16guard.fixing.render import print_verification

    inputs = model_inputs(load_model(MODEL_CFG, checkpoint), [img], Config.fromfile(str(deploy_cfg)))
    plain_check = replace(verify_export(plain, inputs), variant="without plan")
    plan_check = replace(verify_export(with_plan, inputs), variant="with plan")
    print_verification([plain_check, plan_check], console)
    print("without the plan:", "finite" if plain_check.finite else "inf/NaN in FP16",
          "| with the plan:", "finite" if plan_check.finite else "inf/NaN in FP16")"""),
    md("""
    Without the plan, mmdeploy's usual export gives inf or NaN for every one of the 38,400 outputs in
    FP16. With the plan: finite, relative L2 error under 1e-3. In FP32 the two exports are the same
    model (the rewriters change nothing in real arithmetic):
    """),
    code("""
    import onnxruntime as ort

    feed = {"input": inputs[0].arrays[0]}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for p in (plain, with_plan))
    print(f"FP32, plan vs plain: max relative difference {np.abs(a - b).max() / np.abs(a).max():.2g}")"""),
    md("""
    ## What to do next

    * Build the TensorRT engine from `work/fixed/end2end.onnx` on the GPU machine, as mmdeploy's
      `tools/deploy.py` would.
    * The same from the command line: `fp16guard export --deploy-cfg D --model-cfg M panet.pth --img
      chelsea.png --plan plan.json --work-dir work_dir`.
    * Which modules the rewriters cover (mmdet's `BasicBlock`, mmocr's `FPEM_FFM`, and generic Conv,
      Linear, BatchNorm, LayerNorm, MultiheadAttention): README, "Using fp16guard with mmdeploy".
    """),
]

# ---------------------------------------------------------------------------------------------------
NB05 = [
    md("""
    # 5. HRNet, from inspect to a fixed FP16 program

    An HRNet classifier (timm's `hrnet_w18_small_v2`, the HRNet-W18-C-Small-v2 of the HRNet paper)
    being moved to TensorRT FP16. The usual way to find where FP16 goes wrong is manual: mark every
    layer as a network output, run the engine and the PyTorch model, and compare layer by layer. Here
    fp16guard does that work: **inspect** (which activations leave FP16's range), **bisect** (which
    module first breaks an FP16 run), **fix** (an FP16 program exact in real arithmetic), and at the end
    the layer-by-layer FP16-vs-FP32 comparison, automated.

    The weights are random (`pretrained=False`: nothing is downloaded) and the overflow is injected:
    one BatchNorm's weight (`stage3.0.branches.0.0.bn2`) is multiplied by 1e5, what a bad fine-tune or
    a mis-merged checkpoint does. Everything after it carries the factor: about 1e9 by the classifier.

    Needs torchvision and timm, which import only beside torch 2.14.1 here, so it runs in a venv of
    its own (docs/testing.md, "Notebooks", says how). 128x128 images; about three minutes on 2 CPU cores,
    most of it bisect's exports.
    """),
    code(setup=True, text="""
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by timm
    import timm
    import torch
    from skimage import data, transform

    from fp16guard.inputs import NamedInput


    def image(name, size=128):
        \"\"\"A scikit-image photo, ImageNet-normalized, float32 [1, 3, size, size].\"\"\"
        img = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True).astype(np.float32)
        x = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        return NamedInput(name, (np.ascontiguousarray(x.transpose(2, 0, 1)[None]),))


    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small_v2", pretrained=False).eval()
    INJECTED = "stage3.0.branches.0.0.bn2"
    with torch.no_grad():
        model.get_submodule(INJECTED).weight.mul_(1e5)

    calibration, validation = [image("astronaut"), image("coffee")], [image("chelsea")]
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"{sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))} BatchNorms")"""),
    md("""
    ## 1. Inspect

    `FInspect` records every module call's input and output range with forward hooks (removed on exit;
    the model is left bit-identical).
    """),
    code("""
    from fp16guard import FInspect
    from fp16guard.inspect.plot import report_figure
    from fp16guard.inspect.render import print_report

    with torch.no_grad(), FInspect(model) as probe:
        for item in calibration:
            model(torch.from_numpy(item.arrays[0]))
    report = probe.report()
    print_report(report, console, top=5)"""),
    md("""
    The transitions table names the layer where values first leave FP16's range: the injected
    BatchNorm, inputs about 30, outputs about 3e6 (`from`), and then every container around it. Nothing
    brings them back (no `to` row): HRNet's BatchNorms run on running statistics in eval mode, so
    they do not renormalize, and the exchange units spread the factor to all four resolutions. The
    static check flags the weight itself (1e5 > 65504) and says no FP16 form of that BatchNorm is exact.
    The plot shows the jump and the plateau beyond the line:
    """),
    code("""
    report_figure(report, title="hrnet_w18_small_v2, one BatchNorm weight x1e5: output amax per layer (FP32)")"""),
    md("""
    ## 2. Bisect

    The model is captured with `torch.export`, its ops grouped by the module that ran them, and a cut
    runs the modules up to it as a typed FP16 ONNX (exported with `torch.onnx`) on the `emulate`
    backend and the rest in FP32 PyTorch. The search names a module, refined to the op inside it.
    """),
    code("""
    from fp16guard.bisection import bisect, print_bisect
    from fp16guard.bisection.plot import bisect_figure

    found = bisect(model, calibration[:1], backend="emulate", source="hrnet_w18_small_v2")
    print_bisect(found, console)"""),
    code("""
    bisect_figure(found)"""),
    md("""
    Cut 78 (up to `stage3.0.branches.0.0.conv2`) is good with an error of 1.6e-4, FP16 rounding; cut 79
    adds the injected BatchNorm and the output is inf. 11 builds instead of 572 candidate cuts. The
    offender, as data:
    """),
    code("""
    o = found.offenders[0]
    print(f"{o.name} ({o.kind}), op {o.op}; the injected module: {o.name == INJECTED}")"""),
    md("""
    ## 3. Fix

    `fix_model` on a PyTorch module keeps it in PyTorch: it captures the module with `torch.export`,
    folds every BatchNorm into its conv in float64, solves for power-of-two scale regions that keep
    every stored value under 2^13, folds the factors into the conv weights, and returns a typed FP16
    program (a `torch.fx.GraphModule` taking and returning FP32 tensors), verified on the strict FP16
    emulation against FP32.
    """),
    code("""
    from fp16guard.fixing.pipeline import fix_model
    from fp16guard.fixing.render import print_verification

    fixed = fix_model(model, calibration, validation=validation, source="hrnet_w18_small_v2")
    plan = fixed.plan
    kinds = {}
    for note in fixed.notes:
        kinds[note.kind] = kinds.get(note.kind, 0) + 1
    print("rewrites:", kinds, "| nodes left in FP32:", len(fixed.conversion.fp32_nodes))
    print(f"{len(plan.regions)} scale regions, k from {min(r.exponent for r in plan.regions)} to "
          f"{max(r.exponent for r in plan.regions)}; the largest:")
    for r in sorted(plan.regions, key=lambda r: -r.amax)[:4]:
        print(f"  k={r.exponent:2}  {len(r.tensors):3} values  amax {r.amax:.3g} -> {r.amax_after:.4g}  "
              f"scope {r.scopes[:2]}")
    for r in plan.rescale_ops:
        print(f"explicit rescale: {r['tensor']} x 2^{r['exponent']}: {r['reason']}")
    print_verification([fixed.verification, fixed.naive, fixed.fallback], console)"""),
    md("""
    What happened: all 164 BatchNorms are folded into their convs, and 58 regions (`k` from 8 to 17)
    follow the factor through HRNet's branches and exchange units; the convs absorb the powers of two
    in their weights. The solver ties every input and output of an `Add` to one exponent, so through
    the residual identities the largest region reaches back to values computed before the injected
    layer (its scope starts at `transition1`): those are stored 2^17 smaller than they are. The logits
    are about 1e8 in FP32: the last linear layer computes them at 2^-14 in FP16, and one `Mul` on the
    FP32 side of the output cast restores them (the one node "left in FP32": an engine whose outputs
    are FP16 could not hold them). The naive FP16 model gives inf for all 1000 logits; the fixed one is
    within about 1% (relative L2). The FP32 fallback is closer (1e-4) because it runs every overflowing
    layer in FP32, here most of what follows the injected BatchNorm; the fixed model's larger error is
    likely the price of those shifted early values, whose smallest entries lose bits in FP16's
    subnormal range.

    ## 4. Layer by layer, FP16 against FP32

    The check done by hand when converting to TensorRT, marking every layer as an output: run the
    model in FP32 and in plain FP16 (`.half()`, PyTorch's own CPU FP16 kernels), record every leaf
    module's output with forward hooks, and compare. The first layer whose FP16 output is inf, or whose
    error jumps, is where to look.
    """),
    code("""
    import copy


    def leaf_outputs(net, x):
        \"\"\"{module name: output of its first call} for every leaf module, in call order.\"\"\"
        seen, hooks = {}, []

        def record(name, output):  # returns None: a forward hook that returns a value replaces the output
            if name not in seen:
                seen[name] = output.detach()

        for name, m in net.named_modules():
            if not list(m.children()):
                hooks.append(m.register_forward_hook(lambda m, i, o, name=name: record(name, o)))
        try:
            with torch.no_grad():
                net(x)
        finally:
            for h in hooks:
                h.remove()
        return seen


    x = torch.from_numpy(validation[0].arrays[0])
    fp32 = leaf_outputs(model, x)
    fp16 = leaf_outputs(copy.deepcopy(model).half(), x.half())
    rows = []
    for name, ref in fp32.items():
        out = fp16[name].float()
        finite = torch.isfinite(out)
        err = float((out - ref).norm() / ref.norm()) if bool(finite.all()) and float(ref.norm()) > 0 else float("inf")
        rows.append((name, float(ref.abs().max()), err, int((~finite).sum())))
    first_bad = next(i for i, r in enumerate(rows) if r[2] > 0.07)
    print(f"{'layer':36} {'FP32 amax':>10} {'FP16 rel. L2':>12} {'inf/NaN':>8}")
    for name, amax, err, bad in rows[first_bad - 4:first_bad + 4]:
        print(f"{name:36} {amax:10.3g} {err:12.3g} {bad:8}")
    print(f"first layer whose FP16 output is off: {rows[first_bad][0]} (layer {first_bad} of {len(rows)})")"""),
    md("""
    The same verdict as bisect, from the other side: every layer before the injected BatchNorm agrees to
    FP16 rounding, and its output is already inf in FP16. Over the whole network:
    """),
    code("""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    errs = [min(r[2], 10.0) for r in rows]
    ax.semilogy(range(len(rows)), [max(e, 1e-6) for e in errs], ".", ms=3, label="relative L2, FP16 vs FP32")
    ax.axvline(first_bad, color="tab:red", lw=1, label=f"first bad: {rows[first_bad][0]}")
    ax.axhline(0.07, color="gray", ls="--", lw=1, label="0.07 (bisect's default tolerance)")
    ax.set_xlabel("leaf module, in call order")
    ax.set_ylabel("relative L2 (inf drawn at 10)")
    ax.legend(fontsize=8, loc="center left")
    ax.set_title("plain .half(): per-layer error against FP32, chelsea at 128x128", fontsize=10)
    fig"""),
    md("""
    ## What to do next

    * Save the FP16 program: `fp16guard.fixing.torch_pass.save_program(fixed.fixed, [(x,)], "hrnet-fp16.pt2")`,
      loaded with `torch.export.load(...).module()`; or `fix_model(model, ..., output="onnx")` for a
      typed FP16 ONNX for TensorRT.
    * On a GPU machine, verify on real FP16 kernels: `fix_model(..., backend="torch")` (PyTorch FP16 on
      CUDA) or `"tensorrt"`.
    * For a network built with TensorRT's API (tensorrtx style, `.wts` files), `fp16guard.trt` applies
      the same plan's regions to the network: README, "TensorRT".
    """),
]

NOTEBOOKS = {
    "01_inspect": NB01,
    "02_bisect_fix": NB02,
    "03_transformer": NB03,
    "04_mmdeploy": NB04,
    "05_hrnet": NB05,
}


#: Local paths in outputs, made relative: the repository, a temporary folder, an environment's packages.
LOCAL_PATHS = [
    (re.compile(r"(?:/[^\s/'\"]+)+/site-packages/"), "site-packages/"),
    (re.compile(re.escape(str(HERE)) + r"/"), ""),
    (re.compile(re.escape(str(HERE.parent)) + r"/"), ""),
    (re.compile(re.escape(tempfile.gettempdir()) + r"/tmp[\w-]+/"), ""),
    (re.compile(re.escape(str(Path.home())) + r"/"), "~/"),
]


def _relative(text: str) -> str:
    for pattern, replacement in LOCAL_PATHS:
        text = pattern.sub(replacement, text)
    return text


def clean_outputs(nb, name: str) -> None:
    """Committed outputs hold what a reader needs: stderr streams (third-party warnings, progress
    noise) are dropped, after being echoed here so that nothing is lost silently, and local paths
    become relative (``tests/test_docs.py`` checks both)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr":
                print(f"{name}: stderr of a cell, not kept:\n{out.text}", file=sys.stderr)
                continue
            if out.output_type == "stream":
                out.text = _relative(out.text)
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    out.data[mime] = _relative(value)
            if out.output_type == "error":
                out.traceback = [_relative(line) for line in out.traceback]
            kept.append(out)
        cell.outputs = kept


def build(name: str):
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks by prefix (01, 02_bisect_fix, ...); default all")
    parser.add_argument("--execute", action="store_true", help="execute with nbclient and keep the outputs")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell when executing")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="without --execute: keep the outputs of the existing notebook (after a markdown-only "
                             "edit); refused if a code cell changed")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.names or any(n.startswith(p) for p in args.names)]
    for name in names:
        nb = build(name)
        path = HERE / f"{name}.ipynb"
        if args.execute:
            from nbclient import NotebookClient

            start = time.perf_counter()
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": str(HERE)}}).execute()
            print(f"{name}: executed in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            clean_outputs(nb, name)
            nb.metadata["language_info"] = {"name": "python"}  # not the local interpreter's version
        elif args.keep_outputs:
            old = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
            new = [c for c in nb.cells if c.cell_type == "code"]
            if [c.source for c in old] != [c.source for c in new]:
                print(f"{name}: a code cell changed; run it with --execute", file=sys.stderr)
                return 1
            for a, b in zip(old, new):
                b.outputs, b.execution_count = a.outputs, a.execution_count
        nbformat.write(nb, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
