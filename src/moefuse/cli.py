"""The ``moefuse`` command line."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files

import torch

from .bench import cli as bench_cli
from .convert import cli as convert_cli
from .train import cli as train_cli


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _device_description() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda: {torch.cuda.device_count()} x {props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def experts_plan_rows(
    model: str, tokens: int, finetuning_type: str, device: torch.device
) -> list[tuple[str, str]]:
    """``moefuse info --model``: the plan (:mod:`moefuse.ops.plan`) of one MoE layer's experts call of ``model``
    with ``tokens`` tokens, on ``device`` under the current settings. The experts' weights are stand-ins of the
    model's shapes and strides (one expert's storage, expanded), so no checkpoint is read or allocated."""
    from .bench.configs import experts_per_token, load_config
    from .bench.shapes import meta_moe_blocks
    from .experts import (
        UnsupportedExpertsError,
        experts_structure,
        lora_refusal,
        stacked_expert_weights,
    )
    from .ops.gating import gating_of
    from .ops.lora import ExpertsLora, LoraWeights
    from .ops.plan import plan_experts

    label, config = load_config(model)
    try:
        experts = meta_moe_blocks(config)[0].experts
        structure = experts_structure(experts)
    except UnsupportedExpertsError as error:
        raise SystemExit(f"moefuse info: {label}: {error}") from None
    gating = None if "post_fn" in structure else gating_of(structure.get("act_fn"), structure.get("gate_fn"))
    gate_up_meta, down_meta = stacked_expert_weights(experts)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    experts_count, hidden, intermediate = down_meta.shape

    def stand_in(like: torch.Tensor, trained: bool = False) -> torch.Tensor:
        one = torch.empty(like.shape[1:], dtype=dtype, device=device).as_strided(
            like.shape[1:], like.stride()[1:]
        )
        return one.expand(like.shape).requires_grad_(trained)

    def factors(out_features: int, in_features: int, rank: int = 16) -> LoraWeights:
        return LoraWeights(
            lora_A=stand_in(torch.empty(experts_count, rank, in_features, device="meta")),
            lora_B=stand_in(torch.empty(experts_count, out_features, rank, device="meta")),
        )

    apart = lora_refusal(experts, ("gate_proj", "up_proj"))
    no_lora = lora_refusal(experts, ("gate_up_proj", "down_proj"))
    if apart is None:
        training = "yes: expert LoRA, 4-bit experts (QLoRA), expert parallelism"
    elif no_lora is None:
        how = (
            "fused on the Triton kernels"
            if gating is not None
            else "composed: PyTorch ops between grouped GEMMs"
        )
        training = (
            f"LoRA and QLoRA on gate_up_proj and down_proj, full fine-tuning, expert parallelism ({how}); "
            f"refused: these experts {apart}"
        )
    else:
        training = f"refused: these experts {no_lora} (experts_implementation: grouped_mm trains them)"
        finetuning_type = "frozen"  # the plan of the forward these experts do run
    gate_up = stand_in(gate_up_meta, finetuning_type == "full")
    down = stand_in(down_meta, finetuning_type == "full")
    lora = ()
    if finetuning_type == "lora":  # lora_target all's: gate and up together
        lora = (ExpertsLora(gate_up=factors(2 * intermediate, hidden), down=factors(hidden, intermediate)),)
    hidden_states = torch.empty(1, hidden, dtype=dtype, device=device).expand(tokens, -1)
    plan = plan_experts(
        hidden_states,
        gate_up,
        down,
        experts_per_token(config),
        gating=gating,
        biases="down_bias" in structure,
        lora=lora,
    )
    where = f"{label}, {tokens} tokens, {finetuning_type}, {device.type}"
    return [("moefuse train, LoRA, QLoRA", training), (f"plan ({where})", plan.describe())]


def cmd_info(args: argparse.Namespace) -> int:
    import moefuse
    from moefuse.ops.backend import active_backend_description, get_backend

    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    rows = [
        ("moefuse", moefuse.__version__),
        ("python", platform.python_version()),
        *(
            (pkg, _version(pkg))
            for pkg in ("torch", "triton", "transformers", "peft", "safetensors", "huggingface_hub")
        ),
        ("device", _device_description()),
        ("experts implementation", f"'{moefuse.EXPERTS_IMPLEMENTATION}' registered in transformers"),
        ("backend", f"{get_backend()} (MOEFUSE_BACKEND=auto|triton|torch)"),
        *((f"experts on {device}", active_backend_description(torch.device(device))) for device in devices),
        (
            "under torch.compile",
            "the fused experts are one custom operator in the graph (no graph break); composed experts on the "
            "Triton kernels run eagerly between graphs",
        ),
    ]
    if args.model:
        rows += experts_plan_rows(args.model, args.tokens, args.finetuning_type, torch.device(devices[0]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def tiny_qwen3_moe_config():
    """The built-in tiny Qwen3-MoE config shipped in the package."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig.from_json_file(str(files("moefuse") / "data" / "tiny-qwen3-moe.json"))


def cmd_demo(args: argparse.Namespace) -> int:
    """Forward+backward of the built-in tiny Qwen3-MoE with moefuse and eager experts: agreement and tokens/s."""
    from transformers import Qwen3MoeForCausalLM

    import moefuse  # noqa: F401  (registers the experts implementation)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = tiny_qwen3_moe_config()
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config).to(device)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    tokens = ids.numel()
    print(
        f"tiny Qwen3-MoE: {config.num_hidden_layers} layers, {config.num_experts} experts, top-{config.num_experts_per_tok}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {tokens} tokens per step on {device}"
    )

    results = {}
    for impl in ("eager", "moefuse"):
        model.set_experts_implementation(impl)
        times = []
        for step in range(args.warmup + args.steps):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[impl] = (loss.item(), grads, sorted(times)[len(times) // 2])
        print(
            f"  {impl:<8} loss {loss.item():.6f}  median step {results[impl][2] * 1e3:8.2f} ms  "
            f"{tokens / results[impl][2]:10.0f} tokens/s"
        )

    (loss_e, grad_e, t_e), (loss_f, grad_f, t_f) = results["eager"], results["moefuse"]
    grad_err = ((grad_f - grad_e).norm() / grad_e.norm()).item()
    ok = abs(loss_f - loss_e) <= 1e-4 * max(1.0, abs(loss_e)) and grad_err < 1e-4
    print(
        f"moefuse vs eager: loss diff {abs(loss_f - loss_e):.2e}, relative grad error {grad_err:.2e}, "
        f"speed-up {t_e / t_f:.2f}x -> {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefuse",
        description="Fast, small fine-tuning of Mixture-of-Experts models inside the Hugging Face ecosystem.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info", help="versions, device, which kernels are active and a model's experts plan"
    )
    info.add_argument(
        "--model", help="print the experts plan of this model: built-in name, config.json or Hub id"
    )
    info.add_argument("--tokens", type=int, default=4096, help="tokens in the planned call (default 4096)")
    info.add_argument(
        "--finetuning_type",
        choices=("lora", "full"),
        default="lora",
        help="LoRA r=16 on every expert projection, frozen weights (default), or trained weights",
    )
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser(
        "demo",
        help="forward+backward of a built-in tiny Qwen3-MoE with moefuse vs eager experts (no download)",
    )
    demo.add_argument("--steps", type=int, default=5, help="timed steps per implementation (default 5)")
    demo.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    demo.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    demo.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    demo.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    convert_cli.add_parsers(sub)
    train_cli.add_parsers(sub)
    bench_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
