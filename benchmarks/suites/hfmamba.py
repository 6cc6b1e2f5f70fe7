"""HF Mamba suite: transformers' MambaForCausalLM decoding greedily, against the same model
with its mixers swapped for rnnkern.nn.Mamba blocks.

Model: ``transformers.MambaConfig`` with a byte-level vocabulary (benchmarks/lm.py's VOCAB) and
8 layers of 256 (benchmarks/lm.CONFIGS["mamba"]), d_state 16, expand 2, d_conv 4, no in/out
bias, conv bias; ``MambaForCausalLM(config).eval()``, fp32, seeded, batch 1, no_grad.

The HF side runs HF's own torch path. Without the ``kernels`` package, mamba_ssm and
causal_conv1d, transformers (5.x) resolves MambaMixer's ``causal_conv1d_fn``/``_update``,
``mamba_selective_scan`` and ``mamba_selective_state_update`` to the plain-PyTorch fallbacks
in modeling_mamba.py: F.conv1d, a Python loop over the prompt's positions for the scan (its
associative scan runs only under torch.compile) and one torch expression per decode step.
(transformers 4.x calls the same path ``MambaMixer.slow_forward``.) The suite records the
versions and whether mamba_ssm / causal_conv1d are importable.

The rnnkern side (:class:`RnnkernMambaLM`) reuses the HF model's embeddings and lm_head and
puts, per layer, an ``rnnkern.nn.Mamba`` with the HF mixer's state_dict loaded strictly (the
names are mamba_ssm's on both sides: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) in
the mixer's place, and an ``rnnkern.nn.RMSNormGated`` (no gate, one group: the same RMSNorm)
holding each MambaRMSNorm's weight and epsilon in the norm's (one C++ call per token on CPU,
where HF's norm is six torch ops). Each block computes as
HF's MambaBlock: residual = h; h = norm(h); residual in fp32 if config.residual_in_fp32;
h = residual + mixer(h); then norm_f and lm_head, logits in fp32.

What is compared: greedy ids from the same prompt, checked before timing, of
  transformers           an explicit greedy loop over HF's forward: the prompt with use_cache=True,
                         then one token per call with the cache it returned, argmax each time
  transformers generate  ``model.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)`` (no EOS token: nothing is masked, nothing stops early)
  rnnkern                ``RnnkernMambaLM.generate``: Mamba.prefill per layer, then Mamba.step per
                         layer and token (one C++ call per block on the cpu backend)
A case whose generated ids differ anywhere (or whose prompt logits differ by more than
LOGITS_ATOL) is recorded as skipped, with the first differing position, and not timed.

What is timed, taking turns (timing.measure_together): the decoding alone, the n - 1 tokens
after the first, of the transformers loop and of rnnkern, each from its own prefill of the
prompt made before the timer starts (the two prefills differ in kind: HF's torch path scans
the prompt position by position, rnnkern's in one call).
"""
import importlib
import importlib.util
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import rnnkern.nn
from benchmarks import lm, report
from benchmarks.report import progress
from benchmarks.timing import Settings, measure_together

SECTION = "models"
COLUMNS = [
    ("ms/token", lambda r: f"{r['ms_per_token']:.4g}"),
    ("tokens/s", lambda r: f"{1e3 / r['ms_per_token']:.4g}"),
    ("IQR ms", lambda r: f"{(r['ms_q3'] - r['ms_q1']) / (r['new_tokens'] - 1):.2g}"),
    ("vs HF", lambda r: f"{r['speedup_vs_hf']:.2f}"),
    ("weight MB/token", lambda r: f"{r['weight_bytes_per_token'] / 1e6:.2f}" if "weight_bytes_per_token" in r else "-"),
    ("GB/s", lambda r: f"{r['weight_gbps']:.2f}" if "weight_gbps" in r else "-"),
]
LEGEND = (
    "shape: batch x prompt tokens x new tokens; ms/token: median of the decoding after the prompt (new\n"
    "tokens - 1 steps, the prefill outside the timer) / its steps; IQR likewise; vs HF: the transformers\n"
    "loop's median / this median (above 1: faster); weight MB/token: parameter bytes one rnnkern decode\n"
    "step reads (every mixer and norm, one embedding row, lm_head), from the model's tensors; GB/s: that /\n"
    "ms per token"
)
LOGITS_ATOL = 1e-4
OP = "MambaForCausalLM"


def unavailable() -> Optional[str]:
    """Why the suite cannot run here (transformers missing), or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install rnnkern[peers])"
    return None


def hf_config(d_model: int = lm.CONFIGS["mamba"].d_model, layers: int = lm.CONFIGS["mamba"].layers):
    transformers = importlib.import_module("transformers")
    return transformers.MambaConfig(
        vocab_size=lm.VOCAB, hidden_size=d_model, num_hidden_layers=layers, state_size=16, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )


def build_hf(config, seed: int = 0) -> nn.Module:
    """``MambaForCausalLM(config).eval()``, its weights drawn from `seed`, no EOS token."""
    transformers = importlib.import_module("transformers")
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id
    return model


class RnnkernMambaLM(nn.Module):
    """An HF MambaForCausalLM's embeddings and head around rnnkern.nn.Mamba mixers and
    rnnkern.nn.RMSNormGated norms.

    The HF model's embeddings and head are shared, not copied; each HF mixer's state_dict is
    loaded strictly into an ``rnnkern.nn.Mamba`` of the same sizes, each norm's weight into an
    ``rnnkern.nn.RMSNormGated``. Blocks compute as HF's MambaBlock.

        logits, states = model.prefill(tokens)     # (B, T) -> (B, T, V), [(conv_state, ssm_state)] per layer
        logits, states = model.step(token, states)  # (B,) -> (B, V); states updated in place
        tokens = model.generate(prompt, n)          # (B, T) -> (B, n), greedy
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        config, backbone = hf_model.config, hf_model.backbone
        self.residual_in_fp32 = config.residual_in_fp32
        self.embeddings = backbone.embeddings
        self.norms = nn.ModuleList(rnnkern_norm(layer.norm) for layer in backbone.layers)
        self.mixers = nn.ModuleList(rnnkern_mixer(layer.mixer, config, i) for i, layer in enumerate(backbone.layers))
        self.norm_f = rnnkern_norm(backbone.norm_f)
        self.lm_head = hf_model.lm_head

    def _block(self, norm: nn.Module, mix: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
        """HF's MambaBlock: pre-norm, the residual in fp32 where the config says so."""
        residual = hidden.float() if self.residual_in_fp32 else hidden
        return residual + mix(norm(hidden.to(norm.weight.dtype)))

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm_f(hidden).to(self.lm_head.weight.dtype)).float()

    def prefill(self, tokens: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        hidden, states = self.embeddings(tokens), []
        for norm, mixer in zip(self.norms, self.mixers):
            def mix(x, mixer=mixer):
                out, conv_state, ssm_state = mixer.prefill(x)
                states.append((conv_state, ssm_state))
                return out
            hidden = self._block(norm, mix, hidden)
        return self._logits(hidden), states

    def step(self, token: Tensor, states: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        hidden = self.embeddings(token)[:, None]  # (B, 1, d_model)
        for norm, mixer, (conv_state, ssm_state) in zip(self.norms, self.mixers, states):
            hidden = self._block(norm, lambda x, m=mixer, c=conv_state, s=ssm_state: m.step(x, c, s)[0], hidden)
        return self._logits(hidden)[:, 0], states

    def generate(self, prompt: Tensor, new_tokens: int) -> Tensor:
        logits, states = self.prefill(prompt)
        token = logits[:, -1].argmax(-1)
        generated = [token]
        for _ in range(new_tokens - 1):
            logits, states = self.step(token, states)
            token = logits.argmax(-1)
            generated.append(token)
        return torch.stack(generated, dim=1)

    def decode(self, prefilled: tuple[Tensor, list], new_tokens: int) -> Tensor:
        """generate after its prompt: new_tokens - 1 greedy steps from ``prefill``'s output."""
        logits, states = prefilled
        token, generated = logits[:, -1].argmax(-1), []
        for _ in range(new_tokens - 1):
            logits, states = self.step(token, states)
            generated.append(token)
            token = logits.argmax(-1)
        return torch.stack(generated, dim=1)

    def weight_bytes_per_token(self) -> int:
        """Parameter bytes one decode step reads: every mixer and norm, one embedding row, lm_head."""
        tensors = [*self.mixers.parameters(), *self.norms.parameters(), *self.norm_f.parameters(),
                   *self.lm_head.parameters()]
        row = self.embeddings.weight[0]
        return sum(t.numel() * t.element_size() for t in tensors) + row.numel() * row.element_size()


def rnnkern_norm(hf_norm: nn.Module) -> rnnkern.nn.RMSNormGated:
    """HF's MambaRMSNorm (weight * x / sqrt(mean(x^2) + eps)) as rnnkern.nn.RMSNormGated."""
    weight = hf_norm.weight
    norm = rnnkern.nn.RMSNormGated(weight.shape[0], eps=hf_norm.variance_epsilon, device=weight.device,
                                   dtype=weight.dtype)
    norm.load_state_dict(hf_norm.state_dict(), strict=True)
    return norm


def rnnkern_mixer(hf_mixer: nn.Module, config, layer_idx: int) -> rnnkern.nn.Mamba:
    """An rnnkern.nn.Mamba of the HF mixer's sizes, with its state_dict loaded strictly."""
    weight = hf_mixer.in_proj.weight
    mixer = rnnkern.nn.Mamba(d_model=config.hidden_size, d_state=config.state_size, d_conv=config.conv_kernel,
                             expand=config.expand, dt_rank=hf_mixer.time_step_rank, bias=config.use_bias,
                             conv_bias=config.use_conv_bias, layer_idx=layer_idx, device=weight.device,
                             dtype=weight.dtype)
    mixer.load_state_dict(hf_mixer.state_dict(), strict=True)  # same names: in_proj, conv1d, ..., A_log, D
    return mixer.eval()


def hf_loop(model: nn.Module, prompt: Tensor, new_tokens: int) -> Tensor:
    """Greedy decoding with HF's forward and the cache it returns, one token per call."""
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1)
    generated = [token]
    for _ in range(new_tokens - 1):
        out = model(token[:, None], cache=out.cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        generated.append(token)
    return torch.stack(generated, dim=1)


def hf_decode(model: nn.Module, prefilled, new_tokens: int) -> Tensor:
    """The transformers loop after its prompt: new_tokens - 1 greedy steps from `prefilled`
    (the output of ``model(prompt, use_cache=True)``)."""
    out, generated = prefilled, []
    for _ in range(new_tokens - 1):
        token = out.logits[:, -1].argmax(-1)
        out = model(token[:, None], cache=out.cache, use_cache=True)
        generated.append(token)
    return torch.stack(generated, dim=1)


def hf_generate(model: nn.Module, prompt: Tensor, new_tokens: int) -> Tensor:
    """``model.generate``, greedy, exactly `new_tokens` new ids (B, new_tokens)."""
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones_like(prompt))
    return out[:, prompt.shape[1]:]


def sizes(quick: bool) -> tuple[int, int]:
    """(prompt tokens, new tokens)."""
    return (16, 32) if quick else (16, 64)


def run(settings: Settings) -> list[dict[str, Any]]:
    prompt_tokens, new_tokens = sizes(settings.quick)
    reason = unavailable()
    if reason is None and settings.device.type != "cpu":
        reason = "the HF side runs its CPU torch path; this suite times CPU only"
    if reason is not None:
        return [{**_identity(name, 1, prompt_tokens, new_tokens), "skipped": reason} for name in BACKENDS]
    return run_case(hf_config(), prompt_tokens, new_tokens, settings)


BACKENDS = ("transformers", "rnnkern")  # timed; "transformers generate" is checked only


def run_case(config, prompt_tokens: int, new_tokens: int, settings: Settings, seed: int = 0) -> list[dict[str, Any]]:
    """The records of one model and prompt: three measured, or three skipped with the reason."""
    hf_model = build_hf(config, seed)
    ours = RnnkernMambaLM(hf_model)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    calls = {"transformers": lambda: hf_loop(hf_model, prompt, new_tokens),
             "transformers generate": lambda: hf_generate(hf_model, prompt, new_tokens),
             "rnnkern": lambda: ours.generate(prompt, new_tokens)}
    identity = {name: _identity(name, 1, prompt_tokens, new_tokens) for name in calls}
    with torch.no_grad():
        mismatch, checks = check(hf_model, ours, prompt, calls)
        if mismatch is not None:
            progress(f"hfmamba: not timed, {mismatch}")
            return [{**identity[name], **checks, "skipped": mismatch} for name in BACKENDS]
        progress(f"hfmamba greedy decode of {new_tokens - 1} tokens after {prompt_tokens}: transformers, rnnkern")
        decoders = [lambda prefilled: hf_decode(hf_model, prefilled, new_tokens),
                    lambda prefilled: ours.decode(prefilled, new_tokens)]
        prefills = [lambda: (hf_model(prompt, use_cache=True),), lambda: (ours.prefill(prompt),)]
        timings = measure_together(decoders, settings, prefills)
    decoded = new_tokens - 1
    baseline_ms = timings[0].median_ms
    records = []
    for name, timing in zip(BACKENDS, timings):
        record = {**identity[name], **timing.as_record(), **checks, "ms_per_token": timing.median_ms / decoded,
                  "speedup_vs_hf": baseline_ms / timing.median_ms}
        if name == "rnnkern":
            record["weight_bytes_per_token"] = ours.weight_bytes_per_token()
            record["weight_gbps"] = record["weight_bytes_per_token"] / (record["ms_per_token"] * 1e6)
        records.append(record)
    return records


def check(hf_model: nn.Module, ours: RnnkernMambaLM, prompt: Tensor,
          calls: dict[str, Callable[[], Tensor]]) -> tuple[Optional[str], dict[str, Any]]:
    """(why the sides disagree or None, what was compared): the prompt's logits within
    LOGITS_ATOL, then every call's generated ids equal to the transformers loop's."""
    hf_logits = hf_model(prompt, use_cache=False).logits
    our_logits, _ = ours.prefill(prompt)
    checks = {"prompt_logits_max_abs_diff": (hf_logits - our_logits).abs().max().item(),
              "logits_atol": LOGITS_ATOL, "hf_kernels": hf_kernel_packages()}
    if not checks["prompt_logits_max_abs_diff"] <= LOGITS_ATOL:
        return f"prompt logits differ by {checks['prompt_logits_max_abs_diff']:.3g} > {LOGITS_ATOL:g}", checks
    generated = {name: call() for name, call in calls.items()}
    expected = generated["transformers"]
    for name, tokens in generated.items():
        if tokens.shape != expected.shape:
            return f"{name} generated {tuple(tokens.shape)} ids, transformers {tuple(expected.shape)}", checks
        differ = (tokens != expected).any(0).nonzero()
        if len(differ):
            return f"{name}'s greedy ids differ from transformers' first at new token {differ[0].item()}", checks
    checks["generated_ids"] = expected[0].tolist()
    return None, checks


def hf_kernel_packages() -> dict[str, bool]:
    """Which optional fast paths HF could pick up (none are expected: the torch path runs)."""
    return {name: importlib.util.find_spec(name) is not None for name in ("kernels", "mamba_ssm", "causal_conv1d")}


def _identity(backend: str, batch: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    return {"suite": "hfmamba", "op": OP, "backend": backend, "direction": "greedy decode",
            "shape": [batch, prompt_tokens, new_tokens], "dtype": report.dtype_name(torch.float32), "device": "cpu",
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
